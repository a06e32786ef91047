"""HTTP and WebSocket handlers of live sessions: each parses its input and calls one
method of the manager or a session."""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
from typing import Any

from aiohttp import WSMsgType, web
from aiortc import RTCSessionDescription

from avatars.avatar import AvatarNotFound, InvalidAvatarName, check_name
from avatars.clips import ClipError, ClipExists, add_clip, check_clip_name, check_number, reload_clips
from media.decode import AudioDecodeError
from media.timing import SAMPLE_RATE
from server.access import is_operator, presented_secret, secret_cookie
from server.avatar_routes import unknown_avatar
from server.chat_session import ChatRole, Reply
from server.errors import BadRequest, Conflict, ErrorCode, LipSyncError, UnknownAvatar, error_body, ok
from server.events import Closed
from server.keys import CONFIG, MANAGER
from server.request import (
    Body,
    field_audiotype,
    field_bool,
    field_int,
    field_session,
    field_str,
    field_text,
    optional_str,
    parse_json_object,
    read_form,
    read_json,
    show,
)
from server.session import Session
from server.sse import stream_events

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

# POST /human with type "chat" answers once the model has started its reply (so an endpoint
# that is down, refuses the key or does not exist is the HTTP error itself, 502), or after
# this long (then data.started is false, and a failure comes as an error event): it covers
# the chat client's connect timeout, not a slow model's time to its first word.
CHAT_ANSWER_WAIT_S = 6.0


@routes.post("/offer")
async def offer(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await read_json(request)
    sdp = field_str(body, "sdp", max_len=100_000)
    kind = field_str(body, "type")
    if kind != "offer":
        raise BadRequest(f"field 'type' must be 'offer', got {kind!r}")
    avatar = optional_str(body, "avatar")
    watch = optional_str(body, "watch", max_len=128, allow_int=True)
    if watch is not None:
        # A viewer: the watched session's frames on a peer of its own; no new session.
        if avatar is not None:
            raise BadRequest("a viewer sees the watched session's avatar: send 'watch' or 'avatar', not both")
        watched = request.app[MANAGER].get(watch, presented_secret(request, body, watch), is_operator(request))
        answer = await manager.watch(watched, RTCSessionDescription(sdp=sdp, type="offer"), request.remote)
        return ok({"sessionid": watched.id, "watching": True},
                  sdp=answer.sdp, type=answer.type, sessionid=watched.id, watching=True)
    try:
        session, answer = await manager.open(RTCSessionDescription(sdp=sdp, type="offer"), avatar, request.remote)
    except UnknownAvatar as exc:  # say which avatars there are (and whether this one is being prepared)
        raise unknown_avatar(request.app, avatar or manager.config.avatar, exc.msg) from None
    response = ok(
        {"sessionid": session.id, "secret": session.secret},
        sdp=answer.sdp, type=answer.type, sessionid=session.id, secret=session.secret,
    )
    response.set_cookie(secret_cookie(session.id), session.secret, httponly=True, samesite="Strict", path="/")
    return response


def session_of(request: web.Request, fields: Body) -> Session:
    """The session a request addresses: ``sessionid`` and, for a real id, its secret."""
    session_id = field_session(fields)
    return request.app[MANAGER].get(session_id, presented_secret(request, fields, session_id), is_operator(request))


async def bind_websocket(request: web.Request, ws: web.WebSocketResponse) -> Session | None:
    """The session a WebSocket addresses (``?sessionid=``, its secret or cookie, the token;
    none: the default session), with the socket prepared. None when it cannot bind: a
    WebSocket client got one ``error`` event and the close; a plain HTTP GET raises the
    JSON error."""
    try:
        session_id = request.query.get("sessionid")
        session = request.app[MANAGER].get(session_id, presented_secret(request, session_id=session_id), is_operator(request))
    except LipSyncError as exc:
        if not ws.can_prepare(request).ok:
            raise  # a plain HTTP request: the JSON error
        # A WebSocket client (the seed's connects with no sessionid) sees why, then the close.
        await ws.prepare(request)
        await ws.send_json({"event": "error", **error_body(exc.code, exc.msg)})
        await ws.close()
        return None
    if not ws.can_prepare(request).ok:
        raise BadRequest(f"{request.path} is a WebSocket: connect with a WebSocket client (Upgrade: websocket)",
                         ErrorCode.MALFORMED_REQUEST)
    await ws.prepare(request)
    return session


@routes.get("/humanecho")
async def humanecho(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG]
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=256 * 1024)
    session = await bind_websocket(request, ws)
    if session is None:
        return ws

    events = session.events.subscribe()

    async def forward() -> None:
        async for event in events:
            await ws.send_json(event)
            if event["event"] == Closed.kind:
                await ws.close()

    forwarder = asyncio.ensure_future(forward())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_json({"event": "error", **error_body(ErrorCode.INVALID_FIELD, "send text messages, not binary")})
                continue
            if msg.type != WSMsgType.TEXT:
                continue
            # A message is plain text to speak, or {"text": ..., "interrupt": ..., "type": ...,
            # "voice": ...}; both go through the same checks as POST /human.
            try:
                body = _ws_body(msg.data)
                kind = _kind(body)
                text = field_text(body, config.max_text_chars)
                interrupt = field_bool(body, "interrupt")
                voice = await _voice(request, body)
                if session.closed:
                    break
                if kind == "chat":
                    _chat(session.chat).start(text, voice, interrupt)  # reply_text, speech and error events follow
                else:
                    session.say(text, interrupt=interrupt, voice=voice)  # a full queue is an error event too
            except LipSyncError as exc:
                await ws.send_json({"event": "error", **error_body(exc.code, exc.msg)})
    finally:
        forwarder.cancel()
        events.close()
    return ws


def _ws_body(data: str) -> dict[str, Any]:
    if not data.lstrip().startswith("{"):
        return {"text": data}
    return parse_json_object(data, "the JSON message")


def _kind(body: Body) -> str:
    kind = optional_str(body, "type") or "echo"
    if kind not in ("echo", "chat"):
        raise BadRequest(f"field 'type' must be 'echo' or 'chat', got {show(kind)}")
    return kind


def _chat(chat: ChatRole | None) -> ChatRole:
    if chat is None:
        raise LipSyncError(
            "type 'chat' needs a chat model, and this server has none: start it with --chat-base-url URL "
            "(LIPSYNC_CHAT_BASE_URL, or chat_base_url in the config file), an OpenAI-compatible API such as "
            "http://127.0.0.1:8080/v1 (llama.cpp's llama-server), with --chat-model and --chat-api-key as that server "
            "needs; or send the reply's text yourself with type 'echo'",
            ErrorCode.CHAT_NOT_CONFIGURED,
        )
    return chat


async def _voice(request: web.Request, body: Body) -> str | None:
    """The ``voice`` field, checked against what the TTS backend offers where it can tell."""
    voice = (optional_str(body, "voice", max_len=200) or "").strip()
    if not voice:
        return None
    problem = await request.app[MANAGER].tts.check_voice(voice)
    if problem is not None:
        raise BadRequest(problem)
    return voice


@routes.post("/human")
async def human(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body = await read_json(request)
    session = session_of(request, body)
    kind = _kind(body)
    text = field_text(body, config.max_text_chars)
    interrupt = field_bool(body, "interrupt")
    voice = await _voice(request, body)
    if kind == "chat":
        chat = _chat(session.chat)
        reply: Reply = chat.start(text, voice, interrupt)
        started = await chat.wait_first(reply, CHAT_ANSWER_WAIT_S)
        return ok({"reply": reply.id, "started": started})
    utterance = session.say(text, interrupt=interrupt, voice=voice)
    return ok({"utterance": utterance})


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    """The session's events as server-sent events (``server.sse``)."""
    session_id = request.query.get("sessionid")
    session = request.app[MANAGER].get(session_id, presented_secret(request, session_id=session_id), is_operator(request))
    return await stream_events(request, session.events.subscribe(), request.app[CONFIG].events_heartbeat_s, session.closed)


@routes.get("/voices")
async def voices(request: web.Request) -> web.Response:
    """The voices the running TTS backend offers; ``voice`` on /human takes their ids."""
    return ok((await request.app[MANAGER].tts.voice_catalog()).json())


@routes.post("/humanaudio")
async def humanaudio(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send multipart/form-data with fields 'sessionid' and 'file'")
    form = await read_form(request)
    fields = dict(form)
    session = session_of(request, fields)
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise BadRequest("missing file field 'file' (wav, mp3, ogg, m4a, ...)", ErrorCode.MISSING_FIELD)
    data = upload.file.read()
    if not data:
        raise BadRequest("the uploaded file is empty", ErrorCode.UNSUPPORTED_AUDIO)
    interrupt = field_bool(fields, "interrupt")
    try:
        pcm = await request.app[MANAGER].decode(data, config.max_audio_seconds)
    except AudioDecodeError as exc:
        raise BadRequest(f"{upload.filename}: {exc}", ErrorCode.UNSUPPORTED_AUDIO) from None
    utterance = session.play_audio(pcm, interrupt=interrupt)
    return ok({"utterance": utterance, "seconds": round(pcm.size / SAMPLE_RATE, 3)})


@routes.post("/set_audiotype")
async def set_audiotype(request: web.Request) -> web.Response:
    body = await read_json(request)
    session = session_of(request, body)
    return ok(session.set_clip(field_audiotype(body), reinit=field_bool(body, "reinit")))


@routes.post("/avatars/{name}/clips")
async def post_clip(request: web.Request) -> web.Response:
    """Add an action clip to an avatar: multipart ``clip`` (its name), ``file`` (a short video;
    its sound is kept), optional ``number``, ``loop``, ``replace``. Open sessions on the
    avatar can play it at once."""
    config, manager = request.app[CONFIG], request.app[MANAGER]
    try:
        name = check_name(request.match_info["name"])
    except InvalidAvatarName as exc:
        raise BadRequest(str(exc)) from None
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send multipart/form-data with the fields 'clip' (its name) and 'file' (a video)")
    form = await read_form(request)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    clip_name = field_str(fields, "clip", max_len=64)
    number = field_int(fields, "number") if fields.get("number") else None
    try:  # before any work
        check_clip_name(clip_name)
        if number is not None:
            check_number(number)
    except ClipError as exc:
        raise BadRequest(str(exc)) from None
    loop, replace = field_bool(fields, "loop"), field_bool(fields, "replace")
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise BadRequest("missing file field 'file' (a video: mp4, mov, webm...)", ErrorCode.MISSING_FIELD)
    run = asyncio.get_running_loop().run_in_executor
    data = await run(None, upload.file.read)  # at most the server's upload limit (413 past it)
    if not data:
        raise BadRequest("the uploaded file is empty: send a short video")
    try:
        avatar = manager.avatar(name)
    except UnknownAvatar as exc:
        raise unknown_avatar(request.app, name, exc.msg) from None
    try:  # decoding and JPEG encoding: a few seconds of CPU, off the event loop
        clip = await run(None, functools.partial(add_clip, config.data_dir, name, clip_name, data, number, loop, replace))
        await run(None, reload_clips, avatar, config.data_dir)
    except ClipExists as exc:
        raise Conflict(str(exc)) from None
    except ClipError as exc:
        raise BadRequest(f"clip {clip_name!r}: {exc}") from None
    except AvatarNotFound as exc:
        raise unknown_avatar(request.app, name, str(exc)) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LipSyncError("the data directory's disk is full: free some space and add the clip again",
                               ErrorCode.INSUFFICIENT_STORAGE) from None
        raise
    return ok({"avatar": name, **clip.info()})


@routes.post("/record")
async def record(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await read_json(request)
    session = session_of(request, body)
    kind = field_str(body, "type")
    if kind == "start_record":
        session.start_record(manager.recording_path(session))
        return ok()
    if kind == "end_record":
        path = await session.end_record()
        # a download link carries no headers: the session's secret goes in it
        return ok({"url": f"/record/{session.id}?secret={session.secret}", "file": path.name})
    raise BadRequest(f"field 'type' must be 'start_record' or 'end_record', got {kind!r}")


@routes.get("/record/{sessionid}")
async def download_record(request: web.Request) -> web.FileResponse:
    session_id = request.match_info["sessionid"]
    path = request.app[MANAGER].recording(session_id, presented_secret(request, session_id=session_id), is_operator(request))
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"'})


@routes.post("/is_speaking")
async def is_speaking(request: web.Request) -> web.Response:
    body = await read_json(request)
    return ok(session_of(request, body).is_speaking)


@routes.post("/interrupt_talk")
async def interrupt_talk(request: web.Request) -> web.Response:
    body = await read_json(request)
    session = session_of(request, body)
    cut = session.interrupt()
    return ok({"interrupted": cut.utterances, "frame": cut.last_frame})


@routes.get("/digital_human/check")
async def check(request: web.Request) -> web.Response:
    return web.json_response({"status": "Server is running"})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """The worker's state; 503 while it is down (a load balancer takes the hint)."""
    state = request.app[MANAGER].health()
    return web.json_response({"code": 0 if state["ok"] else int(ErrorCode.WORKER_UNAVAILABLE), "msg": "ok" if state["ok"]
                              else "the inference worker is not running", "data": state}, status=200 if state["ok"] else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[MANAGER].metrics_text(), content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    return ok(request.app[MANAGER].stats(with_ids=is_operator(request)))
