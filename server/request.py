"""Reading a request's fields: JSON bodies and form fields checked one by one, each
failure a ``BadRequest`` that names the field and what it should be."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server.errors import BadRequest, ErrorCode

Body = Mapping[str, Any]


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("the request body is empty: send a JSON object", ErrorCode.INVALID_JSON)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}", ErrorCode.INVALID_JSON)
    return body


def optional_str(body: Body, name: str, max_len: int = 10_000, allow_int: bool = False) -> str | None:
    """A string field, or None when absent. ``allow_int`` takes numbers too (LiveTalking
    clients send numeric ids)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int) if allow_int else str):
        raise BadRequest(f"field '{name}' must be a string, got {type(value).__name__}")
    value = str(value)
    if len(value) > max_len:
        raise BadRequest(f"field '{name}' is too long ({len(value)} > {max_len} characters)")
    return value


def field_str(body: Body, name: str, max_len: int = 10_000, allow_int: bool = False) -> str:
    """A required string field."""
    value = optional_str(body, name, max_len, allow_int)
    if value is None:
        raise BadRequest(f"missing field '{name}'", ErrorCode.MISSING_FIELD)
    return value


def field_bool(body: Body, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise BadRequest(f"field '{name}' must be true or false, got {value!r}")


def field_int(body: Body, name: str) -> int:
    value = body.get(name)
    if value is None:
        raise BadRequest(f"missing field '{name}'", ErrorCode.MISSING_FIELD)
    if isinstance(value, bool):
        raise BadRequest(f"field '{name}' must be an integer, got a boolean")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"field '{name}' must be an integer, got {value!r}") from None


def field_audiotype(body: Body) -> int | str:
    """``audiotype``: an integer (0 idle, 1..n clips), a numeric string, or a clip's name."""
    value = body.get("audiotype")
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit() and len(text) <= 9:
            return int(text)
        if not text or len(text) > 128:
            raise BadRequest("field 'audiotype' must be a clip number or a clip name of 1-128 characters")
        return text
    return field_int(body, "audiotype")


def field_session(body: Body) -> str | None:
    """The ``sessionid`` field: an id from ``/offer``, or None (absent, null) for the default session."""
    return optional_str(body, "sessionid", max_len=128, allow_int=True)


def field_text(body: Body, max_len: int, name: str = "text") -> str:
    """Text to speak: a non-blank string of at most ``max_len`` characters."""
    text = field_str(body, name, max_len=max_len)
    if not text.strip():
        raise BadRequest(f"field '{name}' is empty: send something to say", ErrorCode.EMPTY_TEXT)
    return text
