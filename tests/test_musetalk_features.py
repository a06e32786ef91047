"""MuseTalk's per-frame audio features: the exact window, the two versions, streaming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from media.timing import frames_for_samples  # noqa: E402
from models.positional import sinusoid_table  # noqa: E402
from models.whisper import (  # noqa: E402
    FrameFeatureStream,
    StreamConfig,
    WhisperStepStream,
    load_whisper_encoder,
    lookahead_s,
    resolve_step,
    window_indices,
)
from tests.support.musetalk_fixtures import speech_like, whisper_checkpoint  # noqa: E402
from tests.support.whisper_reference import reference_states  # noqa: E402

FAST = StreamConfig(hop=25, left=50, right=25)  # fewer encoder passes: quick on 2 CPU cores


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save(whisper_checkpoint(seed=3), path)
    return load_whisper_encoder(path)


def _features(encoder, version: str, pcm: np.ndarray, chunk: int, config: StreamConfig = FAST) -> tuple[list, int]:
    stream = FrameFeatureStream(encoder, version, config)
    out = []
    for start in range(0, pcm.size, chunk):
        out.extend(stream.push(pcm[start : start + chunk]))
    before_flush = len(out)
    out.extend(stream.flush())
    return out, before_flush


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
def test_window_steps_at_start_middle_and_end_of_an_utterance(frame: int, v1: list, v15: list) -> None:
    assert [resolve_step(i, 50, "v1") for i in window_indices(frame)] == v1
    assert [resolve_step(i, 50, "v15") for i in window_indices(frame)] == v15


def test_positional_encoding_is_the_transformer_table_over_50_rows() -> None:
    pe = sinusoid_table()
    assert pe.shape == (50, 384)
    assert torch.allclose(pe[0, 0::2], torch.zeros(192)) and torch.allclose(pe[0, 1::2], torch.ones(192))
    assert pe[7, 0] == pytest.approx(np.sin(7.0)) and pe[7, 1] == pytest.approx(np.cos(7.0))
    assert pe[3, 10] == pytest.approx(np.sin(3 / 10000 ** (10 / 384)), rel=1e-5)


# ---- versions ---------------------------------------------------------------------------


def test_v1_and_v15_share_four_states_and_v15_layer_norms_the_fifth(encoder) -> None:
    pcm = speech_like(1.0, seed=1)
    v1 = reference_states(encoder, pcm, "v1")
    v15 = reference_states(encoder, pcm, "v15")
    assert v1.shape == v15.shape == (50, 5, 384)
    assert torch.equal(v1[:, :4], v15[:, :4])
    assert not torch.allclose(v1[:, 4], v15[:, 4])
    ln = encoder.ln_post
    normed = torch.nn.functional.layer_norm(v1[:, 4], ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    assert torch.allclose(v15[:, 4], normed, atol=1e-5)


def test_frame_features_pad_with_edge_steps_in_v1_and_zeros_in_v15(encoder) -> None:
    pcm = speech_like(0.5, seed=2)  # 25 steps, 13 frames
    pe = sinusoid_table()
    full = StreamConfig(hop=50, left=1500, right=1500)  # segment-wide context: states = the reference's
    for version in ("v1", "v15"):
        feats, _ = _features(encoder, version, pcm, chunk=pcm.size, config=full)
        steps = reference_states(encoder, pcm, version)
        assert len(feats) == 13
        first = (feats[0] - pe).reshape(10, 5, 384)
        last = (feats[-1] - pe).reshape(10, 5, 384)
        if version == "v1":
            assert torch.allclose(first[:4], steps[0].expand(4, 5, 384), atol=1e-5)
            # frame 12 reads steps 20..29; only 0..24 exist: 25..29 repeat step 24
            assert torch.allclose(last[5:], steps[24].expand(5, 5, 384), atol=1e-5)
        else:
            assert torch.allclose(first[:4], torch.zeros(4, 5, 384), atol=1e-6)
            assert torch.allclose(last[5:], torch.zeros(5, 5, 384), atol=1e-6)
        assert torch.allclose(first[4:], steps[0:6], atol=1e-5)
        assert torch.allclose(last[:5], steps[20:25], atol=1e-5)


# ---- streaming --------------------------------------------------------------------------


def test_every_40ms_of_audio_gets_a_frame_including_the_last_partial_one(encoder) -> None:
    pcm = speech_like(1.0, seed=4)[: 16_000 - 540]  # 24.16 frames of audio
    feats, _ = _features(encoder, "v15", pcm, chunk=4000)
    assert len(feats) == frames_for_samples(pcm.size) == 25
    assert all(f.shape == (50, 384) for f in feats)


def test_features_come_out_while_audio_streams_in_not_only_at_the_end(encoder) -> None:
    pcm = speech_like(2.0, seed=5)
    stream = FrameFeatureStream(encoder, "v15", FAST)
    got_at: list[float] = []
    for start in range(0, pcm.size, 1600):  # 100 ms chunks
        got_at.extend([(start + 1600) / 16_000] * len(stream.push(pcm[start : start + 1600])))
    # every frame whose audio and look-ahead arrived before the end came out before flush
    assert len(got_at) >= int((2.0 - lookahead_s(FAST)) * 25)
    # the frame at t appears once audio up to about t + lookahead has arrived
    assert all(t - 0.04 * k <= lookahead_s(FAST) + 0.1 for k, t in enumerate(got_at))
    assert len(got_at) + len(stream.flush()) == 50


def test_stream_output_does_not_depend_on_how_the_pcm_is_chunked(encoder) -> None:
    pcm = speech_like(1.2, seed=6)
    a, _ = _features(encoder, "v1", pcm, chunk=pcm.size)
    b, _ = _features(encoder, "v1", pcm, chunk=517)
    assert len(a) == len(b) == 30
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_streaming_with_segment_wide_context_reproduces_the_30s_reference_pass(encoder) -> None:
    pcm = speech_like(1.0, seed=7)
    stream = WhisperStepStream(encoder, "v15", StreamConfig(hop=50, left=1500, right=1500))
    streamed = torch.cat([stream.push(pcm[:7000]), stream.push(pcm[7000:]), stream.finish()])
    assert torch.allclose(streamed, reference_states(encoder, pcm, "v15"), atol=1e-5)


def test_default_window_geometry_keeps_lookahead_under_a_second() -> None:
    config = StreamConfig.from_seconds()
    assert (config.hop, config.left, config.right) == (10, 75, 25)
    assert lookahead_s(config) < 1.0


def test_empty_utterance_gives_no_frames(encoder) -> None:
    stream = FrameFeatureStream(encoder, "v15", FAST)
    assert stream.push(np.zeros(0, np.float32)) == [] and stream.flush() == []


def test_utterance_longer_than_whisper_30s_window_continues_across_segments(encoder, tmp_path: Path) -> None:
    pcm = np.tile(speech_like(1.0, seed=8), 31)[: 30 * 16_000 + 3200]  # 30.2 s
    stream = WhisperStepStream(encoder, "v1", StreamConfig(hop=500, left=0, right=1500))
    steps = torch.cat([stream.push(pcm), stream.finish()])
    assert steps.shape[0] == 1510
    # the second segment starts over at position 0, as the reference's second 30 s pass
    ref = reference_states(encoder, pcm, "v1")
    assert torch.allclose(steps[1500:], ref[1500:], atol=1e-4)
