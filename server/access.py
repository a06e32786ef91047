"""Who may do what: the operator's token, each session's secret, and browser Origins.

* **Token** (``--token``): when set, every control route, the WebSocket, recordings and
  outputs need it, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (browsers and
  WebSockets cannot always set headers). The pages, ``/digital_human/check``, ``/health``
  and ``/openapi.json`` stay open. A token holder is the operator (a chatbot back end):
  it may address any session, the default one included.
* **Session secret**: ``/offer`` issues one with every session. Addressing a session by
  its id needs the secret too (``secret`` in the body or form, ``X-Session-Secret``, or
  ``?secret=``) unless the caller holds the token, so knowing an id (from a log, an event,
  a recording's name) is not enough to drive, record or download it. ``/offer`` also sets
  it as a ``SameSite=Strict`` cookie, so pages served here that send only ``sessionid``
  (LiveTalking's, the seed's) drive their own session. The default session (``sessionid``
  0 or none: the seed's single-user clients) needs no secret, and so neither does its own
  id (anyone may address it as 0); a multi-user deployment turns it off
  (``--no-default-session``).
* **Origin**: a browser request from a page on another origin is refused unless that
  origin is in ``--cors-origins``; requests without an ``Origin`` header (curl, Python, the
  seed's examples) are not browsers' cross-site requests and pass. Allowed origins get
  CORS headers, preflights included.
"""
from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from server.errors import ErrorCode, LipSyncError

OPEN_PATHS = frozenset({"/", "/digital_human/check", "/health", "/openapi.json"})
SECRET_HEADER = "X-Session-Secret"
CORS_HEADERS = "Authorization, Content-Type, X-Session-Secret"

class Unauthorized(LipSyncError):
    default_code = ErrorCode.UNAUTHORIZED


class Forbidden(LipSyncError):
    default_code = ErrorCode.FORBIDDEN


IS_OPERATOR = web.RequestKey("is_operator", bool)  # set on every request by the middleware


def new_secret() -> str:
    return secrets.token_urlsafe(18)


def same(a: str, b: str) -> bool:
    # surrogatepass: a header's undecodable bytes or a JSON "\ud800" compare (unequal) instead of raising
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token")


def secret_cookie(session_id: str) -> str:
    """The cookie ``/offer`` sets with the session's secret: a page on this server (ours, or
    LiveTalking's and the seed's, which send only ``sessionid``) then addresses its own
    session with no code for it. ``SameSite=Strict``: never sent on cross-site requests."""
    return f"lipsync_secret_{session_id}"


def presented_secret(request: web.Request, fields: Mapping[str, Any] | None = None, session_id: object = None) -> str | None:
    if fields is not None and isinstance(fields.get("secret"), str):
        return str(fields["secret"])
    found = request.headers.get(SECRET_HEADER) or request.query.get("secret")
    if found is None and isinstance(session_id, str) and session_id:
        found = request.cookies.get(secret_cookie(session_id))
    return found


def is_operator(request: web.Request) -> bool:
    """The request holds the operator's token (always false when none is configured)."""
    return bool(request.get(IS_OPERATOR, False))


def _is_page(path: str) -> bool:
    """Static pages and their assets: what a browser loads before it has any token."""
    return path in OPEN_PATHS or path.endswith((".html", ".js", ".css", ".ico", ".png", ".svg"))


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    own = f"{request.scheme}://{request.host}"
    return origin == own or origin in allowed or "*" in allowed


def access_middleware(token: str | None, cors_origins: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(request, cors_origins):
            raise Forbidden(
                f"requests from pages on {origin} are refused: open the page from this server, "
                "or add that origin to --cors-origins"
            )
        if request.method == "OPTIONS" and origin is not None:  # a CORS preflight from an allowed origin
            return with_cors(web.Response(status=204), origin)
        holds = token is not None and (given := presented_token(request)) is not None and same(given, token)
        request[IS_OPERATOR] = holds
        if token is not None and not holds and not _is_page(request.path):
            if presented_token(request) is None:
                raise Unauthorized("this server needs its token: send 'Authorization: Bearer TOKEN' (or ?token=TOKEN)")
            raise Forbidden("the token sent is not this server's token")
        response = await handler(request)
        return with_cors(response, origin) if origin is not None else response

    return middleware


def with_cors(response: web.StreamResponse, origin: str) -> web.StreamResponse:
    if not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Vary"] = "Origin"
    return response
