"""Builds the aiohttp application: routes, static pages, and the lifetimes of the worker,
the TTS backend and the sessions."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from avatars.avatar import AvatarNotFound, load_avatar
from pipeline.client import WorkerClient
from pipeline.worker import WorkerConfig
from server.config import ServerConfig
from server.errors import ApiError, ErrorCode, error_middleware
from server.digital_human import routes as digital_human_routes
from server.routes import routes
from server.sessions import SessionManager
from server.state import AppState
from tts.registry import create_tts

log = logging.getLogger(__name__)


async def _prepare_default_avatar(config: ServerConfig) -> None:
    if config.avatar != "default":
        try:
            load_avatar(config.data_dir, config.avatar)  # fail at start-up, not at the first /offer
        except AvatarNotFound as exc:
            raise AvatarNotFound(
                f"{exc}; prepare it with: python -m avatars prepare --name {config.avatar} --source VIDEO_OR_PHOTO --data-dir {config.data_dir}"
            ) from None
        return
    from avatars.default import ensure_default_avatar

    await asyncio.get_running_loop().run_in_executor(None, ensure_default_avatar, config.data_dir)


def create_app(config: ServerConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_upload_bytes)
    app.add_routes(routes)
    app.add_routes(digital_human_routes)

    async def index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/webrtcapi.html")

    web_root = config.web_dir.resolve()
    post_only = {r.path for table in (routes, digital_human_routes) for r in table if isinstance(r, web.RouteDef) and r.method == "POST"}

    async def static(request: web.Request) -> web.StreamResponse:
        # Our own handler rather than add_static, so a missing page gets the JSON error.
        if request.path in post_only:
            raise ApiError(405, ErrorCode.METHOD_NOT_ALLOWED, f"GET is not allowed on {request.path}; use POST")
        path = (web_root / request.match_info["path"]).resolve()
        if web_root not in path.parents or not path.is_file():
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no such route or file: {request.path}")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_get("/{path:.+}", static)

    async def startup(app: web.Application) -> None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        await _prepare_default_avatar(config)
        tts = create_tts(config.tts, **config.tts_options)
        sessions = SessionManager(config, tts)
        worker = WorkerClient(
            WorkerConfig(
                engine=config.engine,
                data_dir=str(config.data_dir),
                engine_options=config.engine_options,
                log_level=logging.getLogger().level,
            ),
            on_message=sessions.on_worker_message,
            on_restart=sessions.on_worker_restart,
            start_timeout=config.worker_start_timeout_s,
        )
        sessions.attach_worker(worker)
        await worker.start()
        app["state"] = AppState(config=config, tts=tts, sessions=sessions, worker=worker)
        log.info("serving on http://%s:%d/webrtcapi.html (engine %s, tts %s, avatar %s)",
                 config.host, config.port, worker.ready_info.engine if worker.ready_info else "?", config.tts, config.avatar)

    async def shutdown(app: web.Application) -> None:
        # Before aiohttp waits for open handlers: closing the sessions sends "closed" and
        # ends their WebSockets, so a connected browser does not hold shutdown up.
        state: AppState | None = app.get("state")
        if state is not None:
            await state.sessions.close_all()

    async def cleanup(app: web.Application) -> None:
        state: AppState | None = app.get("state")
        if state is None:
            return
        await state.sessions.close_all()
        await state.worker.stop()
        await state.tts.close()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app
