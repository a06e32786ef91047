"""MuseTalk throughput: frames/s by batch, ms per stage, TFLOP/s, sessions per GPU.

    python -m bench.musetalk_bench [--device cuda|cpu] [--batches 1,4,8,16,32] [--frame 1280x720]
                                   [--dtype fp16|bf16|fp32] [--compile] [--no-channels-last]

Full-size models (the real ``musetalk.json`` UNet, sd-vae-ft-mse's VAE, Whisper tiny's
encoder) with random weights: the architecture sets the cost, not the values, so no
download is needed. The frames go through the engine's own ``render`` (UNet, VAE decode,
paste-back on the device, one transfer back, write into a shared-memory frame ring),
timed per stage with CUDA events on the GPU. Audio features are timed separately per
frame of one session's stream and added to the per-frame cost for the session count.

On a CPU it runs batch 1 only, a couple of iterations, and says so.
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.table import print_table

log = logging.getLogger(__name__)

NOMINAL_GFLOP_PER_FRAME = 790.0  # UNet ~170 + VAE decode ~620 (the design's count)
REALTIME_FPS = 25


def _random_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill weights so activations stay O(1) (fan-in scaled normal; norms 1, biases 0):
    fp16 must not overflow into inf/NaN, which would time a different computation."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen).mul_(1.0 / math.sqrt(fan_in)))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def build_models(device: torch.device, dtype: torch.dtype):
    from models.unet import MUSETALK_UNET_CONFIG, build_unet
    from models.vae import SD_VAE_FT_MSE_CONFIG, build_vae
    from models.whisper import EncoderDims, WhisperAudioEncoder
    from pipeline.engines.musetalk import MuseTalkModels

    models = []
    for i, meta in enumerate((build_unet(MUSETALK_UNET_CONFIG, "meta"), build_vae(SD_VAE_FT_MSE_CONFIG, "meta"))):
        m = meta.to_empty(device="cpu")
        models.append(torch.nn.Module.to(_random_init_(m, i), device=device, dtype=dtype).eval().requires_grad_(False))
    whisper = _random_init_(WhisperAudioEncoder(EncoderDims()), 2).to(device=device, dtype=dtype).eval()
    return MuseTalkModels(models[0], models[1], whisper, device, dtype, vae_id="random")


def count_flops() -> tuple[float, float]:
    """GFLOP per frame of the UNet step and the VAE decode (matmuls and convolutions),
    counted on the meta device: shapes only, no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import MUSETALK_UNET_CONFIG, build_unet
    from models.vae import SD_VAE_FT_MSE_CONFIG, build_vae

    unet, vae = build_unet(MUSETALK_UNET_CONFIG, "meta"), build_vae(SD_VAE_FT_MSE_CONFIG, "meta")
    with FlopCounterMode(display=False) as fc:
        unet(torch.empty(1, 8, 32, 32, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
             encoder_hidden_states=torch.empty(1, 50, 384, device="meta"))
    unet_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.decode(torch.empty(1, 4, 32, 32, device="meta"))
    return unet_flops / 1e9, fc.get_total_flops() / 1e9


def synthetic_avatar(folder: Path, width: int, height: int, frames: int = 8):
    """Frames with a 720p-talking-head-sized face box (0.4 of the height), a blurred
    elliptic mask over its lower half, and random latents."""
    import cv2

    from avatars.avatar import Avatar
    from pipeline.engines.musetalk.material import MaterialParams, MuseTalkMaterial, blend_mask, crop_box

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    avatar = Avatar("bench", folder, pix, np.zeros((frames, 478, 2), np.float32))
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
        MaterialParams(), "bench", np.array(boxes, np.int32),
        rng.standard_normal((frames, 8, 32, 32)).astype(np.float16), np.concatenate(masks), offsets,
    )
    return avatar, material


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16_000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (0.3 * voiced * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)).astype(np.float32)


def feature_ms_per_frame(engine, seconds: float) -> float:
    pcm = _speech(seconds)
    stream = engine.new_stream()
    chunk = 3200
    frames = 0
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for start in range(0, pcm.size, chunk):
        frames += len(stream.push(pcm[start : start + chunk]))
    frames += len(stream.flush())
    sync()
    return (time.perf_counter() - started) * 1000.0 / max(frames, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.musetalk_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,4,8,16,32")
    p.add_argument("--frame", default="1280x720", help="avatar frame size WxH")
    p.add_argument("--dtype", default=None, help="fp16 (CUDA default), bf16, fp32 (CPU default)")
    p.add_argument("--iters", type=int, default=None, help="timed batches per size (default 20 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 3 on GPU, 0 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--feature-seconds", type=float, default=None, help="audio for the feature timing (4 s GPU, 2 s CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from models.unet import MUSETALK_UNET_PARAMETERS
    from pipeline.engines import RenderItem
    from pipeline.engines.musetalk import MuseTalkEngine, StageTimer, pick_dtype
    from pipeline.frame_ring import FrameRing
    from tests.support.model_size import count_parameters

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = pick_dtype(a.dtype or "auto", device)
    batches = [int(b) for b in a.batches.split(",")] if cuda else [1]
    iters = a.iters or (20 if cuda else 1)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 0)
    width, height = (int(v) for v in a.frame.lower().split("x"))
    if cuda:
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        log.info("no GPU: batch 1 only, %d iteration(s); CPU figures show the cost structure, not a real-time rate", iters)

    params = count_parameters()
    unet_gflop, vae_gflop = count_flops()
    log.info("UNet parameters from musetalk.json: %s (%s)", f"{params:,}",
             "matches 849,947,844" if params == MUSETALK_UNET_PARAMETERS else "DIFFERS from 849,947,844")
    log.info("counted GFLOP per frame: UNet %.1f + VAE decode %.1f = %.1f (nominal %.0f)",
             unet_gflop, vae_gflop, unet_gflop + vae_gflop, NOMINAL_GFLOP_PER_FRAME)

    started = time.perf_counter()
    models = build_models(device, dtype)
    log.info("full-size random models on %s as %s in %.1f s", name, dtype, time.perf_counter() - started)
    engine = MuseTalkEngine.from_models(models, max_batch=max(batches), channels_last=not a.no_channels_last,
                                        compile=a.compile, face_parsing=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        avatar, material = synthetic_avatar(Path(tmp), width, height)
        engine.add_material(avatar, material)
        feat_ms = feature_ms_per_frame(engine, a.feature_seconds or (4.0 if cuda else 2.0))
        features = [torch.randn(50, 384, device=device).to(dtype) for _ in range(max(batches))]
        for batch in batches:
            ring = FrameRing.create(batch, (height, width, 3), tag="bench")
            outs: list[np.ndarray] = []
            try:
                outs = [ring.view(i) for i in range(batch)]
                items = [RenderItem("bench", i % avatar.num_frames, features[i]) for i in range(batch)]
                for _ in range(warmup):
                    engine.render(items, outs)
                engine.timer = StageTimer(device)
                started = time.perf_counter()
                for _ in range(iters):
                    engine.render(items, outs)
                wall_ms = (time.perf_counter() - started) * 1000.0 / iters
                stages = {k: v / engine.timer.calls for k, v in engine.timer.totals.items()}
                engine.timer = None
            finally:
                outs = []  # views into the segment go before it closes (the owner also unlinks)
                ring.close()
            fps = batch * 1000.0 / wall_ms
            per_frame_ms = wall_ms / batch + feat_ms
            sessions = int((1000.0 / per_frame_ms) // REALTIME_FPS)
            rows.append([
                batch, f"{fps:.1f}" if fps >= 10 else f"{fps:.3f}", f"{wall_ms:.1f}", f"{feat_ms * batch:.1f}",
                f"{stages.get('unet', 0):.1f}", f"{stages.get('vae_decode', 0):.1f}",
                f"{stages.get('paste_back', 0):.1f}", f"{stages.get('ring_write', 0):.1f}",
                f"{fps * NOMINAL_GFLOP_PER_FRAME / 1000:.2f}", sessions,
            ])
    engine.close()
    title = (f"MuseTalk on {name}, {dtype}, {width}x{height} frames"
             f"{', torch.compile' if a.compile else ''}{'' if a.no_channels_last or not cuda else ', channels_last'}"
             f"; ms per batch; TFLOP/s at {NOMINAL_GFLOP_PER_FRAME:.0f} GFLOP/frame; features timed per session"
             + ("" if cuda else "; CPU: batch 1 only"))
    print_table(title, ["batch", "frames/s", "render ms", "features ms", "UNet ms", "VAE decode ms",
                        "paste-back ms", "ring write ms", "TFLOP/s", "25 fps sessions"], rows)
    print_table("MuseTalk model facts", ["what", "value"], [
        ["UNet parameters (real musetalk.json, meta device)",
         f"{params:,} ({'as expected' if params == MUSETALK_UNET_PARAMETERS else 'expected 849,947,844'})"],
        ["GFLOP per frame counted: UNet step", f"{unet_gflop:.1f}"],
        ["GFLOP per frame counted: VAE decode", f"{vae_gflop:.1f}"],
        ["GFLOP per frame, nominal (TFLOP/s column)", f"{NOMINAL_GFLOP_PER_FRAME:.0f}"],
        ["device / dtype / iterations per batch", f"{name} / {dtype} / {iters} (+{warmup} warm-up)"],
    ])
    best = max(rows, key=lambda r: r[-1])
    log.info("\none %s holds %d speaking sessions at 25 fps (batch %d, features included)", name, best[-1], best[0])


if __name__ == "__main__":
    main()
