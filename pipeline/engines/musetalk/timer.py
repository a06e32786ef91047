"""Milliseconds per render stage, for the benchmark (``engine.timer``; None in service)."""
from __future__ import annotations

import time
from collections import defaultdict
from itertools import pairwise

import torch


class StageTimer:
    """Milliseconds per render stage; CUDA events on the GPU, so timing adds no syncs.

    ``start`` opens a batch, each ``mark(stage)`` closes the stage that ran since the
    previous mark, ``finish`` adds the batch's stages to ``totals`` (waiting for the GPU
    only there)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.calls = 0
        self._stages: list[str] = []  # the stage each mark closes ("" for the start)
        self._events: list[torch.cuda.Event] = []  # on CUDA
        self._times: list[float] = []  # elsewhere: perf_counter seconds

    def _record(self, stage: str) -> None:
        self._stages.append(stage)
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append(event)
        else:
            self._times.append(time.perf_counter())

    def start(self) -> None:
        self._stages, self._events, self._times = [], [], []
        self._record("")

    def mark(self, stage: str) -> None:
        self._record(stage)

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            spans = [a.elapsed_time(b) for a, b in pairwise(self._events)]
        else:
            spans = [(b - a) * 1000.0 for a, b in pairwise(self._times)]
        for stage, ms in zip(self._stages[1:], spans, strict=True):
            self.totals[stage] += ms
        self.calls += 1
        self._stages, self._events, self._times = [], [], []

    def reset(self) -> None:
        self.totals.clear()
        self.calls = 0
