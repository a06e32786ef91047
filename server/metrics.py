"""What an operator watches: Prometheus figures at ``/metrics`` and the server's health.

Counters and histograms are fed as things happen (events published by sessions, audio
decodes); gauges are read from the manager and the worker's last figures at each scrape.
The text exposition format is written here (a few lines), so no client library is needed.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from server.errors import ErrorCode
from server.events import ErrorEvent, SessionEvent, SpeakingStarted

# text -> first speaking frame, seconds: the real-time bar is 0.25 s
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    """The server's running figures (one per manager)."""

    first_frame: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tts_errors: int = 0
    utterances: int = 0
    decode_seconds: float = 0.0
    decodes: int = 0
    http_errors: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    _frames_at: tuple[float, int] | None = None  # for the worker's frames/s between scrapes
    worker_fps: float = 0.0

    def observe(self, event: SessionEvent) -> None:
        """Every session event passes here (``SessionEvents`` observer)."""
        if isinstance(event, SpeakingStarted):
            self.first_frame.observe(event.latency_ms / 1000.0)
            self.utterances += 1
        elif isinstance(event, ErrorEvent) and event.code == ErrorCode.TTS_FAILED:
            self.tts_errors += 1

    def decoded(self, seconds: float) -> None:
        self.decode_seconds += seconds
        self.decodes += 1

    def answered(self, status: int) -> None:
        """Every response's status passes here; errors are counted."""
        if status >= 400:
            self.http_errors[status] = self.http_errors.get(status, 0) + 1

    def frames_rate(self, frames_rendered: int) -> float:
        """The worker's frames/s since the previous scrape."""
        now = time.monotonic()
        if self._frames_at is not None and now > self._frames_at[0]:
            self.worker_fps = (frames_rendered - self._frames_at[1]) / (now - self._frames_at[0])
        self._frames_at = (now, frames_rendered)
        return self.worker_fps


def exposition(metrics: Metrics, gauges: dict[str, tuple[str, float]]) -> str:
    """Prometheus text format: ``gauges`` maps a name to (help, value)."""
    lines: list[str] = []

    def add(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    for name, (help_text, value) in gauges.items():
        add(name, "gauge", help_text, [f"{name} {value:g}"])
    add("lipsync_first_frame_seconds", "histogram", "text or audio queued -> its first frame shown",
        metrics.first_frame.lines("lipsync_first_frame_seconds"))
    add("lipsync_utterances_total", "counter", "utterances that started speaking", [f"lipsync_utterances_total {metrics.utterances}"])
    add("lipsync_tts_errors_total", "counter", "TTS failures reported to sessions", [f"lipsync_tts_errors_total {metrics.tts_errors}"])
    add("lipsync_decode_seconds_total", "counter", "time spent decoding uploaded audio",
        [f"lipsync_decode_seconds_total {metrics.decode_seconds:.6f}"])
    add("lipsync_decodes_total", "counter", "uploaded audio files decoded", [f"lipsync_decodes_total {metrics.decodes}"])
    add("lipsync_http_errors_total", "counter", "error responses, by HTTP status",
        [f'lipsync_http_errors_total{{status="{status}"}} {n}' for status, n in sorted(metrics.http_errors.items())])
    return "\n".join(lines) + "\n"
