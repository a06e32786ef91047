"""Avatars over HTTP: list them, prepare one from an upload (a job), follow or cancel the job.

* ``GET /avatars``: every prepared avatar (size, fps, length, bytes on disk, clips, which
  engines have material for it) and the preparations queued or running.
* ``POST /avatars``: multipart ``name`` + ``file`` (a video or a picture; optional
  ``replace``, ``fps``, ``max_seconds``, ``max_side``). The upload is streamed to a file under
  the data directory, never held in memory, and capped (``--max-avatar-upload-bytes``, 413
  past it); the answer (202) is the job.
* ``GET /avatars/jobs/{job_id}``: the job's state, stage, progress, error and, once done, the
  avatar's listing entry. ``DELETE`` on it cancels it.

``POST /digital_human/preprocess`` (``server/digital_human.py``) queues the same jobs.
An existing avatar, the built-in ``default`` and the server's ``--avatar`` are replaced only
when asked (``replace``), and only by the operator when the server has a token.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from avatars.avatar import InvalidAvatarName, avatar_dir, check_name
from avatars.default import DEFAULT_NAME as BUILTIN_AVATAR
from server.access import Forbidden, is_operator
from server.avatar_jobs import AvatarJobs, JobState, PrepareRequest
from server.config import ServerConfig
from server.errors import BadRequest, Conflict, ErrorCode, LipSyncError, UnknownAvatar
from server.keys import CONFIG, MANAGER
from server.request import Body, check_text, field_bool, show

log = logging.getLogger(__name__)

routes = web.RouteTableDef()
AVATAR_JOBS = web.AppKey("avatar_jobs", AvatarJobs)

UPLOAD_DIR = Path("tmp") / "avatar-uploads"  # under the data directory: same disk as the avatars
CHUNK = 256 * 1024
FIELD_MAX = 1024  # bytes of a form field other than the file
FORM_SLACK = 64 * 1024  # the form's other fields and part headers, beside the file
DISK_RESERVE = 64 * 2**20  # left free on the data directory's disk
STALE_UPLOAD_S = 86400.0
SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,8}$")
FORM_FIELDS = ("name", "replace", "fps", "max_seconds", "max_side")


# ---- options -----------------------------------------------------------------------------


class Bound:
    """A numeric option of the preparation: its default, range, and (in a form) its spelling."""

    def __init__(self, name: str, lo: float, hi: float, integer: bool, form_re: str) -> None:
        self.name, self.lo, self.hi, self.integer = name, lo, hi, integer
        self.form_re = re.compile(form_re)

    def what(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"field '{self.name}' must be {kind} from {self.lo:g} to {self.hi:g}"

    def check(self, value: float) -> float:
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise BadRequest(f"{self.what()}, got {show(value)}")
        return value

    def from_json(self, body: Body) -> float | None:
        value = body.get(self.name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{self.what()}, got {show(value)}")
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            raise BadRequest(f"{self.what()}, got {show(value)}")
        return self.check(float(value))

    def from_form(self, fields: dict[str, str]) -> float | None:
        text = fields.get(self.name)
        if text is None:
            return None
        if not self.form_re.fullmatch(text):
            raise BadRequest(f"{self.what()}, got {show(text)}")
        return self.check(float(text))


# Absent: prepare_avatar's defaults (``python -m avatars prepare`` has the same).
BOUNDS = (
    Bound("fps", 1, 60, True, r"[0-9]{1,2}"),
    Bound("max_seconds", 0.04, 120.0, False, r"[0-9]{1,3}(\.[0-9]{1,3})?"),
    Bound("max_side", 16, 4096, True, r"[0-9]{1,4}"),
)


def _options(values: list[tuple[Bound, float | None]]) -> dict[str, float]:
    return {b.name: (int(v) if b.integer else v) for b, v in values if v is not None}


def options_from_json(body: Body) -> dict[str, float]:
    return _options([(b, b.from_json(body)) for b in BOUNDS])


def options_from_form(fields: dict[str, str]) -> dict[str, float]:
    return _options([(b, b.from_form(fields)) for b in BOUNDS])


def avatar_name(value: str, field: str) -> str:
    try:
        return check_name(value)
    except InvalidAvatarName as exc:
        raise BadRequest(f"field '{field}': {exc}") from None


# ---- who may replace what ----------------------------------------------------------------


def check_replace(request: web.Request, name: str, replace: bool, how: str) -> None:
    """An avatar that exists, the built-in ``default`` and the server's ``--avatar`` are replaced
    only with ``replace`` (409 otherwise), and only by the operator when the server has a token
    (403). ``how`` says how to ask for it in this route's terms."""
    config = request.app[CONFIG]
    exists = (avatar_dir(config.data_dir, name) / "avatar.json").is_file()
    what = ("the built-in avatar" if name == BUILTIN_AVATAR else
            "the server's default avatar" if name == config.avatar else "avatar")
    if not (exists or name in (BUILTIN_AVATAR, config.avatar)):
        return
    if not replace:
        needs = " with the operator's token" if config.token is not None else ""
        raise Conflict(f"{what} {name!r} exists: {how}{needs} to replace it (sessions already on it keep the old one), "
                       "or choose another name")
    if config.token is not None and not is_operator(request):
        raise Forbidden(f"replacing {what} {name!r} needs the operator's token (Authorization: Bearer TOKEN)")


def unknown_avatar(app: web.Application, name: str, why: str = "") -> UnknownAvatar:
    """UnknownAvatar for ``name``, listing the avatars there are, and saying so when ``name``
    is being prepared or its last preparation failed."""
    jobs = app.get(AVATAR_JOBS)
    known = jobs.catalog.names() if jobs is not None else []
    parts = [why or f"avatar {name!r} is not prepared"]
    pending = jobs.pending(name) if jobs is not None else None
    if pending is not None:
        parts.append(f"it is being prepared (job {pending.id}, {pending.state.value}): try again once "
                     f"GET {pending.status_url} says done")
    elif jobs is not None and (last := jobs.last(name)) is not None and last.state == JobState.FAILED:
        parts.append(f"its preparation failed (job {last.id}): {last.error}")
    parts.append(f"known avatars: {', '.join(known) if known else 'none'} (GET /avatars lists them; POST /avatars prepares one)")
    return UnknownAvatar("; ".join(parts))


# ---- routes --------------------------------------------------------------------------------


@routes.get("/avatars")
async def get_avatars(request: web.Request) -> web.Response:
    config, jobs = request.app[CONFIG], request.app[AVATAR_JOBS]
    entries = await asyncio.get_running_loop().run_in_executor(None, jobs.catalog.entries)  # file system: off the loop
    return web.json_response({"code": 0, "msg": "ok", "data": {
        "default": config.avatar,
        "engine": config.engine,
        "avatars": [{**entry, "default": entry["name"] == config.avatar} for entry in entries],
        "jobs": [jobs.snapshot(job) for job in jobs.active()],
    }})


@routes.post("/avatars")
async def post_avatar(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    fields, upload, filename = await read_upload(request, config)
    try:
        if upload is None:
            raise BadRequest("missing file field 'file' (a video: mp4, mov, webm...; or a picture: png, jpg)", ErrorCode.MISSING_FIELD)
        if "name" not in fields:
            raise BadRequest("missing field 'name' (the new avatar's name)", ErrorCode.MISSING_FIELD)
        name = avatar_name(fields["name"], "name")
        replace = field_bool(fields, "replace")
        options = options_from_form(fields)
        if upload.stat().st_size == 0:
            raise BadRequest("the uploaded file is empty: send a video or a picture with one face")
        check_replace(request, name, replace, "send the form field replace=true")
        prepare = PrepareRequest(name, upload, options, replace=replace, source_name=filename, owns_source=True)
        job = request.app[AVATAR_JOBS].submit(prepare)
    except BaseException:
        if upload is not None:
            upload.unlink(missing_ok=True)
        raise
    return web.json_response({"code": 0, "msg": "ok", "data": request.app[AVATAR_JOBS].snapshot(job)}, status=202,
                             headers={"Location": job.status_url})


@routes.get("/avatars/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    jobs = request.app[AVATAR_JOBS]
    return web.json_response({"code": 0, "msg": "ok", "data": jobs.snapshot(jobs.get(request.match_info["job_id"]))})


@routes.delete("/avatars/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[AVATAR_JOBS]
    job = await jobs.cancel(request.match_info["job_id"])
    return web.json_response({"code": 0, "msg": "ok", "data": jobs.snapshot(job)})


# ---- the upload ------------------------------------------------------------------------------


def too_large(cap: int) -> LipSyncError:
    return LipSyncError(f"the upload is larger than the {cap} bytes this server takes for an avatar "
                        "(--max-avatar-upload-bytes): send a shorter clip (5-20 s is plenty) or a picture",
                        ErrorCode.PAYLOAD_TOO_LARGE)


async def read_upload(request: web.Request, config: ServerConfig) -> tuple[dict[str, str], Path | None, str]:
    """The form's small fields, and its ``file`` streamed to a file under the data directory
    (the caller deletes it), with the name the client gave it."""
    cap = config.max_avatar_upload_bytes
    if request.content_type != "multipart/form-data":
        raise BadRequest("send multipart/form-data with the fields 'name' and 'file' (curl -F name=anna -F file=@anna.mp4)")
    if request.content_length is not None and request.content_length > cap + FORM_SLACK:
        raise too_large(cap)
    folder = Path(config.data_dir) / UPLOAD_DIR
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: folder.mkdir(parents=True, exist_ok=True))
    free = (await loop.run_in_executor(None, shutil.disk_usage, folder)).free
    if free < (request.content_length or cap) + DISK_RESERVE:
        raise LipSyncError(f"the data directory's disk has {free // 2**20} MiB free, too little to take this upload: "
                           "free some space and send it again", ErrorCode.INSUFFICIENT_STORAGE)
    fields: dict[str, str] = {}
    upload: Path | None = None
    filename = ""
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("unreadable form: a nested multipart part; send flat form fields")
            if part.name == "file":
                if upload is not None:
                    raise BadRequest("send one file field 'file', not several")
                filename = check_text(part.filename or "", "file's filename")[:255]
                upload = await _stream_file(part, folder, _suffix(filename), cap, loop)
            elif part.name in FORM_FIELDS:
                if part.name in fields:
                    raise BadRequest(f"field '{part.name}' is sent more than once")
                fields[part.name] = await _small_field(part)
            else:
                await part.release()  # an unknown field is ignored, as in JSON bodies
    except BaseException as exc:
        if upload is not None:
            upload.unlink(missing_ok=True)
        if isinstance(exc, (LipSyncError, asyncio.CancelledError)) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            raise BadRequest(f"unreadable form: {_aiohttp_message(exc)}", ErrorCode.MALFORMED_REQUEST) from None
        if isinstance(exc, UnicodeDecodeError):
            raise BadRequest(f"unreadable form: a field is not valid {exc.encoding} text (byte {exc.start}: {exc.reason})") from None
        if isinstance(exc, (ValueError, RuntimeError, LookupError, AssertionError, zlib.error, OSError)):
            raise BadRequest(f"unreadable form: {exc}") from None
        raise
    return fields, upload, filename


def _suffix(filename: str) -> str:
    """The upload's extension, which tells a picture from a video; dropped when odd."""
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if SUFFIX_RE.fullmatch(suffix) else ""


async def _stream_file(part: BodyPartReader, folder: Path, suffix: str, cap: int,
                       loop: asyncio.AbstractEventLoop) -> Path:
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=folder)
    path = Path(name)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await part.read_chunk(CHUNK):
                async for data in part.decode_iter(chunk):
                    written += len(data)
                    if written > cap:
                        raise too_large(cap)
                    await loop.run_in_executor(None, out.write, bytes(data))  # a disk write: off the loop
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


async def _small_field(part: BodyPartReader) -> str:
    raw = bytearray()
    while chunk := await part.read_chunk(FIELD_MAX + 1):
        raw += part.decode(chunk)
        if len(raw) > FIELD_MAX:
            raise BadRequest(f"field '{part.name}' is longer than {FIELD_MAX} bytes")
    text = bytes(raw).decode(part.get_charset(default="utf-8"))
    return check_text(text, part.name or "?")


def _aiohttp_message(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
    message = getattr(cause, "message", None)
    return " ".join((message if isinstance(message, str) and message else str(cause)).split())


def remove_stale_uploads(folder: Path, older_than_s: float = STALE_UPLOAD_S) -> None:
    """Uploads a previous run left (killed mid-upload, or with jobs queued). Only old ones:
    another server may share the data directory."""
    now = time.time()
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()


# ---- wiring ----------------------------------------------------------------------------------


def setup_avatars(app: web.Application) -> None:
    """Add the avatar routes and the preparation jobs (killed at shutdown) to ``app``."""
    config = app[CONFIG]

    def announce(name: str) -> None:  # sessions opened from now on get the new avatar
        manager = app.get(MANAGER)
        if manager is not None:
            manager.forget_avatar(name)

    app[AVATAR_JOBS] = AvatarJobs(config.data_dir, max_jobs=config.max_avatar_jobs, timeout_s=config.job_timeout_s,
                                  on_done=announce)
    app.add_routes(routes)

    async def startup(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, remove_stale_uploads, Path(config.data_dir) / UPLOAD_DIR)

    async def shutdown(app: web.Application) -> None:
        await app[AVATAR_JOBS].close()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
