"""``python -m server``: start the real-time lip-sync server."""
from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from avatars.avatar import AvatarNotFound, InvalidAvatarName
from pipeline.client import WorkerStartError
from server.app import create_app
from server.config import ServerConfig
from server.settings import Settings, SettingsError, load_settings, log_settings, mask_query
from tts.base import TTSError


def configure(argv: list[str] | None = None) -> Settings:
    """The settings from flags, environment and config file (``server/settings.py``), with logging
    set up at their level; a bad setting is one line on stderr and exit status 2."""
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"python -m server: error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    return configure(argv).config


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access line, but ``?token=`` and ``?secret=`` (a browser's only way to send them
    on a WebSocket or a download link) are masked in the request line and the Referer."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %s %.3fs "%s" "%s"', request.remote, request.method, mask_query(request.path_qs),
            request.version.major, request.version.minor, response.status, response.body_length, time,
            mask_query(request.headers.get("Referer", "-")), request.headers.get("User-Agent", "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    settings = configure(argv)
    log_settings(settings)
    config = settings.config
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, only slower
        logging.getLogger(__name__).info("uvloop not installed; using the default asyncio loop")
    else:
        uvloop.install()
    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=None, access_log_class=AccessLogger)
    except KeyboardInterrupt:
        pass
    except (WorkerStartError, AvatarNotFound, InvalidAvatarName, TTSError, ValueError, OSError) as exc:
        # Start-up problems the user can fix: say what and how, without a traceback.
        logging.getLogger("server").error("cannot start: %s", exc)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
