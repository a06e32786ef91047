"""Offline generation: an audio file in, a lip-synced H.264 + AAC mp4 out.

    python -m pipeline.offline --avatar NAME --audio FILE --out FILE.mp4 [--engine auto|cpu|musetalk]

The same engine code as the live path: the whole audio goes into the engine's feature
stream (so features are those of the complete utterance), then frames are rendered in
batches of ``engine.max_batch`` and encoded as they come. Every sample of audio lands in
a frame: ``ceil(samples / 640)`` frames at 25 fps, the audio padded with silence to
exactly that length (the reference scripts drop the last partial second). The avatar
frames follow the idle loop (forward, then backward), as a live session's do.
``generate_video`` also serves ``POST /digital_human/gen``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from avatars.avatar import Avatar, load_avatar
from media.decode import AudioDecodeError, decode_audio
from media.mp4 import Mp4Writer
from media.pcm import Pcm, to_float
from media.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for_samples
from pipeline.engines import LipSyncEngine, RenderItem, create_engine
from pipeline.messages import VideoResult

log = logging.getLogger(__name__)

CHUNK_SAMPLES = SAMPLE_RATE  # PCM handed to the feature stream a second at a time
MAX_SECONDS = 3600.0

F = TypeVar("F")


def generate_video(
    data_dir: Path | str,
    avatar_name: str,
    audio_path: Path | str,
    out_path: Path | str,
    engine_name: str = "auto",
    engine: LipSyncEngine[Any] | None = None,
    engine_options: dict[str, Any] | None = None,
) -> VideoResult:
    """Render ``audio_path`` on ``avatar_name`` into ``out_path`` (mp4).

    Pass ``engine`` to reuse a loaded one (it is prepared for the avatar, not closed);
    otherwise ``engine_name`` is created for this call and closed after it.
    """
    own = engine is None
    engine = engine or create_engine(engine_name, Path(data_dir), **(engine_options or {}))
    try:
        steps = iter_generate_video(data_dir, avatar_name, audio_path, out_path, engine)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
    finally:
        if own:
            engine.close()


def iter_generate_video(
    data_dir: Path | str, avatar: Avatar | str, audio_path: Path | str, out_path: Path | str, engine: LipSyncEngine[F]
) -> Generator[int, None, VideoResult]:
    """The work of ``generate_video`` one batch at a time: yields the frames done so far
    after each batch and returns the result. The inference worker runs offline jobs this
    way, between real-time batches, with the engine (and weights) it already holds."""
    started = time.monotonic()
    out_path = Path(out_path)
    try:
        pcm = decode_audio(audio_path, max_seconds=MAX_SECONDS)  # bad audio is refused before any other work
    except AudioDecodeError as exc:
        raise AudioDecodeError(f"{audio_path}: {exc}") from None
    total = frames_for_samples(pcm.size)
    if isinstance(avatar, str):
        avatar = load_avatar(Path(data_dir), avatar)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".part" + out_path.suffix)
    try:
        engine.prepare(avatar)
        with Mp4Writer(tmp, avatar.width, avatar.height) as writer:
            yield from _render_frames(engine, avatar, pcm, total, writer)
            # Every sample lands in a frame: the audio is padded with silence to the frames' length.
            padded = np.zeros(total * SAMPLES_PER_FRAME, np.int16)
            padded[: pcm.size] = pcm
            for start in range(0, padded.size, CHUNK_SAMPLES):
                writer.write_audio(padded[start : start + CHUNK_SAMPLES])
        os.replace(tmp, out_path)
    except BaseException:  # GeneratorExit too: a cancelled job leaves no partial file
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s: %d frames (%.2f s) with %s in %.1f s",
             out_path, total, total / FPS, engine.name, time.monotonic() - started)
    return VideoResult(str(out_path), total, total / FPS)


def _render_frames(engine: LipSyncEngine[F], avatar: Avatar, pcm: Pcm, total: int, writer: Mp4Writer) -> Generator[int, None, None]:
    """All the audio is known, so it goes into the stream first: every frame's features
    are then those of the whole utterance, as MuseTalk's own scripts compute them. Frames
    are rendered a batch at a time and written as they come."""
    stream = engine.new_stream()
    for start in range(0, pcm.size, CHUNK_SAMPLES):
        stream.push(to_float(pcm[start : start + CHUNK_SAMPLES]))
    stream.finish()
    batch = max(1, engine.max_batch)
    outs = np.empty((batch, *avatar.frame_shape), np.uint8)
    done = 0
    while n := min(batch, stream.ready()):
        (features,) = engine.features([(stream, n)])
        items = [RenderItem(avatar.name, avatar.idle_index(done + k), f) for k, f in enumerate(features)]
        engine.render(items, list(outs[:n]))
        for k in range(n):
            writer.write_frame(outs[k])
        done += n
        yield done
    if done != total:
        # the engine's stream must give one feature per 40 ms; never drop audio
        log.warning("engine %s gave %d frames for %d; showing idle frames for the rest", engine.name, done, total)
        while done < total:
            writer.write_frame(np.asarray(avatar.frames[avatar.idle_index(done)]))
            done += 1


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m pipeline.offline", description="Lip-sync an audio file onto an avatar as an mp4.")
    p.add_argument("--avatar", required=True, help="a prepared avatar's name")
    p.add_argument("--audio", required=True, type=Path, help="wav, mp3, ogg, m4a, ...")
    p.add_argument("--out", required=True, type=Path, help="the mp4 to write")
    p.add_argument("--data-dir", type=Path, default=Path(env("LIPSYNC_DATA_DIR", "data")))
    p.add_argument("--engine", default=env("LIPSYNC_ENGINE", "auto"), choices=["auto", "cpu", "musetalk"])
    p.add_argument("--musetalk-version", default=env("LIPSYNC_MUSETALK_VERSION", "v15"), choices=["v15", "v1"])
    p.add_argument("--device", default=None, help="musetalk: cuda, cuda:1, cpu (default: auto)")
    p.add_argument("--batch", type=int, default=None, help="musetalk: frames per forward")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {}
    if a.engine in ("musetalk", "auto"):
        options["version"] = a.musetalk_version
        if a.device:
            options["device"] = a.device
        if a.batch:
            options["max_batch"] = a.batch
    try:
        result = generate_video(a.data_dir, a.avatar, a.audio, a.out, engine_name=a.engine, engine_options=options)
    except Exception as exc:  # a CLI: say what went wrong in one line
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    log.info("%s", json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
