"""Avatar command line.

    python -m avatars prepare --name NAME --source FILE [--data-dir DIR]
    python -m avatars list [--data-dir DIR]
    python -m avatars default [--data-dir DIR]

The data directory defaults to $LIPSYNC_DATA_DIR, else ./data (as for the server).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("avatars")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("LIPSYNC_DATA_DIR") or "data"),
        help="where avatars live, under <dir>/avatars (env LIPSYNC_DATA_DIR, default ./data)",
    )
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")

    p = argparse.ArgumentParser(prog="python -m avatars", description="Prepare and list talking-head avatars.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", parents=[common], help="make an avatar from a video or a picture")
    prep.add_argument("--name", required=True, help="avatar name: letters, digits, '_', '-', '.'")
    prep.add_argument("--source", required=True, type=Path, help="video (mp4, mov, webm...) or picture (png, jpg)")
    prep.add_argument("--max-seconds", type=float, default=20.0, help="use at most this much of a video (default 20)")
    prep.add_argument("--fps", type=int, default=25, help="avatar frame rate (default 25)")
    prep.add_argument("--max-side", type=int, default=1280, help="shrink so the longer side is at most this (default 1280)")
    sub.add_parser("list", parents=[common], help="list prepared avatars")
    sub.add_parser("default", parents=[common], help="build (or check) the built-in default avatar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` answers without loading numpy, cv2 and mediapipe.
    from .avatar import list_avatars, load_avatar

    data_dir: Path = args.data_dir
    try:
        if args.command == "list":
            for name in list_avatars(data_dir):
                a = load_avatar(data_dir, name)
                # The listing is the command's output, so it goes to stdout, not the log.
                sys.stdout.write(
                    f"{name}\t{a.num_frames} frames\t{a.width}x{a.height}\t{a.fps} fps\t"
                    f"{a.meta.get('kind', '?')}\t{a.meta.get('source', '')}\n"
                )
            return 0
        if args.command == "default":
            from .default import ensure_default_avatar

            a = ensure_default_avatar(data_dir)
        else:
            from .prepare import prepare_avatar

            a = prepare_avatar(
                data_dir, args.name, args.source, max_seconds=args.max_seconds, fps=args.fps, max_side=args.max_side
            )
    except (ValueError, FileNotFoundError, LookupError) as exc:
        log.error("%s", exc)
        return 2
    log.info("avatar %r ready at %s: %d frames %dx%d", a.name, a.path, a.num_frames, a.width, a.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
