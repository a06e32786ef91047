"""MuseTalk throughput: frames/s by batch, ms per stage, TFLOP/s, sessions per GPU.

    python -m bench.musetalk_bench [--device cuda|cpu] [--batches 1,4,8,16,32] [--frame 1280x720]
                                   [--dtype fp16|bf16|fp32] [--runner eager|cudagraph|compile|max-autotune]
                                   [--chunks 2] [--precision] [--size full|tiny] [--no-channels-last]

Full-size models (the real ``musetalk.json`` UNet, sd-vae-ft-mse's VAE, Whisper tiny's
encoder) with random weights: the architecture sets the cost, not the values, so no
download is needed. The frames go through the engine's own ``render`` (UNet, VAE decode,
batched blend on the device, one transfer back, write into a shared-memory frame ring),
timed per stage with CUDA events on the GPU. Audio features are timed separately per
frame of one session's stream and added to the per-frame cost for the session count.
``--chunks 2`` hands ``render`` two batches per call (pipelined: batch k's paste-back
overlaps batch k+1's forward); ``--precision`` prints fp16 and bf16 against fp32 on the
same weights (PSNR of decoded faces). ``--size tiny`` runs the tests' tiny architectures
(for a quick look at the code path, not at speed).

On a CPU it runs batch 1 only, a couple of iterations, and says so. The GPU check
(``python -m bench gpu-check``) calls the functions below stage by stage.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.table import print_table
from pipeline.engines.base import whole_utterance

log = logging.getLogger(__name__)

NOMINAL_GFLOP_PER_FRAME = 790.0  # UNet ~170 + VAE decode ~620 (the design's count)
REALTIME_FPS = 25
STAGES = ("unet", "vae_decode", "blend", "to_host", "ring_write", "host_wait")


def _random_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill weights so activations stay O(1) (fan-in scaled normal; norms 1, biases 0):
    fp16 must not overflow into inf/NaN, which would time a different computation. The
    generator lives where the weights do: on a GPU the 850 M UNet weights fill in well
    under a second instead of a CPU's many seconds."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, device=device).mul_(1.0 / math.sqrt(fan_in)))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def _configs(size: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from models.unet import MUSETALK_UNET_CONFIG
    from models.vae import SD_VAE_FT_MSE_CONFIG

    if size == "full":
        return MUSETALK_UNET_CONFIG, SD_VAE_FT_MSE_CONFIG
    if size == "tiny":  # the tests' tiny architectures, with the real data contract
        from tests.support.musetalk_fixtures import TINY_UNET_CONFIG, TINY_VAE_CONFIG

        return TINY_UNET_CONFIG, TINY_VAE_CONFIG
    raise ValueError(f"unknown model size {size!r}: full or tiny")


def build_models(device: torch.device, dtype: torch.dtype, size: str = "full"):
    """MuseTalk's networks with random weights, built on ``device`` (weights filled in
    float32 there, then cast), so every dtype built from one seed has the same weights."""
    from models.unet import build_unet
    from models.vae import build_vae
    from models.whisper import EncoderDims, WhisperAudioEncoder
    from pipeline.engines.musetalk import MuseTalkModels

    unet_config, vae_config = _configs(size)
    models = []
    for i, meta in enumerate((build_unet(unet_config, "meta"), build_vae(vae_config, "meta"))):
        m = _random_init_(meta.to_empty(device=device), i)
        models.append(torch.nn.Module.to(m, dtype=dtype).eval().requires_grad_(False))
    whisper = _random_init_(WhisperAudioEncoder(EncoderDims()).to(device), 2).to(dtype=dtype).eval()
    return MuseTalkModels(models[0], models[1], whisper, device, dtype, vae_id=f"random-{size}")


def cast_models(models, dtype: torch.dtype):
    """A copy of ``models`` at ``dtype``: the same weights, rounded."""
    from pipeline.engines.musetalk import MuseTalkModels

    def cast(m: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.Module.to(copy.deepcopy(m), dtype=dtype).eval().requires_grad_(False)

    return MuseTalkModels(cast(models.unet), cast(models.vae), cast(models.whisper), models.device, dtype, models.vae_id)


def count_flops(size: str = "full") -> tuple[float, float]:
    """GFLOP per frame of the UNet step and the VAE decode (matmuls and convolutions),
    counted on the meta device: shapes only, no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import build_unet
    from models.vae import build_vae

    unet_config, vae_config = _configs(size)
    unet, vae = build_unet(unet_config, "meta"), build_vae(vae_config, "meta")
    with FlopCounterMode(display=False) as fc:
        unet(torch.empty(1, 8, 32, 32, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
             encoder_hidden_states=torch.empty(1, 50, 384, device="meta"))
    unet_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.decode(torch.empty(1, 4, 32, 32, device="meta"))
    return unet_flops / 1e9, fc.get_total_flops() / 1e9


def synthetic_avatar(folder: Path, width: int, height: int, frames: int = 8, name: str = "bench", seed: int = 0):
    """Frames with a 720p-talking-head-sized face box (0.4 of the height), a blurred
    elliptic mask over its lower half, and random latents."""
    import cv2

    from avatars.avatar import Avatar
    from pipeline.engines.musetalk.material import MaterialParams, MuseTalkMaterial, blend_mask, crop_box

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    avatar = Avatar(name, folder, pixels, np.zeros((frames, 478, 2), np.float32))
    side = int(0.4 * height)
    boxes, masks = [], []
    for i in range(frames):
        x1, y1 = width // 2 - side // 2 + i, height // 3 - side // 2
        box = (x1, y1, x1 + side, y1 + int(side * 1.1))
        cbox = crop_box(box)
        region = np.zeros((cbox[3] - cbox[1], cbox[2] - cbox[0]), np.uint8)
        cv2.ellipse(region, (region.shape[1] // 2, region.shape[0] // 2), (side // 2, side // 2), 0, 0, 360, 255, -1)
        boxes.append(box)
        masks.append(blend_mask(region, box, cbox).reshape(-1))
    offsets = np.zeros(frames + 1, np.int64)
    offsets[1:] = np.cumsum([m.size for m in masks])
    material = MuseTalkMaterial(
        MaterialParams(), name, np.array(boxes, np.int32),
        rng.standard_normal((frames, 8, 32, 32)).astype(np.float16), np.concatenate(masks), offsets,
    )
    return avatar, material


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16_000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (0.3 * voiced * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)).astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feature_ms_per_frame(engine, seconds: float) -> float:
    """Whisper features of a complete utterance (one 30 s pass per segment), per frame."""
    pcm = _speech(seconds)
    _sync(engine.device)
    started = time.perf_counter()
    frames = len(whole_utterance(engine, pcm))
    _sync(engine.device)
    return (time.perf_counter() - started) * 1000.0 / max(frames, 1)


class _Outs:
    """Output frames in a shared-memory ring as the worker's are, or plain arrays where
    the machine's /dev/shm is too small for one (said in the results)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        from pipeline.frame_ring import FrameRing

        self.ring: Any = None
        try:
            self.ring = FrameRing.create(n, shape, tag="bench")
            self.views = [self.ring.view(i) for i in range(n)]
            self.kind = "shared-memory ring"
        except OSError as exc:
            self.views = [np.zeros(shape, np.uint8) for _ in range(n)]
            self.kind = f"numpy arrays (no shared memory: {exc})"

    def close(self) -> None:
        self.views = []  # views into the segment go before it closes (the owner also unlinks)
        if self.ring is not None:
            self.ring.close()


def sweep(engine, avatar, batches: Sequence[int], *, iters: int, warmup: int, chunks: int = 1, feat_ms: float = 0.0,
          gflop_per_frame: float = NOMINAL_GFLOP_PER_FRAME, deadline: float | None = None,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Frames/s and ms per stage for each batch size: ``chunks`` batches per ``render``
    call. Stops before a batch size once ``deadline`` (time.monotonic) has passed."""
    from pipeline.engines import RenderItem
    from pipeline.engines.musetalk import StageTimer

    device, cuda = engine.device, engine.device.type == "cuda"
    shape = (avatar.height, avatar.width, 3)
    gen = torch.Generator(device="cpu").manual_seed(1)
    features = [torch.randn(50, 384, generator=gen).to(device, engine.dtype) for _ in range(max(batches) * chunks)]
    rows: list[dict[str, Any]] = []
    cap = engine.max_batch
    for batch in batches:
        if deadline is not None and time.monotonic() > deadline:
            log.warning("out of time before batch %d", batch)
            break
        n = batch * chunks
        engine.max_batch = batch  # render splits its items into batches of this size
        outs = _Outs(n, shape)
        try:
            items = [RenderItem(avatar.name, i % avatar.num_frames, features[i]) for i in range(n)]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            first = time.perf_counter()
            for _ in range(max(warmup, 1 if cuda else 0)):
                engine.render(items, outs.views)
            warm_s = time.perf_counter() - first
            engine.timer = StageTimer(device)
            started = time.perf_counter()
            for _ in range(iters):
                engine.render(items, outs.views)
            wall_ms = (time.perf_counter() - started) * 1000.0 / iters
            stages = {k: v / engine.timer.calls for k, v in engine.timer.totals.items()}
            engine.timer = None
        finally:
            engine.max_batch = cap
            kind = outs.kind
            outs.close()
        fps = n * 1000.0 / wall_ms
        per_frame_ms = wall_ms / n + feat_ms
        row: dict[str, Any] = {
            "batch": batch, "chunks": chunks, "frames_per_s": fps, "render_ms": wall_ms, "features_ms": feat_ms * n,
            "stage_ms": {k: stages.get(k, 0.0) for k in STAGES}, "tflops": fps * gflop_per_frame / 1000.0,
            "sessions_25fps": int((1000.0 / per_frame_ms) // REALTIME_FPS), "warmup_s": warm_s, "outs": kind,
        }
        if cuda:
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@torch.inference_mode()
def precision(models, dtypes: Sequence[str] = ("fp16", "bf16"), frames: int = 16, seed: int = 0) -> dict[str, Any]:
    """Each of ``dtypes`` against float32 on the same weights (``models`` are float32):
    PSNR of the decoded faces as the engine rounds them (uint8), end to end (UNet + VAE)
    and for the VAE decode alone, the UNet output's relative error, non-finite values."""
    from models.unet import unet_step
    from models.vae import decode_latents
    from pipeline.engines.musetalk import pick_dtype

    device = models.device
    if device.type == "cuda":  # the reference is float32 proper, not TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(frames, 8, 32, 32, generator=gen).to(device)
    audio = torch.randn(frames, 50, 384, generator=gen).to(device)
    pred32 = unet_step(models.unet, latents, audio).float()
    faces32 = decode_latents(models.vae, pred32).round()
    out: dict[str, Any] = {
        "frames": frames,
        # random weights decode to noise with much clipping; PSNR is over what survives it
        "fp32_saturated_fraction": float(((faces32 == 0) | (faces32 == 255)).float().mean()),
        "fp32_face_std": float(faces32.std()),
    }
    for name in dtypes:
        dtype = pick_dtype(name, device)
        low = cast_models(models, dtype)
        pred = unet_step(low.unet, latents.to(dtype), audio.to(dtype)).float()
        faces = decode_latents(low.vae, pred).round()
        vae_only = decode_latents(low.vae, pred32.to(dtype)).round()
        per_frame = [_psnr(faces[i], faces32[i]) for i in range(frames)]
        out[name] = {
            "psnr_db": _psnr(faces, faces32),
            "psnr_db_worst_frame": min(per_frame),
            "psnr_db_vae_only": _psnr(vae_only, faces32),
            "unet_rel_error": float((pred - pred32).norm() / pred32.norm()),
            "max_abs_level_diff": float((faces - faces32).abs().max()),
            "nonfinite": int((~torch.isfinite(pred)).sum()) + int((~torch.isfinite(faces)).sum()),
        }
        del low
    return out


def memory_by_sessions(models, sessions: Sequence[int], *, width: int, height: int, avatar_frames: int, max_batch: int,
                       runner: str = "eager", deadline: float | None = None,
                       on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Device memory as sessions grow: each session speaks on its own avatar (its face
    patches in the device bank, its latents) with its own feature stream; one round of
    every session's frame is rendered in batches of ``max_batch``."""
    from avatars.avatar import Avatar
    from pipeline.engines import RenderItem
    from pipeline.engines.musetalk import MuseTalkEngine

    device = models.device
    cuda = device.type == "cuda"

    def mb(n: int) -> float:
        return n / 2**20

    _sync(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    engine = MuseTalkEngine.from_models(models, max_batch=max_batch, face_parsing=False, runner=runner,
                                        device_cache_mb=1 << 20)  # hold every avatar: the curve is the point
    rows: list[dict[str, Any]] = []
    streams: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        first, material = synthetic_avatar(Path(tmp), width, height, avatar_frames, "s0")
        prepared = 0
        for count in sessions:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("out of time before %d sessions", count)
                break
            while prepared < count:
                # every session its own avatar (its own patch-bank rows), sharing the frames and material host-side
                avatar = Avatar(f"s{prepared}", Path(tmp), first.frames, first.landmarks)
                engine.add_material(avatar, material)
                stream = engine.new_stream()
                stream.push(_speech(2.0))
                stream.finish()
                streams.append(stream)
                prepared += 1
            feats = engine.features([(s, 1) for s in streams[:count]])  # each session's next frame
            items = [RenderItem(f"s{i}", i % avatar_frames, f[0]) for i, f in enumerate(feats)]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            outs = _Outs(len(items), (height, width, 3))
            try:
                engine.render(items, outs.views)
            finally:
                outs.close()
            _sync(device)
            row: dict[str, Any] = {"sessions": count, "frames_rendered": len(items)}
            if cuda:
                row.update({
                    "allocated_mb": mb(torch.cuda.memory_allocated(device)),
                    "engine_mb": mb(torch.cuda.memory_allocated(device) - base),
                    "peak_mb": mb(torch.cuda.max_memory_allocated(device)),
                    "reserved_mb": mb(torch.cuda.memory_reserved(device)),
                    "patch_bank_mb": mb(engine._bank.data.numel()) if engine._bank is not None else 0.0,
                })
            rows.append(row)
            if on_row is not None:
                on_row(row)
    engine.close()
    return rows


def _fmt(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.musetalk_bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,4,8,16,32")
    p.add_argument("--frame", default="1280x720", help="avatar frame size WxH")
    p.add_argument("--dtype", default=None, help="fp16 (CUDA default), bf16, fp32 (CPU default)")
    p.add_argument("--iters", type=int, default=None, help="timed render calls per size (default 20 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on GPU, 0 on CPU)")
    p.add_argument("--runner", default=None, choices=("eager", "cudagraph", "compile", "max-autotune"),
                   help="how the UNet and VAE decode run (default eager)")
    p.add_argument("--compile", action="store_true", help="the same as --runner compile")
    p.add_argument("--chunks", type=int, default=1, help="batches per render call (2: pipelined)")
    p.add_argument("--size", default="full", choices=("full", "tiny"), help="model architecture (tiny: the tests')")
    p.add_argument("--precision", action="store_true", help="also fp16 and bf16 against fp32 (PSNR of decoded faces)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--feature-seconds", type=float, default=None, help="audio for the feature timing (4 s GPU, 2 s CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from models.unet import MUSETALK_UNET_PARAMETERS
    from pipeline.engines.musetalk import MuseTalkEngine, pick_dtype
    from tests.support.model_size import count_parameters

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = pick_dtype(a.dtype or "auto", device)
    runner = a.runner or ("compile" if a.compile else "eager")
    batches = [int(b) for b in a.batches.split(",")] if cuda or a.size == "tiny" else [1]
    iters = a.iters or (20 if cuda else 1)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 0)
    width, height = (int(v) for v in a.frame.lower().split("x"))
    if cuda:
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        log.info("no GPU: %s, %d iteration(s); CPU figures show the cost structure, not a real-time rate",
                 "batch 1 only" if a.size == "full" else "tiny models", iters)

    params = count_parameters()
    unet_gflop, vae_gflop = count_flops(a.size)
    gflop = NOMINAL_GFLOP_PER_FRAME if a.size == "full" else unet_gflop + vae_gflop
    log.info("UNet parameters from musetalk.json: %s (%s)", f"{params:,}",
             "matches 849,947,844" if params == MUSETALK_UNET_PARAMETERS else "DIFFERS from 849,947,844")
    log.info("counted GFLOP per frame (%s models): UNet %.1f + VAE decode %.1f = %.1f (nominal full size %.0f)",
             a.size, unet_gflop, vae_gflop, unet_gflop + vae_gflop, NOMINAL_GFLOP_PER_FRAME)

    started = time.perf_counter()
    if a.precision:
        ref = build_models(device, torch.float32, a.size)
        result = precision(ref, ("fp16", "bf16"))
        print_table(f"fp16 and bf16 against fp32 on {name}, the same random {a.size} weights, {result['frames']} faces",
                    ["dtype", "PSNR dB (faces)", "worst frame dB", "PSNR dB (VAE decode alone)", "UNet rel. error", "non-finite"],
                    [[d, f"{r['psnr_db']:.1f}", f"{r['psnr_db_worst_frame']:.1f}", f"{r['psnr_db_vae_only']:.1f}",
                      f"{r['unet_rel_error']:.2e}", r["nonfinite"]] for d in ("fp16", "bf16") for r in [result[d]]])
        models = ref if dtype == torch.float32 else cast_models(ref, dtype)
        del ref
    else:
        models = build_models(device, dtype, a.size)
    log.info("%s random models on %s as %s in %.1f s", a.size, name, dtype, time.perf_counter() - started)
    engine = MuseTalkEngine.from_models(models, max_batch=max(batches), channels_last=not a.no_channels_last,
                                        runner=runner, face_parsing=False)
    with tempfile.TemporaryDirectory() as tmp:
        avatar, material = synthetic_avatar(Path(tmp), width, height)
        engine.add_material(avatar, material)
        feat_ms = feature_ms_per_frame(engine, a.feature_seconds or (4.0 if cuda else 2.0))
        results = sweep(engine, avatar, batches, iters=iters, warmup=warmup, chunks=a.chunks, feat_ms=feat_ms,
                        gflop_per_frame=gflop)
    engine.close()
    rows = [[r["batch"], _fmt(r["frames_per_s"]), f"{r['render_ms']:.1f}", f"{r['features_ms']:.1f}",
             *(f"{r['stage_ms'][s]:.1f}" for s in STAGES), f"{r['tflops']:.2f}", r["sessions_25fps"]] for r in results]
    title = (f"MuseTalk on {name}, {dtype}, {width}x{height} frames, runner {engine.runner}"
             f"{'' if a.no_channels_last or not cuda else ', channels_last'}"
             f"{f', {a.chunks} batches per render call' if a.chunks > 1 else ''}"
             f"; ms per render call (stages per batch); TFLOP/s at {gflop:.0f} GFLOP/frame; features timed per session"
             + ("" if cuda else "; CPU"))
    print_table(title, ["batch", "frames/s", "render ms", "features ms", "UNet ms", "VAE decode ms", "blend ms",
                        "to-host ms", "ring write ms", "host wait ms", "TFLOP/s", "25 fps sessions"], rows)
    print_table("MuseTalk model facts", ["what", "value"], [
        ["UNet parameters (real musetalk.json, meta device)",
         f"{params:,} ({'as expected' if params == MUSETALK_UNET_PARAMETERS else 'expected 849,947,844'})"],
        [f"GFLOP per frame counted ({a.size}): UNet step", f"{unet_gflop:.1f}"],
        [f"GFLOP per frame counted ({a.size}): VAE decode", f"{vae_gflop:.1f}"],
        ["GFLOP per frame, nominal (TFLOP/s column, full size)", f"{NOMINAL_GFLOP_PER_FRAME:.0f}"],
        ["device / dtype / iterations per batch", f"{name} / {dtype} / {iters} (+{warmup} warm-up)"],
    ])
    best = max(results, key=lambda r: r["sessions_25fps"])
    log.info("\none %s holds %d speaking sessions at 25 fps (batch %d, features included)", name, best["sessions_25fps"],
             best["batch"])


if __name__ == "__main__":
    main()
