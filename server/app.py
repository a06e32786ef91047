"""Builds the aiohttp application: routes, static pages, and the lifetimes of the worker,
the TTS backend and the sessions."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from avatars.avatar import AvatarNotFound, load_avatar
from pipeline.client import WorkerClient, WorkerHandler, WorkerLink
from pipeline.worker import WorkerConfig
from server import logcontext
from server.access import access_middleware
from server.audio_stream import routes as audio_stream_routes
from server.avatar_routes import routes as avatar_routes
from server.avatar_routes import setup_avatars
from server.config import ServerConfig
from server.digital_human import routes as digital_human_routes
from server.errors import ErrorCode, LipSyncError, error_middleware
from server.keys import CONFIG, MANAGER
from server.livekit.launch import launcher_for, setup_livekit
from server.livekit.launch import routes as livekit_routes
from server.manager import SessionManager, WorkerFactory
from server.openapi import routes as openapi_routes
from server.routes import routes
from tts.base import TTSBackend
from tts.registry import create_tts

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _prepare_default_avatar(config: ServerConfig) -> None:
    if config.avatar != "default":
        try:
            load_avatar(config.data_dir, config.avatar)  # fail at start-up, not at the first /offer
        except AvatarNotFound as exc:
            how = f"python -m avatars prepare --name {config.avatar} --source VIDEO_OR_PHOTO --data-dir {config.data_dir}"
            raise AvatarNotFound(f"{exc}; prepare it with: {how}") from None
        return
    from avatars.default import ensure_default_avatar

    await asyncio.get_running_loop().run_in_executor(None, ensure_default_avatar, config.data_dir)


def process_worker(config: ServerConfig) -> WorkerFactory:
    """The real worker: a spawned process running ``config.engine``."""

    def build(handler: WorkerHandler) -> WorkerLink:
        worker_config = WorkerConfig(
            engine=config.engine,
            data_dir=str(config.data_dir),
            engine_options=config.engine_options,
            log_level=logging.getLogger().level,
        )
        return WorkerClient(
            worker_config, handler, start_timeout=config.worker_start_timeout_s, heartbeat_s=config.worker_heartbeat_s or None
        )

    return build


def create_app(config: ServerConfig, worker_factory: WorkerFactory | None = None, tts: TTSBackend | None = None) -> web.Application:
    """The server. ``worker_factory`` and ``tts`` default to the real ones the config
    names; tests pass stand-ins to run everything in one process."""
    @web.middleware
    async def count_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        manager = request.app.get(MANAGER)
        if manager is not None:
            manager.metrics.answered(response.status)
        return response

    config.chat_config()  # a bad chat setting stops the server here (ValueError), before anything starts
    middlewares = [count_errors, error_middleware, access_middleware(config.token, config.cors_origins)]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes)
    app[CONFIG] = config
    app.add_routes(routes)
    app.add_routes(audio_stream_routes)
    app.add_routes(digital_human_routes)
    setup_avatars(app)  # GET/POST /avatars, the preparation jobs
    app.add_routes(openapi_routes)
    setup_livekit(app, launcher_for(config))  # /livekit/launch and /livekit/avatars

    async def index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/webrtcapi.html")

    web_root = config.web_dir.resolve()
    methods: dict[str, set[str]] = {}  # the fixed routes and their methods
    for table in (routes, audio_stream_routes, digital_human_routes, avatar_routes, openapi_routes, livekit_routes):
        for r in table:
            if isinstance(r, web.RouteDef) and "{" not in r.path:
                methods.setdefault(r.path, set()).add(r.method)

    async def static(request: web.Request) -> web.StreamResponse:
        # Every request no route took: the pages (our own handler rather than add_static,
        # so a missing page gets the JSON error), a route asked with the wrong method (405),
        # or nothing at all (404, whatever the method).
        allowed = methods.get(request.path)
        if allowed:
            raise LipSyncError(f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(allowed))}",
                               ErrorCode.METHOD_NOT_ALLOWED)
        try:
            path = (web_root / request.match_info["path"]).resolve()
            found = request.method in ("GET", "HEAD") and web_root in path.parents and path.is_file()
        except (OSError, ValueError):  # a NUL byte, a name longer than the file system takes: no such file
            found = False
        if not found:
            raise LipSyncError(f"no such route or file: {request.path}", ErrorCode.NOT_FOUND)
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_route("*", "/{path:.+}", static)

    async def startup(app: web.Application) -> None:
        logcontext.install()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        await _prepare_default_avatar(config)
        manager = SessionManager(
            config,
            tts if tts is not None else create_tts(config.tts, **config.tts_options),
            worker_factory or process_worker(config),
        )
        ready = await manager.start()
        app[MANAGER] = manager
        log.info("serving on http://%s:%d/webrtcapi.html (engine %s, tts %s, avatar %s)",
                 config.host, config.port, ready.engine, config.tts, config.avatar)

    async def shutdown(app: web.Application) -> None:
        # Before aiohttp waits for open handlers: closing the sessions sends "closed" and
        # ends their WebSockets, so a connected browser does not hold shutdown up.
        manager = app.get(MANAGER)
        if manager is not None:
            manager.fail_jobs("the server is shutting down; send the job again once it is back")
            await manager.close_all()

    async def cleanup(app: web.Application) -> None:
        manager = app.get(MANAGER)
        if manager is None:
            return
        await manager.stop()
        await manager.tts.close()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app
