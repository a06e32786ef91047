"""Avatar command line.

    python -m avatars prepare SOURCE --name NAME [--replace] [--max-seconds S] [--data-dir DIR]
    python -m avatars list [--data-dir DIR]
    python -m avatars default [--data-dir DIR]
    python -m avatars add-clip AVATAR --clip NAME SOURCE [--number N] [--loop | --once] [--replace]

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
    prep = sub.add_parser(
        "prepare",
        parents=[common],
        help="make an avatar from a video, a picture or a folder of pictures",
        description="Make an avatar from a video, a picture or a folder of pictures (its frames, sorted by name). "
        "Run again with the same name to bring it up to date: only what changed is made again.",
    )
    prep.add_argument("source", nargs="?", type=Path, help="video (mp4, mov, webm...), picture (png, jpg...) or folder of pictures")
    prep.add_argument("--source", dest="source_flag", type=Path, help="the same as SOURCE (for older scripts)")
    prep.add_argument("--name", required=True, help="avatar name: letters, digits, '_', '-', '.'")
    prep.add_argument("--replace", action="store_true",
                      help="replace an avatar of that name made from another source; prepare it all again")
    prep.add_argument("--max-seconds", type=float, default=60.0, help="use at most this much of a video (default 60)")
    prep.add_argument("--fps", type=int, default=25, help="avatar frame rate; a folder's pictures are shown at this rate (default 25)")
    prep.add_argument("--max-side", type=int, default=1280, help="shrink so the longer side is at most this (default 1280)")
    face = prep.add_argument_group("face checks")
    face.add_argument("--min-face-score", type=float, default=0.75,
                      help="the face detector's confidence a frame's face needs to count as human (default 0.75)")
    face.add_argument("--min-face-px", type=int, default=80, help="the face's width, cheek to cheek, in source pixels (default 80)")
    face.add_argument("--max-yaw", type=float, default=40.0, help="how far the head may turn to the side, in degrees (default 40)")
    face.add_argument("--min-face-share", type=float, default=0.5,
                      help="the share of frames that need a usable face (default 0.5)")
    sub.add_parser("list", parents=[common], help="list prepared avatars")
    sub.add_parser("default", parents=[common], help="build (or check) the built-in default avatar")
    clip = sub.add_parser("add-clip", parents=[common], help="add an action clip (a short video, with its sound) to an avatar")
    clip.add_argument("avatar", help="the avatar to add it to")
    clip.add_argument("source", type=Path, help="video (mp4, mov, webm...); its sound is kept")
    clip.add_argument("--clip", required=True, help="clip name: letters, digits, '_', '-', '.'; a letter first")
    clip.add_argument("--number", type=int, help="its audiotype number, 2 or more (default: the first free from 2)")
    mode = clip.add_mutually_exclusive_group()
    mode.add_argument("--loop", dest="loop", action="store_true", help="play until switched away")
    mode.add_argument("--once", dest="loop", action="store_false", help="play once, then the idle loop (default)")
    clip.add_argument("--replace", action="store_true", help="replace a clip of that name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` answers without loading numpy, cv2 and mediapipe.
    data_dir: Path = args.data_dir
    try:
        if args.command == "list":
            return _list(data_dir)
        if args.command == "add-clip":
            from .clips import add_clip

            c = add_clip(data_dir, args.avatar, args.clip, args.source, args.number, args.loop, args.replace)
            log.info("avatar %r: clip %s ready: %d frames, %.2f s; play it with audiotype %d or %r",
                     args.avatar, c.describe(), c.num_frames, c.seconds, c.number, c.name)
            return 0
        if args.command == "prepare":
            return _prepare(data_dir, args)
        from .default import ensure_default_avatar  # the "default" command

        a = ensure_default_avatar(data_dir)
    except (ValueError, FileNotFoundError, LookupError) as exc:
        log.error("%s", exc)
        return 2
    log.info("avatar %r ready at %s: %d frames %dx%d", a.name, a.path, a.num_frames, a.width, a.height)
    return 0


def _prepare(data_dir: Path, args: argparse.Namespace) -> int:
    from .face_check import DetectorSettings
    from .prepare import prepare, summary
    from .progress import ProgressDisplay

    if args.source and args.source_flag and args.source != args.source_flag:
        log.error("two sources given (%s and --source %s): give one", args.source, args.source_flag)
        return 2
    source = args.source or args.source_flag
    if source is None:
        log.error("no source: python -m avatars prepare VIDEO_PICTURE_OR_FOLDER --name NAME")
        return 2
    detector = DetectorSettings(
        min_face_score=args.min_face_score,
        min_face_px=args.min_face_px,
        max_yaw_deg=args.max_yaw,
        min_face_share=args.min_face_share,
    )
    display = ProgressDisplay(sys.stderr)
    try:
        result = prepare(
            data_dir, args.name, source, args.max_seconds, args.fps, args.max_side,
            detector=detector, replace=args.replace, progress=display,
        )
    finally:
        display.close()
    # The summary is the command's output: stdout, not the log.
    sys.stdout.write(summary(result))
    return 0


def _list(data_dir: Path) -> int:
    """A table of the prepared avatars, read from their avatar.json (loading an avatar
    would set up its frame cache)."""
    import json

    from .avatar import avatars_root, list_avatars

    names = list_avatars(data_dir)
    if not names:
        sys.stdout.write(
            f"no avatars under {avatars_root(data_dir)}\n"
            f"make one with: python -m avatars prepare VIDEO_OR_PICTURE --name NAME --data-dir {data_dir}\n"
        )
        return 0
    header = ("NAME", "FRAMES", "SIZE", "FPS", "SECONDS", "DISK_MB", "CLIPS", "KIND", "SOURCE")
    rows = [header]
    for name in names:
        folder = avatars_root(data_dir) / name
        try:
            info = json.loads((folder / "avatar.json").read_text())
        except (OSError, ValueError) as exc:
            rows.append((name, "?", "?", "?", "?", "?", "?", "unreadable", str(exc)))
            continue
        frames, fps = int(info.get("num_frames", 0)), int(info.get("fps", 25)) or 25
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rows.append((
            name, str(frames), f"{info.get('width', '?')}x{info.get('height', '?')}", str(fps), f"{frames / fps:.1f}",
            f"{disk / 1e6:.1f}", str(len(info.get("clips") or [])), str(info.get("kind", "?")), str(info.get("source", "")),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    numeric = {1, 3, 4, 5, 6}  # right-aligned columns
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r[:-1], widths, strict=True))]
        sys.stdout.write("  ".join([*cells, r[-1]]).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
