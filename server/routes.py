"""HTTP and WebSocket handlers: the HTTP contract of the design, JSON in and out."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from avatars.avatar import AvatarNotFound, InvalidAvatarName
from pipeline.audio_decode import AudioDecodeError, decode_audio
from server.errors import ApiError, ErrorCode, field_bool, field_int, field_session, field_str, ok, read_json
from server.state import AppState

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def _state(request: web.Request) -> AppState:
    return request.app["state"]


def _text(body: dict, state: AppState, name: str = "text") -> str:
    text = field_str(body, name, max_len=state.config.max_text_chars)
    assert text is not None
    if not text.strip():
        raise ApiError(400, ErrorCode.EMPTY_TEXT, f"field '{name}' is empty: send something to say")
    return text


@routes.post("/offer")
async def offer(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    sdp = field_str(body, "sdp", max_len=100_000)
    kind = field_str(body, "type")
    if kind != "offer":
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field 'type' must be 'offer', got {kind!r}")
    avatar_name = field_str(body, "avatar", required=False, default=state.config.avatar)
    try:
        avatar = state.avatar(avatar_name or state.config.avatar)
    except InvalidAvatarName as exc:
        raise ApiError(400, ErrorCode.INVALID_FIELD, str(exc)) from None
    except AvatarNotFound as exc:
        raise ApiError(404, ErrorCode.UNKNOWN_AVATAR, f"{exc}; prepare it with: python -m avatars prepare --name {avatar_name} --source VIDEO") from None
    try:
        description = RTCSessionDescription(sdp=sdp, type="offer")
    except ValueError as exc:
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"invalid SDP: {exc}") from None
    session = await state.sessions.create(avatar)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in state.config.ice_servers]))
    state.sessions.attach_peer(session, pc)
    try:
        await pc.setRemoteDescription(description)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # aiortc raises ValueError and friends on bad SDP
        await state.sessions.close(session.id)
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"could not answer this offer: {exc}") from None
    log.info("session %s opened with avatar %s", session.id, avatar.name)
    return ok(
        {"sessionid": session.id},
        sdp=pc.localDescription.sdp,
        type=pc.localDescription.type,
        sessionid=session.id,
    )


@routes.get("/humanecho")
async def humanecho(request: web.Request) -> web.WebSocketResponse:
    state = _state(request)
    session = state.sessions.get(request.query.get("sessionid"))
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=256 * 1024)
    await ws.prepare(request)
    events = session.subscribe()

    async def forward() -> None:
        while True:
            event = await events.get()
            await ws.send_json(event)
            if event["event"] == "closed":
                await ws.close()
                return

    forwarder = asyncio.ensure_future(forward())
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    await ws.send_json({"event": "error", "code": int(ErrorCode.INVALID_FIELD), "msg": "send text messages, not binary"})
                continue
            # A message is plain text to speak, or {"text": ..., "interrupt": ...}; both go
            # through the same checks as POST /human.
            try:
                body = json.loads(msg.data) if msg.data.lstrip().startswith("{") else {"text": msg.data}
                if not isinstance(body, dict):
                    raise ApiError(400, ErrorCode.INVALID_JSON, "a JSON message must be an object")
                text = _text(body, state)
                interrupt = field_bool(body, "interrupt")
            except json.JSONDecodeError as exc:
                await ws.send_json({"event": "error", "code": int(ErrorCode.INVALID_JSON), "msg": f"invalid JSON message: {exc}"})
                continue
            except ApiError as exc:
                await ws.send_json({"event": "error", "code": int(exc.code), "msg": exc.msg})
                continue
            if session.closed:
                break
            session.say(text, interrupt=interrupt)
    finally:
        forwarder.cancel()
        session.unsubscribe(events)
    return ws


@routes.post("/human")
async def human(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    session = state.sessions.get(field_session(body))
    kind = field_str(body, "type", required=False, default="echo")
    if kind not in ("echo", "chat"):
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"field 'type' must be 'echo' or 'chat', got {kind!r}")
    if kind == "chat":
        raise ApiError(400, ErrorCode.INVALID_FIELD, "type 'chat' needs a chat backend, which this server does not have yet; send the reply text with type 'echo'")
    interrupt = field_bool(body, "interrupt")
    utt = session.say(_text(body, state), interrupt=interrupt)
    return ok({"utterance": utt.id})


@routes.post("/humanaudio")
async def humanaudio(request: web.Request) -> web.Response:
    state = _state(request)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, ErrorCode.INVALID_FIELD, "send multipart/form-data with fields 'sessionid' and 'file'")
    try:
        form = await request.post()
    except ValueError as exc:
        raise ApiError(400, ErrorCode.INVALID_FIELD, f"unreadable form: {exc}") from None
    session = state.sessions.get(field_session(dict(form)))
    upload = form.get("file")
    if upload is None or not hasattr(upload, "file"):
        raise ApiError(400, ErrorCode.MISSING_FIELD, "missing file field 'file' (wav, mp3, ogg, m4a, ...)")
    data = upload.file.read()
    if not data:
        raise ApiError(400, ErrorCode.UNSUPPORTED_AUDIO, "the uploaded file is empty")
    interrupt = field_bool(dict(form), "interrupt")
    loop = asyncio.get_running_loop()
    try:
        pcm = await loop.run_in_executor(None, decode_audio, data, state.config.max_audio_seconds)
    except AudioDecodeError as exc:
        raise ApiError(400, ErrorCode.UNSUPPORTED_AUDIO, f"{getattr(upload, 'filename', 'file')}: {exc}") from None
    utt = session.play_audio(pcm, interrupt=interrupt)
    return ok({"utterance": utt.id, "seconds": round(pcm.size / 16000, 3)})


@routes.post("/set_audiotype")
async def set_audiotype(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    session = state.sessions.get(field_session(body))
    audiotype = field_int(body, "audiotype")
    reinit = field_bool(body, "reinit")
    clips = session.avatar.meta.get("clips", [])
    if audiotype != 0 and not (1 <= audiotype <= len(clips)):
        raise ApiError(
            400, ErrorCode.INVALID_FIELD,
            f"audiotype {audiotype} is not a clip of avatar {session.avatar.name!r}: it has {len(clips)} action clip(s); 0 is the idle loop",
        )
    session.audiotype = audiotype
    if reinit:
        session.player.cursor = 0
    return ok({"audiotype": audiotype})


@routes.post("/record")
async def record(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    session = state.sessions.get(field_session(body))
    kind = field_str(body, "type")
    if kind == "start_record":
        name = f"{session.id}-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
        session.start_record(state.recordings_dir / name)
        return ok()
    if kind == "end_record":
        path = await session.end_record()
        state.recordings[session.id] = path
        return ok({"url": f"/record/{session.id}", "file": path.name})
    raise ApiError(400, ErrorCode.INVALID_FIELD, f"field 'type' must be 'start_record' or 'end_record', got {kind!r}")


@routes.get("/record/{sessionid}")
async def download_record(request: web.Request) -> web.FileResponse:
    state = _state(request)
    session_id = request.match_info["sessionid"]
    path = state.recordings.get(session_id)
    session = state.sessions.sessions.get(session_id)
    if session is not None and session.last_recording is not None:
        path = session.last_recording
    if path is None or not Path(path).is_file():
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no finished recording for session {session_id!r}")
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{Path(path).name}"'})


@routes.post("/is_speaking")
async def is_speaking(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    session = state.sessions.get(field_session(body))
    return ok(session.is_speaking)


@routes.post("/interrupt_talk")
async def interrupt_talk(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    session = state.sessions.get(field_session(body))
    frame = session.player.last_decided
    cut = session.interrupt()
    # frame: the last media frame that was already decided; every later one is silent
    return ok({"interrupted": cut, "frame": frame})


@routes.get("/digital_human/check")
async def check(request: web.Request) -> web.Response:
    return web.json_response({"status": "Server is running"})


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    state = _state(request)
    w = state.sessions.worker_stats
    return ok(
        {
            "sessions": len(state.sessions.sessions),
            "max_sessions": state.config.max_sessions,
            "engine": state.worker.ready_info.engine if state.worker.ready_info else None,
            "worker_pid": state.worker.pid,
            "worker_restarts": state.worker.restarts,
            "frames_rendered": w.frames_rendered if w else 0,
            "render_seconds": round(w.render_seconds, 3) if w else 0.0,
            "video_frames_skipped": {sid: s.player.video_frames_skipped for sid, s in state.sessions.sessions.items()},
            "video_frames_skipped_total": state.sessions.video_frames_skipped
            + sum(s.player.video_frames_skipped for s in state.sessions.sessions.values()),
        }
    )
