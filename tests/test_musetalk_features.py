"""MuseTalk's per-frame audio features: the window, and the features themselves held to
MuseTalk's own computation (Hugging Face's Whisper for v1.5, openai-whisper for v1.0) on
the same tiny random weights, at the start, middle and end of an utterance, fed whole or
in 20 ms pieces."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("whisper")

from media.timing import SAMPLE_RATE, frames_for_samples  # noqa: E402
from models.positional import sinusoid_table  # noqa: E402
from models.whisper import (  # noqa: E402
    UtteranceFeatures,
    WhisperAudioEncoder,
    encode_pending,
    load_whisper_encoder,
    resolve_step,
    steps_for_samples,
    window_indices,
)
from tests.support.musetalk_fixtures import speech_like, whisper_checkpoint  # noqa: E402
from tests.support.whisper_reference import v1_features, v15_features  # noqa: E402

PIECE = SAMPLE_RATE // 50  # 20 ms
# Relative error allowed against the reference: float32 arithmetic in a different order
# (and numpy's float64 mel in the HF extractor) over 4 transformer blocks.
RTOL = 1e-3


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, Any]:
    return whisper_checkpoint(seed=3)


@pytest.fixture(scope="module")
def encoder(checkpoint: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> WhisperAudioEncoder:
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save(checkpoint, path)
    return load_whisper_encoder(path)


def features(encoder: WhisperAudioEncoder, version: str, pcm: np.ndarray, piece: int | None = None) -> list[torch.Tensor]:
    """Every frame of a complete utterance, pushed whole or in ``piece``-sample pieces."""
    stream = UtteranceFeatures(encoder, version)
    step = piece or max(pcm.size, 1)
    for start in range(0, pcm.size, step):
        stream.push(pcm[start : start + step])
    stream.finish()
    return stream.take(stream.ready())


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


# ---- the window -------------------------------------------------------------------------


def test_frame_window_is_ten_steps_from_minus_80_to_plus_120_ms() -> None:
    for frame in (0, 1, 7, 100):
        steps = window_indices(frame)
        assert len(steps) == 10
        # 20 ms steps; frame f starts at 40 f ms = step 2 f
        assert steps[0] * 20 == frame * 40 - 80 and (steps[-1] + 1) * 20 == frame * 40 + 120


@pytest.mark.parametrize(
    ("frame", "v1", "v15"),
    [
        # start of a 1 s utterance (50 steps, 25 frames): v1.0 repeats step 0, v1.5 pads zeros
        (0, [0, 0, 0, 0, 0, 1, 2, 3, 4, 5], [None] * 4 + [0, 1, 2, 3, 4, 5]),
        (1, [0, 0, 0, 1, 2, 3, 4, 5, 6, 7], [None, None, 0, 1, 2, 3, 4, 5, 6, 7]),
        # middle: the same real steps for both
        (12, list(range(20, 30)), list(range(20, 30))),
        # end: v1.0 repeats the last step (49), v1.5 pads zeros
        (24, [44, 45, 46, 47, 48, 49, 49, 49, 49, 49], [44, 45, 46, 47, 48, 49] + [None] * 4),
    ],
)
def test_window_steps_at_start_middle_and_end_of_an_utterance(frame: int, v1: list[int], v15: list[int | None]) -> None:
    assert [resolve_step(i, 50, "v1") for i in window_indices(frame)] == v1
    assert [resolve_step(i, 50, "v15") for i in window_indices(frame)] == v15


def test_positional_encoding_is_the_transformer_table_over_50_rows() -> None:
    pe = sinusoid_table()
    assert pe.shape == (50, 384)
    assert torch.allclose(pe[0, 0::2], torch.zeros(192)) and torch.allclose(pe[0, 1::2], torch.ones(192))
    assert pe[7, 0] == pytest.approx(np.sin(7.0)) and pe[7, 1] == pytest.approx(np.cos(7.0))
    assert pe[3, 10] == pytest.approx(np.sin(3 / 10000 ** (10 / 384)), rel=1e-5)


# ---- the features, against MuseTalk's own computation ----------------------------------


@pytest.mark.parametrize("version", ["v15", "v1"])
@pytest.mark.parametrize("piece", [None, PIECE], ids=["whole", "20ms-pieces"])
def test_features_equal_musetalks_at_start_middle_and_end(
    encoder: WhisperAudioEncoder, checkpoint: dict[str, Any], version: str, piece: int | None
) -> None:
    pcm = speech_like(2.4, seed=11)[: int(2.3 * SAMPLE_RATE) + 77]  # not a whole number of steps
    reference = (v15_features if version == "v15" else v1_features)(pcm, checkpoint)
    ours = features(encoder, version, pcm, piece)
    assert len(ours) == frames_for_samples(pcm.size) == 58  # ceil: every sample lands in a frame
    assert reference.shape[0] == 57  # the reference drops the last partial frame
    for f in (0, 1, 2, 28, 29, 54, 55, 56):
        assert relative_error(ours[f], reference[f]) <= RTOL, f"frame {f}"


@pytest.mark.parametrize("version", ["v15", "v1"])
def test_an_utterance_over_30s_is_segmented_as_musetalk_segments_it(
    encoder: WhisperAudioEncoder, checkpoint: dict[str, Any], version: str
) -> None:
    pcm = np.tile(speech_like(1.0, seed=8), 31)[: 30 * SAMPLE_RATE + 9_000]  # 30.56 s: two segments
    pcm[SAMPLE_RATE * 30 :] *= 3.0  # louder after 30 s: v1.0 normalises over all, v1.5 per segment
    reference = (v15_features if version == "v15" else v1_features)(pcm, checkpoint)
    ours = features(encoder, version, pcm)
    for f in (0, 400, 748, 749, 750, 751, 760, reference.shape[0] - 1):  # frame 750 starts at 30 s
        assert relative_error(ours[f], reference[f]) <= RTOL, f"frame {f}"


def test_v15_keeps_the_steps_musetalk_keeps_even_where_its_float_arithmetic_drops_one(
    encoder: WhisperAudioEncoder, checkpoint: dict[str, Any]
) -> None:
    pcm = speech_like(2.3, seed=13)  # 36800 samples: 115 steps exactly, 114.99999999999999 in floats
    assert steps_for_samples(pcm.size, "v15") == 114 and steps_for_samples(pcm.size, "v1") == 115
    reference = v15_features(pcm, checkpoint)
    ours = features(encoder, "v15", pcm)
    assert all(relative_error(ours[f], reference[f]) <= RTOL for f in (55, 56))


def test_frame_count_is_every_40ms_of_audio_including_the_last_partial_one(encoder: WhisperAudioEncoder) -> None:
    for samples in (1, 639, 640, 641, 16_000 - 540, 16_000):
        assert len(features(encoder, "v15", speech_like(1.0, seed=4)[:samples])) == -(-samples // 640)


def test_features_do_not_depend_on_how_the_audio_was_cut(encoder: WhisperAudioEncoder) -> None:
    pcm = speech_like(1.2, seed=6)
    a, b = features(encoder, "v1", pcm), features(encoder, "v1", pcm, piece=517)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- streaming ----------------------------------------------------------------------------


def test_frames_are_ready_once_their_window_and_lookahead_arrived(encoder: WhisperAudioEncoder) -> None:
    stream = UtteranceFeatures(encoder, "v15", right_context_s=0.5)
    stream.push(speech_like(1.0, seed=5))
    # frame f needs audio to 640 f + 2120 (its window and the encoder's reach) + 8000
    assert stream.ready() == (16_000 - 2120 - 8000) // 640 + 1 == 10
    stream.take(4)
    assert stream.ready() == 6
    stream.finish()
    assert stream.ready() == 25 - 4  # all the rest, the tail padded


def test_a_pass_runs_again_only_when_audio_arrived_since_the_last(encoder: WhisperAudioEncoder) -> None:
    stream = UtteranceFeatures(encoder, "v15", right_context_s=0.0)
    stream.push(speech_like(1.0, seed=9))
    stream.take(3)
    stream.take(3)
    assert stream.passes == 1  # the second take reused the first pass
    stream.push(speech_like(0.5, seed=10))
    stream.take(3)
    assert stream.passes == 2


def test_frames_taken_before_the_audio_is_complete_see_the_audio_so_far(
    encoder: WhisperAudioEncoder, checkpoint: dict[str, Any]
) -> None:
    pcm = speech_like(2.0, seed=12)
    stream = UtteranceFeatures(encoder, "v15", right_context_s=0.3)
    stream.push(pcm[: SAMPLE_RATE])
    early = stream.take(5)
    stream.push(pcm[SAMPLE_RATE:])
    stream.finish()
    rest = stream.take(stream.ready())
    reference = v15_features(pcm, checkpoint)
    complete = v15_features(pcm[: SAMPLE_RATE], checkpoint)
    # taken early: what MuseTalk computes for the first second alone...
    assert all(relative_error(early[f], complete[f]) <= RTOL for f in range(5))
    # ...taken after the end: what it computes for the whole utterance
    assert all(relative_error(rest[f - 5], reference[f]) <= RTOL for f in (5, 20, 49))


def test_passes_of_many_utterances_run_as_one_batch_with_the_same_result(encoder: WhisperAudioEncoder) -> None:
    streams = [UtteranceFeatures(encoder, "v1") for _ in range(3)]
    for k, stream in enumerate(streams):
        stream.push(speech_like(0.6 + 0.2 * k, seed=20 + k))
        stream.finish()
    encode_pending([(s, s.ready()) for s in streams])
    assert [s.passes for s in streams] == [1, 1, 1]
    batched = [s.take(s.ready()) for s in streams]
    for k, got in enumerate(batched):
        alone = features(encoder, "v1", speech_like(0.6 + 0.2 * k, seed=20 + k))
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got, alone, strict=True))


def test_a_tiny_utterance_still_gives_its_frame(encoder: WhisperAudioEncoder) -> None:
    for version in ("v15", "v1"):
        (only,) = features(encoder, version, speech_like(1.0, seed=4)[:100])
        assert only.shape == (50, 384) and torch.isfinite(only).all()


def test_push_after_finish_is_refused(encoder: WhisperAudioEncoder, tmp_path: Path) -> None:
    stream = UtteranceFeatures(encoder, "v15")
    stream.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        stream.push(np.zeros(10, np.float32))
