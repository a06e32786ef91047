"""What can go wrong, as a client sees it: every failure is JSON
``{"code": <non-zero>, "msg": "..."}`` and the code decides the HTTP status.

Sessions, the manager and the routes raise ``LipSyncError`` subclasses that name the
failure, not the transport; ``error_middleware`` turns them (and aiohttp's own 404/405/413)
into responses. The WebSocket sends the same ``code``/``msg`` as an ``error`` event.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

log = logging.getLogger(__name__)


class ErrorCode(IntEnum):
    INVALID_JSON = 1001
    MISSING_FIELD = 1002
    INVALID_FIELD = 1003
    EMPTY_TEXT = 1004
    UNSUPPORTED_AUDIO = 1005
    PAYLOAD_TOO_LARGE = 1006
    MALFORMED_REQUEST = 1007  # not the fields: the HTTP request itself (its body's encoding, a WebSocket handshake)
    CHAT_NOT_CONFIGURED = 1008  # type "chat" on a server without --chat-base-url
    UNKNOWN_SESSION = 1101
    UNKNOWN_AVATAR = 1102
    NOT_FOUND = 1103
    METHOD_NOT_ALLOWED = 1104
    PATH_OUTSIDE_DATA = 1105
    CONFLICT = 1201
    TOO_MANY_SESSIONS = 1301
    WORKER_UNAVAILABLE = 1302
    TTS_FAILED = 1303
    CHAT_FAILED = 1304  # the chat model is unreachable, refused the request or broke off
    CHAT_TIMEOUT = 1305  # the chat model said nothing in time, or its stream stalled
    UNAUTHORIZED = 1401
    FORBIDDEN = 1403
    TOO_MANY_REQUESTS = 1429
    INSUFFICIENT_STORAGE = 1507
    INTERNAL = 1500


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.MISSING_FIELD: 400,
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.EMPTY_TEXT: 400,
    ErrorCode.UNSUPPORTED_AUDIO: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.MALFORMED_REQUEST: 400,
    ErrorCode.CHAT_NOT_CONFIGURED: 400,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.UNKNOWN_AVATAR: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.PATH_OUTSIDE_DATA: 400,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_MANY_SESSIONS: 503,
    ErrorCode.WORKER_UNAVAILABLE: 503,
    ErrorCode.TTS_FAILED: 502,
    ErrorCode.CHAT_FAILED: 502,
    ErrorCode.CHAT_TIMEOUT: 504,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.TOO_MANY_REQUESTS: 429,
    ErrorCode.INSUFFICIENT_STORAGE: 507,
    ErrorCode.INTERNAL: 500,
}


class LipSyncError(Exception):
    """A failure the client can act on; ``msg`` says what was wrong and how to fix it."""

    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, msg: str, code: ErrorCode | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code or self.default_code

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]


class BadRequest(LipSyncError):
    """The request itself is wrong (unreadable, a field missing or invalid)."""

    default_code = ErrorCode.INVALID_FIELD


class UnknownSession(LipSyncError):
    default_code = ErrorCode.UNKNOWN_SESSION


class UnknownAvatar(LipSyncError):
    default_code = ErrorCode.UNKNOWN_AVATAR


class NotFound(LipSyncError):
    default_code = ErrorCode.NOT_FOUND


class Conflict(LipSyncError):
    """The session is not in a state that allows this (already recording, ...)."""

    default_code = ErrorCode.CONFLICT


class TooManySessions(LipSyncError):
    default_code = ErrorCode.TOO_MANY_SESSIONS


class WorkerUnavailable(LipSyncError):
    default_code = ErrorCode.WORKER_UNAVAILABLE


class TooManyRequests(LipSyncError):
    """A per-session or per-client bound was reached; the message says which and what to do."""

    default_code = ErrorCode.TOO_MANY_REQUESTS


def error_body(code: ErrorCode, msg: str) -> dict[str, Any]:
    return {"code": int(code), "msg": msg}


def error_response(code: ErrorCode, msg: str) -> web.Response:
    return web.json_response(error_body(code, msg), status=HTTP_STATUS[code])


def ok(data: Any = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"code": 0, "msg": "ok"}
    if data is not None:
        body["data"] = data
    body.update(extra)
    return web.json_response(body)


# aiohttp's own HTTP errors (raised by it or a handler), as the code a client sees.
_STATUS_CODE: dict[int, ErrorCode] = {
    400: ErrorCode.MALFORMED_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.TOO_MANY_REQUESTS,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure as the JSON error: the domain's ``LipSyncError``, aiohttp's HTTP errors
    (404, 405, 413, a bad WebSocket handshake, ...) and its errors reading a body (a
    ``Content-Encoding`` that does not decode: 400); anything else is a 500 with the details
    in the log. Redirects and other non-error ``HTTPException`` pass through."""
    try:
        return await handler(request)
    except LipSyncError as exc:
        response = error_response(exc.code, exc.msg)
        if exc.code == ErrorCode.MALFORMED_REQUEST:
            response.force_close()  # a body aiohttp could not read leaves nothing to reuse the connection for
        return response
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(ErrorCode.PAYLOAD_TOO_LARGE, f"request body too large: {exc.text}")
    except web.HTTPNotFound:
        return error_response(ErrorCode.NOT_FOUND, f"no such route or file: {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(ErrorCode.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}; use {allowed}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODE.get(exc.status, ErrorCode.MALFORMED_REQUEST if exc.status < 500 else ErrorCode.INTERNAL)
        text = " ".join((exc.text or exc.reason).split())
        return web.json_response(error_body(code, f"{request.method} {request.path}: {text}"), status=exc.status)
    except (RequestPayloadError, HttpProcessingError) as exc:  # a body aiohttp could not read
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        what = " ".join(str(getattr(cause, "message", "") or cause).split())
        response = error_response(ErrorCode.MALFORMED_REQUEST, f"the request body could not be read: {what}")
        response.force_close()
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ErrorCode.INTERNAL, "internal server error; the server log has the details")
