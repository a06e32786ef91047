"""``python -m server``: start the real-time lip-sync server."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from avatars.avatar import AvatarNotFound, InvalidAvatarName
from pipeline.client import WorkerStartError
from pipeline.engines import engine_names
from server.app import create_app
from server.config import ServerConfig
from tts.base import TTSError


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m server", description="Real-time lip-sync avatar server (WebRTC).")
    p.add_argument("--host", default=env("LIPSYNC_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env("LIPSYNC_PORT", "8010")))
    p.add_argument("--data-dir", type=Path, default=Path(env("LIPSYNC_DATA_DIR", "data")),
                   help="avatars, weights and recordings (env LIPSYNC_DATA_DIR)")
    p.add_argument("--avatar", default=env("LIPSYNC_AVATAR", "default"), help="avatar a session gets unless /offer names one")
    p.add_argument("--engine", default=env("LIPSYNC_ENGINE", "cpu"),
                   help=f"lip-sync engine: {', '.join(engine_names())} ('auto' takes MuseTalk where a GPU and its weights "
                   "are present) or package.module:Class")
    p.add_argument("--musetalk-version", default=env("LIPSYNC_MUSETALK_VERSION", "v15"), choices=["v15", "v1"])
    p.add_argument("--tts", default=env("LIPSYNC_TTS", "espeak"), help="TTS backend: espeak (offline) or edge")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine option, repeatable (musetalk: device=cuda dtype=bf16 max_batch=32 compile=true)")
    p.add_argument("--tts-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TTS backend option, repeatable (espeak: rate=175 pitch=50; edge: rate=+10%% proxy=http://...)")
    p.add_argument("--voice", default=env("LIPSYNC_VOICE"), help="TTS voice (espeak: en-us, de, fr...; edge: en-US-AriaNeural...)")
    p.add_argument("--ice-server", action="append", default=[u for u in (env("LIPSYNC_ICE_SERVERS") or "").split(",") if u],
                   help="STUN/TURN URL for the server's peer connections (repeatable; env LIPSYNC_ICE_SERVERS, "
                   "comma-separated); default: none, host candidates only")
    p.add_argument("--max-sessions", type=int, default=int(env("LIPSYNC_MAX_SESSIONS", "8")))
    p.add_argument("--no-default-session", dest="default_session", action="store_false",
                   default=env("LIPSYNC_DEFAULT_SESSION", "1") not in ("0", "false", "no"),
                   help="sessionid 0 / absent no longer means the oldest open session (multi-user deployments; "
                   "env LIPSYNC_DEFAULT_SESSION=0)")
    p.add_argument("--log-level", default=env("LIPSYNC_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_options: dict[str, object] = {"version": a.musetalk_version} if a.engine in ("musetalk", "auto") else {}
    engine_options.update(_options(p, "--engine-option", a.engine_option))
    tts_options: dict[str, object] = {"voice": a.voice} if a.voice else {}
    tts_options.update(_options(p, "--tts-option", a.tts_option))
    return ServerConfig(
        host=a.host, port=a.port, data_dir=a.data_dir.resolve(), avatar=a.avatar, engine=a.engine,
        engine_options=engine_options, tts=a.tts, tts_options=tts_options, max_sessions=a.max_sessions, ice_servers=a.ice_server,
        default_session=a.default_session,
    )


def _options(p: argparse.ArgumentParser, flag: str, items: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs; integers, floats and true/false become numbers and booleans."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"{flag} takes KEY=VALUE, got {item!r}")
        parsed: object = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    pass
        out[key] = parsed
    return out


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, only slower
        logging.getLogger(__name__).info("uvloop not installed; using the default asyncio loop")
    else:
        uvloop.install()
    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=None)
    except KeyboardInterrupt:
        pass
    except (WorkerStartError, AvatarNotFound, InvalidAvatarName, TTSError, ValueError, OSError) as exc:
        # Start-up problems the user can fix: say what and how, without a traceback.
        logging.getLogger("server").error("cannot start: %s", exc)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
