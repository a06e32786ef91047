"""MuseTalk blending masks and avatar material against MuseTalk's own script steps.

The reference side (``tests/support/musetalk_reference.py``) redoes what
``scripts/realtime_inference.py`` does to prepare an avatar (PIL crop, face parsing with
the version's mode and cheek widths, PIL resizes, ``cv2.rectangle`` cheeks, paste, upper
half zeroed, blur) without the engine's code; the engine's masks must equal it.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from avatars.avatar import Avatar, load_avatar  # noqa: E402
from models.face_parsing import INPUT_SIZE, LOWER_LIP, MOUTH, NECK, NOSE, SKIN, UPPER_LIP, FaceParser, cheek_mask, talking_region  # noqa: E402
from pipeline.engines import RenderItem  # noqa: E402
from pipeline.engines.musetalk import MuseTalkEngine  # noqa: E402
from pipeline.engines.musetalk.engine import MuseTalkOptions  # noqa: E402
from pipeline.engines.musetalk.material import CACHE_DIR, MaterialParams, MuseTalkMaterial, build_material, load_or_build_material  # noqa: E402
from tests.support import musetalk_reference as ref  # noqa: E402
from tests.support.musetalk_fixtures import make_avatar, write_tiny_checkpoints  # noqa: E402

VERSIONS = ("v15", "v1")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("musetalk-masks")
    write_tiny_checkpoints(data)
    ref.write_tiny_bisenet(data)
    make_avatar(data, "one", frames=1)
    return data


class BandParser(torch.nn.Module):
    """A stand-in for BiSeNet with a parsing that follows the pixels: each pixel's class
    from its brightness band (so skin, nose, lips, mouth, neck and background all occur
    in blobs on a real face), as one-hot logits. The resize to 512 therefore shows in the
    classes, as it does with the real network."""

    BANDS = (0, SKIN, SKIN, NOSE, SKIN, UPPER_LIP, SKIN, LOWER_LIP, MOUTH, SKIN, NECK, SKIN, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * torch.tensor(ref.IMAGENET_STD)[:, None, None] + torch.tensor(ref.IMAGENET_MEAN)[:, None, None]
        band = (rgb.mean(dim=1) * len(self.BANDS)).long().clamp(0, len(self.BANDS) - 1)
        classes = torch.tensor(self.BANDS)[band]
        return torch.nn.functional.one_hot(classes, 19).permute(0, 3, 1, 2).float()


class _Remembering(torch.nn.Module):
    """A network that remembers its outputs by input, so the reference reuses the
    engine's BiSeNet forward (seconds on a CPU) when, and only when, it feeds the
    network the very same pixels; ``hits`` counts those."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.outputs: dict[bytes, torch.Tensor] = {}
        self.hits = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(x.detach().cpu().numpy().tobytes()).digest()
        if key in self.outputs:
            self.hits += 1
        else:
            self.outputs[key] = self.net(x)
        return self.outputs[key]


def _zero_encoder(crops: np.ndarray) -> np.ndarray:
    return np.zeros((len(crops), 8, 32, 32), np.float32)


def _face_part(mask: np.ndarray, box: tuple[int, int, int, int], crop: list[int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return mask[y1 - crop[1] : y2 - crop[1], x1 - crop[0] : x2 - crop[0]]


def _reference_masks(avatar: Avatar, material: MuseTalkMaterial, fp: ref.ReferenceFaceParsing, mode: str) -> list[np.ndarray]:
    """The reference's mask of each frame (face-box part), on the engine's face boxes."""
    out = []
    for i in range(avatar.num_frames):
        box = material.box(i)
        assert box is not None
        mask, crop = ref.prepare_material(avatar.frames[i][..., ::-1], box, fp, mode)
        out.append(_face_part(mask, box, crop))
    return out


# ---- the parsing steps ------------------------------------------------------------------


@pytest.mark.parametrize(("left", "right"), [(80, 80), (90, 90), (60, 110), (0, 0), (256, 256)])
def test_cheek_columns_include_the_edge_column_as_cv2_rectangle_fills_it(left: int, right: int) -> None:
    fp = ref.ReferenceFaceParsing(lambda image: np.zeros((INPUT_SIZE, INPUT_SIZE), np.int64), left, right)
    assert np.array_equal(cheek_mask(left, right), fp.cheek_mask)


@pytest.mark.parametrize(("mode", "left", "right"), [("jaw", 90, 90), ("jaw", 80, 80), ("jaw", 70, 100), ("raw", 80, 80),
                                                      ("neck", 80, 80)])
def test_talking_region_of_a_class_map_is_the_references_in_every_mode(mode: str, left: int, right: int) -> None:
    # a face-like class map: skin oval with nose, lips and mouth, neck below, background around
    parsing = np.zeros((INPUT_SIZE, INPUT_SIZE), np.uint8)
    cv2.ellipse(parsing, (256, 230), (150, 200), 0, 0, 360, SKIN, -1)
    cv2.rectangle(parsing, (200, 420), (310, 511), NECK, -1)
    cv2.ellipse(parsing, (256, 250), (25, 50), 0, 0, 360, NOSE, -1)
    cv2.ellipse(parsing, (256, 340), (60, 14), 0, 180, 360, UPPER_LIP, -1)
    cv2.ellipse(parsing, (256, 340), (60, 18), 0, 0, 180, LOWER_LIP, -1)
    cv2.ellipse(parsing, (256, 340), (40, 5), 0, 0, 360, MOUTH, -1)
    fp = ref.ReferenceFaceParsing(lambda image: parsing.astype(np.int64), left, right)
    expected = np.array(fp(Image.new("RGB", (300, 300)), mode))
    got = talking_region(parsing, mode, left, right)
    assert np.array_equal(got, expected)
    if mode == "jaw":  # the skin grows, the nose stays out
        assert not np.array_equal(got, talking_region(parsing, "raw")) and got[250, 256] == 0


# ---- the engine's masks against the reference's -----------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_masks_equal_the_reference_scripts_on_a_synthetic_parser(data: Path, version: str) -> None:
    engine = MuseTalkEngine(data, device="cpu", version=version, cache_material=False, dwpose=False)
    try:
        assert engine._parser is not None
        net = engine._parser.net = BandParser()  # the checkpoint's loading is the BiSeNet test's
        avatar = load_avatar(data, "one")
        engine.prepare(avatar)
        material = engine._avatars["one"].material
        mode, left, right = ref.script_parser_settings(version)
        p = material.params
        assert (p.mask_source, p.parsing_mode, p.mask_resize) == ("face-parsing", mode, "pil")
        assert (p.left_cheek_width, p.right_cheek_width) == ((left, right) if mode == "jaw" else (0, 0))  # raw has no cheeks
        fp = ref.ReferenceFaceParsing(ref.bisenet_classes(net), left, right)
        for i, expected in enumerate(_reference_masks(avatar, material, fp, mode)):
            assert 0 < np.count_nonzero(expected) < expected.size and ((expected > 0) & (expected < 255)).any()
            diff = np.abs(material.mask(i).astype(int) - expected)
            assert not diff.any(), f"frame {i}: {np.count_nonzero(diff)} pixels differ, by up to {diff.max()}"
    finally:
        engine.close()


def test_the_versions_cheek_width_and_mode_are_what_the_masks_depend_on(data: Path) -> None:
    """The choices that set the masks apart: the mode (v1.0's raw vs v1.5's jaw), the cheek
    width (the script's 90 vs the class default 80) and the resize (PIL vs OpenCV) each
    move the mask, so matching the reference needs all three."""
    avatar = load_avatar(data, "one")
    parser = FaceParser(BandParser())
    base = MaterialParams(mask_source="face-parsing", parsing_mode="jaw", left_cheek_width=90, right_cheek_width=90)
    masks = {}
    for name, params in {"v15": base, "cheek80": replace(base, left_cheek_width=80, right_cheek_width=80),
                         "raw": replace(base, parsing_mode="raw"), "cv2": replace(base, mask_resize="cv2")}.items():
        masks[name] = load_or_build_material(avatar, params, _zero_encoder, parser, cache=False).mask(0).astype(int)
    for other in ("cheek80", "raw", "cv2"):
        assert np.abs(masks[other] - masks["v15"]).max() > 0, other


def test_engine_masks_and_pasted_face_equal_the_reference_scripts_with_bisenet(data: Path) -> None:
    # v1.5 (jaw mode, cheeks 90): v1.0's raw mode is the synthetic test's; one BiSeNet forward takes seconds on a CPU
    engine = MuseTalkEngine(data, device="cpu", version="v15", cache_material=False, dwpose=False)
    try:
        avatar = load_avatar(data, "one")
        assert engine._parser is not None
        net = engine._parser.net = _Remembering(engine._parser.net)
        engine.prepare(avatar)
        state = engine._avatars["one"]
        material = state.material
        mode, left, right = ref.script_parser_settings("v15")
        box = material.box(0)
        assert box is not None
        frame_bgr = avatar.frames[0][..., ::-1]
        mask, crop = ref.prepare_material(frame_bgr, box, ref.ReferenceFaceParsing(ref.bisenet_classes(net), left, right), mode)
        assert net.hits == 1  # the network saw the same pixels: PIL's bilinear resize, the same normalisation
        expected = _face_part(mask, box, crop)
        assert 0 < np.count_nonzero(expected) < expected.size
        assert np.array_equal(material.mask(0), expected)

        # the face pasted back: the reference rounds the decoded face to uint8, resizes it
        # with OpenCV and pastes through its mask with PIL; the engine blends in float
        feature = torch.randn(50, 384, generator=torch.Generator().manual_seed(0))
        out = np.zeros(avatar.frame_shape, np.uint8)
        engine.render([RenderItem("one", 0, feature)], [out])
        from models.unet import unet_step
        from models.vae import decode_latents

        with torch.inference_mode():
            face = decode_latents(engine.vae, unet_step(engine.unet, state.latents[:1], feature[None].to(engine.dtype)))
        decoded = (face[0] / 255.0).permute(1, 2, 0).numpy()
        expected_frame = ref.blend_decoded(frame_bgr, decoded, box, mask, crop)[..., ::-1]
        x1, y1, x2, y2 = box
        assert np.array_equal(out[:y1], expected_frame[:y1]) and np.array_equal(out[y2:], expected_frame[y2:])
        got, want = out[y1:y2, x1:x2], expected_frame[y1:y2, x1:x2]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2 and ref.psnr(got, want) > 45
    finally:
        engine.close()


# ---- the versions' choices --------------------------------------------------------------


def test_v15_parses_in_jaw_mode_with_the_scripts_cheek_width_90_and_v1_in_raw_mode() -> None:
    assert MuseTalkOptions(version="v15").parser_settings() == ("jaw", 90, 90) == ref.script_parser_settings("v15")
    assert MuseTalkOptions(version="v1").parser_settings() == ("raw", 80, 80) == ref.script_parser_settings("v1")
    # what a user asks for wins
    assert MuseTalkOptions(version="v15", parsing_mode="neck").parser_settings() == ("neck", 90, 90)
    assert MuseTalkOptions(version="v1", parsing_mode="jaw", left_cheek_width=70).parser_settings() == ("jaw", 70, 80)
    for bad in ({"parsing_mode": "chin"}, {"mask_resize": "lanczos"}, {"left_cheek_width": 300}):
        with pytest.raises(ValueError):
            MuseTalkOptions(**bad)


# ---- latents ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "stored"), [("float32", np.float32), ("float16", np.float16), ("bfloat16", np.float32)])
def test_latents_are_stored_at_the_engine_precision(data: Path, dtype: str, stored: type) -> None:
    avatar = load_avatar(data, "one")
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1, 8, 32, 32)).astype(np.float32)
    if dtype != "float32":  # an engine's VAE gives values of its own precision
        values = torch.from_numpy(values).to(getattr(torch, dtype)).float().numpy()
    material = build_material(avatar, MaterialParams(latent_dtype=dtype), lambda crops: values[: len(crops)])
    assert material.latents.dtype == stored
    assert np.array_equal(material.latents.astype(np.float32), values)  # nothing rounded away


def test_engine_keeps_fp32_latents_unrounded_and_bf16_latents_exact(data: Path) -> None:
    from models.vae import encode_faces
    from pipeline.engines.musetalk.material import face_crop

    avatar = load_avatar(data, "one")
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = MuseTalkEngine(data, device="cpu", dtype=dtype, face_parsing=False, cache_material=False, dwpose=False)
        try:
            engine.prepare(avatar)
            state = engine._avatars["one"]
            box = state.material.box(0)
            assert box is not None
            with torch.inference_mode():
                latent = encode_faces(engine.vae, face_crop(avatar.frames[0], box)[None])
            assert state.material.params.latent_dtype == str(torch_dtype).removeprefix("torch.")
            assert state.material.latents.dtype == np.float32
            assert state.latents.dtype == torch_dtype
            assert torch.equal(state.latents[0].float(), latent[0].float())  # one frame: the same batch, the same numbers
        finally:
            engine.close()


# ---- the cache --------------------------------------------------------------------------


class _CountingParser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, crop: np.ndarray, mode: str, *, left_cheek_width: int, right_cheek_width: int, resize: str) -> np.ndarray:
        self.calls += 1
        return np.full(crop.shape[:2], 255, np.uint8)


@pytest.mark.parametrize("change", [{"parsing_mode": "raw"}, {"left_cheek_width": 80}, {"right_cheek_width": 80},
                                    {"mask_resize": "cv2"}, {"latent_dtype": "float16"}, {"parser_id": "other"}])
def test_material_is_rebuilt_when_a_mask_or_latent_choice_changes(tmp_path: Path, change: dict[str, object]) -> None:
    avatar = make_avatar(tmp_path, "a", frames=1)
    parser = _CountingParser()
    params = MaterialParams(mask_source="face-parsing", parsing_mode="jaw", left_cheek_width=90, right_cheek_width=90)
    first = load_or_build_material(avatar, params, _zero_encoder, parser)
    assert load_or_build_material(avatar, params, _zero_encoder, parser).key == first.key and parser.calls == 1
    changed = load_or_build_material(avatar, replace(params, **change), _zero_encoder, parser)
    assert changed.key != first.key and parser.calls == 2
    assert {p.name for p in (avatar.path / CACHE_DIR).iterdir()} == {changed.key}


def test_choices_that_do_not_shape_the_material_keep_its_cache(tmp_path: Path) -> None:
    avatar = make_avatar(tmp_path, "a", frames=1)
    parser = _CountingParser()
    raw = MaterialParams(mask_source="face-parsing", parsing_mode="raw")
    key = load_or_build_material(avatar, raw, _zero_encoder, parser).key
    # cheek widths act in jaw mode only
    assert load_or_build_material(avatar, replace(raw, left_cheek_width=50), _zero_encoder, parser).key == key
    # without a parser the masks come from landmarks: no parsing choice shapes them
    lm = load_or_build_material(avatar, MaterialParams(), _zero_encoder).key
    assert load_or_build_material(avatar, MaterialParams(parsing_mode="raw", mask_resize="cv2"), _zero_encoder).key == lm
    assert parser.calls == 1


def test_a_cache_whose_latents_are_not_at_the_engine_precision_is_rebuilt(tmp_path: Path) -> None:
    avatar = make_avatar(tmp_path, "a", frames=1)
    calls: list[int] = []

    def encode(crops: np.ndarray) -> np.ndarray:
        calls.append(len(crops))
        return _zero_encoder(crops)

    first = load_or_build_material(avatar, MaterialParams(), encode)
    latents = avatar.path / CACHE_DIR / first.key / "latents.npy"
    np.save(latents, np.load(latents).astype(np.float16))  # an fp16 cache where fp32 is asked for
    again = load_or_build_material(avatar, MaterialParams(), encode)
    assert len(calls) == 2 and again.latents.dtype == np.float32
