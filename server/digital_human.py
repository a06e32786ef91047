"""The batch routes for chatbot back ends: prepare an avatar from a video (a job, see
``server/avatar_routes.py``), and render a spoken answer to an mp4 file. Every path is
resolved inside the data directory."""
from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from aiohttp import web

from avatars.avatar import InvalidAvatarName, check_name
from media.decode import probe_seconds
from server.avatar_jobs import JobState, PrepareRequest
from server.avatar_routes import AVATAR_JOBS, check_replace, options_from_json, unknown_avatar
from server.errors import BadRequest, Conflict, ErrorCode, NotFound, UnknownAvatar
from server.keys import CONFIG, MANAGER
from server.request import Body, field_bool, field_str, read_json

log = logging.getLogger(__name__)

routes = web.RouteTableDef()
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NAME_MAX = 255  # bytes in one path component (Linux, macOS, Windows)
OUTPUTS_URL = "/digital_human/outputs"


def resolve_in_data(data_dir: Path, given: str, field: str) -> Path:
    """``given`` as a path inside ``data_dir``. A relative path is read from the data
    directory, or, as the seed's clients write it (``data/audio/yongen.wav``), from the
    server's working directory; either way it must land inside the data directory."""
    root = Path(data_dir).resolve()
    if "\0" in given:
        raise BadRequest(f"field '{field}' holds a NUL character", ErrorCode.INVALID_FIELD)
    path = Path(given)
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise BadRequest(f"field '{field}' has a path component longer than {NAME_MAX} bytes", ErrorCode.INVALID_FIELD)
    candidates = [path] if path.is_absolute() else [root / path, Path.cwd() / path]
    try:
        inside = [p for p in (c.resolve() for c in candidates) if p == root or root in p.parents]
        if not inside:
            raise BadRequest(f"field '{field}' must name a file inside the data directory {root}, got {given!r}",
                             ErrorCode.PATH_OUTSIDE_DATA)
        return next((p for p in inside if p.exists()), inside[0])
    except OSError as exc:  # too long as a whole, a symlink loop, ...: the path cannot name a file here
        raise BadRequest(f"field '{field}' is not a usable path: {exc.strerror}", ErrorCode.INVALID_FIELD) from None


def _id(body: Body, name: str) -> str:
    value = field_str(body, name, max_len=64, allow_int=True)
    if not ID_RE.fullmatch(value):
        raise BadRequest(f"field '{name}' may hold only letters, digits, '_', '-' and '.' (1-64), got {value!r}")
    return value


def _streamer(body: Body) -> str:
    try:
        return check_name(_id(body, "streamer_id"))
    except InvalidAvatarName as exc:
        raise BadRequest(str(exc)) from None


@routes.post("/digital_human/preprocess")
async def preprocess(request: web.Request) -> web.Response:
    """Queue the preparation of avatar ``streamer_id`` from ``video_path`` and answer at once with
    the job (``data.job_id``, ``data.status_url``); ``"wait": true`` answers when it has ended,
    as the seed's route did. ``/digital_human/gen`` on that avatar waits for the job."""
    config, jobs = request.app[CONFIG], request.app[AVATAR_JOBS]
    body = await read_json(request)
    user_id, request_id, streamer = _id(body, "user_id"), _id(body, "request_id"), _streamer(body)
    video = resolve_in_data(config.data_dir, field_str(body, "video_path"), "video_path")
    if not video.is_file():
        raise NotFound(f"video_path {video} does not exist")
    options = options_from_json(body)
    replace = field_bool(body, "replace") or field_bool(body, "overwrite")  # "overwrite": this route's first spelling
    wait = field_bool(body, "wait")
    check_replace(request, streamer, replace, "send \"replace\": true (or \"overwrite\": true)")
    job = jobs.submit(PrepareRequest(streamer, video, options, replace=replace, source_name=video.name))
    if wait:
        await jobs.wait(job)
        if job.state == JobState.FAILED:
            raise BadRequest(f"could not prepare an avatar from {video.name}: {job.error}")
        if job.state == JobState.CANCELLED:
            raise Conflict(f"the preparation of {streamer!r} was cancelled: {job.error}")
    return web.json_response({"code": 0, "msg": "ok", "user_id": user_id, "request_id": request_id, "data": jobs.snapshot(job)})


@routes.post("/digital_human/gen")
async def gen(request: web.Request) -> web.Response:
    config, manager = request.app[CONFIG], request.app[MANAGER]
    body = await read_json(request)
    user_id, request_id, streamer = _id(body, "user_id"), _id(body, "request_id"), _streamer(body)
    chunk_id = _id(body, "chunk_id") if body.get("chunk_id") is not None else "0"
    audio = resolve_in_data(config.data_dir, field_str(body, "tts_path"), "tts_path")
    if not audio.is_file():
        raise NotFound(f"tts_path {audio} does not exist")
    seconds = await asyncio.get_running_loop().run_in_executor(None, probe_seconds, audio)
    if seconds is not None and seconds > config.max_gen_seconds:
        raise BadRequest(f"tts_path holds {seconds:.0f} s of audio; /digital_human/gen takes at most {config.max_gen_seconds:.0f} s")
    pending = request.app[AVATAR_JOBS].pending(streamer)
    if pending is not None:  # the seed's clients call /gen right after /preprocess
        await request.app[AVATAR_JOBS].wait(pending)
    try:
        manager.avatar(streamer)  # before any work
    except UnknownAvatar:
        raise unknown_avatar(request.app, streamer, f"avatar {streamer!r} is not prepared: call /digital_human/preprocess "
                                                    "first") from None
    root = Path(config.data_dir).resolve()
    out = root / "outputs" / user_id / f"{request_id}_{chunk_id}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = await manager.generate_video(streamer, audio, out, key=f"{user_id}/{request_id}/{chunk_id}")
    # The seed's clients open the file where the server wrote it (an absolute path on the
    # server's machine); anyone else downloads it from the url.
    return web.json_response(
        {
            "code": 0, "msg": "ok", "user_id": user_id, "request_id": request_id,
            "digital_human_mp4_path": str(Path(result.path)),
            "data": {"frames": result.frames, "duration": result.duration, "url": f"{OUTPUTS_URL}/{user_id}/{out.name}"},
        }
    )


@routes.get(OUTPUTS_URL + "/{user_id}/{name}")
async def download_output(request: web.Request) -> web.FileResponse:
    """An mp4 that ``/digital_human/gen`` wrote."""
    user_id, name = request.match_info["user_id"], request.match_info["name"]
    if not ID_RE.fullmatch(user_id) or not ID_RE.fullmatch(name) or not name.endswith(".mp4"):
        raise NotFound(f"no such output: {user_id}/{name}")
    path = Path(request.app[CONFIG].data_dir).resolve() / "outputs" / user_id / name
    if not path.is_file():
        raise NotFound(f"no such output: {user_id}/{name} (outputs are named REQUEST_CHUNK.mp4)")
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@routes.delete("/digital_human/gen")
async def cancel_gen(request: web.Request) -> web.Response:
    """Cancel ``user_id``'s running /gen jobs for ``request_id`` (one ``chunk_id``, or all)."""
    body = await read_json(request)
    user_id, request_id = _id(body, "user_id"), _id(body, "request_id")
    chunk = f"/{_id(body, 'chunk_id')}" if body.get("chunk_id") is not None else "/"
    cancelled = request.app[MANAGER].cancel_jobs(f"{user_id}/{request_id}{chunk}")
    if not cancelled:
        raise NotFound(f"no running job for user {user_id!r}, request {request_id!r}")
    return web.json_response({"code": 0, "msg": "ok", "user_id": user_id, "request_id": request_id, "data": {"cancelled": cancelled}})
