"""Reading a request's fields: JSON bodies and form fields checked one by one, each
failure a ``BadRequest`` that names the field and what it should be.

Whatever a client sends, reading it raises ``BadRequest`` (a 4xx) or succeeds: bodies that
are not UTF-8, JSON nested beyond Python's recursion limit, integers past its 4,300-digit
parse limit, ``NaN``/``Infinity``/``1e400``, NUL characters and unpaired surrogates in
strings, undecodable ``Content-Encoding`` and malformed multipart forms included."""
from __future__ import annotations

import json
import math
import re
import sys
import zlib
from collections.abc import Mapping
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDictProxy

from server.errors import BadRequest, ErrorCode

Body = Mapping[str, Any]

INT_RE = re.compile(r"[+-]?[0-9]{1,18}")
CLIP_NUMBER_RE = re.compile(r"[+-]?[0-9]{1,9}")
MAX_SECRET_CHARS = 1024
SHOWN_CHARS = 60  # of a bad value quoted back in a message


def show(value: object) -> str:
    """``repr(value)``, cut to a length fit for an error message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text)} characters)"


def _refuse_constant(name: str) -> NoReturn:
    raise BadRequest(f"{name} is not a JSON value: send a finite number", ErrorCode.INVALID_JSON)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {show(text)} is out of range: send a finite number", ErrorCode.INVALID_JSON)
    return value


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """JSON text (UTF-8 when bytes) as Python values; every way it can be unreadable is a
    ``BadRequest`` with code 1001 saying which."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason}); send JSON in UTF-8",
                             ErrorCode.INVALID_JSON) from None
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    except RecursionError:
        raise BadRequest(f"{what} nests arrays or objects too deeply to read: send a flat JSON object",
                         ErrorCode.INVALID_JSON) from None
    except ValueError as exc:  # Python's limit on the digits of an integer (3.10.7 and later)
        if "digits" not in str(exc):
            raise BadRequest(f"{what} is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
        raise BadRequest(f"{what} holds an integer of more than {_int_digits()} digits, which this server does not read",
                         ErrorCode.INVALID_JSON) from None


def _int_digits() -> int:
    get = getattr(sys, "get_int_max_str_digits", None)
    return int(get()) if get is not None else 4300


def parse_json_object(raw: bytes | str, what: str = "the request body") -> dict[str, Any]:
    body = parse_json(raw, what)
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(body).__name__}", ErrorCode.INVALID_JSON)
    return body


async def read_body(request: web.Request) -> bytes:
    """The request's body; one aiohttp could not read (a ``Content-Encoding`` that does not
    decode, broken chunking) is a 400. Too large stays aiohttp's 413."""
    try:
        return await request.read()
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise BadRequest(f"the request body could not be read: {_aiohttp_message(exc)}", ErrorCode.MALFORMED_REQUEST) from None


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw:
        raise BadRequest("the request body is empty: send a JSON object", ErrorCode.INVALID_JSON)
    return parse_json_object(raw)


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """A multipart or urlencoded form; a malformed one (a missing boundary, a field that is not
    in its charset, an unknown charset or encoding) is a 400 saying what was wrong."""
    try:
        return await request.post()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"unreadable form: a field is not valid {exc.encoding} text (byte {exc.start}: {exc.reason})") from None
    except LookupError as exc:  # an unknown charset
        raise BadRequest(f"unreadable form: {exc}") from None
    except (ValueError, RuntimeError, zlib.error) as exc:  # aiohttp's multipart reader on malformed parts
        raise BadRequest(f"unreadable form: {exc}") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise BadRequest(f"unreadable form: {_aiohttp_message(exc)}", ErrorCode.MALFORMED_REQUEST) from None


def _aiohttp_message(exc: BaseException) -> str:
    """What aiohttp says went wrong reading a body, without its "400, message:" prefix."""
    cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
    message = getattr(cause, "message", None)
    text = message if isinstance(message, str) and message else str(cause)
    return " ".join(text.split())


def check_text(value: str, name: str) -> str:
    """A string field's value, refused when it holds what no field takes: NUL characters, and
    unpaired UTF-16 surrogates (valid JSON escapes, but not Unicode text)."""
    if "\0" in value:
        raise BadRequest(f"field '{name}' holds a NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"field '{name}' holds an unpaired surrogate ({value[exc.start]!r} at character {exc.start}): "
                         "send valid Unicode text") from None
    return value


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
    return check_text(value, name)


def field_str(body: Body, name: str, max_len: int = 10_000, allow_int: bool = False) -> str:
    """A required string field."""
    value = optional_str(body, name, max_len, allow_int)
    if value is None:
        raise BadRequest(f"missing field '{name}'", ErrorCode.MISSING_FIELD)
    return value


def field_bool(body: Body, name: str, default: bool = False) -> bool:
    """true/false, 1/0, or the strings "true"/"false"/"1"/"0" (any case)."""
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise BadRequest(f"field '{name}' must be true or false, got {show(value)}")


def field_int(body: Body, name: str) -> int:
    """An integer: a JSON integer, a float with no fraction (``2.0``), or a string of at most
    18 digits."""
    value = body.get(name)
    if value is None:
        raise BadRequest(f"missing field '{name}'", ErrorCode.MISSING_FIELD)
    if isinstance(value, bool):
        raise BadRequest(f"field '{name}' must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    if isinstance(value, (float, str)):
        raise BadRequest(f"field '{name}' must be an integer, got {show(value)}")
    raise BadRequest(f"field '{name}' must be an integer, got {type(value).__name__}")


def field_audiotype(body: Body) -> int | str:
    """``audiotype``: an integer (0 or 1 the idle loop, 2.. clips), a numeric string, or a clip's name."""
    value = body.get("audiotype")
    if isinstance(value, str):
        text = value.strip()
        if CLIP_NUMBER_RE.fullmatch(text):
            return int(text)
        if not text or len(text) > 128:
            raise BadRequest("field 'audiotype' must be a clip number or a clip name of 1-128 characters")
        return check_text(text, "audiotype")
    return field_int(body, "audiotype")


def field_session(body: Body) -> str | None:
    """The ``sessionid`` field: an id from ``/offer``, or None (absent, null) for the default session.
    A ``secret`` beside it (``server.access.presented_secret`` reads it) must be a string too."""
    session_id = optional_str(body, "sessionid", max_len=128, allow_int=True)
    optional_str(body, "secret", max_len=MAX_SECRET_CHARS)
    return session_id


def field_text(body: Body, max_len: int, name: str = "text") -> str:
    """Text to speak: a non-blank string of at most ``max_len`` characters."""
    text = field_str(body, name, max_len=max_len)
    if not text.strip():
        raise BadRequest(f"field '{name}' is empty: send something to say", ErrorCode.EMPTY_TEXT)
    return text
