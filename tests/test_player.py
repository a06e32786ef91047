"""The session player decides each 40 ms frame once: speech from the worker in order,
idle frames otherwise; slots go back to the ring as soon as a frame is taken."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatars.default import ensure_default_avatar
from pipeline.frame_ring import FREE, FrameRing
from pipeline.messages import FrameReady
from server.media import SILENCE, SessionPlayer


@pytest.fixture
def setup(data_dir: Path):
    avatar = ensure_default_avatar(data_dir)
    ring = FrameRing.create(4, avatar.frame_shape)
    events: list[tuple[str, str]] = []
    player = SessionPlayer(avatar, ring, on_event=lambda kind, utt: events.append((kind, utt)))
    yield avatar, ring, player, events
    player.close()
    ring.close()


def speaking(ring: FrameRing, seq: int, utt: str = "u", generation: int = 0, last: bool = False, value: int = 200) -> FrameReady:
    slot = ring.acquire()
    ring.view(slot)[:] = value
    ring.publish(slot)
    audio = np.full(640, 1000 + seq, np.int16).tobytes()
    return FrameReady("s", generation, utt, seq, slot, 0, 10 + seq, audio, last)


def test_idle_frames_walk_the_avatar_loop_with_silence(setup) -> None:
    avatar, _ring, player, events = setup
    frames = [player.frame(n) for n in range(5)]
    for n, f in enumerate(frames):
        assert np.array_equal(f.image, avatar.frames[avatar.idle_index(n)])
        assert f.audio is SILENCE and f.utterance_id is None
    assert events == []


def test_speech_is_shown_in_order_and_each_slot_freed_once_taken(setup) -> None:
    _avatar, ring, player, events = setup
    player.frame(0)
    msgs = [speaking(ring, 0), speaking(ring, 1, last=True)]
    for m in msgs:
        player.push(m)
    f1, f2, f3 = player.frame(1), player.frame(2), player.frame(3)
    assert f1.utterance_id == f2.utterance_id == "u" and f3.utterance_id is None
    assert int(f1.audio[0]) == 1000 and int(f2.audio[0]) == 1001
    assert np.all(f1.image == 200)
    assert all(ring._state[m.slot] == FREE for m in msgs)
    assert events == [("started", "u"), ("ended", "u")]
    assert player.cursor == 10 + 1 + 2  # idle resumes right after the last speaking frame's position


def test_both_tracks_asking_for_a_frame_get_the_same_one(setup) -> None:
    _avatar, ring, player, _events = setup
    player.push(speaking(ring, 0, last=True))
    assert player.frame(0) is player.frame(0)


def test_frames_from_before_an_interrupt_are_released_and_never_shown(setup) -> None:
    _avatar, ring, player, events = setup
    player.push(speaking(ring, 0))
    player.frame(0)
    pending = speaking(ring, 1)
    player.push(pending)
    cut = player.interrupt(1)
    assert cut == ["u"] and ring._state[pending.slot] == FREE
    assert player.frame(0).audio is SILENCE  # the frame on air loses its remaining speech
    stale = speaking(ring, 2, generation=0)
    player.push(stale)
    assert ring._state[stale.slot] == FREE
    assert player.frame(1).utterance_id is None
    assert events == [("started", "u")]  # the session reports the cut itself
