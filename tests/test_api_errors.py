"""Bad input gets a clear 4xx JSON error and never takes the server or a session down."""
from __future__ import annotations

import aiohttp
import pytest

from tests.support.client import AvatarClient

pytestmark = pytest.mark.slow


async def _post_raw(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


def assert_error(status: int, body: dict, expected: int, words: str) -> None:
    assert status == expected, (status, body)
    assert body["code"] != 0 and isinstance(body["code"], int)
    assert words.lower() in body["msg"].lower(), body["msg"]


@pytest.mark.parametrize(
    "path", ["/human", "/is_speaking", "/interrupt_talk", "/set_audiotype", "/record", "/offer"]
)
async def test_invalid_json_is_a_400_naming_the_problem(server, path: str) -> None:
    status, body = await _post_raw(server.url + path, b"{not json")
    assert_error(status, body, 400, "not valid JSON")
    status, body = await _post_raw(server.url + path, b"[1, 2]")
    assert_error(status, body, 400, "JSON object")


async def test_unknown_session_and_missing_fields(server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/human", json={"sessionid": "nope", "text": "hi"}) as r:
            assert_error(r.status, await r.json(), 404, "unknown session")
        async with http.post(server.url + "/human", json={"text": "hi"}) as r:  # no sessionid: the default session
            assert_error(r.status, await r.json(), 404, "no session is open")
        async with http.post(server.url + "/offer", json={"type": "offer"}) as r:
            assert_error(r.status, await r.json(), 400, "missing field 'sdp'")
        async with http.post(server.url + "/offer", json={"sdp": "garbage", "type": "offer"}) as r:
            body = await r.json()
            assert r.status == 400 and body["code"] != 0
        async with http.post(server.url + "/offer", json={"sdp": "x", "type": "offer", "avatar": "../etc"}) as r:
            assert_error(r.status, await r.json(), 400, "invalid avatar name")
        async with http.post(server.url + "/offer", json={"sdp": "x", "type": "offer", "avatar": "nobody"}) as r:
            assert_error(r.status, await r.json(), 404, "not prepared")
        async with http.get(server.url + "/no/such/route") as r:
            assert_error(r.status, await r.json(), 404, "no such route")
        async with http.get(server.url + "/human") as r:
            assert_error(r.status, await r.json(), 405, "not allowed")
        async with http.get(server.url + "/humanecho?sessionid=nope") as r:
            assert_error(r.status, await r.json(), 404, "unknown session")


async def test_bad_fields_on_a_live_session_leave_it_working(server) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()
        sid = client.session_id
        cases = [
            ("/human", {"sessionid": sid, "text": "   "}, 400, "empty"),
            ("/human", {"sessionid": sid, "text": 42}, 400, "must be a string"),
            ("/human", {"sessionid": sid, "text": "x" * 6000}, 400, "too long"),
            ("/human", {"sessionid": sid, "text": "hi", "type": "sing"}, 400, "'echo' or 'chat'"),
            ("/human", {"sessionid": sid, "text": "hi", "interrupt": "maybe"}, 400, "true or false"),
            ("/set_audiotype", {"sessionid": sid, "audiotype": [1]}, 400, "integer"),
            ("/set_audiotype", {"sessionid": sid, "audiotype": 7}, 400, "not a clip"),
            ("/record", {"sessionid": sid, "type": "pause"}, 400, "start_record"),
            ("/record", {"sessionid": sid, "type": "end_record"}, 409, "not recording"),
        ]
        assert client.http is not None
        for path, body, status, words in cases:
            async with client.http.post(server.url + path, json=body, headers=client.headers) as r:
                reply = await r.json()
                assert r.status == status, (path, body, reply)
            assert reply["code"] != 0 and words.lower() in reply["msg"].lower(), (path, body, reply)
        ok = await client.post("/set_audiotype", {"sessionid": sid, "audiotype": 0, "reinit": True})
        assert ok["code"] == 0
        # the session still speaks after all that
        await client.say("Still here.")
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=15)


async def test_non_audio_empty_and_oversize_uploads_are_refused(server) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()

        async def upload(data: bytes, name: str) -> tuple[int, dict]:
            form = aiohttp.FormData()
            form.add_field("sessionid", client.session_id)
            form.add_field("file", data, filename=name, content_type="application/octet-stream")
            async with client.http.post(server.url + "/humanaudio", data=form, headers=client.headers) as r:
                return r.status, await r.json()

        status, body = await upload(b"this is not audio at all" * 100, "notes.txt")
        assert_error(status, body, 400, "audio")
        status, body = await upload(b"", "empty.wav")
        assert_error(status, body, 400, "empty")
        status, body = await upload(b"\0" * (21 * 1024 * 1024), "huge.wav")
        assert_error(status, body, 413, "too large")
        async with client.http.post(server.url + "/humanaudio", json={"sessionid": client.session_id}, headers=client.headers) as r:
            assert_error(r.status, await r.json(), 400, "multipart")
        assert await client.is_speaking() is False
    async with aiohttp.ClientSession() as http, http.get(server.url + "/digital_human/check") as r:
        assert (await r.json()) == {"status": "Server is running"}
