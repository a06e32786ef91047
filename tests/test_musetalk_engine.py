"""The MuseTalk engine on CPU with tiny checkpoints: avatar material, rendering, batching."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from avatars.avatar import load_avatar  # noqa: E402
from pipeline.engines import RenderItem  # noqa: E402
from pipeline.engines.base import whole_utterance  # noqa: E402
from pipeline.engines.musetalk import MuseTalkEngine  # noqa: E402
from pipeline.engines.musetalk.material import (  # noqa: E402
    CACHE_DIR,
    MEDIAPIPE_TO_68,
    MaterialParams,
    blend_mask,
    crop_box,
    face_box,
    face_crop,
    landmark_region,
    load_or_build_material,
    mediapipe_to_68,
)
from tests.support.musetalk_fixtures import astronaut_with_landmarks, make_avatar, speech_like, write_tiny_checkpoints  # noqa: E402

FAST: dict[str, float] = {}  # nothing to speed up: one Whisper pass per utterance


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("musetalk-engine")
    write_tiny_checkpoints(data)
    make_avatar(data, "astro", frames=6, no_face=(2,))
    make_avatar(data, "astro2", frames=4, flip=True)
    return data


@pytest.fixture(scope="module")
def engine(data: Path) -> MuseTalkEngine:
    engine = MuseTalkEngine(data, device="cpu", version="v15", max_batch=8, **FAST)
    for name in ("astro", "astro2"):
        engine.prepare(load_avatar(data, name))
    return engine


@pytest.fixture(scope="module")
def features(engine: MuseTalkEngine) -> list[list]:
    """Two utterances' features (two sessions speaking different audio)."""
    out = []
    for seed in (1, 2):
        out.append(whole_utterance(engine, speech_like(0.4, seed=seed)))
    return out


# ---- landmarks and boxes ----------------------------------------------------------------


def test_mediapipe_to_68_puts_ibug_points_where_they_belong_on_a_real_face() -> None:
    _, lm478 = astronaut_with_landmarks()
    assert len(MEDIAPIPE_TO_68) == 68 and all(0 <= i < 478 for idx in MEDIAPIPE_TO_68 for i in idx)
    p = mediapipe_to_68(lm478)
    x, y = p[:, 0], p[:, 1]
    assert x[0] < x[8] < x[16]  # jaw runs from the image's left across the chin to the right
    assert y[8] == y[:17].max()  # the chin is the jaw's lowest point
    assert y[27] < y[28] < y[29] < y[30]  # the nose bridge runs down
    eyes, mouth = y[36:48].mean(), y[48:68].mean()
    assert eyes < y[29] < mouth  # 29, the box's centre, sits between eyes and mouth
    assert x[48] < x[51] < x[54] and y[51] < y[57]  # mouth corners; upper above lower lip
    assert x[36] < x[39] < x[42] < x[45]  # right eye (image left) then left eye


def _lm68(top: float = 100, nose: float = 150, chin: float = 230, left: float = 100, right: float = 200) -> np.ndarray:
    lm = np.zeros((68, 2), np.float32)
    lm[:, 0] = np.linspace(left, right, 68)
    lm[:, 1] = top
    lm[8, 1] = chin
    lm[29, 1] = nose
    return lm


def test_face_box_mirrors_the_top_around_landmark_29_and_only_v1_applies_bbox_shift() -> None:
    lm = _lm68(nose=150, chin=230)
    assert face_box(lm, 480, 640, "v1") == (100, 70, 200, 230)  # 150 - (230 - 150)
    assert face_box(lm, 480, 640, "v1", bbox_shift=10) == (100, 90, 200, 230)  # centre 160 -> top 90
    assert face_box(lm, 480, 640, "v1", bbox_shift=-10) == (100, 50, 200, 230)
    assert face_box(lm, 480, 640, "v15", bbox_shift=10, extra_margin=0) == (100, 70, 200, 230)


def test_face_box_v15_adds_extra_margin_below_the_chin_within_the_frame() -> None:
    lm = _lm68(nose=150, chin=230)
    assert face_box(lm, 480, 640, "v15", extra_margin=10) == (100, 70, 200, 240)
    assert face_box(lm, 235, 640, "v15", extra_margin=10)[3] == 235
    assert face_box(lm, 480, 640, "v1", extra_margin=10)[3] == 230


def test_face_box_is_clipped_to_the_frame_and_absent_without_landmarks() -> None:
    assert face_box(_lm68(nose=40, chin=230, left=-20), 480, 640, "v1") == (0, 0, 200, 230)
    assert face_box(np.full((68, 2), np.nan, np.float32), 480, 640, "v15") is None
    assert face_box(_lm68(nose=150, chin=155, left=10, right=12), 480, 640, "v1") is None


# ---- material ---------------------------------------------------------------------------


def test_frames_without_a_face_keep_their_slot_so_latents_never_shift(engine: MuseTalkEngine, data: Path) -> None:
    from models.vae import encode_faces

    avatar = load_avatar(data, "astro")
    material = engine._avatars["astro"].material
    assert material.valid.tolist() == [True, True, False, True, True, True]
    assert material.box(2) is None and not material.latents[2].any()
    assert material.latents.dtype == np.float32  # the engine's precision: nothing rounded to fp16
    with torch.inference_mode():
        expected = encode_faces(engine.vae, face_crop(avatar.frames[3], material.box(3))[None]).numpy()
    assert np.allclose(material.latents[3].astype(np.float32), expected[0], atol=2e-3)
    # the boxes follow the face as it moves 3 pixels a frame
    assert material.box(3)[0] - material.box(1)[0] == 6


def test_material_is_cached_and_rebuilt_only_when_a_parameter_it_uses_changes(data: Path) -> None:
    avatar = load_avatar(data, "astro2")
    calls: list[int] = []

    def encode(crops: np.ndarray) -> np.ndarray:
        calls.append(len(crops))
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    params = MaterialParams(version="v15", extra_margin=10, vae_id="test")
    first = load_or_build_material(avatar, params, encode)
    again = load_or_build_material(avatar, params, encode)
    assert len(calls) == 1 and again.key == first.key and np.array_equal(again.boxes, first.boxes)
    # v1.5 ignores bbox_shift: same cache
    assert load_or_build_material(avatar, replace(params, bbox_shift=7), encode).key == first.key and len(calls) == 1
    changed = load_or_build_material(avatar, replace(params, extra_margin=20), encode)
    assert len(calls) == 2 and changed.key != first.key
    assert (changed.boxes[:, 3] - first.boxes[:, 3]).tolist() == [10] * 4
    assert {p.name for p in (avatar.path / CACHE_DIR).iterdir()} == {changed.key}  # the stale one went


def test_landmark_mask_covers_the_lower_face_only_with_a_soft_edge() -> None:
    _, lm478 = astronaut_with_landmarks()
    box = face_box(mediapipe_to_68(lm478), 512, 512, "v15")
    cbox = crop_box(box, 1.5)
    mask = blend_mask(landmark_region(lm478, cbox), box, cbox)
    x1, y1, x2, y2 = box
    assert mask.shape == (y2 - y1, x2 - x1)
    # zero above the crop box's middle, but for the blur's reach (half its kernel)
    centre_row = (cbox[1] + cbox[3]) // 2 - y1
    reach = int(0.1 * (cbox[2] - cbox[0]) // 2 * 2) // 2 + 1
    assert not mask[: centre_row - reach].any() and mask[centre_row - reach :].any()
    lower = mask[centre_row:]
    assert lower.max() == 255 and ((lower > 0) & (lower < 255)).any()  # full inside, blurred edges
    mouth_y = int(mediapipe_to_68(lm478)[62, 1]) - y1
    mouth_x = int(mediapipe_to_68(lm478)[62, 0]) - x1
    assert mask[mouth_y, mouth_x] > 200


# ---- rendering --------------------------------------------------------------------------


def test_render_writes_whole_frames_changing_only_the_face_box(engine: MuseTalkEngine, data: Path, features) -> None:
    avatar = load_avatar(data, "astro")
    outs = [np.zeros(avatar.frame_shape, np.uint8) for _ in range(2)]
    engine.render([RenderItem("astro", 1, features[0][0]), RenderItem("astro", 4, features[0][1])], outs)
    for out, idx in zip(outs, (1, 4), strict=True):
        x1, y1, x2, y2 = engine._avatars["astro"].material.box(idx)
        outside = np.ones(avatar.frame_shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[outside], avatar.frames[idx][outside])
        assert (out[y1:y2, x1:x2] != avatar.frames[idx][y1:y2, x1:x2]).any()
        # the upper half of the blending box keeps the original pixels (mask zero there,
        # but for the blur's reach)
        cx1, cy1, cx2, cy2 = crop_box((x1, y1, x2, y2))
        top = (cy1 + cy2) // 2 - int(0.1 * (cx2 - cx1) // 2 * 2) // 2 - 1
        assert np.array_equal(out[y1:top, x1:x2], avatar.frames[idx][y1:top, x1:x2])


def test_frame_without_a_face_is_shown_unchanged(engine: MuseTalkEngine, data: Path, features) -> None:
    avatar = load_avatar(data, "astro")
    out = np.zeros(avatar.frame_shape, np.uint8)
    engine.render([RenderItem("astro", 2, features[0][0])], [out])
    assert np.array_equal(out, avatar.frames[2])


def test_one_batch_across_sessions_equals_rendering_each_frame_alone(engine: MuseTalkEngine, data: Path, features) -> None:
    # two sessions on two avatars, each with its own audio, in one forward
    items = [
        RenderItem("astro", 0, features[0][0]),
        RenderItem("astro2", 1, features[1][0]),
        RenderItem("astro", 3, features[0][1]),
        RenderItem("astro2", 3, features[1][1]),
        RenderItem("astro", 2, features[0][2]),  # no face, mixed into the batch
    ]
    shape = load_avatar(data, "astro").frame_shape
    batched = [np.zeros(shape, np.uint8) for _ in items]
    engine.render(items, batched)
    for item, expected in zip(items, batched, strict=True):
        alone = np.zeros(shape, np.uint8)
        engine.render([item], [alone])
        assert np.abs(alone.astype(int) - expected.astype(int)).max() <= 1


def test_batches_larger_than_max_batch_are_split(data: Path, engine: MuseTalkEngine, features) -> None:
    shape = load_avatar(data, "astro").frame_shape
    items = [RenderItem("astro", i % 6, features[0][i % len(features[0])]) for i in range(11)]
    outs = [np.zeros(shape, np.uint8) for _ in items]
    engine.render(items, outs)
    assert engine.max_batch == 8 and all(o.any() for o in outs)


def test_feature_stream_gives_one_50x384_feature_per_40ms(engine: MuseTalkEngine) -> None:
    stream = engine.new_stream()
    pcm = speech_like(0.3, seed=9)  # 4800 samples: 7.5 frames -> 8
    stream.push(pcm[:2000])
    stream.push(pcm[2000:])
    stream.finish()
    (feats,) = engine.features([(stream, stream.ready())])
    assert len(feats) == 8 and all(f.shape == (50, 384) for f in feats)


def test_v1_engine_renders_from_the_v1_layout_with_bbox_shift(data: Path) -> None:
    engine = MuseTalkEngine(data, device="cpu", version="v1", bbox_shift=-5, **FAST)
    avatar = load_avatar(data, "astro2")
    engine.prepare(avatar)
    box = engine._avatars["astro2"].material.box(0)
    v15_box = face_box(mediapipe_to_68(avatar.landmarks[0]), avatar.height, avatar.width, "v15")
    assert box[1] == v15_box[1] - 10 and box[3] == v15_box[3] - 10  # shifted top, no extra margin
    feats = whole_utterance(engine, speech_like(0.2, seed=3))
    out = np.zeros(avatar.frame_shape, np.uint8)
    engine.render([RenderItem("astro2", 0, feats[0])], [out])
    assert out.any()
    engine.close()


def test_worker_loop_batches_two_sessions_through_musetalk_into_their_rings(engine: MuseTalkEngine, data: Path) -> None:
    from pipeline.frame_ring import FrameRing
    from pipeline.messages import AudioChunk, FrameReady, OpenSession
    from pipeline.worker import WorkerLoop

    class Outbox(list):
        def put(self, msg: object) -> None:
            self.append(msg)

    outbox = Outbox()
    worker = WorkerLoop(engine, data, outbox, max_batch=8)
    shape = load_avatar(data, "astro").frame_shape
    rings = {sid: FrameRing.create(16, shape) for sid in ("a", "b")}
    try:
        for sid, ring in rings.items():
            worker.handle(OpenSession(sid, "astro" if sid == "a" else "astro2", ring.name, 16, shape))
        for seed, sid in enumerate(rings):
            pcm = (speech_like(0.3, seed=seed) * 32767).astype(np.int16)  # 7.5 frames -> 8
            worker.handle(AudioChunk(sid, 0, f"{sid}1", pcm, final=True))
        batches = []
        while n := worker.render_batch():
            batches.append(n)
        sent = [m for m in outbox if isinstance(m, FrameReady)]
        assert batches == [8, 8] and {m.session_id for m in sent[:8]} == {"a", "b"}  # one forward, both sessions
        for sid, ring in rings.items():
            mine = [m for m in sent if m.session_id == sid]
            assert len(mine) == 8 and mine[-1].last
            avatar = load_avatar(data, "astro" if sid == "a" else "astro2")
            first = ring.view(mine[0].slot)
            assert first.any() and not np.array_equal(first, avatar.frames[mine[0].avatar_index])
    finally:
        for session in worker.sessions.values():  # not worker.close(): the engine is shared by this module
            session.ring.close()
        for ring in rings.values():
            ring.close()
