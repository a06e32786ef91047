"""Bad input never gets a 5xx: a property-based fuzz of every operation in /openapi.json
(schemathesis, schema-valid and schema-violating cases) and hand-written cases for what an
attack report once turned into HTTP 500s. Every error must be the JSON envelope, and a canary
session open throughout must still speak afterwards.

In-process (``tests/support/harness.py``), except the last test, which sends the known
cases to a real server process. The fuzz is derandomized (the same cases every run);
``LIPSYNC_FUZZ_EXAMPLES=N`` sets the cases per operation and mode (default 30) and
``LIPSYNC_FUZZ_SEED=S`` draws other cases.
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup  # the checks' verdict: a BaseExceptionGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server.errors import ErrorCode, error_middleware
from server.openapi import OPENAPI_PATH
from tests.support.client import AvatarClient
from tests.support.harness import Harness, Viewer, running_server
from tests.support.server_process import ServerProcess

EXAMPLES = int(os.environ.get("LIPSYNC_FUZZ_EXAMPLES", "30"))
SEED = os.environ.get("LIPSYNC_FUZZ_SEED")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
MODES = [GenerationMode(value) for value in ("positive", "negative")]  # schema-valid cases, then schema-violating ones
TOKEN = "fuzz-token"
BIG_INT = "1" + "0" * 5000  # past Python's 4,300-digit int parse limit
LONG_NAME = "a" * 300  # past the 255-byte limit of one path component
STREAM_READ_S = 1.0


def is_event_stream(operation: schemathesis.APIOperation) -> bool:
    responses = operation.definition.raw.get("responses", {})
    return any("text/event-stream" in (r.get("content") or {}) for r in responses.values() if isinstance(r, dict))


def envelope_problem(status: int, body: bytes, content_type: str) -> str | None:
    """What is wrong with an error response, if anything: it must be JSON {"code": non-zero int, "msg": text}."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"a {status} that is not JSON ({content_type}): {body[:200]!r}"
    try:
        reply = json.loads(body)
    except ValueError:
        return f"a {status} whose body is not JSON: {body[:200]!r}"
    code, msg = reply.get("code") if isinstance(reply, dict) else None, reply.get("msg") if isinstance(reply, dict) else None
    if not isinstance(code, int) or isinstance(code, bool) or code == 0 or not isinstance(msg, str) or not msg:
        return f"a {status} without the error envelope: {reply!r}"
    return None


def content_type(response: schemathesis.Response) -> str:
    values = {name.lower(): value for name, value in response.headers.items()}.get("content-type") or [""]
    return values[0] if isinstance(values, list) else str(values)


def runner(operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str, http: requests.Session,
           examples: int, seen: Counter[str]) -> Callable[[], None]:
    """One Hypothesis test: ``examples`` cases of ``operation`` in ``mode``, each sent and checked."""

    # An event stream (GET /events on the canary) never ends on its own: read a second of it.
    timeout = STREAM_READ_S if is_event_stream(operation) else 30

    @settings(max_examples=examples, deadline=None, database=None, derandomize=SEED is None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=http, allow_redirects=False, timeout=timeout)
        seen[f"{operation.label} {response.status_code}"] += 1
        problem = envelope_problem(response.status_code, response.content, content_type(response))
        assert problem is None, f"{problem}\nReproduce with: {case.as_curl_command()}"
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as exc:
            raise AssertionError(f"{exc.message}\n[{response.status_code}] {response.content[:500]!r}\n"
                                 f"Reproduce with: {case.as_curl_command()}") from None

    return seed(int(SEED))(run) if SEED is not None else run


def fuzz(spec: dict[str, Any], base_url: str, examples: int) -> tuple[list[str], Counter[str]]:
    """Every operation of ``spec``, ``examples`` schema-valid and as many schema-violating cases
    each, against ``base_url`` (blocking: run it in a thread). Returns the failures and the
    statuses seen per operation."""
    schema = schemathesis.openapi.from_dict(spec)
    http = requests.Session()
    failures: list[str] = []
    seen: Counter[str] = Counter()
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"an operation of the spec does not load: {result.err()}")
            continue
        operation = result.ok()
        for mode in MODES:
            try:
                runner(operation, mode, base_url, http, examples, seen)()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{operation.label}: no schema-valid case can be generated")
                # else: nothing in the operation to violate (no parameters, no body)
            except Exception as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures, seen


async def assert_still_speaks(h: Harness, canary: Viewer) -> None:
    """The canary session answers, speaks a new utterance (is_speaking goes true) and shows its frames."""
    sid = canary.session.id
    status, _ = await h.post("/interrupt_talk", {"sessionid": sid})
    assert status == 200
    status, reply = await h.post("/human", {"sessionid": sid, "text": "Still here."})
    assert status == 200, reply
    utterance = reply["data"]["utterance"]
    status, reply = await h.post("/is_speaking", {"sessionid": sid})
    assert status == 200 and reply["data"] is True
    await h.until(lambda: canary.shown(utterance), timeout=10)
    async with h.client.get("/health") as resp:
        assert resp.status == 200


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


async def test_fuzz_every_operation_against_the_spec(h: Harness) -> None:
    canary = await h.viewer()  # also the default session: the fuzz drives it whenever it sends no sessionid
    async with h.client.get(OPENAPI_PATH) as resp:
        spec = await resp.json()
    base_url = str(h.client.make_url("")).rstrip("/")
    failures, seen = await asyncio.to_thread(fuzz, spec, base_url, EXAMPLES)
    assert not failures, "\n\n".join(failures)
    answered = {key.rsplit(" ", 1)[0] for key in seen}
    documented = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert answered == documented, f"operations the fuzz never reached: {documented - answered}"
    assert not [key for key in seen if key.rsplit(" ", 1)[1].startswith("5")]
    await assert_still_speaks(h, canary)
    assert not canary.session.closed and len(h.manager) == 1


async def test_fuzz_without_the_token_gets_json_401s(tmp_path: Path) -> None:
    async with running_server(tmp_path, token=TOKEN) as guarded:
        async with guarded.client.get(OPENAPI_PATH) as resp:
            spec = await resp.json()
        base_url = str(guarded.client.make_url("")).rstrip("/")
        failures, seen = await asyncio.to_thread(fuzz, spec, base_url, 5)
    assert not failures, "\n\n".join(failures)
    assert seen["POST /human 401"] > 0 and seen["GET /stats 401"] > 0


def undecodable_wav() -> bytes:
    """A WAV whose header says 0 bits per sample: PyAV opens it, but has no decoder for it."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 0, 0, 0)
    data = b"\0" * 64
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def known_cases(sid: str, secret: str) -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    """(method, path, body, headers, status, words in msg): inputs that were 500s."""
    own = {"X-Session-Secret": secret}
    dh = {"user_id": "u1", "request_id": "r1", "streamer_id": "tiny"}
    multipart = {"Content-Type": "multipart/form-data; boundary=xx"}

    def part(headers: str, value: bytes, name: str = "sessionid") -> bytes:
        return (f'--xx\r\nContent-Disposition: form-data; name="{name}"{headers}\r\n\r\n').encode() + value + b"\r\n--xx--\r\n"

    def js(body: dict[str, Any]) -> bytes:
        return json.dumps(body).encode()

    return [
        # integers past the 4,300-digit limit, anywhere in the body
        ("POST", "/human", f'{{"sessionid": {BIG_INT}, "text": "hi"}}'.encode(), {}, 400, "4300 digits"),
        ("POST", "/is_speaking", f'{{"sessionid": "{sid}", "x": [{BIG_INT}]}}'.encode(), own, 400, "4300 digits"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": -{BIG_INT}}}'.encode(), own, 400, "4300 digits"),
        # nesting past the recursion limit
        ("POST", "/human", b"[" * 100_000, {}, 400, "too deeply"),
        ("POST", "/offer", b'{"a":' * 50_000, {}, 400, "too deeply"),
        ("POST", "/digital_human/gen", b'{"tts_path": ' + b"[" * 20_000, {}, 400, "too deeply"),
        # Infinity, NaN and 1e400 where an integer or a bool is expected
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": Infinity}}'.encode(), own, 400, "not a JSON value"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": -Infinity}}'.encode(), own, 400, "not a JSON value"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": NaN}}'.encode(), own, 400, "not a JSON value"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": 1e400}}'.encode(), own, 400, "out of range"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": 1.5}}'.encode(), own, 400, "must be an integer"),
        ("POST", "/human", f'{{"sessionid": "{sid}", "text": "hi", "interrupt": 1e400}}'.encode(), own, 400, "out of range"),
        ("POST", "/set_audiotype", f'{{"sessionid": "{sid}", "audiotype": 0, "reinit": NaN}}'.encode(), own, 400, "not a JSON value"),
        # strings no field takes: NUL, unpaired surrogates; a secret that is not a string
        ("POST", "/human", js({"sessionid": sid, "text": "a\0b"}), own, 400, "NUL"),
        ("POST", "/human", b'{"text": "\\ud800 hello"}', {}, 400, "unpaired surrogate"),
        ("POST", "/human", js({"sessionid": sid, "text": "hi"})[:-1] + b', "secret": "\\udfff"}', {}, 400, "unpaired surrogate"),
        ("POST", "/offer", b'{"sdp": "\\udc80", "type": "offer"}', {}, 400, "unpaired surrogate"),
        ("POST", "/human", js({"sessionid": sid, "text": "hi", "secret": 12}), {}, 400, "'secret' must be a string"),
        # NUL bytes and over-long components in /digital_human paths and ids
        ("POST", "/digital_human/preprocess", js({**dh, "video_path": "video/a\0.mp4"}), {}, 400, "NUL"),
        ("POST", "/digital_human/preprocess", js({**dh, "video_path": LONG_NAME}), {}, 400, "longer than 255 bytes"),
        ("POST", "/digital_human/gen", js({**dh, "tts_path": f"audio/{LONG_NAME}/x.wav"}), {}, 400, "longer than 255 bytes"),
        ("POST", "/digital_human/gen", js({**dh, "tts_path": "é" * 200}), {}, 400, "longer than 255 bytes"),
        ("POST", "/digital_human/gen", js({**dh, "tts_path": "ab/" * 2000}), {}, 400, "not a usable path"),
        ("POST", "/digital_human/gen", js({**dh, "user_id": "u\0", "tts_path": "a.wav"}), {}, 400, "user_id"),
        ("POST", "/digital_human/gen", js({**dh, "request_id": LONG_NAME, "tts_path": "a.wav"}), {}, 400, "too long"),
        ("GET", "/" + LONG_NAME, b"", {}, 404, "no such route or file"),
        ("GET", "/a%00b.html", b"", {}, 404, "no such route or file"),
        ("GET", f"/{LONG_NAME}/{LONG_NAME}.js", b"", {}, 404, "no such route or file"),
        ("GET", "/record/" + LONG_NAME, b"", {}, 404, "no finished recording"),
        ("GET", "/record/a%00b", b"", {}, 404, "no finished recording"),
        ("GET", f"/digital_human/outputs/{LONG_NAME}/{LONG_NAME}.mp4", b"", {}, 404, "no such output"),
        # bodies and form fields that are not UTF-8, unknown charsets, undecodable encodings
        ("POST", "/human", b'{"text": "\xff\xfe"}', {}, 400, "not UTF-8"),
        ("POST", "/human", '{"text": "hi"}'.encode("utf-16"), {}, 400, "not UTF-8"),
        ("POST", "/humanaudio", part("", b"\xff\xfe"), multipart, 400, "not valid utf-8"),
        ("POST", "/humanaudio", part("\r\nContent-Type: text/plain; charset=nonsense", b"0"), multipart, 400, "unknown encoding"),
        ("POST", "/humanaudio", part("; filename=\"a.wav\"\r\nContent-Transfer-Encoding: rot13", b"abc", "file"), multipart, 400,
         "unknown content transfer encoding"),
        ("POST", "/humanaudio", part("; filename=\"a.wav\"\r\nContent-Encoding: gzip", b"not gzip", "file"), multipart, 400,
         "a.wav"),
        ("POST", "/humanaudio", b"garbage", {"Content-Type": "multipart/form-data"}, 400, "boundary"),
        # audio PyAV opens but cannot decode
        ("POST", "/humanaudio", part("", sid.encode())[: -len(b"--xx--\r\n")] + part('; filename="x.wav"', undecodable_wav(), "file"),
         {**multipart, **own}, 400, "cannot be decoded"),
        ("POST", "/human", b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "content-encoding"),
        ("POST", "/human", b"not deflate at all", {"Content-Encoding": "deflate"}, 400, "content-encoding"),
        # a plain GET on the WebSocket route
        ("GET", f"/humanecho?sessionid={sid}&secret={secret}", b"", {}, 400, "WebSocket"),
        # query strings as long as aiohttp reads them
        ("GET", "/stats?" + "&".join(f"k{i}=v" for i in range(700)), b"", {}, 200, ""),
        ("POST", f"/is_speaking?secret={'s' * 7000}", js({"sessionid": sid}), {}, 403, "needs its secret"),
    ]


async def test_known_attack_inputs_get_a_4xx_naming_the_problem(h: Harness) -> None:
    canary = await h.viewer()
    sid, secret = canary.session.id, canary.session.secret
    base_url = str(h.client.make_url("")).rstrip("/")
    wrong = []
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http:
        for method, path, body, headers, status, words in known_cases(sid, secret):
            sent = {"Content-Type": "application/json", **headers} if body else headers
            async with http.request(method, base_url + path, data=body or None, headers=sent) as resp:
                raw = await resp.read()
                problem = envelope_problem(resp.status, raw, resp.content_type)
                reply = json.loads(raw) if resp.content_type == "application/json" else {}
            if resp.status != status or problem or words.lower() not in str(reply.get("msg", "")).lower():
                wrong.append(f"{method} {path[:80]} {body[:80]!r}: {resp.status} {problem or reply}")
    assert not wrong, "\n".join(wrong)
    # what once raised inside a parser: "+-5" and "²" are clip names now (no such clip: 200 with the reason)
    for audiotype in ("+-5", "²", "12345678901"):
        status, reply = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": audiotype})
        assert status == 200 and reply["data"]["switched"] is False, reply
    await assert_still_speaks(h, canary)


async def raw_request(port: int, data: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes no HTTP client library would; the status line, the headers and the body back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


async def test_header_bytes_that_are_not_utf8_get_a_json_4xx(tmp_path: Path) -> None:
    async with running_server(tmp_path, token=TOKEN) as guarded:
        canary = await guarded.viewer()
        port = guarded.client.port
        assert port is not None
        body = json.dumps({"sessionid": canary.session.id, "text": "hi"}).encode()

        def post(headers: bytes) -> bytes:
            return (b"POST /human HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n" + headers
                    + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

        for headers, status, code in (
            (b"Authorization: Bearer \xff\xfe\r\n", 403, ErrorCode.FORBIDDEN),
            (f"Authorization: Bearer {TOKEN}\r\n".encode(), 200, 0),
            (b"Authorization: Bearer \xc3\x28\r\nX-Session-Secret: \xff\r\n", 403, ErrorCode.FORBIDDEN),
            (b"Origin: http://\xff\xfe\r\n", 403, ErrorCode.FORBIDDEN),
        ):
            got, head, answer = await raw_request(port, post(headers))
            assert got == status and json.loads(answer)["code"] == code, (headers, head, answer)
            assert envelope_problem(got, answer, "application/json") is None
        # A request line or header past aiohttp's 8190 bytes never reaches the app: aiohttp answers
        # its own plain-text 400 (the one case where the answer is not the JSON envelope).
        for request in (b"GET /stats?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\nConnection: close\r\n\r\n"):
            got, _, _ = await raw_request(port, request)
            assert got == 400
        status, reply = await guarded.post("/human", {"sessionid": canary.session.id, "text": "Still here."}, headers={
            "Authorization": f"Bearer {TOKEN}"})
        assert status == 200, reply


async def test_bad_websocket_messages_get_an_error_event_and_the_socket_stays_open(h: Harness) -> None:
    canary = await h.viewer()
    sid, secret = canary.session.id, canary.session.secret
    async with h.client.ws_connect(f"/humanecho?sessionid={sid}&secret={secret}") as ws:
        for message, code, words in (
            ('{"text": ' + BIG_INT + "}", ErrorCode.INVALID_JSON, "4300 digits"),
            ('{"a":' * 50_000, ErrorCode.INVALID_JSON, "too deeply"),
            ('{"text": ' + "[" * 100_000, ErrorCode.INVALID_JSON, "too deeply"),
            ('{"text": "hi", "interrupt": 1e400}', ErrorCode.INVALID_JSON, "out of range"),
            ('{"text": "hi", "interrupt": NaN}', ErrorCode.INVALID_JSON, "not a JSON value"),
            ('{"text": "\\ud800"}', ErrorCode.INVALID_FIELD, "unpaired surrogate"),
            ('{"text": "a\\u0000"}', ErrorCode.INVALID_FIELD, "NUL"),
            ('{"text": "   "}', ErrorCode.EMPTY_TEXT, "empty"),
            ("[1, 2]", None, None),  # not an object: plain text to speak
        ):
            await ws.send_str(message)
            event = await ws.receive_json(timeout=5)
            if code is None:
                assert event["event"] == "queued", event
                continue
            assert event["event"] == "error" and event["code"] == code and words in event["msg"], event
        # a full queue is an error event as well, not the end of the socket
        limit = h.manager.config.max_queued_utterances
        for _ in range(limit + 1):
            await ws.send_str("Again.")
        while (event := await ws.receive_json(timeout=5))["event"] != "error":
            pass  # queued, speaking_started, ...: the forwarder's events and this reply are not ordered
        assert event["code"] == ErrorCode.TOO_MANY_REQUESTS, event
        await ws.send_json({"text": "Still here.", "interrupt": True})
        while not ((event := await ws.receive_json(timeout=5))["event"] == "queued" and event["text"] == "Still here."):
            pass
        assert not ws.closed
    await assert_still_speaks(h, canary)


@pytest.mark.slow
async def test_known_attack_inputs_against_a_real_server_process(server: ServerProcess) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()
        sid = client.session_id
        assert client.http is not None and sid is not None
        secret = client.secret or ""
        wrong = []
        for method, path, body, headers, status, words in known_cases(sid, secret):
            if "/digital_human/" in path and "streamer_id" in body.decode(errors="replace"):
                body = body.replace(b'"tiny"', b'"default"')
            sent = {"Content-Type": "application/json", **headers} if body else headers
            async with client.http.request(method, server.url + path, data=body or None, headers=sent,
                                           skip_auto_headers=["Content-Type"]) as resp:
                raw = await resp.read()
                problem = envelope_problem(resp.status, raw, resp.content_type)
                reply = json.loads(raw) if resp.content_type == "application/json" else {}
            if resp.status != status or problem or words.lower() not in str(reply.get("msg", "")).lower():
                wrong.append(f"{method} {path[:80]} {body[:80]!r}: {resp.status} {problem or reply}")
        assert not wrong, "\n".join(wrong)
        await client.say("Still here.")
        await client.wait_speaking(True, timeout=5)
    # the server is shared with other tests: leave it with no session open, as it was
    for _ in range(100):
        if (await asyncio.to_thread(server.stats))["sessions"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await asyncio.to_thread(server.stats))["sessions"] == 0


async def test_aiohttp_http_errors_a_handler_raises_become_the_json_envelope() -> None:
    async def unsupported(request: web.Request) -> web.Response:
        raise web.HTTPUnsupportedMediaType(text="send JSON")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/unsupported", unsupported)
    app.router.add_get("/moved", moved)
    async with TestClient(TestServer(app)) as client:
        async with client.get("/unsupported") as resp:
            body = await resp.json()
            assert resp.status == 415 and body["code"] == ErrorCode.MALFORMED_REQUEST and "send JSON" in body["msg"]
        async with client.get("/moved", allow_redirects=False) as resp:
            assert resp.status == 302  # not an error: passes through
