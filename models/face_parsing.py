"""BiSeNet face parsing (``79999_iter.pth``), for MuseTalk's blending masks.

The network of zllrunning/face-parsing.PyTorch, which MuseTalk uses, written here with
plain torch (no torchvision: its wheels do not run on this project's CPU torch). The
checkpoint holds the whole network, ResNet-18 backbone included, so the separate
``resnet18-5c106cde.pth`` the reference passes in (an ImageNet initialisation for
training) is not needed. Parameter names match the checkpoint's.

Classes (CelebAMask-HQ): 0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses,
7/8 ears, 9 earring, 10 nose, 11 mouth, 12 upper lip, 13 lower lip, 14 neck, 15 necklace,
16 cloth, 17 hair, 18 hat.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import assign_state_dict, load_state_dict, strip_prefix

log = logging.getLogger(__name__)

N_CLASSES = 19
INPUT_SIZE = 512
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    """The backbone; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _layer(64, 64, 1)
        self.layer2 = _layer(64, 128, 2)
        self.layer3 = _layer(128, 256, 2)
        self.layer4 = _layer(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = F.interpolate(self.conv_avg(F.adaptive_avg_pool2d(feat32, 1)), feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest"))
        feat16_up = self.conv_head16(F.interpolate(self.arm16(feat16) + feat32_up, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, kernel_size=1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class Output(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Output(256, 256, n_classes)
        self.conv_out16 = Output(128, 64, n_classes)  # auxiliary heads: in the checkpoint,
        self.conv_out32 = Output(128, 64, n_classes)  # unused at inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input resolution (the main head only)."""
        feat8, feat_cp8, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, feat_cp8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(path: Path | str, device: str | torch.device = "cpu") -> BiSeNet:
    with torch.device("meta"):
        model = BiSeNet()
    state = strip_prefix(load_state_dict(path), "module.")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")} | {
        k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k.endswith("num_batches_tracked")
    }
    assign_state_dict(model, state, "BiSeNet face parsing", path)
    return model.to(device).eval().requires_grad_(False)


def _jaw_kernel() -> np.ndarray:
    """The reference's jaw-mode kernel (33 x 33, centre row 16): rows 10-20 a cone
    widening downward from 1 to 21 pixels, rows 21-32 a 21-wide column. ``cv2.dilate``
    applies it unreflected, so skin grows up to 16 rows upward (10 columns either side)
    and a tapering 6 rows downward."""
    cone, tail = 21, 12
    size = cone + tail
    k = np.zeros((size, size), np.uint8)
    c = size // 2
    for row in range(cone // 2, cone):
        half = row - cone // 2
        k[row, c - half : c + half + 1] = 1
    base = int(k[cone - 1].sum())
    k[cone:, max(0, c - base // 2) : min(size, c + base // 2 + 1)] = 1
    return k


#: How a crop is resized to the 512 parsing canvas and the mask back to the crop:
#: "pil" as MuseTalk's ``FaceParsing.__call__`` (PIL bilinear, which filters over the
#: source when it shrinks) and ``face_seg`` (PIL's default filter, bicubic); "cv2":
#: OpenCV's linear both ways (no anti-aliasing).
RESIZES = ("pil", "cv2")
MODES = ("jaw", "raw", "neck")


def cheek_mask(left_cheek_width: int, right_cheek_width: int) -> np.ndarray:
    """255 over the canvas's outer columns, where ``jaw`` mode erodes the jaw dilation
    back: columns up to and including ``centre - left`` and from ``centre + right`` on.
    The reference fills these with ``cv2.rectangle``, whose corners are inclusive (and a
    left edge past column 0 still fills column 0)."""
    mask = np.zeros((INPUT_SIZE, INPUT_SIZE), np.uint8)
    centre = INPUT_SIZE // 2
    mask[:, : max(centre - left_cheek_width, 0) + 1] = 255
    mask[:, max(centre + right_cheek_width, 0) :] = 255
    return mask


def talking_region(parsing: np.ndarray, mode: str, left_cheek_width: int = 80, right_cheek_width: int = 80) -> np.ndarray:
    """0/255 region of a class map that the generated face may replace (the reference's
    ``FaceParsing.__call__``). ``jaw``: skin dilated with the jaw kernel, eroded back
    sideways outside the central ``left + right`` columns, without the nose, plus mouth
    and lips; ``raw``: skin, mouth and lips; ``neck``: those and the neck."""
    if mode == "jaw":
        skin = np.where(parsing == SKIN, 255, 0).astype(np.uint8)
        grown = cv2.dilate(skin, _JAW_KERNEL, iterations=1)
        eroded = cv2.erode(grown, _CHEEK_KERNEL, iterations=2)
        cheeks = cheek_mask(left_cheek_width, right_cheek_width)
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(grown, cv2.bitwise_not(cheeks)))
        mask = ((region == 255) & (parsing != NOSE)) | np.isin(parsing, (MOUTH, UPPER_LIP, LOWER_LIP))
    elif mode == "neck":
        mask = np.isin(parsing, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP, NECK))
    elif mode == "raw":
        mask = np.isin(parsing, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP))
    else:
        raise ValueError(f"unknown parsing mode {mode!r}: {', '.join(MODES)}")
    return np.where(mask, 255, 0).astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int], method: str, pil_filter: Image.Resampling) -> np.ndarray:
    """``image`` resized to ``size`` (width, height)."""
    if method == "pil":
        return np.asarray(Image.fromarray(image).resize(size, pil_filter))
    if method == "cv2":
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    raise ValueError(f"unknown resize {method!r}: {', '.join(RESIZES)}")


_JAW_KERNEL = _jaw_kernel()
_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


class FaceParser:
    """RGB face crop in, 0/255 mask of the talking region out (same size as the crop).

    ``path`` is the ``79999_iter.pth`` checkpoint, or a network already built (a test's).
    ``cheek_width`` is the default of both cheek widths (80, as the reference's class;
    its scripts pass 90 for v1.5, which the engine passes per call)."""

    def __init__(self, path: Path | str | nn.Module, device: str | torch.device = "cpu", cheek_width: int = 80) -> None:
        self.device = torch.device(device)
        self.net = path.to(self.device).eval() if isinstance(path, nn.Module) else load_bisenet(path, self.device)
        self.cheek_width = cheek_width

    @torch.no_grad()
    def classes(self, crop: np.ndarray, resize: str = "pil") -> np.ndarray:
        """(512, 512) class index map of an RGB uint8 crop resized to 512 x 512 (``RESIZES``)."""
        img = _resize(np.ascontiguousarray(crop), (INPUT_SIZE, INPUT_SIZE), resize, Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(img)).to(self.device).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(_STD, device=self.device)[:, None, None]
        logits = self.net(((x - mean) / std)[None])
        return logits[0].argmax(0).to(torch.uint8).cpu().numpy()

    def __call__(self, crop: np.ndarray, mode: str = "jaw", *, left_cheek_width: int | None = None,
                 right_cheek_width: int | None = None, resize: str = "pil") -> np.ndarray:
        left = self.cheek_width if left_cheek_width is None else left_cheek_width
        right = self.cheek_width if right_cheek_width is None else right_cheek_width
        region = talking_region(self.classes(crop, resize), mode, left, right)
        h, w = crop.shape[:2]
        return _resize(region, (w, h), resize, Image.Resampling.BICUBIC)
