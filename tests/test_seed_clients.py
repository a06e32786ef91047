"""The client code of the user's seed README, as written there, against the real server
with one WebRTC session open (a browser's, played here by aiortc). Each snippet runs in a
process of its own, as a user would run it; only the host, port and file paths are filled
in. ``sessionid`` 0 (or none) is the default session: the only open one."""
from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.client import AvatarClient
from tests.support.media_analysis import wav_bytes
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.slow

WEBSOCKET = """
import asyncio
import aiohttp

async def send_message_via_websocket():
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect('ws://localhost:8010/humanecho') as ws:
            print("WebSocket connection established!")
            
            # Send a text message
            await ws.send_str("Hello, Avatar!")
            
            # Receive response (if any)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    print(f"Response from server: {msg.data}")
                elif msg.type == aiohttp.WSMsgType.CLOSED:
                    break

# Run the WebSocket client
asyncio.run(send_message_via_websocket())
"""

UPLOAD = """
import aiohttp

async def upload_audio_file(session_id, file_path):
    async with aiohttp.ClientSession() as session:
        with open(file_path, 'rb') as file:
            audio_data = {'file': file}
            payload = {'sessionid': str(session_id)}
            form = aiohttp.FormData()
            form.add_field('sessionid', str(session_id))
            form.add_field('file', open(file_path, 'rb'), filename=file_path)
            
            async with session.post('http://localhost:8010/humanaudio', data=form) as response:
                response_json = await response.json()
                print(f"Response: {response_json}")

# Example usage
session_id = 0
file_path = '/path/to/your/audio.wav'
asyncio.run(upload_audio_file(session_id, file_path))
"""

SET_AUDIOTYPE = """
import aiohttp

async def set_audio_type(session_id, audio_type, reinit=False):
    payload = {
        'sessionid': session_id,
        'audiotype': audio_type,
        'reinit': reinit
    }
    
    async with aiohttp.ClientSession() as session:
        async with session.post('http://localhost:8010/set_audiotype', json=payload) as response:
            result = await response.json()
            print(f"Audio type set response: {result}")

# Example usage
asyncio.run(set_audio_type(0, 'stereo', reinit=True))
"""

RECORD = """
import aiohttp

async def record_avatar(session_id, action_type):
    payload = {
        'sessionid': session_id,
        'type': action_type  # either 'start_record' or 'end_record'
    }
    
    async with aiohttp.ClientSession() as session:
        async with session.post('http://localhost:8010/record', json=payload) as response:
            result = await response.json()
            print(f"Record action response: {result}")

# Example usage to start recording
asyncio.run(record_avatar(0, 'start_record'))

# Example usage to stop recording
asyncio.run(record_avatar(0, 'end_record'))
"""

IS_SPEAKING = """
import aiohttp

async def is_avatar_speaking(session_id):
    payload = {
        'sessionid': session_id
    }
    
    async with aiohttp.ClientSession() as session:
        async with session.post('http://localhost:8010/is_speaking', json=payload) as response:
            result = await response.json()
            print(f"Is avatar speaking: {result['data']}")

# Example usage
asyncio.run(is_avatar_speaking(0))
"""

# The seed's Python snippets use asyncio without importing it (the README imports it once,
# higher up, for the WebSocket example); a user pastes them below that import.
PRELUDE = "import asyncio\n"


async def run_python(code: str, server: ServerProcess, timeout: float = 30.0, **paths: str) -> str:
    code = code.replace("localhost:8010", server.url.removeprefix("http://"))
    for old, new in paths.items():
        code = code.replace(old, new)
    proc = await asyncio.create_subprocess_exec(  # unbuffered: the WebSocket one is stopped, not ended
        sys.executable, "-u", "-c", PRELUDE + code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    reader = asyncio.ensure_future(proc.stdout.read())  # all it prints, whether it ends or is stopped
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
    return (await reader).decode()


async def run_curl(args: list[str], server: ServerProcess) -> str:
    args = [a.replace("http://<server-ip>:8010", server.url).replace("http://localhost:8010", server.url) for a in args]
    proc = await asyncio.create_subprocess_exec("curl", "-s", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode()


@pytest.fixture
def speech_wav(tmp_path: Path) -> Path:
    t = np.arange(int(16_000 * 1.2)) / 16_000
    path = tmp_path / "audiofile.wav"
    path.write_bytes(wav_bytes(0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0)))
    return path


async def test_the_seed_python_snippets_work_as_written(server: ServerProcess, speech_wav: Path) -> None:
    async with AvatarClient(server.url, keep_images=False) as browser:
        await browser.connect()
        # /humanecho with no sessionid: the text is spoken, events come back
        out = await run_python(WEBSOCKET, server, timeout=6.0)
        assert "WebSocket connection established!" in out
        assert '"event": "queued"' in out and '"event": "speaking_started"' in out, out
        await browser.wait_speaking(False)
        out = await run_python(UPLOAD, server, **{"/path/to/your/audio.wav": str(speech_wav)})
        assert "'code': 0" in out and "'seconds': 1.2" in out, out
        out = await run_python(IS_SPEAKING, server)
        assert "Is avatar speaking: True" in out, out
        await browser.wait_speaking(False)
        out = await run_python(SET_AUDIOTYPE, server)
        assert "'code': 0" in out and "'switched': False" in out, out
        out = await run_python(RECORD, server)
        assert out.count("'code': 0") == 2 and "/record/" in out, out
        out = await run_python(IS_SPEAKING, server)
        assert "Is avatar speaking: False" in out, out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
async def test_the_seed_curl_commands_work_as_written(server: ServerProcess, speech_wav: Path) -> None:
    async with AvatarClient(server.url, keep_images=False) as browser:
        await browser.connect()
        out = await run_curl(["-X", "POST", "http://<server-ip>:8010/humanaudio", "-F", "sessionid=0", "-F", f"file=@{speech_wav}"], server)
        assert '"code": 0' in out, out
        out = await run_curl(["-X", "POST", "http://<server-ip>:8010/is_speaking", "-H", "Content-Type: application/json",
                              "-d", '{\n          "sessionid": 0\n        }'], server)
        assert '"data": true' in out, out
        await browser.wait_speaking(False)
        out = await run_curl(["-X", "POST", "http://<server-ip>:8010/set_audiotype", "-H", "Content-Type: application/json",
                              "-d", '{\n          "sessionid": 0,\n          "audiotype": "stereo",\n          "reinit": false\n        }'],
                             server)
        assert '"code": 0' in out, out
        for kind in ("start_record", "end_record"):
            out = await run_curl(["-X", "POST", "http://<server-ip>:8010/record", "-H", "Content-Type: application/json",
                                  "-d", f'{{\n          "sessionid": 0,\n          "type": "{kind}"\n        }}'], server)
            assert '"code": 0' in out, out
        out = await run_curl(["http://localhost:8010/digital_human/check"], server)
        assert out == '{"status": "Server is running"}'
