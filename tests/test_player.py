"""The session player decides each 40 ms frame once: speech from the worker in order,
idle frames otherwise; slots go back to the ring as soon as a frame is taken."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from avatars.avatar import Avatar
from avatars.default import ensure_default_avatar
from media.pcm import SILENT_FRAME
from media.timing import SAMPLES_PER_FRAME
from pipeline.frame_ring import FREE, FrameRing
from pipeline.messages import FrameReady
from server.frames import MediaFrame
from server.player import SessionPlayer


@dataclass
class Listener:
    """Records what the player tells the session, and owns the generation as the feeder does."""

    generation: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)

    def on_playback_started(self, utterance_id: str) -> None:
        self.events.append(("started", utterance_id))

    def on_playback_ended(self, utterance_id: str) -> None:
        self.events.append(("ended", utterance_id))


@dataclass
class Setup:
    avatar: Avatar
    ring: FrameRing
    player: SessionPlayer
    listener: Listener


@pytest.fixture
def setup(data_dir: Path) -> Iterator[Setup]:
    avatar = ensure_default_avatar(data_dir)
    ring = FrameRing.create(4, avatar.frame_shape)
    listener = Listener()
    player = SessionPlayer(avatar, ring, lambda: listener.generation, listener)
    yield Setup(avatar, ring, player, listener)
    player.close()
    ring.close()


def speaking(ring: FrameRing, seq: int, utt: str = "u", generation: int = 0, last: bool = False, value: int = 200) -> FrameReady:
    slot = ring.acquire()
    assert slot is not None
    ring.view(slot)[:] = value
    ring.publish(slot)
    audio = np.full(SAMPLES_PER_FRAME, 1000 + seq, np.int16)
    return FrameReady("s", generation, utt, seq, slot, 0, 10 + seq, audio, last)


def test_idle_frames_walk_the_avatar_loop_with_silence(setup: Setup) -> None:
    frames = [setup.player.frame(n) for n in range(5)]
    for n, f in enumerate(frames):
        assert np.array_equal(f.image, setup.avatar.frames[setup.avatar.idle_index(n)])
        assert f.audio is SILENT_FRAME and f.utterance_id is None
    assert setup.listener.events == []


def test_speech_is_shown_in_order_and_each_slot_freed_once_taken(setup: Setup) -> None:
    ring, player = setup.ring, setup.player
    player.frame(0)
    msgs = [speaking(ring, 0), speaking(ring, 1, last=True)]
    for m in msgs:
        player.push(m)
    f1, f2, f3 = player.frame(1), player.frame(2), player.frame(3)
    assert f1.utterance_id == f2.utterance_id == "u" and f3.utterance_id is None
    assert int(f1.audio[0]) == 1000 and int(f2.audio[0]) == 1001
    assert np.all(f1.image == 200)
    assert all(ring._state[m.slot] == FREE for m in msgs)
    assert setup.listener.events == [("started", "u"), ("ended", "u")]
    assert player.cursor == 10 + 1 + 2  # idle resumes right after the last speaking frame's position


def test_both_tracks_asking_for_a_frame_get_the_same_one(setup: Setup) -> None:
    setup.player.push(speaking(setup.ring, 0, last=True))
    assert setup.player.frame(0) is setup.player.frame(0)


def test_frames_from_before_an_interrupt_are_released_and_never_shown(setup: Setup) -> None:
    ring, player, listener = setup.ring, setup.player, setup.listener
    player.push(speaking(ring, 0))
    player.frame(0)
    pending = speaking(ring, 1)
    player.push(pending)
    listener.generation = 1  # the feeder's interrupt
    player.cut()
    assert ring._state[pending.slot] == FREE
    assert player.frame(0).audio is SILENT_FRAME  # the frame on air loses its remaining speech
    stale = speaking(ring, 2, generation=0)
    player.push(stale)
    assert ring._state[stale.slot] == FREE
    assert player.frame(1).utterance_id is None
    assert listener.events == [("started", "u")]  # the feeder reports the cut itself


def test_every_sink_sees_every_decided_frame_once_in_order(setup: Setup) -> None:
    seen: list[list[int]] = [[], []]
    sinks = [lambda f, k=k: seen[k].append(f.index) for k in range(2)]
    for sink in sinks:
        setup.player.add_sink(sink)
    setup.player.frame(3)
    setup.player.frame(1)  # already decided: not seen again
    setup.player.remove_sink(sinks[1])
    setup.player.frame(5)
    assert seen == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3]]


def test_restart_idle_goes_back_to_the_first_frame_of_the_loop(setup: Setup) -> None:
    for n in range(7):
        setup.player.frame(n)
    setup.player.restart_idle()
    frame: MediaFrame = setup.player.frame(7)
    assert np.array_equal(frame.image, setup.avatar.frames[setup.avatar.idle_index(0)])
