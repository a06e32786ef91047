"""``python -m lipsync_livekit --url wss://... --token ... [--room NAME]``: one avatar in one room.

Progress goes to stdout as JSON lines (``{"state": "connecting" | "joined" | "running" |
"ended" | "failed", ...}``): the server's ``/livekit/launch`` route reads them. Tokens may come
from the environment (``LIVEKIT_TOKEN``, ``LIPSYNC_TOKEN``) so they stay out of process lists.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from lipsync_livekit.server_client import ServerError
from lipsync_livekit.worker import WorkerOptions, run_worker

log = logging.getLogger("lipsync_livekit")


def report(state: str, **details: Any) -> None:
    print(json.dumps({"state": state, **details}), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lipsync_livekit", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="the LiveKit server (wss://...; env LIVEKIT_URL)")
    p.add_argument("--token", default=os.environ.get("LIVEKIT_TOKEN"),
                   help="a room token for the avatar's identity, with lk.publish_on_behalf naming the agent (env LIVEKIT_TOKEN)")
    p.add_argument("--room", help="the room's name, for logs (the token decides which room is joined)")
    p.add_argument("--server", default=os.environ.get("LIPSYNC_SERVER", "http://127.0.0.1:8010"),
                   help="the lip-sync server that renders (env LIPSYNC_SERVER)")
    p.add_argument("--server-token", default=os.environ.get("LIPSYNC_TOKEN"), help="its --token, if it has one (env LIPSYNC_TOKEN)")
    p.add_argument("--avatar", help="the server's avatar to use (default: the server's)")
    p.add_argument("--agent", help="the agent's identity (default: the token's lk.publish_on_behalf)")
    p.add_argument("--connect-timeout", type=float, default=20.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not args.url or not args.token:
        p.error("--url and --token are needed (or LIVEKIT_URL and LIVEKIT_TOKEN)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = WorkerOptions(url=args.url, token=args.token, server_url=args.server.rstrip("/"), server_token=args.server_token,
                            avatar=args.avatar, sender_identity=args.agent, connect_timeout_s=args.connect_timeout)
    try:
        asyncio.run(run_worker(options, report))
    except KeyboardInterrupt:
        report("ended", reason="interrupted")
        return 0
    except (ConnectionError, ServerError, OSError) as exc:
        log.error("%s", exc)
        report("failed", error=str(exc))
        return 1
    except Exception as exc:
        log.exception("the avatar worker failed")
        report("failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    report("ended", reason="the room or the lip-sync server ended the session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
