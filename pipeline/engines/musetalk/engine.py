"""The MuseTalk engine: Whisper features, one UNet step, VAE decode, paste-back on the GPU.

One instance lives in the worker and holds one copy of the weights; ``render`` takes the
frames of every speaking session at once (each with its own avatar's latent) and runs
them as one UNet forward and one VAE decode. The decoded faces are resized to their
face boxes and blended through their masks with the original pixels on the device;
only the blended face-box patches travel back (one transfer into pinned memory), and
are written, with the rest of the avatar frame, straight into the shared-memory slots.

Precision: fp16 on CUDA by default (``dtype="bf16"`` is offered: the SD VAE's decoder
can overflow fp16 on some inputs), fp32 on the CPU; channels-last memory format on CUDA;
``compile=True`` wraps the UNet and the VAE decoder in ``torch.compile`` with batches
padded to powers of two so there are few shapes to compile.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from avatars.avatar import Avatar
from media.pcm import FloatPcm
from models.checkpoint import CheckpointError
from models.unet import load_unet, unet_step
from models.vae import decode_latents, encode_faces, load_vae
from models.weights import MissingWeights, WeightProblem, WeightsError, optional_present, require_weights, spec
from models.whisper import FrameFeatureStream, StreamConfig, WhisperAudioEncoder, load_whisper_encoder
from pipeline.engines.base import EngineUnavailable, FeatureStream, Frame, LipSyncEngine, RenderItem

from .material import MaterialParams, MuseTalkMaterial, dwpose_landmarks68, file_identity, load_or_build_material
from .timer import StageTimer

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from models.face_parsing import FaceParser

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32}

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@dataclass(frozen=True)
class MuseTalkOptions:
    version: str = "v15"
    device: str = "auto"  # auto: CUDA, or EngineUnavailable; "cpu" forces the (slow) CPU
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    max_batch: int | None = None  # default 16 on CUDA, 4 on CPU
    bbox_shift: int = 0  # v1.0: moves the face box's centre down (+) or up (-), pixels
    extra_margin: int = 10  # v1.5: extends the face box below the chin, pixels
    expand: float = 1.5  # blending box / face box
    parsing_mode: str = "jaw"
    face_parsing: bool = True  # use 79999_iter.pth for masks when present
    dwpose: bool = True  # use DWPose landmarks for boxes when mmpose and its weights are present
    channels_last: bool = True
    compile: bool = False
    whisper_hop_s: float = 0.2
    whisper_left_s: float = 1.5
    whisper_right_s: float = 0.5
    device_cache_mb: int = 1024  # per-engine budget for avatar patches kept on the device
    cache_material: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MuseTalkOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            log.warning("MuseTalk ignores unknown options: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in kwargs.items() if k in known})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        raise EngineUnavailable(
            "MuseTalk needs a CUDA GPU to run in real time and torch sees none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); the CPU engine serves "
            "this machine (pass --engine-option device=cpu to force MuseTalk onto the CPU, far slower than real time)"
        )
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: fp16, bf16 or fp32")
    return _DTYPES[name]


def _channels_last(module: ModuleT) -> ModuleT:
    # nn.Module.to, not the module's own: diffusers' override only adds a warning about fp32-pinned modules
    return torch.nn.Module.to(module, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs lack memory_format=


def _compile(module: ModuleT) -> ModuleT:
    """``torch.compile`` of ``module``: an ``OptimizedModule`` that runs the compiled
    forward and hands every other attribute to ``module``, so it stands in for it (torch's
    stubs only say it returns a callable)."""
    return cast(ModuleT, torch.compile(module, dynamic=False))


@dataclass
class MuseTalkModels:
    unet: torch.nn.Module
    vae: AutoencoderKL
    whisper: WhisperAudioEncoder
    device: torch.device
    dtype: torch.dtype
    vae_id: str = ""

    @classmethod
    def load(cls, data_dir: Path, version: str, device: torch.device, dtype: torch.dtype) -> MuseTalkModels:
        """The weights of ``version``, or MissingWeights naming the file that is missing or
        does not load (and the command that fetches it)."""
        paths = require_weights(data_dir, version)
        try:
            unet = load_unet(paths["unet-config"], paths["unet"], device, dtype)
            vae = load_vae(paths["vae"].parent, device, dtype)
            whisper = load_whisper_encoder(paths["whisper"], device, dtype)
        except CheckpointError as exc:
            bad = next((s for s in ("unet", "vae", "whisper") if str(paths[s]) in str(exc)), "unet")
            key = {"unet": f"unet-{version}", "vae": "vae", "whisper": "whisper"}[bad]
            raise MissingWeights(version, data_dir, [WeightProblem(spec(key), paths[bad], "corrupt", str(exc))]) from exc
        return cls(unet, vae, whisper, device, dtype, file_identity(paths["vae"]))


@dataclass
class _AvatarState:
    avatar: Avatar
    material: MuseTalkMaterial
    latents: torch.Tensor  # (N, 8, 32, 32) on the device
    patches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # device cache
    cached: bool = False

    def patch(self, idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The original face-box pixels (h, w, 3) and mask (h, w), uint8, on the device."""
        if idx in self.patches:
            return self.patches[idx]
        box = self.material.box(idx)
        if box is None:
            raise ValueError(f"avatar {self.avatar.name} frame {idx} has no face box")
        x1, y1, x2, y2 = box
        orig = torch.from_numpy(np.array(self.avatar.frames[idx, y1:y2, x1:x2])).to(device)  # a copy: frames are read-only
        mask = torch.from_numpy(self.material.mask(idx)).to(device)
        return orig, mask


class _Work(NamedTuple):
    """One frame to render."""

    out: int  # index into the outputs
    state: _AvatarState
    frame: int  # avatar frame
    box: tuple[int, int, int, int]  # face box
    feature: torch.Tensor  # (50, 384)


class _Stream(FeatureStream[torch.Tensor]):
    """The engine interface over ``models.whisper``'s stream (models know no engines)."""

    def __init__(self, inner: FrameFeatureStream) -> None:
        self._inner = inner

    def push(self, pcm: FloatPcm) -> list[torch.Tensor]:
        return self._inner.push(pcm)

    def flush(self) -> list[torch.Tensor]:
        return self._inner.flush()


def _bucket(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(max(b, n), max(cap, n))


class MuseTalkEngine(LipSyncEngine[torch.Tensor]):
    name = "musetalk"

    def __init__(self, data_dir: Path, **options: Any) -> None:
        self.options = MuseTalkOptions.from_kwargs(**options)
        if self.options.version not in ("v15", "v1"):
            raise ValueError(f"unknown MuseTalk version {self.options.version!r}: v15 or v1")
        self.data_dir = Path(data_dir)
        device = pick_device(self.options.device)
        dtype = pick_dtype(self.options.dtype, device)
        started = time.monotonic()
        try:
            models = MuseTalkModels.load(self.data_dir, self.options.version, device, dtype)
        except WeightsError as exc:  # missing or damaged weights: the message says how to fetch them
            raise EngineUnavailable(str(exc)) from exc
        log.info("MuseTalk %s loaded on %s (%s) in %.1f s", self.options.version, device, dtype, time.monotonic() - started)
        self._setup(models)

    @classmethod
    def from_models(cls, models: MuseTalkModels, data_dir: Path | None = None, **options: Any) -> MuseTalkEngine:
        """An engine around models already in memory (the benchmark's random full-size ones)."""
        engine = cls.__new__(cls)
        engine.options = MuseTalkOptions.from_kwargs(**options)
        engine.data_dir = Path(data_dir) if data_dir is not None else Path(".")
        engine._setup(models)
        return engine

    def _setup(self, models: MuseTalkModels) -> None:
        opts = self.options
        self.models = models
        self.device, self.dtype = models.device, models.dtype
        self.max_batch = opts.max_batch or (16 if self.device.type == "cuda" else 4)
        self.unet, self.vae, self.whisper = models.unet, models.vae, models.whisper
        if self.device.type == "cuda" and opts.channels_last:
            self.unet = _channels_last(self.unet)
            self.vae = _channels_last(self.vae)
        self._compiled = False
        if opts.compile:
            self.unet = _compile(self.unet)
            self.vae.decoder = _compile(self.vae.decoder)
            self._compiled = True
        self.stream_config = StreamConfig.from_seconds(opts.whisper_hop_s, opts.whisper_left_s, opts.whisper_right_s)
        self._avatars: dict[str, _AvatarState] = {}
        self._cache_bytes = 0
        self._pinned: torch.Tensor | None = None
        self._closed = False
        self.timer: StageTimer | None = None
        self._parser: FaceParser | None = None
        self._parser_id = ""
        path = optional_present(self.data_dir, "face-parsing") if opts.face_parsing else None
        if path is not None:
            from models.face_parsing import FaceParser

            self._parser = FaceParser(path, self.device)
            self._parser_id = file_identity(path)
            log.info("blending masks from face parsing (%s)", path)
        elif opts.face_parsing:
            log.info("blending masks from face landmarks (face parsing weights not present: "
                     "python -m models download --with face-parsing)")
        if self.device.type == "cuda":
            # the worker process is ours, and each batch size is a fixed set of shapes:
            # let cuDNN pick its fastest convolutions once per shape
            torch.backends.cudnn.benchmark = True

    # ---- LipSyncEngine ----
    def prepare(self, avatar: Avatar) -> None:
        landmarks68, source = None, "mediapipe-478"
        dw = optional_present(self.data_dir, "dwpose") if self.options.dwpose else None
        if dw is not None:
            landmarks68 = dwpose_landmarks68(np.asarray(avatar.frames), dw, str(self.device))
            if landmarks68 is not None:
                source = "dwpose"
        params = MaterialParams(
            version=self.options.version,
            bbox_shift=self.options.bbox_shift,
            extra_margin=self.options.extra_margin,
            expand=self.options.expand,
            parsing_mode=self.options.parsing_mode,
            mask_source="face-parsing" if self._parser is not None else "landmarks",
            landmark_source=source,
            vae_id=self.models.vae_id,
            parser_id=self._parser_id,
        )

        def encode(crops: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return encode_faces(self.vae, crops).float().cpu().numpy()

        material = load_or_build_material(avatar, params, encode, self._parser, landmarks68, cache=self.options.cache_material)
        self.add_material(avatar, material)

    def add_material(self, avatar: Avatar, material: MuseTalkMaterial) -> None:
        """Make ``avatar`` renderable with ``material`` (``prepare`` builds it; the benchmark
        brings its own)."""
        if material.num_frames != avatar.num_frames:
            raise ValueError(f"material has {material.num_frames} frames, avatar {avatar.name} {avatar.num_frames}")
        old = self._avatars.pop(avatar.name, None)
        if old is not None and old.cached:
            self._cache_bytes -= self._patch_bytes(old.material)
        latents = torch.from_numpy(material.latents).to(self.device, self.dtype)
        state = _AvatarState(avatar, material, latents)
        need = self._patch_bytes(material)
        if self.device.type != "cpu" and self._cache_bytes + need <= self.options.device_cache_mb * 2**20:
            # keep every frame's original face patch and mask on the device: paste-back
            # then reads nothing from the host
            for i in np.flatnonzero(material.valid):
                state.patches[int(i)] = state.patch(int(i), self.device)
            state.cached = True
            self._cache_bytes += need
        self._avatars[avatar.name] = state

    @staticmethod
    def _patch_bytes(material: MuseTalkMaterial) -> int:
        return int(material.mask_data.size) * 4  # 3 bytes of pixels + 1 of mask per face-box pixel

    def new_stream(self) -> FeatureStream[torch.Tensor]:
        return _Stream(FrameFeatureStream(self.whisper, self.options.version, self.stream_config, self.dtype))

    def render(self, items: Sequence[RenderItem[torch.Tensor]], outs: Sequence[Frame]) -> None:
        if len(items) != len(outs):
            raise ValueError(f"{len(items)} items but {len(outs)} output frames")
        work: list[_Work] = []
        for i, item in enumerate(items):
            state = self._avatars.get(item.avatar)
            if state is None:
                raise KeyError(f"avatar {item.avatar!r} was not prepared for MuseTalk")
            box = state.material.box(item.avatar_index)
            if box is None:
                np.copyto(outs[i], state.avatar.frames[item.avatar_index])  # no face: the frame as it is
                continue
            work.append(_Work(i, state, item.avatar_index, box, item.feature))
        for start in range(0, len(work), self.max_batch):
            self._render_batch(work[start : start + self.max_batch], outs)

    def close(self) -> None:
        """Drop the weights and every avatar (a closed engine renders nothing more)."""
        self._avatars.clear()
        if not self._closed:
            self._closed = True
            del self.unet, self.vae, self.whisper, self.models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- the batch ----
    @torch.inference_mode()
    def _render_batch(self, work: list[_Work], outs: Sequence[Frame]) -> None:
        timer = self.timer
        if timer:
            timer.start()
        n = len(work)
        latents = torch.stack([w.state.latents[w.frame] for w in work])
        audio = torch.stack([w.feature.to(self.device, self.dtype) for w in work])
        if self._compiled and (size := _bucket(n, self.max_batch)) > n:
            latents = torch.cat([latents, latents[-1:].expand(size - n, -1, -1, -1)])
            audio = torch.cat([audio, audio[-1:].expand(size - n, -1, -1)])
        if self.device.type == "cuda" and self.options.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        pred = unet_step(self.unet, latents, audio)
        if timer:
            timer.mark("unet")
        faces = decode_latents(self.vae, pred)[:n]  # (B, 3, 256, 256) float 0..255
        if timer:
            timer.mark("vae_decode")
        patches = self._blend(faces, work)
        host = self._to_host(patches)
        if timer:
            timer.mark("paste_back")
        for w, patch in zip(work, host, strict=True):
            x1, y1, x2, y2 = w.box
            out = outs[w.out]
            np.copyto(out, w.state.avatar.frames[w.frame])
            out[y1:y2, x1:x2] = patch
        if timer:
            timer.mark("ring_write")
            timer.finish()

    def _blend(self, faces: torch.Tensor, work: list[_Work]) -> list[torch.Tensor]:
        """Each face resized to its box and mixed with the original pixels through its
        mask: out = orig + (face - orig) * mask / 255, rounded to uint8, on the device."""
        patches = []
        for k, w in enumerate(work):
            x1, y1, x2, y2 = w.box
            face = F.interpolate(faces[k : k + 1], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            orig, mask = w.state.patch(w.frame, self.device)
            o = orig.permute(2, 0, 1).float()
            mixed = o + (face - o) * (mask.float() / 255.0)
            patches.append(mixed.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous())
        return patches

    def _to_host(self, patches: list[torch.Tensor]) -> list[npt.NDArray[np.uint8]]:
        """One device-to-host copy for the whole batch (into pinned memory on CUDA)."""
        flat = torch.cat([p.reshape(-1) for p in patches])
        if flat.is_cuda:
            if self._pinned is None or self._pinned.numel() < flat.numel():
                self._pinned = torch.empty(int(flat.numel() * 1.25), dtype=torch.uint8, pin_memory=True)
            host = self._pinned[: flat.numel()]
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            arr = host.numpy()
        else:
            arr = flat.numpy()
        out, offset = [], 0
        for p in patches:
            size = p.numel()
            out.append(arr[offset : offset + size].reshape(p.shape))
            offset += size
        return out
