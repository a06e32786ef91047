"""How far MuseTalk's audio features are from the whole-utterance ones when frames are
rendered before the utterance's audio is complete, and what the Whisper passes cost.

The engine computes a frame's features from all the audio there is when the frame is
rendered (``models.whisper.utterance``). Complete audio gives MuseTalk's own features
exactly; audio still arriving gives features computed without the rest. Three ways audio
arrives, for v1.5 and v1.0:

* complete: an upload, an offline job, a one-sentence TTS reply;
* sentences: a multi-sentence TTS reply, whose first sentence renders its first ring of
  frames (8) before the next sentence arrives;
* streamed: 20 ms pieces at real time (a voice agent's TTS), frames rendered as soon as
  ready, for several look-aheads.

The weights are random (the real ones cannot be downloaded here): the errors show the
mechanism and its order, not what the trained Whisper gives. Run:
``python -m bench features [--seconds 6] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.table import print_table
from media.pcm import to_float
from media.timing import SAMPLE_RATE
from models.whisper import UtteranceFeatures, WhisperAudioEncoder, encode, load_whisper_encoder
from tests.support.musetalk_fixtures import whisper_checkpoint

RING = 8  # frames a session renders ahead (the server's ring)
PIECE = SAMPLE_RATE // 50


def speech_sentences() -> list[np.ndarray]:
    """Three espeak sentences as float PCM."""
    from tts.espeak import EspeakBackend

    async def synth() -> list[np.ndarray]:
        tts = EspeakBackend()
        text = ("The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow. "
                "How vexingly quick daft zebras jump!")
        parts = [to_float(c) async for c in tts.stream(text)]
        await tts.close()
        return parts

    return asyncio.run(synth())


def errors(got: list[torch.Tensor], whole: list[torch.Tensor]) -> np.ndarray:
    return np.array([float((g - w).float().norm() / w.float().norm()) for g, w in zip(got, whole, strict=True)])


def complete(encoder: WhisperAudioEncoder, version: str, pcm: np.ndarray) -> tuple[list[torch.Tensor], int]:
    stream = UtteranceFeatures(encoder, version)
    stream.push(pcm)
    stream.finish()
    return stream.take(stream.ready()), stream.passes


def by_sentences(encoder: WhisperAudioEncoder, version: str, parts: list[np.ndarray]) -> tuple[list[torch.Tensor], int]:
    stream = UtteranceFeatures(encoder, version)
    stream.push(parts[0])
    got = stream.take(min(RING, stream.ready()))
    for part in parts[1:]:
        stream.push(part)
    stream.finish()
    return got + stream.take(stream.ready()), stream.passes


def streamed(
    encoder: WhisperAudioEncoder, version: str, pcm: np.ndarray, lookahead_s: float, every: int
) -> tuple[list[torch.Tensor], int]:
    """Frames taken ``every`` at a time as they become ready (the worker takes one as each
    ring slot frees, 25 a second; fewer, bigger takes keep a CPU run short)."""
    stream = UtteranceFeatures(encoder, version, right_context_s=lookahead_s)
    got: list[torch.Tensor] = []
    for start in range(0, pcm.size, PIECE):
        stream.push(pcm[start : start + PIECE])
        if stream.ready() >= every:
            got += stream.take(stream.ready())
    stream.finish()
    return got + stream.take(stream.ready()), stream.passes


def pass_ms(encoder: WhisperAudioEncoder, batch: int, device: torch.device) -> float:
    mels = torch.randn(batch, encoder.dims.n_mels, 3000, device=device)
    encode(encoder, mels[:1], "v15")  # warm up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    encode(encoder, mels, "v15")
    sync()
    return (time.perf_counter() - started) * 1000


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    path = Path(tempfile.mkdtemp(prefix="lipsync-features-")) / "tiny.pt"
    torch.save(whisper_checkpoint(seed=0), path)
    encoder = load_whisper_encoder(path, device)
    parts = speech_sentences()
    pcm = np.concatenate(parts)[: int(args.seconds * SAMPLE_RATE)]
    rows = []
    for version in ("v15", "v1"):
        whole, passes = complete(encoder, version, pcm)
        seconds = pcm.size / SAMPLE_RATE
        rows.append([version, "complete (upload, offline, one sentence)", "0", "0", "0", f"{passes / seconds:.2f}"])
        cases = [("sentences (first 8 frames before sentence 2)", by_sentences(encoder, version, parts))]
        for la in args.lookaheads:
            label = f"streamed 20 ms pieces, look-ahead {la:.1f} s, frames taken {args.every} at a time"
            cases.append((label, streamed(encoder, version, pcm, la, args.every)))
        for label, (got, passes) in cases:
            got = got[: len(whole)]
            e = errors(got, whole[: len(got)])
            rows.append([version, label, f"{np.median(e):.3f}", f"{np.percentile(e, 95):.3f}", f"{e.max():.3f}", f"{passes / seconds:.2f}"])
    print_table(
        f"MuseTalk audio features vs the whole utterance's ({pcm.size / SAMPLE_RATE:.1f} s of espeak speech, random Whisper-tiny "
        "weights: the mechanism, not the trained model's figures); relative error per frame",
        ["version", "audio arrives", "median", "95th pct", "max", "30 s passes per second of audio"],
        rows,
    )
    timing = [[str(b), f"{pass_ms(encoder, b, device):.0f}"] for b in args.batches]
    print_table(f"Whisper-tiny encoder pass over 30 s segments on {device} (fp32), one batched call",
                ["segments in the call", "ms"], timing)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=6.0, help="speech length (three espeak sentences give about 6.5 s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lookaheads", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5, 1.0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--every", type=int, default=1 if torch.cuda.is_available() else 8,
                   help="take streamed frames this many at a time (the live worker: 1; a CPU run: 8 keeps it short)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench features", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
