"""MuseTalk's render path: the batched blend against the per-frame one it replaced, the
patch bank against host staging, pipelined batches, runners and precision options.

Runs on the device ``LIPSYNC_TEST_DEVICE`` names (default CPU, where the pipelining
degenerates to the plain path); the tests marked for CUDA run only there."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch.nn.functional as F  # noqa: E402

from avatars.avatar import load_avatar  # noqa: E402
from pipeline.engines import RenderItem  # noqa: E402
from pipeline.engines.base import whole_utterance  # noqa: E402
from pipeline.engines.musetalk import MuseTalkEngine, MuseTalkOptions, StageTimer  # noqa: E402
from pipeline.engines.musetalk import engine as engine_module  # noqa: E402
from tests.support.device_select import musetalk_test_device, on_cuda  # noqa: E402
from tests.support.musetalk_fixtures import ASTRONAUT_LANDMARKS, make_avatar, speech_like, write_tiny_checkpoints  # noqa: E402

DEVICE = musetalk_test_device()
cuda_only = pytest.mark.skipif(not on_cuda(), reason="needs LIPSYNC_TEST_DEVICE=cuda")


def per_frame_blend(faces: torch.Tensor, boxes: list[tuple[int, int]], origs: list[np.ndarray],
                    masks: list[np.ndarray]) -> list[np.ndarray]:
    """The blend as it was, one frame at a time (the reference the batched one replaced):
    interpolate to the box, mix with the original through the mask, round to uint8."""
    out = []
    for k, (h, w) in enumerate(boxes):
        face = F.interpolate(faces[k : k + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
        o = torch.from_numpy(origs[k]).to(faces.device).permute(2, 0, 1).float()
        mask = torch.from_numpy(masks[k]).to(faces.device)
        mixed = o + (face - o) * (mask.float() / 255.0)
        out.append(mixed.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return out


def batched_blend(faces: torch.Tensor, boxes: list[tuple[int, int]], origs: list[np.ndarray],
                  masks: list[np.ndarray]) -> list[np.ndarray]:
    """The engine's batched blend over the same inputs, staged as the engine stages them."""
    n = len(boxes)
    height, width = max(h for h, _ in boxes), max(w for _, w in boxes)
    src = np.zeros((n, height, width, 4), np.uint8)
    meta = np.zeros((n, 3), np.int64)
    for b, (h, w) in enumerate(boxes):
        src[b, :h, :w, :3] = origs[b]
        src[b, :h, :w, 3] = masks[b]
        meta[b] = (0, h, w)
    out = MuseTalkEngine._blend(faces, torch.from_numpy(src).to(faces.device), torch.from_numpy(meta).to(faces.device))
    host = out.cpu().numpy()
    return [host[b, :h, :w] for b, (h, w) in enumerate(boxes)]


def blend_inputs(boxes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """Decoder-like faces (smooth structure plus noise, in 0..255), random originals, and
    masks with hard 0 and 255 regions and a soft ramp between."""
    rng = np.random.default_rng(seed)
    n = len(boxes)
    smooth = F.interpolate(torch.from_numpy(rng.uniform(0, 255, (n, 3, 16, 16)).astype(np.float32)), size=(256, 256),
                           mode="bicubic", align_corners=False)
    faces = (smooth + torch.from_numpy(rng.normal(0, 12, (n, 3, 256, 256)).astype(np.float32))).clamp(0, 255)
    origs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in boxes]
    masks = []
    for h, w in boxes:
        ramp = np.clip(np.linspace(-0.5, 1.5, h)[:, None] * 255 + rng.normal(0, 20, (h, w)), 0, 255)
        masks.append(ramp.astype(np.uint8))
    return faces.to(DEVICE), origs, masks


# ---- the batched blend ------------------------------------------------------------------


# boxes smaller, equal to and larger than the 256 face, square and not
BOXES = [(180, 150), (256, 256), (317, 288), (97, 121), (420, 380), (256, 200)]


def test_batched_blend_is_within_one_level_of_the_per_frame_blend() -> None:
    faces, origs, masks = blend_inputs(BOXES)
    old = per_frame_blend(faces, BOXES, origs, masks)
    new = batched_blend(faces, BOXES, origs, masks)
    differing = total = 0
    for (h, w), a, b, mask, orig in zip(BOXES, old, new, masks, origs, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1, f"box {h}x{w}: off by {diff.max()}"
        # where the mask is 0 both are the original exactly
        assert np.array_equal(b[mask == 0], orig[mask == 0])
        differing += int((diff > 0).sum())
        total += diff.size
    # the resample's coordinates round differently from interpolate's: a rare pixel whose
    # value sits on a .5 boundary goes the other way (measured: 0.004 % of them on CPU)
    assert differing / total < 0.001


def test_batched_blend_is_bit_exact_where_the_box_is_the_face_size() -> None:
    # no resampling: grid_sample lands exactly on the face's own pixels
    boxes = [(256, 256), (256, 256)]
    faces, origs, masks = blend_inputs(boxes, seed=3)
    for a, b in zip(per_frame_blend(faces, boxes, origs, masks), batched_blend(faces, boxes, origs, masks), strict=True):
        assert np.array_equal(a, b)


def test_blend_launches_the_same_kernels_whatever_the_batch_size() -> None:
    from torch.profiler import ProfilerActivity, profile

    def ops(n: int) -> int:
        boxes = [BOXES[k % len(BOXES)] for k in range(n)]
        faces, origs, masks = blend_inputs(boxes, seed=n)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            batched_blend(faces, boxes, origs, masks)
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    assert ops(2) == ops(12)


# ---- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("musetalk-render")
    write_tiny_checkpoints(data, versions=("v15",))
    make_avatar(data, "astro", frames=5, no_face=(2,))
    make_avatar(data, "astro2", frames=3, flip=True, shift=5)
    return data


def make_engine(data: Path, **options: object) -> MuseTalkEngine:
    engine = MuseTalkEngine(data, device=DEVICE, version="v15", face_parsing=False, **options)
    for name in ("astro", "astro2"):
        engine.prepare(load_avatar(data, name))
    return engine


@pytest.fixture(scope="module")
def engine(data: Path) -> MuseTalkEngine:
    return make_engine(data, max_batch=2)


@pytest.fixture(scope="module")
def items(engine: MuseTalkEngine) -> list[RenderItem]:
    feats = whole_utterance(engine, speech_like(0.3, seed=4))
    picks = [("astro", 0), ("astro2", 1), ("astro", 3), ("astro", 2), ("astro2", 2), ("astro", 4)]  # frame 2: no face
    return [RenderItem(name, idx, feats[k]) for k, (name, idx) in enumerate(picks)]


def render(engine: MuseTalkEngine, items: list[RenderItem]) -> list[np.ndarray]:
    shape = engine._avatars[items[0].avatar].avatar.frame_shape
    outs = [np.full(shape, 7, np.uint8) for _ in items]  # poisoned: every pixel must be written
    engine.render(items, outs)
    return outs


def assert_whole_frames(engine: MuseTalkEngine, items: list[RenderItem], outs: list[np.ndarray]) -> None:
    for item, out in zip(items, outs, strict=True):
        state = engine._avatars[item.avatar]
        frame = state.avatar.frames[item.avatar_index]
        box = state.material.box(item.avatar_index)
        if box is None:
            assert np.array_equal(out, frame)
            continue
        x1, y1, x2, y2 = box
        outside = np.ones(out.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[outside], frame[outside])
        assert (out[y1:y2, x1:x2] != frame[y1:y2, x1:x2]).any()


def test_more_items_than_max_batch_are_pipelined_and_equal_batch_by_batch_renders(engine: MuseTalkEngine, items) -> None:
    assert engine.max_batch == 2
    together = render(engine, items)  # 5 faces: batches of 2, 2, 1 in flight two at a time
    assert_whole_frames(engine, items, together)
    faces = [it for it in items if engine._avatars[it.avatar].material.box(it.avatar_index) is not None]
    one_by_one = []
    for start in range(0, len(faces), 2):
        one_by_one += render(engine, faces[start : start + 2])
    by_item = {id(it): out for it, out in zip(items, together, strict=True)}
    for it, alone in zip(faces, one_by_one, strict=True):
        # the same batches through the same kernels: the same bytes (on CUDA within a
        # level, should a library pick its kernels per call; a race would be far off)
        assert np.abs(by_item[id(it)].astype(int) - alone.astype(int)).max() <= (1 if on_cuda() else 0)


def test_patch_bank_gathers_the_same_pixels_as_host_staging(data: Path, items) -> None:
    engine = make_engine(data, max_batch=8)
    # cached is add_material's device-budget decision; on the CPU it never caches, so the
    # bank is forced here to hold it to the host-staged path
    for state in engine._avatars.values():
        state.cached = False
    staged = render(engine, items)
    for state in engine._avatars.values():
        state.cached = True
    banked = render(engine, items)
    assert engine._bank is not None
    for a, b in zip(staged, banked, strict=True):
        assert np.array_equal(a, b)
    # the bank holds every face pixel once, and add_material's per-frame copies went
    rows = sum(int(s.material.mask_data.size) for s in engine._avatars.values())
    assert engine._bank.data.shape == (rows, 4)
    assert all(not s.patches for s in engine._avatars.values())
    # a re-prepared avatar replaces its rows; compaction drops the stale ones
    engine.prepare(load_avatar(data, "astro"))
    engine._avatars["astro"].cached = True
    again = render(engine, items)
    for a, b in zip(staged, again, strict=True):
        assert np.array_equal(a, b)
    assert engine._bank.data.shape[0] <= 2 * rows
    engine.close()


def test_stage_timer_sees_every_batch_and_stage(engine: MuseTalkEngine, items) -> None:
    engine.timer = StageTimer(engine.device)
    try:
        render(engine, items)
        assert engine.timer.calls == 3  # 5 faces in batches of 2
        stages = set(engine.timer.totals)
        assert {"unet", "vae_decode", "blend", "ring_write", "host_wait"} <= stages
        assert ("to_host" in stages) == on_cuda()
        assert all(ms >= 0 for ms in engine.timer.totals.values())
    finally:
        engine.timer = None


# ---- options --------------------------------------------------------------------------------


def test_buckets_are_powers_of_two_to_8_then_multiples_of_8() -> None:
    assert engine_module._buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert engine_module._buckets(12) == [1, 2, 4, 8, 12]
    assert engine_module._buckets(4) == [1, 2, 4]
    assert [engine_module._bucket(n, 32) for n in (1, 3, 5, 9, 17, 25, 32, 40)] == [1, 4, 8, 16, 24, 32, 32, 40]


def test_unknown_runner_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="runner"):
        MuseTalkOptions(runner="tensorrt")
    assert MuseTalkOptions.from_kwargs(runner="cudagraph").runner == "cudagraph"


@pytest.mark.skipif(on_cuda(), reason="the CPU fallback")
def test_cudagraph_runner_falls_back_to_eager_off_cuda(data: Path, engine: MuseTalkEngine, items) -> None:
    graphed = make_engine(data, max_batch=2, runner="cudagraph")
    assert graphed.runner == "eager" and graphed._graphs is None
    for a, b in zip(render(graphed, items), render(engine, items), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(("options", "runner", "mode"), [
    ({"compile": True}, "compile", "reduce-overhead"),
    ({"runner": "compile"}, "compile", "reduce-overhead"),
    ({"runner": "max-autotune"}, "max-autotune", "max-autotune"),
])
def test_compile_runners_compile_both_stages_and_pad_to_buckets(data: Path, engine: MuseTalkEngine, items, monkeypatch,
                                                                options, runner, mode) -> None:
    calls: list[dict] = []
    shapes: list[int] = []

    def fake_compile(fn, **kwargs):  # torch.compile's contract without the minutes of compiling
        calls.append(kwargs)

        def run(x, *rest):
            shapes.append(x.shape[0])
            return fn(x, *rest)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = make_engine(data, max_batch=4, **options)
    assert compiled.runner == runner and len(calls) == 2
    assert all(c["dynamic"] is False and c["backend"] == "inductor" for c in calls)
    assert all(c["mode"] == (mode if on_cuda() else None) for c in calls)  # modes are CUDA graphs' business
    three = [it for it in items if compiled._avatars[it.avatar].material.box(it.avatar_index) is not None][:3]
    outs = render(compiled, three)
    assert shapes == [4, 4]  # 3 frames padded to the 4 bucket, through the UNet and the decoder
    for a, b in zip(outs, render(engine, three), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # a padded batch: same rows, other blocking


def test_bf16_renders_close_to_fp32(data: Path, items) -> None:
    fp32 = make_engine(data, max_batch=8, dtype="fp32")
    bf16 = make_engine(data, max_batch=8, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16._avatars["astro"].latents.dtype == torch.bfloat16
    feats = [RenderItem(it.avatar, it.avatar_index, it.feature.float()) for it in items]
    a, b = render(fp32, feats), render(bf16, feats)
    for item, x, y in zip(items, a, b, strict=True):
        box = fp32._avatars[item.avatar].material.box(item.avatar_index)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        err = x[y1:y2, x1:x2].astype(float) - y[y1:y2, x1:x2].astype(float)
        psnr = 10 * np.log10(255.0**2 / max(float(np.mean(err**2)), 1e-12))
        assert psnr > 25, f"bf16 PSNR {psnr:.1f} dB against fp32"
    fp32.close()
    bf16.close()


@pytest.mark.skipif(on_cuda(), reason="the plugin has already moved this run's engines")
def test_device_plugin_moves_engines_asking_for_cpu_onto_the_test_device(data: Path, monkeypatch) -> None:
    from tests.support import device_select

    # "cpu:0" stands in for "cuda" here: another device name, the same CPU underneath
    monkeypatch.setenv(device_select.ENV_DEVICE, "cpu:0")
    monkeypatch.setattr(engine_module, "pick_device", engine_module.pick_device)  # restored afterwards
    monkeypatch.setattr(engine_module, "pick_dtype", engine_module.pick_dtype)
    assert device_select.redirect_engines() and device_select.redirect_engines()  # once, however often asked
    moved = MuseTalkEngine(data, device="cpu", version="v15", face_parsing=False)
    assert moved.device == torch.device("cpu", 0) and moved.dtype == torch.float32
    monkeypatch.setenv(device_select.ENV_DEVICE, "cpu")
    assert not device_select.redirect_engines()
    moved.close()


# ---- the stored landmarks (machines without mediapipe use them) -----------------------------


def test_stored_astronaut_landmarks_are_mediapipes() -> None:
    pytest.importorskip("mediapipe")
    from skimage import data

    from avatars.landmarks import FaceMeshDetector

    with FaceMeshDetector(video=False) as detector:
        fresh = detector(data.astronaut())
    assert np.allclose(np.load(ASTRONAUT_LANDMARKS), fresh, atol=0.05)


# ---- CUDA only ------------------------------------------------------------------------------


@cuda_only
def test_a_warm_render_never_synchronises_the_device(engine: MuseTalkEngine, items, monkeypatch) -> None:
    render(engine, items)  # warm: cuDNN's search, the bank, pinned buffers

    def refuse(*args: object) -> None:
        raise AssertionError("the render path synchronised the whole device or a stream")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", refuse)
    torch.cuda.set_sync_debug_mode("error")  # synchronous copies, .item(), stream syncs
    try:
        outs = render(engine, items)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_whole_frames(engine, items, outs)


@cuda_only
def test_cudagraph_runner_equals_eager(data: Path, engine: MuseTalkEngine, items) -> None:
    graphed = make_engine(data, max_batch=2, runner="cudagraph")
    assert graphed.runner == "cudagraph" and graphed._graphs is not None
    assert graphed._graphs.sizes == [1, 2]
    for a, b in zip(render(graphed, items), render(engine, items), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    graphed.close()


@cuda_only
def test_overlap_off_gives_the_same_frames(data: Path, engine: MuseTalkEngine, items) -> None:
    plain = make_engine(data, max_batch=2, overlap=False)
    assert plain._copy_stream is None
    for a, b in zip(render(plain, items), render(engine, items), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    plain.close()
