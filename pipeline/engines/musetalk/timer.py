"""Milliseconds per render stage, for the benchmark (``engine.timer``; None in service)."""
from __future__ import annotations

import time
from collections import defaultdict

import torch


class BatchTimes:
    """One batch's stages. Device stages are spans between CUDA events on a lane (a
    stream): ``mark(stage)`` closes the stage that ran since the lane's previous mark (the
    batch's start, on the compute lane). Host stages add wall milliseconds (``host``).
    Nothing here waits for the GPU: the events are read when the totals are."""

    def __init__(self, timer: StageTimer) -> None:
        self._timer = timer
        self._last: dict[str, torch.cuda.Event | float] = {}
        self._spans: list[tuple[str, torch.cuda.Event | float, torch.cuda.Event | float]] = []
        self._host: dict[str, float] = defaultdict(float)
        self.lane("compute")

    def _now(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | float:
        if not self._timer.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def lane(self, lane: str, stream: torch.cuda.Stream | None = None) -> None:
        """Open ``lane``: its first stage starts now (on ``stream``, default the current one)."""
        self._last[lane] = self._now(stream)

    def mark(self, stage: str, lane: str = "compute", stream: torch.cuda.Stream | None = None) -> None:
        end = self._now(stream)
        self._spans.append((stage, self._last[lane], end))
        self._last[lane] = end

    def host(self, stage: str, ms: float) -> None:
        self._host[stage] += ms

    def finish(self) -> None:
        """The batch is complete on the host; its device spans are read later."""
        self._timer._pending.append(self)

    def resolve(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for stage, start, end in self._spans:
            if isinstance(start, float) and isinstance(end, float):
                out[stage] += (end - start) * 1000.0
            elif isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
                end.synchronize()  # this batch's own event, not the device: other work keeps running
                out[stage] += start.elapsed_time(end)
        for stage, ms in self._host.items():
            out[stage] += ms
        return out


class StageTimer:
    """Milliseconds per render stage; CUDA events on the GPU, so timing adds no syncs.

    ``begin()`` opens a batch (several can be in flight: the engine overlaps one batch's
    copy back with the next one's compute) and returns its ``BatchTimes``; ``totals`` sums
    the finished batches' stages, waiting only for their own events."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._calls = 0
        self._pending: list[BatchTimes] = []

    def begin(self) -> BatchTimes:
        return BatchTimes(self)

    def _resolve(self) -> None:
        pending, self._pending = self._pending, []
        for batch in pending:
            for stage, ms in batch.resolve().items():
                self._totals[stage] += ms
            self._calls += 1

    @property
    def totals(self) -> dict[str, float]:
        self._resolve()
        return dict(self._totals)

    @property
    def calls(self) -> int:
        self._resolve()
        return self._calls

    def reset(self) -> None:
        self._pending = []
        self._totals.clear()
        self._calls = 0
