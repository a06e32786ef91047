"""``/audio_stream`` end to end: one short trial of ``bench stream`` (a real server with the
CPU engine, a real aiortc client streaming espeak speech at real time in 20 ms pieces),
asserting generous versions of the bench's bars so a loaded 2-core CI machine passes and a
regression does not."""
from __future__ import annotations

import asyncio
import logging
import math

import pytest

from bench.stream_bench import espeak_speech, measure
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)


@pytest.mark.slow
async def test_streamed_speech_is_prompt_whole_lip_synced_and_clears_at_once(server: ServerProcess) -> None:
    speech = await asyncio.to_thread(espeak_speech)
    (trial,) = await measure(server.url, 1, speech)
    log.info("stream trial: %s", trial)
    assert trial.to_audio_ms <= 400, trial
    assert trial.to_video_ms <= 400, trial
    assert abs(trial.duration_diff_ms) <= 120, trial
    assert not math.isnan(trial.r) and trial.r >= 0.5, trial
    assert abs(trial.lag_ms) <= 80, trial
    assert trial.clear_to_last_loud_ms <= 200, trial
    assert trial.clear_interrupted, trial
    assert trial.clear_to_finished_ms <= 500, trial
