"""``python -m bench [cpu|realtime|stream|musetalk|encode|browser|avatar|load|gpu-check|all]``: the benchmarks, each printing a table."""
from __future__ import annotations

import importlib
import logging
import sys

BENCHES = {
    "cpu": ("bench.cpu_engine_bench", "CPU engine frames/s at 512x512 and 1280x720"),
    "realtime": ("bench.realtime_bench", "latency, interrupt, A/V offset and session capacity at a WebRTC client"),
    "stream": ("bench.stream_bench", "/audio_stream at real time: first piece -> speech, heard whole, lip-sync, clear_buffer -> silence"),
    "musetalk": ("bench.musetalk_bench", "MuseTalk frames/s by batch, ms per stage, TFLOP/s (GPU when present)"),
    "features": ("bench.features_bench", "MuseTalk audio features while audio still arrives vs the whole utterance's; Whisper pass ms"),
    "encode": ("bench.encoder_bench", "aiortc VP8/H.264 encode ms, frames/s with 1 and 2 sessions in parallel, sessions per core"),
    "browser": ("bench.browser_bench", "the same latency and sync figures as headless Chromium plays them (needs playwright)"),
    "avatar": ("bench.avatar_bench", "a 30 s 1080p presenter video: preparation frames/s, MB on disk, first session s, shared cache"),
    "load": ("bench.load_bench", "N real aiortc clients come, talk, interrupt, upload and go; latency, gaps, server memory/fds/shm"),
    "gpu-check": ("bench.gpu_check", "one-call MuseTalk check on a GPU machine: tests, precision, benchmarks, one report (--dry-run: CPU)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    name = argv.pop(0) if argv and (not argv[0].startswith("-") or argv[0] in ("-h", "--help")) else "all"
    if name in ("-h", "--help") or (name not in BENCHES and name != "all"):
        print("usage: python -m bench [" + "|".join([*BENCHES, "all"]) + "] [options]")
        for key, (_mod, what) in BENCHES.items():
            print(f"  {key:9s} {what}")
        sys.exit(0 if name in ("-h", "--help") else 2)
    names = ["cpu", "realtime"] if name == "all" else [name]
    for key in names:
        importlib.import_module(BENCHES[key][0]).main(argv)


if __name__ == "__main__":
    main()
