"""The shared-memory frame ring: slot states, backpressure, and cleanup across processes."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.frame_ring import FULL, FrameRing


def _child_writes(name: str, slots: int, shape: tuple[int, int, int], value: int) -> None:
    ring = FrameRing.attach(name, slots, shape)
    slot = ring.acquire()
    ring.view(slot)[:] = value
    ring.publish(slot)
    ring.close()


def shm_entries(prefix: str = "lipsync_") -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(prefix + "*")} if os.path.isdir("/dev/shm") else set()


def test_acquire_until_full_then_backpressure() -> None:
    ring = FrameRing.create(3, (4, 4, 3))
    try:
        got = [ring.acquire() for _ in range(3)]
        assert sorted(got) == [0, 1, 2]
        assert ring.acquire() is None  # full: the worker must wait, the ring never grows
        ring.publish(got[0])
        ring.release(got[0])
        assert ring.acquire() == got[0]
    finally:
        ring.close()


def test_frame_written_in_another_process_is_read_here_and_segment_survives_its_exit() -> None:
    shape = (8, 6, 3)
    ring = FrameRing.create(2, shape, tag="t")
    try:
        p = mp.get_context("spawn").Process(target=_child_writes, args=(ring.name, 2, shape, 77))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        full = [i for i in range(2) if ring._state[i] == FULL]
        assert len(full) == 1
        assert np.all(ring.view(full[0]) == 77)
        assert ring.name in shm_entries()  # the worker's exit did not unlink the server's segment
    finally:
        ring.close()
    assert ring.name not in shm_entries()


def test_close_is_idempotent_and_unlinks() -> None:
    ring = FrameRing.create(1, (2, 2, 3))
    name = ring.name
    ring.close()
    ring.close()
    assert name not in shm_entries()


def test_rejects_bad_slot_count() -> None:
    with pytest.raises(ValueError):
        FrameRing.create(0, (2, 2, 3))
