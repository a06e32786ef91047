"""A bounded ring of frame slots in one POSIX shared-memory segment, one ring per session.

The server process creates and unlinks the segment (it owns the session); the worker
only attaches. Frames are written by the worker straight into a slot and read by the
server's video track; only slot numbers cross the process boundary.

Slot state is one byte per slot in the segment's header, each transition owned by one
side, so no lock is needed:

    FREE --worker acquires--> WRITING --worker publishes--> FULL --server releases--> FREE

The FULL transition happens before the slot number is put on the result queue, and the
queue's pipe write orders it, so the server never reads a half-written frame.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import sys
from multiprocessing import shared_memory

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

FREE, WRITING, FULL = 0, 1, 2
HEADER = 64  # state bytes live here; frames start 64-byte aligned
NAME_PREFIX = "lipsync_"


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with this process's resource tracker: the segment
    belongs to the server, and a tracker in the worker would unlink it when the worker
    exits (or warn about a leak that is not one)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker

    original = resource_tracker.register
    setattr(resource_tracker, "register", lambda *args, **kwargs: None)  # noqa: B010 - patching a function
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        setattr(resource_tracker, "register", original)  # noqa: B010


class FrameRing:
    def __init__(self, shm: shared_memory.SharedMemory, slots: int, frame_shape: tuple[int, int, int], owner: bool) -> None:
        if slots < 1 or slots > HEADER:
            raise ValueError(f"slots must be 1..{HEADER}, got {slots}")
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.slots = slots
        self.frame_shape = tuple(frame_shape)
        self.owner = owner
        frame_bytes = int(np.prod(frame_shape))
        self._state: npt.NDArray[np.uint8] = np.ndarray((slots,), np.uint8, buffer=shm.buf, offset=0)
        self._frames: npt.NDArray[np.uint8] = np.ndarray((slots, *frame_shape), np.uint8, buffer=shm.buf, offset=HEADER)
        self._next = 0
        assert HEADER + slots * frame_bytes <= shm.size

    @classmethod
    def create(cls, slots: int, frame_shape: tuple[int, int, int], tag: str = "") -> FrameRing:
        size = HEADER + slots * int(np.prod(frame_shape))
        name = f"{NAME_PREFIX}{tag[:16]}_{secrets.token_hex(4)}" if tag else f"{NAME_PREFIX}{secrets.token_hex(6)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        ring = cls(shm, slots, frame_shape, owner=True)
        ring._state[:] = FREE
        return ring

    @classmethod
    def attach(cls, name: str, slots: int, frame_shape: tuple[int, int, int]) -> FrameRing:
        return cls(_attach_untracked(name), slots, frame_shape, owner=False)

    # ---- worker side ----
    def acquire(self) -> int | None:
        """A free slot for writing, or None when the ring is full (backpressure)."""
        for k in range(self.slots):
            i = (self._next + k) % self.slots
            if self._state[i] == FREE:
                self._state[i] = WRITING
                self._next = (i + 1) % self.slots
                return i
        return None

    def free_count(self) -> int:
        return int(np.count_nonzero(self._state == FREE))

    def publish(self, slot: int) -> None:
        self._state[slot] = FULL

    def abandon(self, slot: int) -> None:
        """Give back a slot acquired for a frame that will not be sent."""
        self._state[slot] = FREE

    def view(self, slot: int) -> np.ndarray:
        return self._frames[slot]

    # ---- server side ----
    def release(self, slot: int) -> None:
        self._state[slot] = FREE

    def reset(self) -> None:
        """Mark every slot free; only when no worker is attached (it died)."""
        self._state[:] = FREE

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Safe to call twice."""
        if self._shm is None:
            return
        # Views into the buffer must go before the mmap can close.
        self._state = self._frames = np.zeros(0, np.uint8)
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a frame view still alive somewhere; the unlink still frees it
            log.debug("ring %s closed with live views", shm.name)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
