"""MuseTalk's blending masks and paste-back as its scripts run them, for tests.

Written from MuseTalk's code (``musetalk/utils/blending.py``: ``get_crop_box``,
``face_seg``, ``get_image_prepare_material``, ``get_image_blending``;
``musetalk/utils/face_parsing/__init__.py``: ``FaceParsing``;
``scripts/realtime_inference.py``: which mode and cheek widths each version gets),
step by step and in its libraries (PIL crops, pastes and resizes, ``cv2.rectangle``),
and independently of the engine's code, so the engine's masks can be checked against
it. The frames here are BGR, as the scripts read them with OpenCV.

The parsing network is a parameter: a function from the 512 x 512 RGB PIL image the
reference feeds BiSeNet to a (512, 512) class map, so a test can use the tiny BiSeNet
(``bisenet_classes``) or a synthetic rule on the pixels.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ClassMap = Callable[[Image.Image], np.ndarray]  # 512x512 RGB image -> (512, 512) int classes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def script_parser_settings(version: str, parsing_mode: str = "jaw", left_cheek_width: int = 90,
                           right_cheek_width: int = 90) -> tuple[str, int, int]:
    """(mode, left, right) the realtime script gives the parser: v1.5 takes the command
    line's ``--parsing_mode`` (default "jaw") and cheek widths (default 90); v1.0 builds
    ``FaceParsing()`` (cheeks 80) and always parses in "raw" mode."""
    if version == "v15":
        return parsing_mode, left_cheek_width, right_cheek_width
    return "raw", 80, 80


def bisenet_classes(net: torch.nn.Module) -> ClassMap:
    """The reference's network step: ToTensor, ImageNet Normalize, argmax of the logits."""

    def classes(image: Image.Image) -> np.ndarray:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        with torch.no_grad():
            out = net(((x - mean) / std)[None])
        return out[0].numpy().argmax(0)

    return classes


class ReferenceFaceParsing:
    """``FaceParsing.__call__`` with the network replaced by ``classes``."""

    def __init__(self, classes: ClassMap, left_cheek_width: int = 80, right_cheek_width: int = 80) -> None:
        self.classes = classes
        cone_height, tail_height = 21, 12
        size = cone_height + tail_height
        kernel = np.zeros((size, size), np.uint8)
        centre = size // 2
        for row in range(cone_height // 2, cone_height):
            width = 2 * (row - cone_height // 2) + 1
            kernel[row, centre - width // 2 : centre + width // 2 + 1] = 1
        base = int(kernel[cone_height - 1].sum())
        for row in range(cone_height, size):
            kernel[row, max(0, centre - base // 2) : min(size, centre + base // 2 + 1)] = 1
        self.kernel = kernel
        self.cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
        cheeks = np.zeros((512, 512), np.uint8)
        c = 512 // 2
        cv2.rectangle(cheeks, (0, 0), (c - left_cheek_width, 512), 255, -1)
        cv2.rectangle(cheeks, (c + right_cheek_width, 0), (512, 512), 255, -1)
        self.cheek_mask = cheeks

    def __call__(self, image: Image.Image, mode: str = "raw") -> Image.Image:
        parsing = np.array(self.classes(image.resize((512, 512), Image.Resampling.BILINEAR)), np.int64)
        if mode == "neck":
            parsing[np.isin(parsing, [1, 11, 12, 13, 14])] = 255
        elif mode == "jaw":
            skin = (np.isin(parsing, [1]) * 255).astype(np.uint8)
            dilated = cv2.dilate(skin, self.kernel, iterations=1)
            eroded = cv2.erode(dilated, self.cheek_kernel, iterations=2)
            face = cv2.bitwise_or(cv2.bitwise_and(eroded, self.cheek_mask), cv2.bitwise_and(dilated, ~self.cheek_mask))
            parsing[(face == 255) & ~np.isin(parsing, [10])] = 255
            parsing[np.isin(parsing, [11, 12, 13])] = 255
        else:
            parsing[np.isin(parsing, [1, 11, 12, 13])] = 255
        parsing[parsing != 255] = 0
        return Image.fromarray(parsing.astype(np.uint8))


def get_crop_box(box: tuple[int, int, int, int], expand: float = 1.5) -> list[int]:
    x, y, x1, y1 = box
    xc, yc = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    return [xc - s, yc - s, xc + s, yc + s]


def prepare_material(frame_bgr: np.ndarray, box: tuple[int, int, int, int], fp: ReferenceFaceParsing, mode: str,
                     upper_boundary_ratio: float = 0.5, expand: float = 1.5) -> tuple[np.ndarray, list[int]]:
    """``get_image_prepare_material``: the crop-box-sized blurred mask and the crop box."""
    body = Image.fromarray(np.ascontiguousarray(frame_bgr[:, :, ::-1]))
    x, y, x1, y1 = box
    crop = get_crop_box(box, expand)
    xs, ys = crop[0], crop[1]
    face_large = body.crop((crop[0], crop[1], crop[2], crop[3]))
    size = face_large.size
    seg = fp(face_large, mode=mode).resize(size)  # face_seg: PIL's default filter (bicubic)
    small = seg.crop((x - xs, y - ys, x1 - xs, y1 - ys))
    mask = Image.new("L", size, 0)
    mask.paste(small, (x - xs, y - ys, x1 - xs, y1 - ys))
    width, height = mask.size
    top = int(height * upper_boundary_ratio)
    kept = Image.new("L", size, 0)
    kept.paste(mask.crop((0, top, width, height)), (0, top))
    k = int(0.1 * size[0] // 2 * 2) + 1
    return cv2.GaussianBlur(np.array(kept), (k, k), 0), crop


def paste_back(frame_bgr: np.ndarray, face_bgr: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray,
               crop: list[int]) -> np.ndarray:
    """``get_image_blending``: the face pasted into the crop box, that pasted through the mask."""
    body = Image.fromarray(np.ascontiguousarray(frame_bgr[:, :, ::-1]))
    face = Image.fromarray(np.ascontiguousarray(face_bgr[:, :, ::-1]))
    x, y, x1, y1 = box
    xs, ys = crop[0], crop[1]
    face_large = body.crop((crop[0], crop[1], crop[2], crop[3]))
    face_large.paste(face, (x - xs, y - ys, x1 - xs, y1 - ys))
    body.paste(face_large, (xs, ys), Image.fromarray(mask).convert("L"))
    return np.array(body)[:, :, ::-1]


def blend_decoded(frame_bgr: np.ndarray, decoded: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray,
                  crop: list[int]) -> np.ndarray:
    """The realtime script's ``process_frames`` on one VAE output: ``decoded`` is the
    (256, 256, 3) RGB float image in [0, 1] the VAE's ``decode_latents`` rounds to uint8
    BGR, resized to the face box with OpenCV's default (bilinear), then pasted back."""
    bgr = (decoded * 255).round().astype(np.uint8)[..., ::-1]
    x, y, x1, y1 = box
    return paste_back(frame_bgr, cv2.resize(np.ascontiguousarray(bgr), (x1 - x, y1 - y)), box, mask, crop)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def write_tiny_bisenet(data_dir: Path, seed: int = 0) -> Path:
    """A random BiSeNet saved where ``python -m models download --with face-parsing`` puts
    ``79999_iter.pth`` (full size: BiSeNet has no narrower layout), noted in the manifest
    so the engine picks it up. Its random weights still give a mixed class map (skin,
    lips, eyes, background), which is what the mask steps need."""
    from models.face_parsing import BiSeNet
    from models.weights import models_dir, record_in_manifest, spec

    torch.manual_seed(seed)
    local = spec("face-parsing").local
    path = models_dir(data_dir) / local
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(BiSeNet().state_dict(), path)
    record_in_manifest(data_dir, local, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(), "tests")
    return path
