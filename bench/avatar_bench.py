"""Avatars from a presenter video: preparation speed, size on disk, first session start,
and memory shared across processes.

``python -m bench avatar [--seconds 30] [--height 1080] [--max-side 1920]`` makes a
presenter-like video (the default avatar's face, moving and zooming slowly on a larger
canvas, H.264 at 25 fps), prepares it with ``avatars.prepare`` as a user would, then
starts the server (CPU engine) and opens a WebRTC session on it with the real client. It
prints:

* preparation: frames/s, seconds, the video's and the prepared avatar's bytes, and the
  raw size the frames would take uncompressed (format 1);
* the first session on the fresh avatar: offer -> first video frame at the client, after
  a server start (no decoded cache yet), and a second session;
* the decoded-frame cache: its size, and how much of it the server and the worker each
  hold privately (PSS of the mapping): held once per machine, it is shared between them.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from bench.table import print_table


def make_presenter_video(path: Path, seconds: float, width: int, height: int, fps: int = 25) -> int:
    """The default avatar's face on a ``width``x``height`` canvas, drifting and zooming."""
    from avatars.default import default_still

    still = default_still()
    frames = int(seconds * fps)
    base = min(width, height) * 0.8 / still.shape[0]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        stream.time_base = Fraction(1, fps)
        canvas = np.empty((height, width, 3), np.uint8)
        for i in range(frames):
            t = i / fps
            scale = base * (1.0 + 0.08 * math.sin(2 * math.pi * t / 11))
            face = cv2.resize(still, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            canvas[:] = (40, 60, 80)
            fh, fw = face.shape[:2]
            x0 = int((width - fw) / 2 + 0.1 * width * math.sin(2 * math.pi * t / 7))
            y0 = int((height - fh) / 2)
            xs, ys = max(0, x0), max(0, y0)
            xe, ye = min(width, x0 + fw), min(height, y0 + fh)
            canvas[ys:ye, xs:xe] = face[ys - y0 : ye - y0, xs - x0 : xe - x0]
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def _mapping_kb(pid: int, name: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of ``pid``'s mappings of a file whose path contains ``name``."""
    rss = pss = 0
    current = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if head and "-" in head[0] and len(head) >= 5:
                    current = name in line
                elif current and head[0] == "Rss:":
                    rss += int(head[1])
                elif current and head[0] == "Pss:":
                    pss += int(head[1])
    except OSError:
        pass
    return rss, pss


async def _first_frame_s(url: str, avatar: str, speak: bool = False) -> float:
    """Offer -> first video frame; ``speak``: then let it talk, so the worker renders on
    (and maps) the avatar's frames too."""
    from tests.support.client import AvatarClient

    async with AvatarClient(url, keep_images=False) as client:
        started = time.perf_counter()
        await client.connect(avatar=avatar, timeout=60)
        took = time.perf_counter() - started
        if speak:
            await client.say("Good morning, and welcome to the show. Today we look at avatars made from your own video.")
            await client.wait_speaking(True)
            await client.wait_speaking(False, timeout=60)
        return took


def run(args: argparse.Namespace) -> None:
    from avatars.frame_store import SharedFrames, stored_bytes
    from avatars.prepare import prepare_avatar
    from tests.support.proc_stats import pid_listening_on
    from tests.support.server_process import ServerProcess

    work = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-avatar-bench-"))
    width = round(args.height * 16 / 9) // 2 * 2
    video = work / f"presenter-{args.height}p.mp4"
    started = time.perf_counter()
    count = make_presenter_video(video, args.seconds, width, args.height)
    made_s = time.perf_counter() - started

    started = time.perf_counter()
    avatar = prepare_avatar(work, "presenter", video, max_seconds=args.seconds + 1, max_side=args.max_side)
    prep_s = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in avatar.path.rglob("*") if p.is_file())
    raw = avatar.num_frames * avatar.height * avatar.width * 3
    print_table(
        f"Preparing a {args.seconds:.0f} s {width}x{args.height} presenter video (2-core CPU; made in {made_s:.0f} s)",
        ["frames", "stored size", "prepare s", "frames/s", "video MB", "avatar on disk MB", "frames MB", "raw frames MB (format 1)"],
        [[f"{avatar.num_frames} of {count}", f"{avatar.width}x{avatar.height}", f"{prep_s:.1f}",
          f"{avatar.num_frames / prep_s:.1f}", f"{video.stat().st_size / 1e6:.1f}", f"{disk / 1e6:.1f}",
          f"{stored_bytes(avatar.path) / 1e6:.1f}", f"{raw / 1e6:.0f}"]],
    )
    if isinstance(avatar.frames, SharedFrames):
        avatar.release()  # the server below starts with no decoded cache

    rows = []
    with ServerProcess(work, "--log-level", "WARNING") as server:
        first = asyncio.run(_first_frame_s(server.url, "presenter"))
        second = asyncio.run(_first_frame_s(server.url, "presenter", speak=True))
        time.sleep(args.settle)  # the server's prefetch decodes the rest meanwhile
        maps = {pid: _mapping_kb(pid, "presenter-") for pid in _pids()}
        maps = {pid: kb for pid, kb in maps.items() if kb[0]}
        server_pid = pid_listening_on(server.port) or server.proc.pid
        s_rss, s_pss = maps.get(server_pid, (0, 0))
        others = [kb for pid, kb in maps.items() if pid != server_pid]
        o_rss, o_pss = sum(r for r, _ in others), sum(q for _, q in others)
        rows.append([f"{first:.2f}", f"{second:.2f}", f"{raw / 2**20:.0f}", str(len(maps)),
                     f"{s_rss / 1024:.0f} / {s_pss / 1024:.0f}", f"{o_rss / 1024:.0f} / {o_pss / 1024:.0f}",
                     f"{(s_pss + o_pss) / 1024:.0f}"])
    print_table(
        "First session on the prepared avatar (CPU engine), and the decoded-frame cache",
        ["1st session: offer -> first frame s", "2nd session s", "decoded cache MiB", "processes mapping it",
         "server (RSS / PSS MiB)", "worker (RSS / PSS MiB)", "held on the machine MiB (PSS sum)"],
        rows,
    )


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench avatar", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--max-side", type=int, default=1920, help="prepare at up to this size (1920 keeps 1080p)")
    p.add_argument("--settle", type=float, default=20.0, help="seconds before the memory figures")
    p.add_argument("--data-dir", default=None)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
