"""What MuseTalk needs per avatar frame, built once and cached with the avatar.

Per frame: the face box, the 8x32x32 UNet input latent (the VAE latent of the 256x256
face crop with its lower half blanked, next to that of the whole crop) and the blending
mask. All arrays are indexed by avatar frame: a frame without a face keeps its slot
(marked invalid) so latents never shift against frames, the fault of the reference
scripts, which skip such frames when they build their latent list. Latents are kept at
the engine's precision (``latent_dtype``): float32 and float16 as they are, bfloat16 as
float32 (numpy has no bfloat16; float32 holds each one exactly, and the engine converts
on loading).

Face box (the reference's ``get_landmark_and_bbox``), from 68 face landmarks in the
iBUG 300-W order: x from the landmarks' extent, bottom at the lowest landmark, top
mirrored around landmark 29 (the lower nose bridge) so that point sits at the box's
centre; v1.0 shifts that point by ``bbox_shift`` pixels, v1.5 ignores the shift and
extends the bottom by ``extra_margin``. The box is clipped to the frame (the reference
lets the top go negative, which slices the wrong rows).

The 68 landmarks come from MediaPipe's 478-point mesh the avatar already carries,
through ``MEDIAPIPE_TO_68`` below; or from DWPose (the reference's detector) when
mmpose and ``dw-ll_ucoco_384.pth`` are installed.

Mask (the reference's ``get_image_prepare_material``): a square crop box 1.5x the face
box around its centre; the talking region (face parsing's when its weights are there,
else the face-oval polygon of the landmarks grown downward) kept inside the face box
only, its upper half (of the crop box) zeroed, Gaussian-blurred with a kernel a tenth
of the crop box. Outside the face box the reference blends the frame with itself, so
only the face-box part is stored. Face parsing as MuseTalk's realtime script runs it
(``scripts/realtime_inference.py``): v1.5 in "jaw" mode with cheek widths 90, v1.0 in
"raw" mode; the crop resized to the parser's 512 canvas and the mask back with PIL
(bilinear in, bicubic out), as ``FaceParsing.__call__`` and ``face_seg`` do.

The cache lives in ``<avatar>/musetalk/<key>/`` where the key hashes every parameter
above, the VAE and parser weights' identity and the avatar's own files: changing any of
them builds a new cache (and removes the stale one).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from avatars.avatar import Avatar
from avatars.landmarks import FACE_OVAL

log = logging.getLogger(__name__)

FORMAT = 2  # 2: PIL resizes and inclusive cheek edge in face-parsing masks
CACHE_DIR = "musetalk"
FACE_SIZE = 256
LATENT_SHAPE = (8, 32, 32)
MIN_BOX = 16  # pixels: a smaller face box is no face

#: MediaPipe face-mesh index (or indices, averaged) for each of the 68 iBUG landmarks.
#: Chosen on MediaPipe's canonical face model to sit where the 300-W annotation puts
#: each point (after the common correspondence used by face-alignment ports): the jaw
#: 0-16 from the subject's right ear down the contour to the chin (8) and up to the left
#: ear; brows 17-26; nose bridge 27-30 (29, the box's centre, is the lower bridge)
#: and nostrils 31-35; eyes 36-47; outer lips 48-59; inner lips 60-67.
MEDIAPIPE_TO_68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,),
    (400,), (379,), (365,), (397, 288), (361,), (323,), (454,), (356,),
    # right brow 17-21, left brow 22-26
    (70,), (63,), (105,), (66,), (107,), (336,), (296,), (334,), (293,), (300,),
    # nose bridge 27-30, nostrils 31-35
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),
    # right eye 36-41, left eye 42-47
    (33,), (160,), (158,), (133,), (153,), (144,), (362,), (385,), (387,), (263,), (373,), (380,),
    # outer lips 48-59
    (61,), (40,), (37,), (0,), (267,), (270,), (291,), (321,), (314,), (17,), (84,), (91,),
    # inner lips 60-67
    (78,), (81,), (13,), (311,), (308,), (402,), (14,), (178,),
)
NOSE_CENTRE = 29


def mediapipe_to_68(lm478: np.ndarray) -> np.ndarray:
    """(..., 478, 2) MediaPipe points -> (..., 68, 2) iBUG-order points (NaN stays NaN)."""
    lm478 = np.asarray(lm478, np.float32)
    return np.stack([lm478[..., list(idx), :].mean(axis=-2) for idx in MEDIAPIPE_TO_68], axis=-2)


def dwpose_landmarks68(frames: np.ndarray, checkpoint: Path, device: str = "cpu") -> np.ndarray | None:
    """68 face points per frame from DWPose (RTMPose-l whole-body, the reference's
    detector), or None when mmpose or its config is not installed. Keypoints 23-90 of
    COCO-WholeBody are the 68 face points in iBUG order."""
    try:
        import importlib.resources

        from mmpose.apis import inference_topdown, init_model
        from mmpose.structures import merge_data_samples
    except ImportError:
        return None
    cfg = (importlib.resources.files("mmpose") / ".mim/configs/wholebody_2d_keypoint/rtmpose/ubody"
           / "rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py")
    if not cfg.is_file():
        log.warning("mmpose is installed without its RTMPose whole-body config; using MediaPipe landmarks")
        return None
    model = init_model(str(cfg), str(checkpoint), device=device)
    out = np.full((len(frames), 68, 2), np.nan, np.float32)
    for i, frame in enumerate(frames):
        result = merge_data_samples(inference_topdown(model, np.ascontiguousarray(frame[..., ::-1])))  # BGR in
        points = result.pred_instances.keypoints
        if len(points):
            out[i] = points[0][23:91]
    return out


# ---- boxes ------------------------------------------------------------------------------


def face_box(lm68: np.ndarray, height: int, width: int, version: str, bbox_shift: int = 0,
             extra_margin: int = 10) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the face crop, or None where there is no usable face."""
    if not np.all(np.isfinite(lm68)):
        return None
    lm = lm68.astype(np.int32)  # the reference truncates landmark coordinates too
    centre_y = int(lm[NOSE_CENTRE, 1]) + (bbox_shift if version == "v1" else 0)
    bottom = int(lm[:, 1].max())
    top = centre_y - (bottom - centre_y)
    x1, x2 = int(lm[:, 0].min()), int(lm[:, 0].max())
    if version == "v15":
        bottom += extra_margin
    x1, y1, x2, y2 = max(x1, 0), max(top, 0), min(x2, width), min(bottom, height)
    if x2 - x1 < MIN_BOX or y2 - y1 < MIN_BOX:
        return None
    return x1, y1, x2, y2


def crop_box(box: tuple[int, int, int, int], expand: float = 1.5) -> tuple[int, int, int, int]:
    """The square blending region around the face box (may extend past the frame)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return cx - s, cy - s, cx + s, cy + s


def crop_padded(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` with black where the box leaves the frame (PIL's crop)."""
    x1, y1, x2, y2 = box
    h, w = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out


def face_crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 256x256 RGB face the VAE encodes."""
    x1, y1, x2, y2 = box
    return cv2.resize(np.ascontiguousarray(frame[y1:y2, x1:x2]), (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


# ---- masks ------------------------------------------------------------------------------


def landmark_region(lm478: np.ndarray, cbox: tuple[int, int, int, int]) -> np.ndarray:
    """0/255 talking region in crop-box coordinates from the face oval: the polygon, grown
    downward by ~6% of the crop (the reference's jaw dilation, 33 of 512 pixels) so a
    chin that drops while speaking stays inside."""
    x0, y0, x1, y1 = cbox
    size = (y1 - y0, x1 - x0)
    region = np.zeros(size, np.uint8)
    pts: npt.NDArray[np.int32] = (lm478[FACE_OVAL] - np.array([x0, y0], np.float32)).round().astype(np.int32)
    cv2.fillPoly(region, [pts], (255,))
    grow = max(3, round(0.064 * size[0]))
    kernel = np.ones((grow, max(1, grow // 3)), np.uint8)
    return cv2.dilate(region, kernel, anchor=(kernel.shape[1] // 2, grow - 1))


def blend_mask(region: np.ndarray, box: tuple[int, int, int, int], cbox: tuple[int, int, int, int],
               upper_boundary_ratio: float = 0.5) -> np.ndarray:
    """The reference's mask steps on a crop-box-sized region; returns the face-box part."""
    x1, y1, x2, y2 = box
    x0, y0 = cbox[0], cbox[1]
    height, width = region.shape
    mask = np.zeros_like(region)
    fy1, fy2, fx1, fx2 = y1 - y0, y2 - y0, x1 - x0, x2 - x0
    mask[fy1:fy2, fx1:fx2] = region[fy1:fy2, fx1:fx2]
    mask[: int(height * upper_boundary_ratio)] = 0
    k = int(0.1 * width // 2 * 2) + 1
    mask = cv2.GaussianBlur(mask, (k, k), 0)
    return np.ascontiguousarray(mask[fy1:fy2, fx1:fx2])


# ---- the material -----------------------------------------------------------------------


@dataclass(frozen=True)
class MaterialParams:
    version: str = "v15"
    bbox_shift: int = 0  # v1.0 only
    extra_margin: int = 10  # v1.5 only
    expand: float = 1.5
    upper_boundary_ratio: float = 0.5
    mask_source: str = "landmarks"  # or "face-parsing"
    parsing_mode: str = "jaw"  # face parsing: jaw, raw or neck
    left_cheek_width: int = 90  # face parsing, jaw mode: the cheek erosion spares this many
    right_cheek_width: int = 90  # columns (of the 512 canvas) left / right of its centre
    mask_resize: str = "pil"  # face parsing: "pil" (the reference's) or "cv2"
    landmark_source: str = "mediapipe-478"  # or "dwpose"
    vae_id: str = ""  # identity of the VAE weights the latents come from
    parser_id: str = ""
    latent_dtype: str = "float32"  # the engine's: float32, float16 or bfloat16

    def normalised(self) -> MaterialParams:
        """Parameters that do not shape this material do not split the cache: those of
        the other version, the parser's without face parsing, the cheeks outside jaw mode."""
        out = replace(self, bbox_shift=0) if self.version == "v15" else replace(self, extra_margin=0)
        if out.mask_source != "face-parsing":
            out = replace(out, parsing_mode="", mask_resize="", parser_id="")
        if out.parsing_mode != "jaw":
            out = replace(out, left_cheek_width=0, right_cheek_width=0)
        return out


#: numpy type the latents of each engine precision are stored in
LATENT_STORAGE: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


def latent_storage(latent_dtype: str) -> type[np.floating]:
    if latent_dtype not in LATENT_STORAGE:
        raise ValueError(f"unknown latent dtype {latent_dtype!r}: {', '.join(LATENT_STORAGE)}")
    return LATENT_STORAGE[latent_dtype]


@dataclass
class MuseTalkMaterial:
    params: MaterialParams
    key: str
    boxes: np.ndarray  # (N, 4) int32 x1, y1, x2, y2; -1 where there is no face
    latents: np.ndarray  # (N, 8, 32, 32) in latent_storage(params.latent_dtype); zeros where there is no face
    mask_data: np.ndarray  # uint8, every frame's face-box mask, flattened
    mask_offsets: np.ndarray  # (N + 1,) int64 into mask_data

    @property
    def num_frames(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def valid(self) -> np.ndarray:
        return self.boxes[:, 0] >= 0

    def box(self, i: int) -> tuple[int, int, int, int] | None:
        b = self.boxes[i]
        return None if b[0] < 0 else (int(b[0]), int(b[1]), int(b[2]), int(b[3]))

    def mask(self, i: int) -> np.ndarray:
        """(h, w) uint8 blending weights over face box ``i`` (255 = generated face)."""
        box = self.box(i)
        if box is None:
            return np.zeros((0, 0), np.uint8)
        x1, y1, x2, y2 = box
        return self.mask_data[self.mask_offsets[i] : self.mask_offsets[i + 1]].reshape(y2 - y1, x2 - x1)


def file_identity(path: Path | None) -> str:
    """Cheap identity of a weight file: name, size and modification time."""
    if path is None or not Path(path).is_file():
        return ""
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}"


def _avatar_identity(avatar: Avatar) -> dict[str, str | list[int]]:
    return {
        "frames": avatar.frames_identity(),
        "landmarks": hashlib.sha1(np.ascontiguousarray(avatar.landmarks).tobytes()).hexdigest(),
        "shape": list(avatar.frames.shape),
    }


def material_key(avatar: Avatar, params: MaterialParams) -> str:
    blob = json.dumps(
        {"format": FORMAT, "params": asdict(params.normalised()), "avatar": _avatar_identity(avatar)}, sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


_FILES = ("boxes.npy", "latents.npy", "mask_data.npy", "mask_offsets.npy")


def _load(folder: Path, params: MaterialParams, key: str) -> MuseTalkMaterial | None:
    if not all((folder / f).is_file() for f in _FILES):
        return None
    try:
        arrays = {f: np.load(folder / f) for f in _FILES}
    except (OSError, ValueError) as exc:
        log.warning("rebuilding unreadable MuseTalk cache %s: %s", folder, exc)
        return None
    if arrays["latents.npy"].dtype != latent_storage(params.latent_dtype):
        log.warning("rebuilding MuseTalk cache %s: latents are %s, not %s", folder, arrays["latents.npy"].dtype,
                    params.latent_dtype)
        return None
    return MuseTalkMaterial(params, key, *(arrays[f] for f in _FILES))


def _save(root: Path, material: MuseTalkMaterial) -> None:
    folder = root / material.key
    tmp = root / (material.key + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "boxes.npy", material.boxes)
    np.save(tmp / "latents.npy", material.latents)
    np.save(tmp / "mask_data.npy", material.mask_data)
    np.save(tmp / "mask_offsets.npy", material.mask_offsets)
    (tmp / "params.json").write_text(json.dumps(asdict(material.params), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    for stale in root.iterdir():  # one cache per avatar: an old parameter set is dead weight
        if stale.is_dir() and stale.name != material.key:
            shutil.rmtree(stale, ignore_errors=True)


Encoder = Callable[[np.ndarray], np.ndarray]  # (B, 256, 256, 3) uint8 RGB -> (B, 8, 32, 32)


class Parser(Protocol):
    """(h, w, 3) RGB crop -> (h, w) 0..255 talking region (``models.face_parsing.FaceParser``)."""

    def __call__(self, crop: np.ndarray, mode: str, *, left_cheek_width: int, right_cheek_width: int,
                 resize: str) -> np.ndarray: ...


def build_material(avatar: Avatar, params: MaterialParams, encode: Encoder, parser: Parser | None = None,
                   landmarks68: np.ndarray | None = None, batch: int = 16) -> MuseTalkMaterial:
    """Compute boxes, latents and masks for every frame of ``avatar`` (masks from ``parser``
    when ``params.mask_source`` is "face-parsing", else from the landmarks)."""
    n, height, width = avatar.num_frames, avatar.height, avatar.width
    lm68 = mediapipe_to_68(avatar.landmarks) if landmarks68 is None else np.asarray(landmarks68, np.float32)
    boxes = np.full((n, 4), -1, np.int32)
    for i in range(n):
        if not avatar.has_face(i):
            continue
        box = face_box(lm68[i], height, width, params.version, params.bbox_shift, params.extra_margin)
        if box is not None:
            boxes[i] = box
    if (params.mask_source == "face-parsing") != (parser is not None):
        raise ValueError(f"mask source {params.mask_source!r} with{'out' if parser is None else ''} a face parser")
    latents = np.zeros((n, *LATENT_SHAPE), latent_storage(params.latent_dtype))
    masks: list[np.ndarray] = []
    todo = [i for i in range(n) if boxes[i, 0] >= 0]
    for start in range(0, len(todo), batch):
        idx = todo[start : start + batch]
        crops = np.stack([face_crop(avatar.frames[i], tuple(boxes[i])) for i in idx])
        latents[idx] = np.asarray(encode(crops), latents.dtype)
    for i in range(n):
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        if x1 < 0:
            masks.append(np.zeros(0, np.uint8))
            continue
        cbox = crop_box((x1, y1, x2, y2), params.expand)
        if parser is not None:
            region = parser(crop_padded(avatar.frames[i], cbox), params.parsing_mode, left_cheek_width=params.left_cheek_width,
                            right_cheek_width=params.right_cheek_width, resize=params.mask_resize)
        else:
            region = landmark_region(avatar.landmarks[i], cbox)
        masks.append(blend_mask(region, (x1, y1, x2, y2), cbox, params.upper_boundary_ratio).reshape(-1))
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([m.size for m in masks])
    mask_data = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    if len(todo) < n:
        log.info("avatar %s: %d of %d frames have no usable face; they are shown as they are", avatar.name, n - len(todo), n)
    return MuseTalkMaterial(params, material_key(avatar, params), boxes, latents, mask_data, offsets)


def load_or_build_material(avatar: Avatar, params: MaterialParams, encode: Encoder, parser: Parser | None = None,
                           landmarks68: np.ndarray | None = None, cache: bool = True) -> MuseTalkMaterial:
    """The cached material for these parameters, built (and cached) when absent. The mask
    source follows ``parser`` (face parsing when given), so the key says which it is."""
    params = replace(params, mask_source="landmarks" if parser is None else "face-parsing").normalised()
    key = material_key(avatar, params)
    root = Path(avatar.path) / CACHE_DIR
    if cache:
        found = _load(root / key, params, key)
        if found is not None and found.num_frames == avatar.num_frames:
            log.info("avatar %s: MuseTalk material from cache %s", avatar.name, key)
            return found
    log.info("avatar %s: building MuseTalk material (%s, %s mask) for %d frames", avatar.name,
             params.version, params.mask_source, avatar.num_frames)
    material = build_material(avatar, params, encode, parser, landmarks68)
    if cache:
        try:
            _save(root, material)
        except OSError as exc:  # a read-only avatar still renders, it only rebuilds next time
            log.warning("could not cache MuseTalk material in %s: %s", root, exc)
    return material
