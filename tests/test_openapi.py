"""The OpenAPI document at /openapi.json: valid OpenAPI 3.1, one operation for every route the
app registers and none it does not, and the README's examples and the server's real answers
valid against it. In-process (``tests/support/harness.py``)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.definitions import OPENAPI_31

from server.app import create_app
from server.config import ServerConfig
from server.errors import HTTP_STATUS, ErrorCode
from server.openapi import OPENAPI_PATH, build_spec
from tests.support.harness import Harness, running_server

STATIC_CATCH_ALL = "/{path}"  # the pages: every request no route took (aiohttp's canonical form)
TOKEN = "spec-token"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


def registered_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app answers, HEAD (aiohttp adds one per GET) and the
    static catch-all left out."""
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path == STATIC_CATCH_ALL:
            continue
        out.add((route.method, path))
    return out


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item if method in methods}


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator for ``schema``, its ``#/components/...`` refs resolved
    against ``spec``."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})


def assert_valid(spec: dict[str, Any], schema: dict[str, Any], instance: Any, what: str) -> None:
    errors = [f"{e.message} at {list(e.instance_path)}" for e in validator(spec, schema).iter_errors(instance)]
    assert not errors, f"{what}: {instance!r} does not match: {errors}"


def request_schema(spec: dict[str, Any], method: str, path: str, media: str = "application/json") -> dict[str, Any]:
    return spec["paths"][path][method]["requestBody"]["content"][media]["schema"]


def response_schema(spec: dict[str, Any], method: str, path: str, status: int, media: str = "application/json") -> dict[str, Any]:
    return spec["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def test_every_registered_route_is_in_the_spec_and_nothing_else(tmp_path: Path) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path))  # never started: no worker, no TTS
    registered = registered_operations(app)
    documented = spec_operations(build_spec(ServerConfig(data_dir=tmp_path)))
    assert ("GET", OPENAPI_PATH) in registered
    assert registered - documented == set(), "routes the spec does not describe"
    assert documented - registered == set(), "operations the spec describes that no route answers"


def test_the_spec_is_valid_openapi_3_1_and_every_operation_loads(tmp_path: Path) -> None:
    spec = build_spec(ServerConfig(data_dir=tmp_path))
    errors = [e.message for e in jsonschema_rs.Draft202012Validator(OPENAPI_31).iter_errors(spec)]
    assert not errors, errors
    schema = schemathesis.openapi.from_dict(spec)
    loaded = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in loaded), [result for result in loaded if not isinstance(result, Ok)]
    assert len(loaded) == len(spec_operations(spec))
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["sessionSecret"]["in"] == "header" and schemes["sessionSecret"]["name"] == "X-Session-Secret"
    assert "x-websocket" in spec["paths"]["/humanecho"]["get"]


def test_every_error_code_is_documented_under_its_http_status(tmp_path: Path) -> None:
    spec = build_spec(ServerConfig(data_dir=tmp_path))
    schemas = spec["components"]["schemas"]
    assert set(schemas["Error"]["properties"]["code"]["enum"]) == {int(c) for c in ErrorCode}
    for code in ErrorCode:
        assert int(code) in schemas[f"Error{HTTP_STATUS[code]}"]["properties"]["code"]["enum"]


def test_the_readme_examples_and_the_specs_own_examples_validate(tmp_path: Path) -> None:
    spec = build_spec(ServerConfig(data_dir=tmp_path))
    sid = "3f2a9c0d5e6b7a81"
    readme = [  # README.md "API": the curl examples' bodies, and the seed's shapes
        ("/human", {"sessionid": sid, "text": "Hello! How can I help you today?", "type": "echo"}),
        ("/human", {"sessionid": 0, "text": "Seed style.", "interrupt": True}),
        ("/is_speaking", {"sessionid": sid}),
        ("/interrupt_talk", {"sessionid": sid}),
        ("/record", {"sessionid": sid, "type": "start_record"}),
        ("/record", {"sessionid": sid, "type": "end_record"}),
        ("/set_audiotype", {"sessionid": sid, "audiotype": "stereo", "reinit": False}),
        ("/set_audiotype", {"sessionid": 0, "audiotype": 1, "reinit": 1}),
        ("/offer", {"sdp": "v=0\r\n...", "type": "offer", "avatar": "anna"}),
        ("/digital_human/preprocess", {"user_id": "u1", "request_id": "r1", "streamer_id": "anna", "video_path": "video/anna.mp4"}),
        ("/digital_human/gen", {"user_id": 7, "request_id": "r2", "streamer_id": "default", "tts_path": "data/audio/yongen.wav",
                                "chunk_id": 3}),
    ]
    for path, body in readme:
        assert_valid(spec, request_schema(spec, "post", path), body, f"README body of {path}")
    assert_valid(spec, request_schema(spec, "post", "/humanaudio", "multipart/form-data"),
                 {"sessionid": sid, "file": "<bytes>", "interrupt": "true"}, "the README's curl -F upload")
    assert_valid(spec, spec["components"]["schemas"]["WsMessage"], {"text": "Good morning!", "interrupt": True}, "a WS message")
    for event in ({"event": "queued", "utterance": f"{sid}-1", "text": "Good morning!", "source": "text", "sessionid": sid, "t": 1.0},
                  {"event": "error", "code": 1004, "msg": "field 'text' is empty"}):
        assert_valid(spec, spec["components"]["schemas"]["WsEvent"], event, "a WS event")
    examples = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                if "example" in content:
                    examples += 1
                    assert_valid(spec, content["schema"], content["example"], f"the example of {method} {path} ({media})")
            for status, response in op["responses"].items():
                for content in response.get("content", {}).values():
                    if "example" in content:
                        examples += 1
                        assert_valid(spec, content["schema"], content["example"], f"the {status} example of {method} {path}")
    assert examples >= 8


async def test_the_servers_real_answers_match_the_spec(h: Harness) -> None:
    async with h.client.get(OPENAPI_PATH) as resp:
        assert resp.status == 200
        spec = await resp.json()
    assert spec == build_spec(h.manager.config)
    viewer = await h.viewer()
    sid = viewer.session.id

    status, body = await h.post("/human", {"sessionid": sid, "text": "Checking the spec."})
    assert_valid(spec, response_schema(spec, "post", "/human", status), body, "POST /human")
    status, body = await h.post("/is_speaking", {"sessionid": sid})
    assert_valid(spec, response_schema(spec, "post", "/is_speaking", status), body, "POST /is_speaking")
    status, body = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": "stereo"})
    assert_valid(spec, response_schema(spec, "post", "/set_audiotype", status), body, "POST /set_audiotype")
    status, body = await h.post("/interrupt_talk", {"sessionid": sid})
    assert_valid(spec, response_schema(spec, "post", "/interrupt_talk", status), body, "POST /interrupt_talk")
    for path, sent in (("/human", {"sessionid": "nope", "text": "hi"}), ("/human", {"sessionid": sid, "text": " "}),
                       ("/record", {"sessionid": sid, "type": "end_record"}), ("/offer", {"type": "offer"})):
        status, body = await h.post(path, sent)
        assert status >= 400
        assert_valid(spec, response_schema(spec, "post", path, status), body, f"the {status} of POST {path}")
    for path in ("/stats", "/health", "/digital_human/check", OPENAPI_PATH):
        async with h.client.get(path) as resp:
            assert_valid(spec, response_schema(spec, "get", path, resp.status), await resp.json(), f"GET {path}")
    async with h.client.get("/", allow_redirects=False) as resp:
        assert resp.status == 302 and "302" in spec["paths"]["/"]["get"]["responses"]


async def test_the_spec_is_open_when_the_server_has_a_token(tmp_path: Path) -> None:
    async with running_server(tmp_path, token=TOKEN) as guarded:
        async with guarded.client.get(OPENAPI_PATH) as resp:
            assert resp.status == 200 and (await resp.json())["openapi"].startswith("3.1")
        async with guarded.client.post(OPENAPI_PATH) as resp:
            body = await resp.json()
            assert resp.status == 405 and body["code"] == ErrorCode.METHOD_NOT_ALLOWED
