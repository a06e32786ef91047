"""API errors: every failure is JSON ``{"code": <non-zero>, "msg": "..."}`` with a 4xx/5xx status."""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


class ErrorCode(IntEnum):
    INVALID_JSON = 1001
    MISSING_FIELD = 1002
    INVALID_FIELD = 1003
    EMPTY_TEXT = 1004
    UNSUPPORTED_AUDIO = 1005
    PAYLOAD_TOO_LARGE = 1006
    UNKNOWN_SESSION = 1101
    UNKNOWN_AVATAR = 1102
    NOT_FOUND = 1103
    METHOD_NOT_ALLOWED = 1104
    PATH_OUTSIDE_DATA = 1105
    CONFLICT = 1201
    TOO_MANY_SESSIONS = 1301
    WORKER_UNAVAILABLE = 1302
    TTS_FAILED = 1303
    INTERNAL = 1500


class ApiError(Exception):
    def __init__(self, status: int, code: ErrorCode, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg


def ok(data: Any = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"code": 0, "msg": "ok"}
    if data is not None:
        body["data"] = data
    body.update(extra)
    return web.json_response(body)


def error_response(status: int, code: int, msg: str) -> web.Response:
    return web.json_response({"code": int(code), "msg": msg}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.msg)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body too large: {exc.text}")
    except web.HTTPNotFound:
        return error_response(404, ErrorCode.NOT_FOUND, f"no such route or file: {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(405, ErrorCode.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(exc.allowed_methods))}")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, ErrorCode.INTERNAL, "internal server error; the server log has the details")


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise ApiError(400, ErrorCode.INVALID_JSON, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, ErrorCode.INVALID_JSON, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def field_str(
    body: dict[str, Any], name: str, required: bool = True, default: str | None = None, max_len: int = 10_000, allow_int: bool = False
) -> str | None:
    """A string field. ``allow_int`` takes numbers too (LiveTalking clients send numeric session ids)."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, ErrorCode.MISSING_FIELD, f"missing field '{name}'")
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int) if allow_int else str):
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field '{name}' must be a string, got {type(value).__name__}")
    value = str(value)
    if len(value) > max_len:
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field '{name}' is too long ({len(value)} > {max_len} characters)")
    return value


def field_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(400, ErrorCode.INVALID_FIELD, f"field '{name}' must be true or false, got {value!r}")


def field_int(body: dict[str, Any], name: str, required: bool = True, default: int = 0) -> int:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, ErrorCode.MISSING_FIELD, f"missing field '{name}'")
        return default
    if isinstance(value, bool):
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field '{name}' must be an integer, got a boolean")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field '{name}' must be an integer, got {value!r}") from None


def field_session(body: dict[str, Any]) -> str:
    value = field_str(body, "sessionid", max_len=128, allow_int=True)
    assert value is not None
    return value
