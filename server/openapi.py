"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Every route the app registers is here (``tests/test_openapi.py`` holds the two sets equal,
and ``tests/test_fuzz.py`` fuzzes every operation against it): request bodies (JSON, and
multipart for ``/humanaudio``), the ``sessionid``/``secret``/``token`` query parameters, the
``Authorization: Bearer`` and ``X-Session-Secret`` schemes, the ``{"code", "msg", "data"}``
envelope and, per HTTP status, the error codes that status carries. OpenAPI has no
WebSocket messages: ``/humanecho`` documents its handshake, and its messages and events as
schemas (``WsMessage``, ``WsEvent``) named by the ``x-websocket`` extension.

Limits that are settings (text length, upload size) come from the running server's config.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from avatars.clips import CLIP_NAME_RE, FIRST_NUMBER, MAX_CLIP_SECONDS
from server.config import ServerConfig
from server.errors import HTTP_STATUS, ErrorCode
from server.events import EVENT_KINDS
from server.keys import CONFIG
from server.request import MAX_SECRET_CHARS

OPENAPI_PATH = "/openapi.json"
VERSION = "0.1.0"

routes = web.RouteTableDef()

Schema = dict[str, Any]

# What each error code means, for the document (ErrorCode itself carries no prose).
CODE_MEANING: dict[ErrorCode, str] = {
    ErrorCode.INVALID_JSON: "the body is not a JSON object (not UTF-8, not JSON, nested too deeply, a number out of range)",
    ErrorCode.MISSING_FIELD: "a required field is missing",
    ErrorCode.INVALID_FIELD: "a field has the wrong type or value (the message names it)",
    ErrorCode.EMPTY_TEXT: "the text to speak is empty or blank",
    ErrorCode.UNSUPPORTED_AUDIO: "the uploaded or named audio cannot be decoded, or is empty",
    ErrorCode.PAYLOAD_TOO_LARGE: "the body is larger than the server takes",
    ErrorCode.MALFORMED_REQUEST: "the HTTP request itself is malformed (a body that does not decode, no WebSocket upgrade)",
    ErrorCode.CHAT_NOT_CONFIGURED: "type 'chat' on a server with no chat model (start it with --chat-base-url)",
    ErrorCode.UNKNOWN_SESSION: "no such session (or no default session)",
    ErrorCode.UNKNOWN_AVATAR: "the avatar is not prepared",
    ErrorCode.NOT_FOUND: "no such route, file, recording or output",
    ErrorCode.METHOD_NOT_ALLOWED: "the route does not take this method",
    ErrorCode.PATH_OUTSIDE_DATA: "a path names a file outside the data directory",
    ErrorCode.CONFLICT: "the session or avatar is not in a state that allows this",
    ErrorCode.TOO_MANY_SESSIONS: "the server is at its session limit",
    ErrorCode.WORKER_UNAVAILABLE: "the inference worker is not running",
    ErrorCode.TTS_FAILED: "speech synthesis failed (a WebSocket error event)",
    ErrorCode.CHAT_FAILED: "the chat model is unreachable, refused the request or broke off (its message says which)",
    ErrorCode.CHAT_TIMEOUT: "the chat model said nothing in time, or its stream stalled",
    ErrorCode.UNAUTHORIZED: "the server has a token and none was sent",
    ErrorCode.FORBIDDEN: "a wrong token, a missing or wrong session secret, or a refused browser Origin",
    ErrorCode.TOO_MANY_REQUESTS: "a per-session or per-client bound was reached",
    ErrorCode.INSUFFICIENT_STORAGE: "the disk is too full to write the file",
    ErrorCode.INTERNAL: "a bug: the server log has the details",
}

STATUS_TEXT = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
    409: "Conflict", 413: "Payload too large", 429: "Too many requests", 500: "Internal error", 502: "Bad gateway",
    503: "Service unavailable", 504: "Gateway timeout", 507: "Insufficient storage",
}

DESCRIPTION = """\
Real-time lip-sync avatar server. JSON in, JSON out.

**Envelope.** Success: `{"code": 0, "msg": "ok", "data": ...}` (a few routes add fields
beside `data`, as the seed's clients expect). Failure: a 4xx/5xx status with
`{"code": <non-zero>, "msg": "<what was wrong and how to fix it>"}`; the code decides the
status (each error response below lists its codes). Bad input is always a 4xx.

**Sessions.** `POST /offer` opens one and returns its `sessionid` and `secret`.
`sessionid` `0`, `"0"`, absent or null addresses the *default session* (the only open one;
with several, the oldest) unless the server runs with `--no-default-session`.

**Access.** With `--token`, every route but `/`, the pages, `/digital_human/check`,
`/health` and this document needs the token (`Authorization: Bearer TOKEN` or `?token=`).
Addressing a session by id needs its secret too (the `secret` field, `X-Session-Secret`
or `?secret=`) unless the caller holds the token. A browser request from another Origin is
refused (403) unless `--cors-origins` allows it.

**Strings** never hold NUL characters or unpaired surrogates (400 naming the field).
"""


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, example: Any = None) -> Schema:
    media: Schema = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _ok(description: str, data: Schema | None = None, example: Any = None, **extra: Schema) -> Schema:
    """A 200 with the envelope: ``data`` and any fields beside it."""
    properties: Schema = {"code": {"const": 0}, "msg": {"const": "ok"}, **extra}
    if data is not None:
        properties["data"] = data
    schema = {"type": "object", "required": ["code", "msg", *(["data"] if data is not None else []), *extra],
              "properties": properties}
    return {"description": description, "content": _json(schema, example)}


def _codes(status: int) -> list[ErrorCode]:
    return [code for code in ErrorCode if HTTP_STATUS[code] == status]


def _errors(*statuses: int) -> dict[str, Schema]:
    """Error responses, each with the codes of its status."""
    out: dict[str, Schema] = {}
    for status in (*statuses, 500):
        listed = "; ".join(f"{int(c)} {CODE_MEANING[c]}" for c in _codes(status))
        out[str(status)] = {"description": f"{STATUS_TEXT[status]}: {listed}", "content": _json(_ref(f"Error{status}"))}
    return out


ACCESS = (401, 403)  # every route behind the token; 403 is also a refused browser Origin


def _query(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _operation(summary: str, description: str, responses: dict[str, Schema], *, security: list[Schema],
               parameters: list[Schema] | None = None, body: Schema | None = None, tag: str = "sessions",
               operation_id: str) -> Schema:
    op: Schema = {"operationId": operation_id, "summary": summary, "description": description, "tags": [tag],
                  "security": security, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    return op


OPEN: list[Schema] = []  # no credentials, whatever the server's settings
TOKEN: list[Schema] = [{}, {"bearerAuth": []}]  # the token when the server has one
SESSION: list[Schema] = [{}, {"bearerAuth": []}, {"sessionSecret": []}, {"bearerAuth": [], "sessionSecret": []}]


def _json_body(schema_name: str, example: Any) -> Schema:
    return {"required": True, "content": _json(_ref(schema_name), example)}


def _schemas(config: ServerConfig) -> dict[str, Schema]:
    flag: Schema = {"anyOf": [{"type": "boolean"}, {"enum": [0, 1]}, {"enum": ["true", "false", "1", "0"]}],
                    "description": "true or false; 1/0 and the strings \"true\"/\"false\"/\"1\"/\"0\" (any case) too"}
    ident: Schema = {"anyOf": [{"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                               {"type": "integer", "minimum": 0, "maximum": 10**18}],
                     "description": "1-64 letters, digits, '_', '-' or '.' (a number is taken as its digits)"}
    session_fields: Schema = {"sessionid": _ref("SessionId"), "secret": _ref("Secret")}
    error_props: Schema = {"msg": {"type": "string", "minLength": 1, "description": "what was wrong and how to fix it"}}
    schemas: dict[str, Schema] = {
        "SessionId": {
            "anyOf": [{"type": "string", "maxLength": 128}, {"type": "integer", "minimum": -(10**18), "maximum": 10**18},
                      {"type": "null"}],
            "description": "An id from POST /offer. 0, \"0\", absent or null: the default session.",
        },
        "Secret": {"type": ["string", "null"], "maxLength": MAX_SECRET_CHARS,
                   "description": "The session's secret from POST /offer (or send X-Session-Secret, or ?secret=)."},
        "Flag": flag,
        "Id": ident,
        "AvatarName": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "DataPath": {"type": "string", "minLength": 1, "maxLength": 10_000,
                     "description": "A file inside the data directory: relative to it, or to the server's working directory "
                                    "(data/audio/x.wav with the default --data-dir data); 400 (1105) when it lands outside."},
        "Error": {"type": "object", "required": ["code", "msg"], "additionalProperties": False,
                  "properties": {"code": {"type": "integer", "enum": [int(c) for c in ErrorCode]}, **error_props},
                  "description": "Every failure. " + "; ".join(f"{int(c)} {CODE_MEANING[c]}" for c in ErrorCode)},
        "Offer": {
            "type": "object", "required": ["sdp", "type"],
            "properties": {
                "sdp": {"type": "string", "maxLength": 100_000, "description": "the browser's SDP offer"},
                "type": {"const": "offer"},
                "avatar": {"anyOf": [_ref("AvatarName"), {"type": "null"}],
                           "description": "a prepared avatar; the server's --avatar when absent"},
                "watch": {"anyOf": [{"type": "string", "maxLength": 128}, {"type": "integer", "minimum": 0, "maximum": 10**18},
                                    {"type": "null"}],
                          "description": "watch this session (its id; 0 the default session) instead of opening one: its "
                                         "secret (the `secret` field, X-Session-Secret, ?secret= or its cookie) or the token "
                                         f"is needed; at most {config.max_viewers} viewers a session"},
            },
        },
        "Human": {
            "type": "object", "required": ["text"],
            "properties": {
                **session_fields,
                "text": {"type": "string", "minLength": 1, "maxLength": config.max_text_chars, "pattern": "\\S",
                         "description": "what to say: long text is split into sentences, speech starts with the first"},
                "type": {"anyOf": [{"enum": ["echo", "chat"]}, {"type": "null"}], "default": "echo",
                         "description": "echo: speak the text as given; chat: send it to the chat model and speak its reply "
                                        "sentence by sentence as it streams (400 with code 1008 when no chat model is "
                                        "configured). A chat message while a reply is still streaming or being spoken cuts "
                                        "that reply first."},
                "interrupt": {**_ref("Flag"), "description": "cut off what the session is saying (and a chat reply being "
                                                             "written) first"},
                "voice": {"type": ["string", "null"], "maxLength": 200,
                          "description": "the TTS voice for this text (an id from GET /voices); the server's --voice when "
                                         "absent; an unknown one is a 400 naming some that exist, where the backend lists them"},
            },
        },
        "HumanAudio": {
            "type": "object", "required": ["file"],
            "properties": {
                "sessionid": {"type": "string", "maxLength": 128, "description": "as in SessionId; 0 or absent: the default session"},
                "secret": _ref("Secret"),
                "interrupt": {"enum": ["true", "false", "1", "0"]},
                "file": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                         "description": f"wav, mp3, ogg, m4a...: at most {config.max_upload_bytes} bytes, "
                                        f"{config.max_audio_seconds:.0f} s"},
            },
        },
        "SessionOnly": {"type": "object", "properties": session_fields},
        "SetAudiotype": {
            "type": "object", "required": ["audiotype"],
            "properties": {
                **session_fields,
                "audiotype": {"anyOf": [{"type": "integer", "minimum": -(10**9), "maximum": 10**9},
                                        {"type": "string", "minLength": 1, "maxLength": 128}],
                              "description": "0 or 1: the idle loop (LiveTalking's 'normal' and 'silence'); 2.. or a "
                                             "clip's name: the avatar's action clips (POST /avatars/{name}/clips)"},
                "reinit": {**_ref("Flag"), "description": "restart what plays: the clip, or the idle loop"},
            },
        },
        "Record": {
            "type": "object", "required": ["type"],
            "properties": {**session_fields, "type": {"enum": ["start_record", "end_record"]}},
        },
        "Preprocess": {
            "type": "object", "required": ["user_id", "request_id", "streamer_id", "video_path"],
            "properties": {
                "user_id": _ref("Id"), "request_id": _ref("Id"), "streamer_id": _ref("AvatarName"),
                "video_path": _ref("DataPath"),
                "replace": {**_ref("Flag"), "description": "replace an avatar of that name, the built-in `default` or the "
                                                           "server's --avatar (409 otherwise; with --token, the operator only)"},
                "overwrite": {**_ref("Flag"), "description": "the same as `replace` (this route's first spelling)"},
                "wait": {**_ref("Flag"), "description": "answer when the job has ended (400 if it failed) instead of at once"},
                "fps": {"type": "integer", "minimum": 1, "maximum": 60, "default": 25, "description": "avatar frame rate"},
                "max_seconds": {"type": "number", "minimum": 0.04, "maximum": 120,
                                "description": "use at most this much of the video (default: as `python -m avatars prepare`)"},
                "max_side": {"type": "integer", "minimum": 16, "maximum": 4096, "default": 1280,
                             "description": "shrink so the longer side is at most this"},
            },
        },
        "Gen": {
            "type": "object", "required": ["user_id", "request_id", "streamer_id", "tts_path"],
            "properties": {
                "user_id": _ref("Id"), "request_id": _ref("Id"), "streamer_id": _ref("AvatarName"),
                "tts_path": _ref("DataPath"), "chunk_id": {"anyOf": [_ref("Id"), {"type": "null"}]},
            },
        },
        "CancelGen": {
            "type": "object", "required": ["user_id", "request_id"],
            "properties": {
                "user_id": _ref("Id"), "request_id": _ref("Id"), "chunk_id": {"anyOf": [_ref("Id"), {"type": "null"}]},
            },
        },
        "Health": {
            "type": "object", "required": ["code", "msg", "data"],
            "properties": {
                "code": {"enum": [0, int(ErrorCode.WORKER_UNAVAILABLE)]}, "msg": {"type": "string"},
                "data": {"type": "object", "required": ["ok", "worker", "sessions", "speaking"],
                         "properties": {"ok": {"type": "boolean"}, "worker": {"type": "object"},
                                        "sessions": {"type": "integer"}, "speaking": {"type": "integer"}}},
            },
        },
        "WsMessage": {
            "description": "A /humanecho message from the client: plain text to speak, or this object as JSON text "
                           "(the fields of POST /human).",
            "anyOf": [{"type": "string"},
                      {"type": "object", "required": ["text"],
                       "properties": {"text": {"type": "string", "minLength": 1, "maxLength": config.max_text_chars},
                                      "type": {"enum": ["echo", "chat"]}, "voice": {"type": "string"},
                                      "interrupt": _ref("Flag")}}],
        },
        "WsEvent": {
            "description": "A session event, as /humanecho sends it (one JSON text message each) and GET /events "
                           "(the `data` of each server-sent event, named by `event`). queued: an utterance was accepted; "
                           "speaking_started / speaking_ended: its first / last frame was handed to the peer (ended also "
                           "when it was cut off: `interrupted`); reply_text: a chat reply's text so far (`done` on the "
                           "last, with `interrupted` and `error`); error: `code` and `msg`; closed: the session ended. "
                           "Speech events carry `utterance` and, for a chat reply's sentences, `reply`. On the WebSocket "
                           "a message that is not valid (bad JSON, nested too deeply, a number out of range, empty text, "
                           "a full queue) gets an `error` event and the socket stays open; when the socket cannot bind to "
                           "a session it gets one `error` event, then the close.",
            "type": "object", "required": ["event"],
            "properties": {
                "event": {"enum": list(EVENT_KINDS)},
                "sessionid": {"type": "string"}, "t": {"type": "number", "description": "unix seconds"},
                "utterance": {"type": "string"}, "text": {"type": ["string", "null"]}, "source": {"enum": ["text", "audio", "stream"]},
                "reply": {"type": "string", "description": "the chat reply (POST /human's data.reply)"},
                "done": {"type": "boolean"},
                "latency_ms": {"type": "number"}, "interrupted": {"type": "boolean"}, "empty": {"type": "boolean"},
                "error": {"type": "boolean"}, "code": {"type": "integer"}, "msg": {"type": "string"},
            },
        },
        "AudioStreamMessage": {
            "description": "An /audio_stream text message from the client (binary messages are raw s16le PCM, "
                           "interleaved when stereo, any size, at the declared format). format: the PCM's rate (8000.."
                           "48000 Hz) and channels (1 or 2), default 16000 mono, changeable between segments; "
                           "end_of_segment: the segment is complete (LiveKit's AudioSegmentEnd); clear_buffer: stop now "
                           "and drop what is queued (lk.clear_buffer). A segment starts with the first binary message "
                           "after connect, end_of_segment or clear_buffer.",
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["format", "end_of_segment", "clear_buffer"]},
                           "sample_rate": {"type": "integer", "minimum": 8000, "maximum": 48000, "default": 16000},
                           "channels": {"enum": [1, 2], "default": 1}},
        },
        "AudioStreamEvent": {
            "description": "An /audio_stream event (one JSON text message each). playback_started: the segment's first "
                           "frame went out to the peer; playback_finished: once per segment, when it has played out "
                           "(after end_of_segment) or was cut (clear_buffer, an interrupt: `interrupted`), with "
                           "`playback_position` the seconds of it played (lk.playback_finished); error: bad input "
                           "(`code`, `msg`; the socket stays open; 1429: past the session's speech limits the piece or "
                           "segment is dropped); closed: the session ended, then the close.",
            "type": "object", "required": ["event"],
            "properties": {"event": {"enum": ["playback_started", "playback_finished", "error", "closed"]},
                           "segment": {"type": "string", "description": "\"<session>-a<n>\", as the session's speech "
                                       "events name it (`utterance`)"},
                           "playback_position": {"type": "number", "minimum": 0}, "interrupted": {"type": "boolean"},
                           "code": {"type": "integer"}, "msg": {"type": "string"}},
        },
        "Voices": {
            "type": "object", "required": ["backend", "default", "voices", "complete"],
            "properties": {
                "backend": {"type": "string", "description": "the TTS backend (--tts)"},
                "default": {"type": ["string", "null"], "description": "the voice used when a message names none"},
                "voices": {"type": "array", "items": {
                    "type": "object", "required": ["id", "name"],
                    "properties": {"id": {"type": "string", "description": "what `voice` takes"}, "name": {"type": "string"},
                                   "language": {"type": "string"}, "gender": {"type": "string"}}}},
                "complete": {"type": "boolean", "description": "every voice the backend takes is listed (any other is "
                                                               "refused); false: only what is known (e.g. offline)"},
                "note": {"type": "string"},
            },
        },
    }
    for status in sorted(set(HTTP_STATUS.values())):
        schemas[f"Error{status}"] = {
            "type": "object", "required": ["code", "msg"], "additionalProperties": False,
            "properties": {"code": {"type": "integer", "enum": [int(c) for c in _codes(status)]}, **error_props},
        }
    schemas.update(_avatar_schemas(config))
    schemas.update(_clip_schemas(config))
    return schemas


def build_spec(config: ServerConfig) -> dict[str, Any]:
    """The OpenAPI document of a server running with ``config``."""
    sid_example = "3f2a9c0d5e6b7a81"
    utterance = {"utterance": f"{sid_example}-1"}
    mp4 = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
    paths: dict[str, Any] = {
        "/": {"get": _operation(
            "The page", "Redirects to the browser client /webrtcapi.html.",
            {"302": {"description": "to /webrtcapi.html", "headers": {"Location": {"schema": {"type": "string"}}}},
             **_errors(403)},
            security=OPEN, tag="pages", operation_id="index")},
        "/offer": {"post": _operation(
            "Open a session, or watch one",
            "A WebRTC offer in, the answer and the new session's id and secret out. With `watch`, no session is opened: "
            "the answer is a receive-only peer showing the watched session (the same frames its own peer gets, not "
            "rendered again), and `watching` is true; the viewer closing leaves the session open, the session closing "
            "closes its viewers.",
            {"200": {"description": "the answer", "content": _json({
                "type": "object", "required": ["code", "msg", "data", "sdp", "type", "sessionid"],
                "properties": {"code": {"const": 0}, "msg": {"const": "ok"}, "sdp": {"type": "string"},
                               "type": {"const": "answer"}, "sessionid": {"type": "string"},
                               "secret": {"type": "string", "description": "a new session's (not given to a viewer)"},
                               "watching": {"const": True, "description": "a viewer of an existing session"},
                               "data": {"type": "object", "required": ["sessionid"],
                                        "properties": {"sessionid": {"type": "string"}, "secret": {"type": "string"},
                                                       "watching": {"const": True}}}}})},
             **_errors(400, *ACCESS, 404, 413, 429, 503)},
            security=SESSION, parameters=[_query("token")],
            body=_json_body("Offer", {"sdp": "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n...", "type": "offer"}),
            operation_id="offer")},
        "/humanecho": {"get": _operation(
            "Speak over a WebSocket",
            "A WebSocket (`Upgrade: websocket`) bound to a session: each text message (`WsMessage`) is spoken, and the "
            "session's events (`WsEvent`) stream back. No sessionid: the default session. A plain HTTP GET gets the "
            "JSON error.",
            {"101": {"description": "the WebSocket; messages: WsMessage in, WsEvent out"},
             **_errors(400, *ACCESS, 404)},
            security=SESSION, parameters=[_query("sessionid"), _query("secret"), _query("token")],
            operation_id="humanecho") | {"x-websocket": {"client": _ref("WsMessage"), "server": _ref("WsEvent")}}},
        "/audio_stream": {"get": _operation(
            "Stream audio in (voice agents)",
            "A WebSocket (`Upgrade: websocket`) bound to a session, with LiveKit's avatar semantics: raw PCM in binary "
            "messages, grouped into segments (`AudioStreamMessage`), played as it arrives with the lips from the audio "
            "arrived so far; `playback_started`/`playback_finished` back (`AudioStreamEvent`). Each segment is also an "
            "utterance of the session's events (`source` \"stream\"). Access as for /humanecho; no sessionid: the "
            "default session. A plain HTTP GET gets the JSON error.",
            {"101": {"description": "the WebSocket; messages: binary PCM and AudioStreamMessage in, AudioStreamEvent out"},
             **_errors(400, *ACCESS, 404)},
            security=SESSION, parameters=[_query("sessionid"), _query("secret"), _query("token")],
            operation_id="audio_stream") | {"x-websocket": {"client": _ref("AudioStreamMessage"), "server": _ref("AudioStreamEvent")}}},
        "/human": {"post": _operation(
            "Say text, or chat",
            "echo: queue text for the session to speak (`data.utterance`). chat: send it to the chat model; its reply is "
            "spoken sentence by sentence as it streams, and followed in the session's events (`reply_text`, and speech "
            "events carrying `reply`). The answer comes once the model has started replying, or after a few seconds "
            "(`data.started` false); a model that is unreachable or refuses is a 502, one that says nothing in time a "
            "504, with its message. `interrupt` cuts off what the session is saying (and a reply being written) first.",
            {"200": _ok("queued", {"anyOf": [
                {"type": "object", "required": ["utterance"], "properties": {"utterance": {"type": "string"}}},
                {"type": "object", "required": ["reply", "started"],
                 "properties": {"reply": {"type": "string", "description": "the chat reply's id, in its events"},
                                "started": {"type": "boolean", "description": "the model had started its reply"}}}]},
                        {"code": 0, "msg": "ok", "data": utterance}),
             **_errors(400, *ACCESS, 404, 413, 429, 502, 504)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body=_json_body("Human", {"sessionid": sid_example, "text": "Hello! How can I help you today?", "type": "echo"}),
            operation_id="human")},
        "/events": {"get": _operation(
            "Follow the session's events",
            "Server-sent events (`text/event-stream`): each event is `event: <kind>` and `data: <JSON>` (a `WsEvent`, as "
            "the WebSocket sends it); a comment every "
            f"{config.events_heartbeat_s:g} s keeps the stream open. It ends after `closed`. No sessionid: the default "
            "session.",
            {"200": {"description": "the event stream", "content": {"text/event-stream": {"schema": {
                "type": "object", "required": ["data"],
                "properties": {"event": {"enum": list(EVENT_KINDS)},
                               "data": {"type": "string", "contentMediaType": "application/json"}}}}}},
             **_errors(*ACCESS, 404)},
            security=SESSION, parameters=[_query("sessionid"), _query("secret"), _query("token")],
            operation_id="events")},
        "/voices": {"get": _operation(
            "List the voices", "What the running TTS backend offers: `voice` on /human and the WebSocket takes an `id`. "
            "espeak lists its installed voices; edge needs the network for its list (offline: the configured voice and "
            "a `note`); openai asks its server.",
            {"200": _ok("the voices", _ref("Voices"), {"code": 0, "msg": "ok", "data": {
                "backend": "espeak", "default": "en-us", "complete": True,
                "voices": [{"id": "en-us", "name": "English (America)", "language": "en-us", "gender": "male"}]}}),
             **_errors(*ACCESS)},
            security=TOKEN, parameters=[_query("token")], tag="sessions", operation_id="voices")},
        "/humanaudio": {"post": _operation(
            "Say an audio file", "Upload audio for the session to speak.",
            {"200": _ok("queued", {"type": "object", "required": ["utterance", "seconds"],
                                   "properties": {"utterance": {"type": "string"}, "seconds": {"type": "number"}}}),
             **_errors(400, *ACCESS, 404, 413, 429)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body={"required": True, "content": {"multipart/form-data": {
                "schema": _ref("HumanAudio"), "encoding": {"file": {"contentType": "application/octet-stream"}}}}},
            operation_id="humanaudio")},
        "/interrupt_talk": {"post": _operation(
            "Stop speaking", "Cut off what the session is saying and everything queued.",
            {"200": _ok("what was cut", {"type": "object", "required": ["interrupted", "frame"],
                                         "properties": {"interrupted": {"type": "array", "items": {"type": "string"}},
                                                        "frame": {"type": "integer"}}}),
             **_errors(400, *ACCESS, 404, 413)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body=_json_body("SessionOnly", {"sessionid": sid_example}), operation_id="interrupt_talk")},
        "/is_speaking": {"post": _operation(
            "Is it speaking?", "`data` is true from the moment speech is queued (or a chat message is taken) until its "
            "last frame is shown.",
            {"200": _ok("the answer", {"type": "boolean"}, {"code": 0, "msg": "ok", "data": False}),
             **_errors(400, *ACCESS, 404, 413)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body=_json_body("SessionOnly", {"sessionid": sid_example}), operation_id="is_speaking")},
        "/set_audiotype": {"post": _operation(
            "Play an action clip, or the idle loop",
            "0 or 1: the idle loop; 2.. (LiveTalking's numbers) or a clip's name: that action clip, cross-faded in. A "
            "looping clip plays until switched away, a one-shot clip once; speech leaves a clip, and one chosen while "
            "speaking starts when the speech stops. An unknown number, or an unknown name on an avatar with clips, is a "
            "400 listing the clips; the seed's audio modes (`stereo`) and names on an avatar without clips switch nothing "
            "and say why in `data.reason`.",
            {"200": _ok("what was done", {"type": "object", "required": ["audiotype", "switched", "reinit"],
                                          "properties": {"audiotype": {"type": ["integer", "string"]},
                                                         "switched": {"type": "boolean"}, "reinit": {"type": "boolean"},
                                                         "clip": {"type": ["string", "null"],
                                                                  "description": "the clip chosen; null: the idle loop"},
                                                         "reason": {"type": "string"}}}),
             **_errors(400, *ACCESS, 404, 413)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body=_json_body("SetAudiotype", {"sessionid": sid_example, "audiotype": 0, "reinit": True}),
            operation_id="set_audiotype")},
        "/record": {"post": _operation(
            "Record the session", "start_record, then end_record: `data.url` downloads the mp4 (H.264 + AAC).",
            {"200": {"description": "started (no data) or ended", "content": _json({
                "type": "object", "required": ["code", "msg"],
                "properties": {"code": {"const": 0}, "msg": {"const": "ok"},
                               "data": {"type": "object", "required": ["url", "file"],
                                        "properties": {"url": {"type": "string"}, "file": {"type": "string"}}}}})},
             **_errors(400, *ACCESS, 404, 409, 413, 507)},
            security=SESSION, parameters=[_query("secret"), _query("token")],
            body=_json_body("Record", {"sessionid": sid_example, "type": "start_record"}), operation_id="record")},
        "/record/{sessionid}": {"get": _operation(
            "Download a recording", "The session's last finished recording (open or closed session).",
            {"200": {"description": "the mp4", "content": mp4}, **_errors(*ACCESS, 404)},
            security=SESSION,
            parameters=[{"name": "sessionid", "in": "path", "required": True, "schema": {"type": "string"}},
                        _query("secret"), _query("token")],
            operation_id="download_record")},
        "/digital_human/check": {"get": _operation(
            "Liveness", "Answers while the server runs (the seed's shape, no envelope).",
            {"200": {"description": "running", "content": _json({
                "type": "object", "required": ["status"], "properties": {"status": {"const": "Server is running"}}})},
             **_errors(403)},
            security=OPEN, tag="digital_human", operation_id="check")},
        "/digital_human/preprocess": {"post": _operation(
            "Prepare an avatar from a video",
            "Queues the preparation of avatar `streamer_id` from `video_path` (inside the data directory) as a job and "
            "answers at once: `data` is the job (`job_id`, `status_url`: GET it for progress, DELETE it to cancel). "
            "`wait: true` answers once the job has ended. `/digital_human/gen` on that avatar waits for the job.",
            {"200": {"description": "the job", "content": _json({
                "type": "object", "required": ["code", "msg", "user_id", "request_id", "data"],
                "properties": {"code": {"const": 0}, "msg": {"const": "ok"}, "user_id": {"type": "string"},
                               "request_id": {"type": "string"}, "data": _ref("AvatarJob")}})},
             **_errors(400, *ACCESS, 404, 409, 413, 429)},
            security=TOKEN, parameters=[_query("token")],
            body=_json_body("Preprocess", {"user_id": "u1", "request_id": "r1", "streamer_id": "anna",
                                           "video_path": "data/video/anna.mp4"}),
            tag="digital_human", operation_id="preprocess")},
        "/digital_human/gen": {"post": _operation(
            "Render speech to an mp4", "Renders `tts_path` (inside the data directory) with avatar `streamer_id` in the "
            "inference worker; the file is at `digital_human_mp4_path` on the server and at `data.url`.",
            {"200": {"description": "rendered", "content": _json({
                "type": "object", "required": ["code", "msg", "user_id", "request_id", "digital_human_mp4_path", "data"],
                "properties": {"code": {"const": 0}, "msg": {"const": "ok"}, "user_id": {"type": "string"},
                               "request_id": {"type": "string"}, "digital_human_mp4_path": {"type": "string"},
                               "data": {"type": "object", "required": ["url"],
                                        "properties": {"frames": {"type": "integer"}, "duration": {"type": "number"},
                                                       "url": {"type": "string"}}}}})},
             **_errors(400, *ACCESS, 404, 413, 503, 507)},
            security=TOKEN, parameters=[_query("token")],
            body=_json_body("Gen", {"user_id": "u1", "request_id": "r1", "streamer_id": "default",
                                    "tts_path": "data/audio/yongen.wav", "chunk_id": 0}),
            tag="digital_human", operation_id="gen"),
            "delete": _operation(
            "Cancel rendering", "Cancels `user_id`'s running /gen jobs for `request_id` (one `chunk_id`, or all); "
            "the waiting /gen answers 409 and its partial file is removed.",
            {"200": {"description": "cancelled", "content": _json({
                "type": "object", "required": ["code", "msg", "user_id", "request_id", "data"],
                "properties": {"code": {"const": 0}, "msg": {"const": "ok"}, "user_id": {"type": "string"},
                               "request_id": {"type": "string"},
                               "data": {"type": "object", "properties": {"cancelled": {"type": "integer"}}}}})},
             **_errors(400, *ACCESS, 404, 413)},
            security=TOKEN, parameters=[_query("token")],
            body=_json_body("CancelGen", {"user_id": "u1", "request_id": "r1"}),
            tag="digital_human", operation_id="cancel_gen")},
        "/digital_human/outputs/{user_id}/{name}": {"get": _operation(
            "Download a rendered mp4", "A file /digital_human/gen wrote (REQUEST_CHUNK.mp4).",
            {"200": {"description": "the mp4", "content": mp4}, **_errors(*ACCESS, 404)},
            security=TOKEN,
            parameters=[{"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}, _query("token")],
            tag="digital_human", operation_id="download_output")},
        "/health": {"get": _operation(
            "Health", "200 while the inference worker runs, 503 while it is down.",
            {"200": {"description": "serving", "content": _json(_ref("Health"))},
             "503": {"description": "the worker is down (code 1302)", "content": _json(_ref("Health"))},
             **_errors(403)},
            security=OPEN, tag="server", operation_id="health")},
        "/metrics": {"get": _operation(
            "Metrics", "Prometheus text exposition (no session ids).",
            {"200": {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
             **_errors(*ACCESS)},
            security=TOKEN, parameters=[_query("token")], tag="server", operation_id="metrics")},
        "/stats": {"get": _operation(
            "Figures", "Sessions, worker pid and restarts, frames rendered; session ids only for the token holder.",
            {"200": _ok("the figures", {"type": "object", "required": ["sessions", "max_sessions", "worker_restarts"],
                                        "properties": {"sessions": {"type": "integer"}, "max_sessions": {"type": "integer"},
                                                       "worker_restarts": {"type": "integer"}}}),
             **_errors(*ACCESS)},
            security=TOKEN, parameters=[_query("token")], tag="server", operation_id="stats")},
        **_avatar_paths(config),
        **_clip_paths(config),
        **_livekit_paths(),
        OPENAPI_PATH: {"get": _operation(
            "This document", "The OpenAPI description of this server.",
            {"200": {"description": "the document", "content": _json({"type": "object", "required": ["openapi", "paths"]})},
             **_errors(403)},
            security=OPEN, tag="server", operation_id="openapi")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Real-Time Lip Sync", "version": VERSION, "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [{"name": "sessions"}, {"name": "avatars"}, {"name": "digital_human"}, {"name": "server"}, {"name": "livekit"},
                 {"name": "pages"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(config),
            "parameters": {
                "sessionid": {"name": "sessionid", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 128},
                              "description": "the session; absent or 0: the default session"},
                "secret": {"name": "secret", "in": "query", "required": False, "schema": {"type": "string"},
                           "description": "the session's secret (or X-Session-Secret, or the body's secret)"},
                "token": {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                          "description": "the server's token (or Authorization: Bearer)"},
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "the server's --token; needed only when it has one"},
                "sessionSecret": {"type": "apiKey", "in": "header", "name": "X-Session-Secret",
                                  "description": "the secret POST /offer returned with the session"},
            },
        },
    }


@routes.get(OPENAPI_PATH)
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_spec(request.app[CONFIG]))


# ---- avatars and their preparation jobs (server/avatar_routes.py) ----


def _avatar_schemas(config: ServerConfig) -> dict[str, Schema]:
    nullable_str: Schema = {"type": ["string", "null"]}
    nullable_num: Schema = {"type": ["number", "null"]}
    return {
        "AvatarEntry": {
            "type": "object",
            "required": ["name", "width", "height", "fps", "frames", "seconds", "bytes", "clips", "engines"],
            "properties": {
                "name": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                "fps": {"type": "integer"}, "frames": {"type": "integer"}, "seconds": {"type": "number"},
                "bytes": {"type": "integer", "description": "on disk, engine material included"},
                "kind": {**nullable_str, "description": "video or image: what it was prepared from"},
                "source": {**nullable_str, "description": "the file it was prepared from"},
                "builder": nullable_str, "format": {"type": ["integer", "null"]},
                "clips": {"type": "array", "description": "action clips, played by /set_audiotype's `audiotype` number or name",
                          "items": {"type": "object", "required": ["number", "name"],
                                    "properties": {"number": {"type": "integer"}, "name": {"type": "string"}}}},
                "engines": {"type": "object", "required": ["cpu", "musetalk"],
                            "description": "which engines have what they need prepared (cpu needs nothing)",
                            "properties": {"cpu": {"type": "boolean"}, "musetalk": {"type": "boolean"}}},
                "material": {"type": "object", "properties": {"musetalk": {"type": "array", "items": {"type": "object"}}}},
                "prepared_at": nullable_str,
                "default": {"type": "boolean", "description": "the avatar a session gets when /offer names none"},
            },
        },
        "AvatarJob": {
            "type": "object",
            "required": ["job_id", "name", "state", "stage", "progress", "error", "result", "status_url"],
            "properties": {
                "job_id": {"type": "string"}, "name": {"type": "string"},
                "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                "stage": {"type": "string", "description": "queued, starting, then prepare_avatar's stages; the state once ended"},
                "progress": {"type": "object", "required": ["done", "total", "fraction", "fps", "eta_s"],
                             "properties": {"done": {"type": "integer"}, "total": {"type": "integer"},
                                            "fraction": nullable_num, "fps": {**nullable_num, "description": "steps/s in this stage"},
                                            "eta_s": {**nullable_num, "description": "seconds left in this stage"}}},
                "error": {**nullable_str, "description": "why it failed or was cancelled (no face, not a video, ...)"},
                "result": {"anyOf": [_ref("AvatarEntry"), {"type": "null"}], "description": "the avatar, once done"},
                "warnings": {"type": "array", "items": {"type": "string"},
                             "description": "what the preparation noticed (frames without a usable face, ...)"},
                "source": {"type": "string"}, "replace": {"type": "boolean"}, "options": {"type": "object"},
                "queue_position": {"type": ["integer", "null"]},
                "queued_at": nullable_str, "started_at": nullable_str, "finished_at": nullable_str,
                "elapsed_s": {"type": "number"}, "status_url": {"type": "string"},
            },
        },
        "AvatarUpload": {
            "type": "object", "required": ["name", "file"],
            "properties": {
                "name": _ref("AvatarName"),
                "file": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                         "description": f"a video (mp4, mov, webm...) or a picture (png, jpg) with one face; at most "
                                        f"{config.max_avatar_upload_bytes} bytes"},
                "replace": {"enum": ["true", "false", "1", "0"],
                            "description": "replace an existing avatar, the built-in `default` or the server's --avatar"},
                "fps": {"type": "string", "pattern": "^[0-9]{1,2}$", "description": "1-60 (default 25)"},
                "max_seconds": {"type": "string", "pattern": "^[0-9]{1,3}(\\.[0-9]{1,3})?$",
                                "description": "0.04-120: use at most this much of a video (default: as `python -m avatars "
                                               "prepare`)"},
                "max_side": {"type": "string", "pattern": "^[0-9]{1,4}$",
                             "description": "16-4096 (default 1280): shrink so the longer side is at most this"},
            },
        },
    }


def _avatar_paths(config: ServerConfig) -> dict[str, Schema]:
    job_id: Schema = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    job_example = {"code": 0, "msg": "ok", "data": {
        "job_id": "9f1c2b3a4d5e6f70", "name": "anna", "state": "running", "stage": "landmarks",
        "progress": {"done": 120, "total": 500, "fraction": 0.24, "fps": 61.5, "eta_s": 6.2}, "error": None,
        "result": None, "status_url": "/avatars/jobs/9f1c2b3a4d5e6f70"}}
    return {
        "/avatars": {
            "get": _operation(
                "List the avatars", "Every prepared avatar (size, frame rate, length, bytes on disk, action clips, which "
                "engines have material for it), the server's default avatar and engine, and the preparations queued or "
                "running.",
                {"200": _ok("the avatars", {"type": "object", "required": ["default", "engine", "avatars", "jobs"],
                                            "properties": {"default": {"type": "string"}, "engine": {"type": "string"},
                                                           "avatars": {"type": "array", "items": _ref("AvatarEntry")},
                                                           "jobs": {"type": "array", "items": _ref("AvatarJob")}}}),
                 **_errors(*ACCESS)},
                security=TOKEN, parameters=[_query("token")], tag="avatars", operation_id="list_avatars"),
            "post": _operation(
                "Prepare an avatar from an upload",
                "multipart/form-data: `name` and `file` (a video or a picture with one face), optional `replace`, `fps`, "
                "`max_seconds`, `max_side`. The upload is streamed to disk (413 past "
                f"{config.max_avatar_upload_bytes} bytes); the answer (202) is the job: follow it at `data.status_url`. "
                "An existing avatar, the built-in `default` and the server's --avatar are replaced only with `replace` "
                "(409 otherwise) and, with --token, only by the operator. One job runs at a time; past "
                f"{config.max_avatar_jobs} queued or running: 429.",
                {"202": {"description": "the job, queued", "headers": {"Location": {"schema": {"type": "string"}}},
                         "content": _json({"type": "object", "required": ["code", "msg", "data"],
                                           "properties": {"code": {"const": 0}, "msg": {"const": "ok"},
                                                          "data": _ref("AvatarJob")}})},
                 **_errors(400, *ACCESS, 409, 413, 429, 507)},
                security=TOKEN, parameters=[_query("token")],
                body={"required": True, "content": {"multipart/form-data": {
                    "schema": _ref("AvatarUpload"), "encoding": {"file": {"contentType": "application/octet-stream"}}}}},
                tag="avatars", operation_id="upload_avatar"),
        },
        "/avatars/jobs/{job_id}": {
            "get": _operation(
                "Follow a preparation", "The job's state (queued, running, done, failed, cancelled), stage, progress "
                "(done/total, steps per second, seconds left in the stage), error and, once done, the avatar. Ended jobs "
                "are kept for an hour (the last 64).",
                {"200": _ok("the job", _ref("AvatarJob"), job_example), **_errors(*ACCESS, 404)},
                security=TOKEN, parameters=[job_id, _query("token")], tag="avatars", operation_id="avatar_job"),
            "delete": _operation(
                "Cancel a preparation", "A queued job is dropped; a running one is killed and what it wrote removed "
                "(an avatar it was replacing stays as it was). 409 when the job has ended.",
                {"200": _ok("the job, cancelled", _ref("AvatarJob")), **_errors(*ACCESS, 404, 409)},
                security=TOKEN, parameters=[job_id, _query("token")], tag="avatars", operation_id="cancel_avatar_job"),
        },
    }


# ---- action clips (POST /avatars/{name}/clips in server/routes.py) ----


def _clip_schemas(config: ServerConfig) -> dict[str, Schema]:
    form_flag: Schema = {"enum": ["true", "false", "1", "0"]}
    return {
        "AddClip": {
            "type": "object", "required": ["clip", "file"],
            "properties": {
                "clip": {"type": "string", "pattern": CLIP_NAME_RE.pattern, "description": "the clip's name: a letter first"},
                "file": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                         "description": f"a video (mp4, mov, webm...) of at most {MAX_CLIP_SECONDS:.0f} s and "
                                        f"{config.max_upload_bytes} bytes, cut from the avatar's framing; its sound is kept"},
                "number": {"type": "string", "pattern": "^[0-9]{1,9}$",
                           "description": f"its audiotype number, {FIRST_NUMBER} or more (0 and 1 are the idle loop); "
                                          "default: its number when replaced, else the first free"},
                "loop": {**form_flag, "description": "play until switched away (default: once, then the idle loop)"},
                "replace": {**form_flag, "description": "replace a clip of that name (409 otherwise)"},
            },
        },
        "Clip": {
            "type": "object", "required": ["avatar", "name", "number", "frames", "seconds", "has_audio", "loop"],
            "properties": {"avatar": {"type": "string"}, "name": {"type": "string"}, "number": {"type": "integer"},
                           "frames": {"type": "integer"}, "seconds": {"type": "number"},
                           "has_audio": {"type": "boolean"}, "loop": {"type": "boolean"}},
        },
    }


def _clip_paths(config: ServerConfig) -> dict[str, Schema]:
    return {
        "/avatars/{name}/clips": {"post": _operation(
            "Add an action clip to an avatar",
            "A short video, fitted to the avatar (its frame rate; scaled and centre-cropped to its size; refused when its "
            "shape is too far off), with its sound, stored with the avatar and listed in its `clips`. Open sessions on "
            "the avatar can play it at once with POST /set_audiotype (its number or name).",
            {"200": _ok("the clip", _ref("Clip"), {"code": 0, "msg": "ok", "data": {
                "avatar": "anna", "name": "wave", "number": 2, "frames": 50, "seconds": 2.0, "has_audio": True,
                "loop": False}}),
             **_errors(400, *ACCESS, 404, 409, 413, 507)},
            security=TOKEN,
            parameters=[{"name": "name", "in": "path", "required": True, "schema": _ref("AvatarName")}, _query("token")],
            body={"required": True, "content": {"multipart/form-data": {
                "schema": _ref("AddClip"), "encoding": {"file": {"contentType": "application/octet-stream"}}}}},
            tag="avatars", operation_id="add_clip")},
    }


# ---- LiveKit avatars (server/livekit/launch.py) ----


def _livekit_paths() -> dict[str, Schema]:
    avatar: Schema = {"type": "object", "required": ["id", "state"], "properties": {
        "id": {"type": "string"}, "room": {"type": ["string", "null"]}, "livekit_url": {"type": "string"},
        "avatar": {"type": ["string", "null"]}, "pid": {"type": "integer"}, "exit_code": {"type": ["integer", "null"]},
        "state": {"enum": ["starting", "connecting", "joined", "running", "ended", "failed", "stopped"]},
        "error": {"type": ["string", "null"]}, "started_at": {"type": "number"}}}
    launch: Schema = {"type": "object", "required": ["livekit_url", "token"], "properties": {
        "livekit_url": {"type": "string", "pattern": "^(wss?|https?)://", "maxLength": 2048,
                        "description": "the LiveKit server (wss://...)"},
        "token": {"type": "string", "minLength": 1, "maxLength": 16384,
                  "description": "a token for the avatar's identity whose attribute lk.publish_on_behalf names the agent"},
        "room": {"type": "string", "maxLength": 256, "description": "the room's name, for the listing (the token decides)"},
        "avatar": {"type": "string", "maxLength": 128, "description": "this server's avatar to show (default: the server's)"}}}
    avatar_id: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
    return {
        "/livekit/launch": {"post": _operation(
            "Start a LiveKit avatar", "One worker process joins the room as the agent's avatar, renders the agent's speech "
            "here and publishes avatar_video/avatar_audio. 503 (1302) when the worker's own environment is not installed; "
            "429 past LIPSYNC_LIVEKIT_MAX_AVATARS.",
            {"200": _ok("the avatar, starting", avatar), **_errors(400, *ACCESS, 413, 429, 503)},
            security=TOKEN, parameters=[_query("token")], body={"required": True, "content": _json(launch)},
            tag="livekit", operation_id="livekit_launch")},
        "/livekit/avatars": {"get": _operation(
            "LiveKit avatars", "Those running and the last ones that ended (with their error).",
            {"200": _ok("the avatars", {"type": "object", "required": ["avatars", "alive", "max"], "properties": {
                "avatars": {"type": "array", "items": avatar}, "alive": {"type": "integer"}, "max": {"type": "integer"}}}),
             **_errors(*ACCESS)},
            security=TOKEN, parameters=[_query("token")], tag="livekit", operation_id="livekit_avatars")},
        "/livekit/avatars/{id}": {
            "get": _operation("A LiveKit avatar", "Its state and error.", {"200": _ok("the avatar", avatar), **_errors(*ACCESS, 404)},
                              security=TOKEN, parameters=[avatar_id, _query("token")], tag="livekit", operation_id="livekit_avatar"),
            "delete": _operation("Stop a LiveKit avatar", "It leaves the room (SIGINT, then SIGKILL after 5 s).",
                                 {"200": _ok("the avatar, stopped", avatar), **_errors(*ACCESS, 404)},
                                 security=TOKEN, parameters=[avatar_id, _query("token")], tag="livekit",
                                 operation_id="livekit_stop"),
        },
    }
