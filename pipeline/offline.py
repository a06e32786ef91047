"""Offline generation: an audio file in, a lip-synced H.264 + AAC mp4 out.

    python -m pipeline.offline --avatar NAME --audio FILE --out FILE.mp4 [--engine auto|cpu|musetalk]

The same engine code as the live path: the audio goes through the engine's feature
stream in chunks, frames are rendered in batches of ``engine.max_batch`` and encoded as
they come, so memory stays flat however long the audio. Every sample of audio lands in
a frame: ``ceil(samples / 640)`` frames at 25 fps, the audio padded with silence to
exactly that length (the reference scripts drop the last partial second). The avatar
frames follow the idle loop (forward, then backward), as a live session's do.
``generate_video`` also serves ``POST /digital_human/gen``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import av
import numpy as np

from avatars.avatar import Avatar, load_avatar
from pipeline.audio_decode import AudioDecodeError, decode_audio
from pipeline.engines import LipSyncEngine, RenderItem, create_engine
from pipeline.messages import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

CHUNK_SECONDS = 1.0  # PCM handed to the feature stream at a time


def decode_audio_file(path: Path | str, max_seconds: float = 3600.0) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at 16 kHz."""
    try:
        pcm = decode_audio(path, max_seconds=max_seconds)
    except AudioDecodeError as exc:
        raise AudioDecodeError(f"{path}: {exc}") from None
    return pcm.astype(np.float32) / 32768.0


class _Mp4Writer:
    """H.264 (yuv420p) video at 25 fps and AAC mono audio at 16 kHz, muxed as produced."""

    def __init__(self, path: Path, width: int, height: int, crf: int = 18, preset: str = "veryfast") -> None:
        self.container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        self.video = self.container.add_stream(codec, rate=FPS)
        # yuv420p needs even sizes: odd frames get their last row/column repeated
        self.width, self.height = width + width % 2, height + height % 2
        self.video.width, self.video.height, self.video.pix_fmt = self.width, self.height, "yuv420p"
        self.video.options = {"crf": str(crf), "preset": preset}
        self.audio = self.container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        self.frames = 0
        self.samples = 0

    def write_frame(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if (w, h) != (self.width, self.height):
            rgb = np.pad(rgb, ((0, self.height - h), (0, self.width - w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self.video.encode(frame):
            self.container.mux(packet)

    def write_audio(self, pcm: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, np.float32)[None, :], format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.samples
        self.samples += pcm.size
        for packet in self.audio.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for stream in (self.video, self.audio):
            for packet in stream.encode(None):
                self.container.mux(packet)
        self.container.close()


def generate_video(
    data_dir: Path | str,
    avatar_name: str,
    audio_path: Path | str,
    out_path: Path | str,
    engine_name: str = "auto",
    engine: LipSyncEngine | None = None,
    engine_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Render ``audio_path`` on ``avatar_name`` into ``out_path`` (mp4).

    Pass ``engine`` to reuse a loaded one (it is prepared for the avatar, not closed);
    otherwise ``engine_name`` is created for this call and closed after it.
    Returns ``{"frames", "duration", "path"}`` (duration in seconds, = frames / 25).
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
    data_dir: Path | str, avatar: Avatar | str, audio_path: Path | str, out_path: Path | str, engine: LipSyncEngine
) -> Generator[int, None, dict[str, Any]]:
    """The work of ``generate_video`` one batch at a time: yields the frames done so far
    after each batch and returns the result. The inference worker runs offline jobs this
    way, between real-time batches, with the engine (and weights) it already holds."""
    started = time.monotonic()
    out_path = Path(out_path)
    pcm = decode_audio_file(audio_path)  # bad audio is refused before any other work
    total = math.ceil(pcm.size / SAMPLES_PER_FRAME)
    if isinstance(avatar, str):
        avatar = load_avatar(Path(data_dir), avatar)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".part" + out_path.suffix)
    try:
        engine.prepare(avatar)
        writer = _Mp4Writer(tmp, avatar.width, avatar.height)
        try:
            stream = engine.new_stream()
            batch = max(1, engine.max_batch)
            outs = np.empty((batch, *avatar.frame_shape), np.uint8)
            pending: list[Any] = []
            done = 0

            def render(features: list[Any]) -> None:
                nonlocal done
                items = [RenderItem(avatar.name, avatar.idle_index(done + k), f) for k, f in enumerate(features)]
                engine.render(items, list(outs[: len(items)]))
                for k in range(len(items)):
                    writer.write_frame(outs[k])
                done += len(items)

            step = int(CHUNK_SECONDS * SAMPLE_RATE)
            for start in range(0, pcm.size, step):
                pending.extend(stream.push(pcm[start : start + step]))
                while len(pending) >= batch:
                    render(pending[:batch])
                    del pending[:batch]
                    yield done
            pending.extend(stream.flush())
            for start in range(0, len(pending), batch):
                render(pending[start : start + batch])
                yield done
            if done != total:
                # the engine's stream must give one feature per 40 ms; never drop audio
                log.warning("engine %s gave %d frames for %d; showing idle frames for the rest", engine.name, done, total)
                while done < total:
                    writer.write_frame(np.asarray(avatar.frames[avatar.idle_index(done)]))
                    done += 1
            padded = np.zeros(total * SAMPLES_PER_FRAME, np.float32)
            padded[: pcm.size] = np.clip(pcm, -1.0, 1.0)
            for start in range(0, padded.size, SAMPLE_RATE):
                writer.write_audio(padded[start : start + SAMPLE_RATE])
        finally:
            writer.close()
        os.replace(tmp, out_path)
    except BaseException:  # GeneratorExit too: a cancelled job leaves no partial file
        tmp.unlink(missing_ok=True)
        raise
    result = {"frames": total, "duration": total / FPS, "path": str(out_path)}
    log.info("wrote %s: %d frames (%.2f s) with %s in %.1f s",
             out_path, total, total / FPS, engine.name, time.monotonic() - started)
    return result


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
    log.info("%s", json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
