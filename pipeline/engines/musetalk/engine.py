"""The MuseTalk engine: Whisper features, one UNet step, VAE decode, paste-back on the GPU.

One instance lives in the worker and holds one copy of the weights; ``render`` takes the
frames of every speaking session at once (each with its own avatar's latent) and runs
them as one UNet forward and one VAE decode. The decoded faces are resized to their
face boxes and blended through their masks with the original pixels on the device;
only the blended face-box patches travel back (one transfer into pinned memory), and
are written, with the rest of the avatar frame, straight into the shared-memory slots.

Precision: fp16 on CUDA by default (``dtype="bf16"`` is offered: the SD VAE's decoder
can overflow fp16 on some inputs), fp32 on the CPU; channels-last memory format on CUDA.

Runners (``runner=``): ``eager`` runs the modules as they are; ``cudagraph`` captures
the UNet step and the VAE decode as CUDA graphs, one pair per batch bucket (1, 2, 4, 8,
then multiples of 8 up to ``max_batch``; a batch is padded to its bucket) at start-up;
``compile`` (``reduce-overhead``) and ``max-autotune`` wrap both in ``torch.compile``
for the same buckets, compiled at each bucket's first use. Off CUDA ``cudagraph`` falls
back to eager (``compile=True`` is the old spelling of ``runner=compile``).

Batches are pipelined: the blend is a fixed handful of kernels per batch (every face
resampled into its box by one ``grid_sample`` over a padded batch, one masked mix), the
patches go back on a copy stream into pinned double buffers, and the host writes the
frames' own pixels into their slots while the device computes; a ``render`` given more
than ``max_batch`` items launches batch k+1 before it pastes batch k. Nothing waits for
the whole device: the host waits for each batch's own copy event only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from avatars.avatar import Avatar
from media.pcm import FloatPcm
from models.checkpoint import CheckpointError
from models.positional import TOKENS
from models.unet import CROSS_ATTENTION_DIM, load_unet, unet_step
from models.vae import decode_latents, encode_faces, load_vae
from models.weights import MissingWeights, WeightProblem, WeightsError, optional_present, require_weights, spec
from models.whisper import DEFAULT_RIGHT_CONTEXT_S, UtteranceFeatures, WhisperAudioEncoder, encode_pending, load_whisper_encoder
from pipeline.engines.base import EngineUnavailable, FeatureStream, Frame, LipSyncEngine, RenderItem

from .material import LATENT_SHAPE, MaterialParams, MuseTalkMaterial, dwpose_landmarks68, file_identity, load_or_build_material
from .timer import BatchTimes, StageTimer

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from models.face_parsing import FaceParser

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32}

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

RUNNERS = ("eager", "cudagraph", "compile", "max-autotune")


@dataclass(frozen=True)
class MuseTalkOptions:
    version: str = "v15"
    device: str = "auto"  # auto: CUDA, or EngineUnavailable; "cpu" forces the (slow) CPU
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    max_batch: int | None = None  # default 16 on CUDA, 4 on CPU
    bbox_shift: int = 0  # v1.0: moves the face box's centre down (+) or up (-), pixels
    extra_margin: int = 10  # v1.5: extends the face box below the chin, pixels
    expand: float = 1.5  # blending box / face box
    # Face-parsing masks as MuseTalk's realtime script makes them: "auto" is "jaw" for
    # v1.5 and "raw" for v1.0 (or jaw, raw, neck); cheek widths (of the 512 parsing
    # canvas, jaw mode) default to the script's 90 for v1.5, FaceParsing's 80 for v1.0.
    parsing_mode: str = "auto"
    left_cheek_width: int | None = None
    right_cheek_width: int | None = None
    mask_resize: str = "pil"  # parser in/out resizes: "pil" as the reference, or "cv2" (linear)
    face_parsing: bool = True  # use 79999_iter.pth for masks when present
    dwpose: bool = True  # use DWPose landmarks for boxes when mmpose and its weights are present
    channels_last: bool = True
    compile: bool = False  # the old spelling of runner="compile"
    # How the UNet step and VAE decode run: eager, cudagraph (captured per batch bucket at
    # start-up), compile (torch.compile reduce-overhead) or max-autotune; see the module doc.
    runner: str = "eager"
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" checks tracing without code generation)
    overlap: bool = True  # CUDA: copy patches back on their own stream while the next batch computes
    # While an utterance's audio is still arriving, a frame waits for this much audio
    # beyond its feature window before it is rendered (more: closer to the whole-utterance
    # features; less: speech starts sooner). A complete utterance never waits.
    lookahead_s: float = DEFAULT_RIGHT_CONTEXT_S
    device_cache_mb: int = 1024  # per-engine budget for avatar patches kept on the device
    cache_material: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MuseTalkOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            log.warning("MuseTalk ignores unknown options: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def __post_init__(self) -> None:
        # checked here, not when the first avatar is prepared: a typo fails at start-up
        if self.parsing_mode not in ("auto", "jaw", "raw", "neck"):
            raise ValueError(f"unknown parsing_mode {self.parsing_mode!r}: auto, jaw, raw or neck")
        if self.mask_resize not in ("pil", "cv2"):
            raise ValueError(f"unknown mask_resize {self.mask_resize!r}: pil or cv2")
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown runner {self.runner!r}: {', '.join(RUNNERS)}")
        for width in (self.left_cheek_width, self.right_cheek_width):
            if width is not None and not 0 <= width <= 256:
                raise ValueError(f"cheek width {width} is outside the 512 canvas's half (0..256)")

    def parser_settings(self) -> tuple[str, int, int]:
        """(mode, left cheek width, right cheek width) for this version."""
        mode = self.parsing_mode if self.parsing_mode != "auto" else ("jaw" if self.version == "v15" else "raw")
        default = 90 if self.version == "v15" else 80
        left = default if self.left_cheek_width is None else self.left_cheek_width
        right = default if self.right_cheek_width is None else self.right_cheek_width
        return mode, left, right


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


FnT = TypeVar("FnT", bound=Callable[..., torch.Tensor])


def _compile(fn: FnT, mode: str | None, backend: str = "inductor") -> FnT:
    """``torch.compile`` of one stage function (the UNet step, the VAE decode), static
    shapes: batches are padded to buckets so there are few to compile. The models are
    left as they are (the benchmark runs several runners over one set of weights)."""
    if backend != "inductor":
        mode = None  # modes are inductor's
    return cast(FnT, torch.compile(fn, dynamic=False, mode=mode, backend=backend))


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
    """The engine interface over ``models.whisper``'s utterance features (models know no engines)."""

    def __init__(self, inner: UtteranceFeatures) -> None:
        self.inner = inner

    def push(self, pcm: FloatPcm) -> None:
        self.inner.push(pcm)

    def finish(self) -> None:
        self.inner.finish()

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def ready(self) -> int:
        return self.inner.ready()

    def take(self, n: int) -> list[torch.Tensor]:
        return self.inner.take(n)


def _buckets(cap: int) -> list[int]:
    """The batch sizes graphs and compiled code are built for: 1, 2, 4, 8, then multiples
    of 8 (17 frames run as 24, not 32) and ``cap`` itself."""
    return sorted({b for b in (1, 2, 4, 8) if b < cap} | set(range(16, cap, 8)) | {cap})


def _bucket(n: int, cap: int) -> int:
    """The bucket a batch of ``n`` is padded to (``n`` itself past ``cap``)."""
    return next((b for b in _buckets(cap) if b >= n), n)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _Slot:
    """One in-flight batch's host buffers. There are two, so batch k+1 stages into one
    while batch k's patches land in the other; pinned on CUDA, so copies are DMA that
    neither the host nor the compute stream waits for."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # a quarter to spare: the next batch's boxes are often a little larger
            buf = torch.empty(int(numel * 1.25) + 64, dtype=dtype, pin_memory=self.pin)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


class _PatchBank:
    """Every cached avatar frame's face-box pixels and mask as one (P, 4) uint8 tensor
    (R, G, B, mask per pixel) on the device: one gather fetches a whole batch's originals,
    whatever mix of avatars and box sizes it holds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.data = torch.empty((0, 4), dtype=torch.uint8, device=device)
        # avatar name -> (its state, first row, each frame's row offset from there, -1: no face, rows)
        self._where: dict[str, tuple[_AvatarState, int, npt.NDArray[np.int64], int]] = {}
        self._stale = 0  # rows of replaced avatars, dropped when they outgrow the live ones

    def offset(self, state: _AvatarState, frame: int) -> int:
        name = state.avatar.name
        entry = self._where.get(name)
        if entry is None or entry[0] is not state:
            entry = self._add(state)
        return entry[1] + int(entry[2][frame])

    def _add(self, state: _AvatarState) -> tuple[_AvatarState, int, npt.NDArray[np.int64], int]:
        material, frames = state.material, state.avatar.frames
        offsets = np.full(material.num_frames, -1, np.int64)
        blocks, rows = [], 0
        for i in np.flatnonzero(material.valid):
            x1, y1, x2, y2 = cast(tuple[int, int, int, int], material.box(int(i)))
            px = np.empty((y2 - y1, x2 - x1, 4), np.uint8)
            px[..., :3] = frames[i, y1:y2, x1:x2]
            px[..., 3] = material.mask(int(i))
            offsets[i] = rows
            rows += px.shape[0] * px.shape[1]
            blocks.append(px.reshape(-1, 4))
        old = self._where.pop(state.avatar.name, None)
        if old is not None:
            self._stale += old[3]
        if self._stale and self._stale * 2 > self.data.shape[0]:
            self._compact()
        host = torch.from_numpy(np.concatenate(blocks) if blocks else np.zeros((0, 4), np.uint8))
        if self.device.type == "cuda":
            host = host.pin_memory()  # an asynchronous upload: this runs inside a render
        entry = (state, int(self.data.shape[0]), offsets, rows)
        self.data = torch.cat([self.data, host.to(self.device, non_blocking=True)])
        self._where[state.avatar.name] = entry
        # add_material's per-frame copies of the same pixels are no longer read (the
        # render path reads the bank): free them so the cache budget holds one copy
        state.patches.clear()
        return entry

    def _compact(self) -> None:
        parts, start = [], 0
        for name, (state, first, offsets, rows) in list(self._where.items()):
            parts.append(self.data[first : first + rows])
            self._where[name] = (state, start, offsets, rows)
            start += rows
        self.data = torch.cat(parts) if parts else self.data[:0].clone()
        self._stale = 0


def _gather(bank: torch.Tensor, meta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, height, width, 4): item b's (h, w) box from bank row ``meta[b, 0]`` on, row by
    row, in its top-left corner; the padding repeats a bank row (never used)."""
    n = meta.shape[0]
    first, h, w = (meta[:, k].view(n, 1, 1) for k in range(3))
    ys = torch.arange(height, device=bank.device).view(1, height, 1)
    xs = torch.arange(width, device=bank.device).view(1, 1, width)
    rows = torch.where((ys < h) & (xs < w), first + ys * w + xs, 0)
    return bank[rows]


class _GraphSet(NamedTuple):
    latents: torch.Tensor  # static inputs, copied into before each replay
    audio: torch.Tensor
    unet: torch.cuda.CUDAGraph
    vae: torch.cuda.CUDAGraph
    faces: torch.Tensor  # static output (bucket, 3, 256, 256), overwritten by the next replay


class _GraphedModels:
    """The UNet step and the VAE decode captured as CUDA graphs, one pair per batch
    bucket, sharing one memory pool: a batch costs two graph launches instead of the
    ~2,000 kernel launches (and their Python) of an eager forward."""

    def __init__(self, unet: torch.nn.Module, vae: AutoencoderKL, buckets: list[int], device: torch.device,
                 dtype: torch.dtype, channels_last: bool) -> None:
        self.sizes = sorted(buckets)
        self._sets: dict[int, _GraphSet] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # largest first: the smaller captures fit in the pool memory it leaves behind
            for b in sorted(buckets, reverse=True):
                self._sets[b] = self._capture(unet, vae, b, device, dtype, channels_last, pool)

    @staticmethod
    def _capture(unet: torch.nn.Module, vae: AutoencoderKL, b: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, pool: Any) -> _GraphSet:
        latents = torch.zeros((b, *LATENT_SHAPE), device=device, dtype=dtype)
        if channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        audio = torch.zeros((b, TOKENS, CROSS_ATTENTION_DIM), device=device, dtype=dtype)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # outside the graph: cuDNN's algorithm search and lazy set-up cannot be captured
                decode_latents(vae, unet_step(unet, latents, audio))
        torch.cuda.current_stream(device).wait_stream(side)
        unet_graph, vae_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(unet_graph, pool=pool):
            pred = unet_step(unet, latents, audio)
        with torch.cuda.graph(vae_graph, pool=pool):
            faces = decode_latents(vae, pred)
        return _GraphSet(latents, audio, unet_graph, vae_graph, faces)

    def run(self, latents: torch.Tensor, audio: torch.Tensor, times: BatchTimes | None) -> torch.Tensor:
        n = latents.shape[0]
        g = self._sets[_bucket(n, self.sizes[-1])]
        b = g.latents.shape[0]
        g.latents[:n].copy_(latents)
        g.audio[:n].copy_(audio)
        if b > n:  # padding rows repeat the last frame: each row is its own sample, so they change no other
            g.latents[n:].copy_(latents[-1:].expand(b - n, -1, -1, -1))
            g.audio[n:].copy_(audio[-1:].expand(b - n, -1, -1))
        g.unet.replay()
        if times:
            times.mark("unet")
        g.vae.replay()
        if times:
            times.mark("vae_decode")
        return g.faces[:n]


class _Launched(NamedTuple):
    """A batch queued on the device, its patches on their way into a host buffer."""

    work: list[_Work]
    host: npt.NDArray[np.uint8]  # (n, Hp, Wp, 3): item b's patch in its top-left (h, w) once ``done``
    done: torch.cuda.Event | None  # None: already there (CPU)
    times: BatchTimes | None


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
        self._avatars: dict[str, _AvatarState] = {}
        self._cache_bytes = 0
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
        self._setup_runner()

    def _setup_runner(self) -> None:
        """How batches run (``runner``; eager is the fallback), and the render path's buffers."""
        opts, cuda = self.options, self.device.type == "cuda"
        self._unet_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = partial(unet_step, self.unet)
        self._decode: Callable[[torch.Tensor], torch.Tensor] = partial(decode_latents, self.vae)
        self._graphs: _GraphedModels | None = None
        self._padded = self._mark_steps = False
        self._bank: _PatchBank | None = None
        self._slots = (_Slot(cuda), _Slot(cuda))
        self._copy_stream = torch.cuda.Stream(self.device) if cuda and opts.overlap else None
        runner = "compile" if opts.compile and opts.runner == "eager" else opts.runner
        if runner == "cudagraph" and not cuda:
            log.info("runner cudagraph needs CUDA: eager on %s", self.device)
            runner = "eager"
        elif runner == "cudagraph":
            started = time.monotonic()
            try:
                self._graphs = _GraphedModels(self.unet, self.vae, _buckets(self.max_batch), self.device, self.dtype,
                                              opts.channels_last)
            except Exception:  # a stage that cannot be captured must not take the engine down: eager still renders
                log.exception("CUDA graph capture failed; running eager")
                runner = "eager"
            else:
                log.info("CUDA graphs captured for batches %s in %.1f s", _buckets(self.max_batch), time.monotonic() - started)
        elif runner in ("compile", "max-autotune"):
            # reduce-overhead: inductor's kernels replayed as CUDA graphs; modes mean nothing off CUDA
            mode = runner if runner == "max-autotune" else "reduce-overhead"
            mode_here = mode if cuda else None
            self._unet_step = _compile(self._unet_step, mode_here, opts.compile_backend)
            self._decode = _compile(self._decode, mode_here, opts.compile_backend)
            self._padded = True
            # cudagraph trees need to be told where a batch starts, or they keep each output alive
            self._mark_steps = cuda and opts.compile_backend == "inductor"
        self.runner = runner

    # ---- LipSyncEngine ----
    def prepare(self, avatar: Avatar) -> None:
        landmarks68, source = None, "mediapipe-478"
        dw = optional_present(self.data_dir, "dwpose") if self.options.dwpose else None
        if dw is not None:
            landmarks68 = dwpose_landmarks68(np.asarray(avatar.frames), dw, str(self.device))
            if landmarks68 is not None:
                source = "dwpose"
        mode, left, right = self.options.parser_settings()
        params = MaterialParams(
            version=self.options.version,
            bbox_shift=self.options.bbox_shift,
            extra_margin=self.options.extra_margin,
            expand=self.options.expand,
            mask_source="face-parsing" if self._parser is not None else "landmarks",
            parsing_mode=mode,
            left_cheek_width=left,
            right_cheek_width=right,
            mask_resize=self.options.mask_resize,
            landmark_source=source,
            vae_id=self.models.vae_id,
            parser_id=self._parser_id,
            latent_dtype=str(self.dtype).removeprefix("torch."),  # the VAE's output: its precision is the engine's
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
        # stored at the engine's precision (bfloat16 as float32, exactly): this cast is exact
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
        return _Stream(UtteranceFeatures(self.whisper, self.options.version, self.dtype, self.options.lookahead_s))

    def features(self, wants: Sequence[tuple[FeatureStream[torch.Tensor], int]]) -> list[list[torch.Tensor]]:
        """One batched Whisper pass for every utterance that needs one, then the windows."""
        encode_pending([(stream.inner, n) for stream, n in wants if isinstance(stream, _Stream)])
        return [stream.take(n) for stream, n in wants]

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
        # Batch k+1 is queued before batch k is pasted, so the host's ring writes overlap
        # the device's next forward; each batch alternates between the two host slots.
        pending: _Launched | None = None
        for k, start in enumerate(range(0, len(work), self.max_batch)):
            launched = self._launch(work[start : start + self.max_batch], self._slots[k % 2])
            self._backgrounds(launched, outs)
            if pending is not None:
                self._land(pending, outs)
            pending = launched
        if pending is not None:
            self._land(pending, outs)

    def close(self) -> None:
        """Drop the weights and every avatar (a closed engine renders nothing more)."""
        self._avatars.clear()
        self._graphs = self._bank = None  # graph pools and the patch bank hold device memory too
        if not self._closed:
            self._closed = True
            del self.unet, self.vae, self.whisper, self.models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- the batch ----
    @torch.inference_mode()
    def _launch(self, work: list[_Work], slot: _Slot) -> _Launched:
        """Queue one batch on the device, through to its patches' copy into ``slot``."""
        times = self.timer.begin() if self.timer is not None else None
        latents = torch.stack([w.state.latents[w.frame] for w in work])
        audio = torch.stack([w.feature.to(self.device, self.dtype) for w in work])
        faces = self._faces(latents, audio, times)
        src, meta = self._sources(work, slot)
        patches = self._blend(faces, src, meta)
        if times:
            times.mark("blend")
        host, done = self._to_host(patches, slot, times)
        return _Launched(work, host, done, times)

    def _faces(self, latents: torch.Tensor, audio: torch.Tensor, times: BatchTimes | None) -> torch.Tensor:
        """(n, 3, 256, 256) float faces in 0..255: the UNet step and the VAE decode."""
        n = latents.shape[0]
        if self._graphs is not None and n <= self._graphs.sizes[-1]:
            return self._graphs.run(latents, audio, times)
        if self._padded and (size := _bucket(n, self.max_batch)) > n:
            latents = torch.cat([latents, latents[-1:].expand(size - n, -1, -1, -1)])
            audio = torch.cat([audio, audio[-1:].expand(size - n, -1, -1)])
        if self.device.type == "cuda" and self.options.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if self._mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        pred = self._unet_step(latents, audio)
        if times:
            times.mark("unet")
        faces = self._decode(pred)
        if times:
            times.mark("vae_decode")
        return faces[:n]

    def _sources(self, work: list[_Work], slot: _Slot) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's original face-box pixels and masks, padded to the largest box:
        (n, Hp, Wp, 4) uint8 on the device, and (n, 3) int64 [bank row, h, w]. From the
        device's patch bank when every avatar in the batch is cached there (add_material's
        budget), else staged on the host and sent in one copy."""
        n = len(work)
        hs = [w.box[3] - w.box[1] for w in work]
        ws = [w.box[2] - w.box[0] for w in work]
        # padded to multiples of 8: fewer distinct shapes for the allocator to keep
        height, width = _round_up(max(hs), 8), _round_up(max(ws), 8)
        meta = slot.buffer("meta", (n, 3), torch.int64)
        m = meta.numpy()
        m[:, 1], m[:, 2] = hs, ws
        if all(w.state.cached for w in work):
            if self._bank is None:
                self._bank = _PatchBank(self.device)
            bank = self._bank
            m[:, 0] = [bank.offset(w.state, w.frame) for w in work]
            dev_meta = meta.to(self.device, non_blocking=True)
            return _gather(bank.data, dev_meta, height, width), dev_meta
        m[:, 0] = 0
        stage = slot.buffer("stage", (n, height, width, 4), torch.uint8)
        st = stage.numpy()
        for b, w in enumerate(work):
            x1, y1, x2, y2 = w.box
            st[b, : y2 - y1, : x2 - x1, :3] = w.state.avatar.frames[w.frame, y1:y2, x1:x2]
            st[b, : y2 - y1, : x2 - x1, 3] = w.state.material.mask(w.frame)
        return stage.to(self.device, non_blocking=True), meta.to(self.device, non_blocking=True)

    @staticmethod
    def _blend(faces: torch.Tensor, src: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Each face resampled to its box and mixed with the original pixels through its
        mask, out = orig + (face - orig) * mask / 255 rounded to uint8, for the whole
        padded batch in a fixed handful of kernels: (n, Hp, Wp, 3) uint8, item b's patch
        in its top-left (h, w) (the rest is padding).

        The resample is ``F.interpolate``'s bilinear (align_corners=False) as a
        ``grid_sample``: sample x lands on (x + 0.5) * 256 / w - 0.5, clamped to the face
        (border padding), as interpolate's does; the coordinates are rounded differently,
        so a pixel can come out one level off the per-frame resize."""
        n, height, width = src.shape[:3]
        h = meta[:, 1].view(n, 1, 1).float()
        w = meta[:, 2].view(n, 1, 1).float()
        ys = torch.arange(height, device=faces.device, dtype=torch.float32).view(1, height, 1)
        xs = torch.arange(width, device=faces.device, dtype=torch.float32).view(1, 1, width)
        gx = (xs + 0.5) / w * 2.0 - 1.0
        gy = (ys + 0.5) / h * 2.0 - 1.0
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
        face = F.grid_sample(faces.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        face = face.permute(0, 2, 3, 1)
        o = src[..., :3].float()
        mixed = o + (face - o) * (src[..., 3:].float() / 255.0)
        return mixed.round_().clamp_(0, 255).to(torch.uint8).contiguous()

    def _to_host(self, patches: torch.Tensor, slot: _Slot,
                 times: BatchTimes | None) -> tuple[npt.NDArray[np.uint8], torch.cuda.Event | None]:
        """The batch's patches into ``slot``'s pinned buffer in one copy, queued on the copy
        stream (the next batch's forward does not wait for it); the event says when they
        are there."""
        if not patches.is_cuda:
            return patches.numpy(), None
        host = slot.buffer("patches", tuple(patches.shape), torch.uint8)
        stream = self._copy_stream or torch.cuda.current_stream(self.device)
        if self._copy_stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            patches.record_stream(stream)  # the allocator must not reuse it before the copy has read it
        with torch.cuda.stream(stream):
            if times:
                times.lane("copy", stream)
            host.copy_(patches, non_blocking=True)
            if times:
                times.mark("to_host", "copy", stream)
            done = torch.cuda.Event()
            done.record(stream)
        return host.numpy(), done

    def _backgrounds(self, launched: _Launched, outs: Sequence[Frame]) -> None:
        """The frames' own pixels into their slots: host work done while the device computes."""
        started = time.perf_counter()
        for w in launched.work:
            np.copyto(outs[w.out], w.state.avatar.frames[w.frame])
        if launched.times:
            launched.times.host("ring_write", (time.perf_counter() - started) * 1000.0)

    def _land(self, launched: _Launched, outs: Sequence[Frame]) -> None:
        """Wait for this batch's own copy (not the device), then paste its patches."""
        started = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
        waited = time.perf_counter()
        for b, w in enumerate(launched.work):
            x1, y1, x2, y2 = w.box
            outs[w.out][y1:y2, x1:x2] = launched.host[b, : y2 - y1, : x2 - x1]
        if launched.times:
            launched.times.host("host_wait", (waited - started) * 1000.0)
            launched.times.host("ring_write", (time.perf_counter() - waited) * 1000.0)
            launched.times.finish()
