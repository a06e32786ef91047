"""Progress of a long avatar preparation, for whoever watches it.

The preparation reports :class:`Progress` values to a plain callback; the command line
draws them on stderr (:class:`ProgressDisplay`), an HTTP preparation job stores the
latest one for its status route. Reporting is throttled at the source
(:class:`StageProgress`), so a callback never sees more than a few calls a second,
and always sees the first and the last step of every stage.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where one stage of a preparation stands: ``done`` of ``total`` frames after
    ``elapsed_s`` seconds in this stage."""

    stage: str
    done: int
    total: int
    elapsed_s: float

    @property
    def fps(self) -> float:
        """Frames per second so far (0 before the first frame)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 and self.done > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None before there is a pace."""
        if self.done >= self.total:
            return 0.0
        fps = self.fps
        return (self.total - self.done) / fps if fps > 0 else None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 1.0

    @property
    def finished(self) -> bool:
        return self.done >= self.total


ProgressCallback = Callable[[Progress], None]


class StageProgress:
    """Counts one stage's frames and calls ``callback`` at most every ``interval_s``,
    plus at the start and at the end (``finish``), so the last call has done == total."""

    def __init__(self, callback: ProgressCallback | None, stage: str, total: int, interval_s: float = 0.1) -> None:
        self._callback = callback
        self.stage = stage
        self.total = max(0, int(total))
        self.done = 0
        self._interval = interval_s
        self._started = time.perf_counter()
        self._last = -math.inf
        self._emit()

    def step(self, count: int = 1) -> None:
        self.done += count
        if self._callback is not None and time.perf_counter() - self._last >= self._interval:
            self._emit()

    def finish(self, total: int | None = None) -> None:
        """End the stage; ``total`` corrects an estimate (a clip shorter than its header said)."""
        if total is not None:
            self.total = int(total)
        self.done = self.total
        self._emit()

    def _emit(self) -> None:
        if self._callback is None:
            return
        now = time.perf_counter()
        self._last = now
        # done never passes total: an estimate that was short grows with it
        self.total = max(self.total, self.done)
        self._callback(Progress(self.stage, self.done, self.total, now - self._started))


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def describe(p: Progress) -> str:
    """One line: stage, done/total, frames/s, time left."""
    parts = [f"{p.stage:<10} {p.done:>{len(str(p.total))}}/{p.total} frames"]
    if p.fps > 0:
        parts.append(f"{p.fps:6.1f} frames/s")
    if p.finished:
        parts.append(f"done in {format_seconds(p.elapsed_s)}")
    elif p.eta_s is not None:
        parts.append(f"{format_seconds(p.eta_s)} left")
    return "  ".join(parts)


class ProgressDisplay:
    """A progress callback that draws on a terminal: a one-line bar redrawn with ``\\r``
    when ``stream`` is a TTY, else a plain line every ``log_every_s`` seconds and at the
    end of each stage (a log file or a CI console gets no carriage returns)."""

    def __init__(self, stream: TextIO, tty: bool | None = None, log_every_s: float = 5.0, width: int = 24) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._every = log_every_s
        self._width = width
        self._last_line = -math.inf
        self._open = False  # a bar is drawn and not yet ended with a newline

    def __call__(self, p: Progress) -> None:
        if self._tty:
            filled = round(self._width * p.fraction)
            bar = "#" * filled + "-" * (self._width - filled)
            self._stream.write(f"\r[{bar}] {describe(p)}\x1b[K")
            self._open = True
            if p.finished:
                self._stream.write("\n")
                self._open = False
            self._stream.flush()
            return
        now = time.monotonic()
        if p.finished or now - self._last_line >= self._every:
            self._last_line = now
            self._stream.write(describe(p) + "\n")
            self._stream.flush()

    def close(self) -> None:
        """End a bar left open (a stage that stopped with an error)."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False
