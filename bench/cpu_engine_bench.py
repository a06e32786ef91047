"""CPU engine throughput: frames per second rendered into a shared-memory ring, one core,
at the default avatar's 512x512 and at 1280x720.

Run: ``python -m bench cpu``.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from avatars.avatar import Avatar, save_avatar
from avatars.default import ensure_default_avatar
from bench.table import print_table
from media.pcm import to_float
from media.timing import SAMPLE_RATE
from pipeline.engines import RenderItem, create_engine
from pipeline.engines.base import whole_utterance
from pipeline.frame_ring import FrameRing


def widen(avatar: Avatar, data_dir: Path, size: tuple[int, int] = (720, 1280)) -> Avatar:
    """The default avatar centred on a 1280x720 canvas (edges replicated)."""
    h, w = size
    y0, x0 = (h - avatar.height) // 2, (w - avatar.width) // 2
    frames = np.stack([np.pad(f, ((y0, h - avatar.height - y0), (x0, w - avatar.width - x0), (0, 0)), mode="edge") for f in avatar.frames])
    return save_avatar(data_dir, "bench720", frames, avatar.landmarks + np.array([x0, y0], np.float32))


def speech(seconds: float) -> np.ndarray:
    from tts.espeak import EspeakBackend

    async def synth() -> np.ndarray:
        tts = EspeakBackend()
        text = "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow. " * 3
        parts = [c async for c in tts.stream(text)]
        await tts.close()
        return np.concatenate(parts)

    pcm = asyncio.run(synth())
    return to_float(pcm[: int(seconds * SAMPLE_RATE)])  # the engine's stream takes float PCM


def bench_avatar(engine, avatar: Avatar, features: list, frames: int) -> tuple[float, float]:
    engine.prepare(avatar)
    ring = FrameRing.create(8, avatar.frame_shape)
    try:
        batch = engine.max_batch
        times = []
        done = 0
        while done < frames:
            items, outs, slots = [], [], []
            for k in range(min(batch, frames - done)):
                slot = ring.acquire()
                slots.append(slot)
                items.append(RenderItem(avatar.name, avatar.idle_index(done + k), features[(done + k) % len(features)]))
                outs.append(ring.view(slot))
            t = time.perf_counter()
            engine.render(items, outs)
            times.append((time.perf_counter() - t) / len(items))
            for s in slots:
                ring.publish(s)
                ring.release(s)
            done += len(items)
        per_frame = float(np.median(times))
        return 1.0 / per_frame, per_frame * 1000
    finally:
        ring.close()


def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-bench-"))
    engine = create_engine("cpu", data_dir)
    pcm = speech(8.0)
    t = time.perf_counter()
    features = whole_utterance(engine, pcm)
    feat_ms = (time.perf_counter() - t) * 1000 / max(1, len(features))
    avatar = ensure_default_avatar(data_dir)
    rows = []
    for label, av in (("512x512", avatar), ("1280x720", widen(avatar, data_dir))):
        fps, ms = bench_avatar(engine, av, features, args.frames)
        rows.append([label, f"{fps:.0f}", f"{ms:.2f}", f"{feat_ms:.3f}", f"{fps / 25:.0f}"])
    print_table(
        f"CPU engine, one core, {args.frames} frames rendered into a shared-memory ring (median per frame)",
        ["frame size", "frames/s", "render ms/frame", "features ms/frame", "25 fps streams one core could render"],
        rows,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--data-dir", default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench cpu")
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
