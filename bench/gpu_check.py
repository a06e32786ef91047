"""One-call GPU check of the MuseTalk engine: everything a single short run on a bare GPU
machine can learn, in one report.

    python -m bench gpu-check [--dry-run] [--out DIR] [--budget SECONDS] [--only STAGE,...]
    ./run.sh gpu-check [--dry-run]

Stages, each in its own process with its own time budget (a failure or a timeout is
recorded and the next stage runs):

* ``env``: GPU, driver, torch, CUDA, cuDNN, packages; a bf16 matrix product's TFLOP/s as
  the ceiling the model's rate is read against.
* ``precision``: fp16 and bf16 against fp32 on the same random full-size weights: PSNR
  of the decoded faces (end to end, and the VAE decode alone).
* ``bench-eager``: frames/s by batch 1 to 32, ms per stage, TFLOP/s at 790 GFLOP a
  frame, 25 fps sessions; two batches per render call (pipelined) beside one; bf16.
* ``bench-cudagraph``: the same sweep with the UNet and VAE decode as CUDA graphs.
* ``memory``: device memory as sessions (each on its own avatar) grow.
* ``tests``: the MuseTalk tests with ``LIPSYNC_TEST_DEVICE=cuda``.
* ``bench-compile``: ``torch.compile`` (reduce-overhead) at batch 16, then 32, with its
  compile time; last, since compiling the full UNet may not fit what is left.

The report (``gpu-check.md`` and ``gpu-check.json``, with ``gpu-check.log`` and the
tests' ``pytest-junit.xml``) goes to ``--out``, else ``$OUT`` when set (what comes back
from the device machine), else ``bench/out/gpu-check-<time>/``; the folder is named on
stdout first, and the Markdown is printed at the end too.

A bare machine has torch but not diffusers (nor openai-whisper, which the feature tests
compare against): wheels gathered beforehand into ``.whl/`` (README, "GPU check") are
installed from there with ``--no-index`` into a folder on ``PYTHONPATH``, only when a
module is missing.

``--dry-run`` runs the same stages on the CPU with tiny models and sizes (about a
minute): the path is the same, the numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu-check")

ROOT = Path(__file__).resolve().parent.parent
REPORT_MD, REPORT_JSON, LOG_FILE, JUNIT = "gpu-check.md", "gpu-check.json", "gpu-check.log", "pytest-junit.xml"
GFLOP_PER_FRAME = 790.0
# module -> why the check needs it (the wheels list in the README gathers them)
NEEDED = {
    "diffusers": "the UNet and VAE architectures (every stage but env)",
    "importlib_metadata": "diffusers imports it",
    "whisper": "openai-whisper: the reference the feature tests compare with (skipped without it)",
    "more_itertools": "openai-whisper imports it",
}
# every MuseTalk test file: the render path's own (its CUDA-only tests) first, the feature
# tests (CPU references, nothing on the device) last, where a time limit would cut them
MUSETALK_TESTS = sorted((p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_musetalk_*.py")),
                        key=lambda name: (not name.endswith("_render.py"), name.endswith("_features.py"), name))


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # on the GPU
    dry_budget_s: float  # in the dry run
    what: str


STAGES = [
    Stage("env", 30, 30, "machine, versions, bf16 matmul ceiling"),
    Stage("precision", 45, 40, "fp16 / bf16 against fp32, PSNR of decoded faces"),
    Stage("bench-eager", 90, 45, "frames/s by batch, ms per stage, TFLOP/s, sessions; pipelined; bf16"),
    Stage("bench-cudagraph", 60, 30, "the same with CUDA graphs"),
    Stage("memory", 45, 30, "device memory as sessions grow"),
    Stage("tests", 150, 90, "MuseTalk tests on the device"),
    Stage("bench-compile", 150, 60, "torch.compile reduce-overhead"),
]
DEFAULT_BUDGET_S = 465.0  # under 8 minutes with start-up and the report
DRY_BUDGET_S = 240.0


# ---- stages (each runs in its own process: python -m bench.gpu_check --stage NAME) ----


class Recorder:
    """A stage's result, rewritten to its JSON file at each step, so a stage cut off by
    its time budget still leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def append(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


@dataclass
class Ctx:
    dry: bool
    out: Path
    deadline: float  # time.monotonic() by which the stage should stop starting new work

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    @property
    def size(self) -> str:
        return "tiny" if self.dry else "full"

    @property
    def frame(self) -> tuple[int, int]:
        return (640, 360) if self.dry else (1280, 720)

    @property
    def batches(self) -> list[int]:
        return [1, 2] if self.dry else [1, 2, 4, 8, 16, 32]

    @property
    def iters(self) -> tuple[int, int]:  # timed, warm-up
        return (1, 0) if self.dry else (10, 2)

    @property
    def dtype(self) -> Any:
        import torch

        return torch.float32 if self.dry else torch.float16


def stage_env(ctx: Ctx, rec: Recorder) -> None:
    import numpy as np
    import torch

    rec["python"] = platform.python_version()
    rec["platform"] = platform.platform()
    rec["cpus"] = os.cpu_count()
    rec["torch"] = torch.__version__
    rec["torch_cuda"] = torch.version.cuda
    rec["numpy"] = np.__version__
    rec["packages"] = package_versions()
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        rec["dev_shm_mb"] = st.f_bavail * st.f_frsize / 2**20
    rec["cuda_available"] = torch.cuda.is_available()
    if ctx.dry:
        size, dtype = 512, torch.float32
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU")
        props = torch.cuda.get_device_properties(0)
        rec["gpu"] = {"name": props.name, "memory_gb": props.total_memory / 1e9, "capability": f"{props.major}.{props.minor}",
                      "multiprocessors": props.multi_processor_count}
        rec["cudnn"] = torch.backends.cudnn.version()
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            rec["nvidia_smi"] = (q.stdout or q.stderr).strip()
        size, dtype = 8192, torch.bfloat16
    # the ceiling the model's TFLOP/s is read against: a large bf16 matrix product here
    a = torch.randn(size, size, device=ctx.device, dtype=dtype)
    b = torch.randn(size, size, device=ctx.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    sync()
    reps = 2 if ctx.dry else 20
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    rec["matmul_tflops"] = 2 * size**3 * reps / (time.perf_counter() - started) / 1e12
    rec["matmul"] = f"{size}x{size}x{size} {str(dtype).removeprefix('torch.')}, mean of {reps}"


def package_versions() -> dict[str, str]:
    """Installed versions from the packages' metadata (importing them all would take
    seconds); "missing" where the module cannot be found."""
    from importlib import metadata

    dists = {
        "diffusers": ("diffusers",), "transformers": ("transformers",), "safetensors": ("safetensors",),
        "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"), "skimage": ("scikit-image",),
        "whisper": ("openai-whisper",), "aiohttp": ("aiohttp",), "pytest": ("pytest",), "triton": ("triton",),
        "mediapipe": ("mediapipe",), "aiortc": ("aiortc",), "av": ("av",),
    }
    out = {}
    for module, names in dists.items():
        if importlib.util.find_spec(module) is None:
            out[module] = "missing"
            continue
        out[module] = "present"
        for name in names:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[module] = metadata.version(name)
                break
    return out


def stage_precision(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from bench.musetalk_bench import build_models, precision

    started = time.perf_counter()
    models = build_models(ctx.device, torch.float32, ctx.size)
    rec["build_s"] = time.perf_counter() - started
    rec["size"] = ctx.size
    result = precision(models, ("fp16", "bf16"), frames=4 if ctx.dry else 16)
    for key, value in result.items():
        rec[key] = value


def _engine(models: Any, ctx: Ctx, runner: str, max_batch: int, **options: Any) -> Any:
    from pipeline.engines.musetalk import MuseTalkEngine

    return MuseTalkEngine.from_models(models, max_batch=max_batch, face_parsing=False, runner=runner, **options)


def _sweep_stage(ctx: Ctx, rec: Recorder, runner: str, extras: bool, **options: Any) -> None:
    import torch

    from bench.musetalk_bench import build_models, cast_models, count_flops, feature_ms_per_frame, sweep, synthetic_avatar

    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    unet_gflop, vae_gflop = count_flops(ctx.size)
    rec["counted_gflop_per_frame"] = {"unet": unet_gflop, "vae_decode": vae_gflop}
    gflop = GFLOP_PER_FRAME if not ctx.dry else unet_gflop + vae_gflop
    rec["gflop_per_frame_used"] = gflop
    started = time.perf_counter()
    models = build_models(ctx.device, ctx.dtype, ctx.size)
    rec["build_s"] = time.perf_counter() - started
    batches = ctx.batches
    started = time.perf_counter()
    engine = _engine(models, ctx, runner, max(batches), **options)
    rec["setup_s"] = time.perf_counter() - started  # graph capture happens here
    rec["runner"] = engine.runner
    if engine.runner != runner:
        rec["fallback"] = f"asked for {runner}, ran {engine.runner} ({'no CUDA' if ctx.dry else 'why: gpu-check.log'})"
    rec["dtype"] = str(ctx.dtype).removeprefix("torch.")
    iters, warmup = ctx.iters
    width, height = ctx.frame
    rec["frame"] = f"{width}x{height}"
    with tempfile.TemporaryDirectory() as tmp:
        avatar, material = synthetic_avatar(Path(tmp), width, height)
        engine.add_material(avatar, material)
        feat_ms = feature_ms_per_frame(engine, 2.0 if ctx.dry else 4.0)
        rec["features_ms_per_frame"] = feat_ms
        sweep(engine, avatar, batches, iters=iters, warmup=warmup, feat_ms=feat_ms, gflop_per_frame=gflop,
              deadline=ctx.deadline, on_row=lambda r: rec.append("rows", r))
        if extras:
            # two batches per render call: the second's forward overlaps the first's paste-back
            sweep(engine, avatar, [2] if ctx.dry else [8, 16, 32], iters=iters, warmup=warmup, chunks=2, feat_ms=feat_ms,
                  gflop_per_frame=gflop, deadline=ctx.deadline, on_row=lambda r: rec.append("rows_2_chunks", r))
            if not ctx.dry:  # copies back on the compute stream: what the copy stream buys
                plain = _engine(models, ctx, runner, 32, overlap=False)
                plain.add_material(avatar, material)
                sweep(plain, avatar, [16, 32], iters=iters, warmup=warmup, feat_ms=feat_ms, gflop_per_frame=gflop,
                      deadline=ctx.deadline, on_row=lambda r: rec.append("rows_no_overlap", r))
                plain.close()
        engine.close()
        if extras:
            bf16 = _engine(cast_models(models, torch.bfloat16), ctx, runner, max(batches), **options)
            del models
            bf16.add_material(avatar, material)
            sweep(bf16, avatar, [2] if ctx.dry else [8, 16, 32], iters=iters, warmup=warmup, feat_ms=feat_ms,
                  gflop_per_frame=gflop, deadline=ctx.deadline, on_row=lambda r: rec.append("rows_bf16", r))
            bf16.close()


def stage_bench_eager(ctx: Ctx, rec: Recorder) -> None:
    _sweep_stage(ctx, rec, "eager", extras=True)


def stage_bench_cudagraph(ctx: Ctx, rec: Recorder) -> None:
    _sweep_stage(ctx, rec, "cudagraph", extras=False)


def stage_bench_compile(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from bench.musetalk_bench import build_models, count_flops, feature_ms_per_frame, sweep, synthetic_avatar

    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    unet_gflop, vae_gflop = count_flops(ctx.size)
    gflop = GFLOP_PER_FRAME if not ctx.dry else unet_gflop + vae_gflop
    models = build_models(ctx.device, ctx.dtype, ctx.size)
    # the dry run checks dynamo's tracing of both stages; inductor's CPU code generation takes minutes there
    backend = "aot_eager" if ctx.dry else "inductor"
    rec["backend"], rec["mode"] = backend, "reduce-overhead" if not ctx.dry else "default"
    rec["dtype"] = str(ctx.dtype).removeprefix("torch.")
    iters, _warmup = ctx.iters
    width, height = ctx.frame
    rec["frame"] = f"{width}x{height}"
    with tempfile.TemporaryDirectory() as tmp:
        avatar, material = synthetic_avatar(Path(tmp), width, height)
        for batch in [2] if ctx.dry else [16, 32]:
            if time.monotonic() > ctx.deadline:
                break
            engine = _engine(models, ctx, "compile", batch, compile_backend=backend)
            rec["runner"] = engine.runner
            rec["compiling_batch"] = batch  # left behind if the compile outlasts the budget
            engine.add_material(avatar, material)
            feat_ms = feature_ms_per_frame(engine, 2.0)
            # warm-up 2: the first call compiles (its time is the row's warmup_s), the
            # second records the CUDA graphs of reduce-overhead
            sweep(engine, avatar, [batch], iters=iters, warmup=2, feat_ms=feat_ms, gflop_per_frame=gflop,
                  on_row=lambda r: rec.append("rows", r))
            engine.close()


def stage_memory(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from bench.musetalk_bench import build_models, memory_by_sessions

    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        base = torch.cuda.memory_allocated()
    models = build_models(ctx.device, ctx.dtype, ctx.size)
    if ctx.device.type == "cuda":
        rec["weights_mb"] = (torch.cuda.memory_allocated() - base) / 2**20
    width, height = ctx.frame
    frames = 4 if ctx.dry else 25
    rec["avatar"] = f"{width}x{height}, {frames} frames each (a 10 s avatar has 250 frames: {250 // frames}x its patch bank)"
    memory_by_sessions(models, [1, 4] if ctx.dry else [1, 8, 32, 64, 128], width=width, height=height,
                       avatar_frames=frames, max_batch=2 if ctx.dry else 32, deadline=ctx.deadline,
                       on_row=lambda r: rec.append("rows", r))


def stage_tests(ctx: Ctx, rec: Recorder) -> None:
    fd, name = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    results = Path(name)
    env = dict(os.environ, LIPSYNC_TEST_DEVICE="cpu" if ctx.dry else "cuda", LIPSYNC_TEST_RESULTS=str(results),
               PYTHONDONTWRITEBYTECODE="1")
    # the dry run runs a few fast ones: the path (plugin, results, parsing) is what it checks
    paths = ["tests/test_musetalk_render.py", "-k", "blend or buckets or runner"] if ctx.dry else MUSETALK_TESTS
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.support.device_select", "-p", "no:cacheprovider", "-q", "-rfEs",
           "-o", "timeout=150", f"--junitxml={ctx.out / JUNIT}", *paths]
    rec["command"] = "python " + " ".join(cmd[1:])
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(10.0, ctx.deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        rec["outcomes"] = read_outcomes(results)  # what it saw before the limit
        raise RuntimeError(f"pytest still running after {time.perf_counter() - started:.0f} s") from exc
    finally:
        rec["seconds"] = time.perf_counter() - started
    rec["exit_code"] = proc.returncode
    rec["summary"] = (proc.stdout.strip().splitlines() or [""])[-1]
    rec["outcomes"] = read_outcomes(results)
    results.unlink(missing_ok=True)
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {proc.returncode}: {rec.data['summary']}")


def read_outcomes(path: Path) -> dict[str, Any]:
    """Counts and problems from the device_select plugin's JSON lines (one per test
    phase that decided an outcome)."""
    final: dict[str, dict[str, Any]] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r["test"] not in final or rank.get(r["outcome"], 2) > rank.get(final[r["test"]]["outcome"], 2):
                    final[r["test"]] = r
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    for r in final.values():
        if r["outcome"] == "failed":
            kind = "failed" if r["when"] == "call" else "errors"
            counts[kind] += 1
            problems.append({"test": r["test"], "kind": kind if kind == "failed" else f"error in {r['when']}",
                             "message": r["message"]})
        else:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {"counts": counts, "problems": problems}


STAGE_FUNCS: dict[str, Callable[[Ctx, Recorder], None]] = {
    "env": stage_env, "precision": stage_precision, "bench-eager": stage_bench_eager,
    "bench-cudagraph": stage_bench_cudagraph, "memory": stage_memory, "tests": stage_tests, "bench-compile": stage_bench_compile,
}


def run_stage_here(name: str, result: Path, dry: bool, out: Path, budget: float) -> int:
    """The child's side: run one stage, record its result or its error."""
    rec = Recorder(result)
    # stop starting new measurements a little before the parent's kill
    ctx = Ctx(dry, out, time.monotonic() + budget * 0.85)
    try:
        STAGE_FUNCS[name](ctx, rec)
    except Exception as exc:
        rec["_error"] = f"{type(exc).__name__}: {exc}"
        rec["_traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
        return 1
    return 0


# ---- the driver ----


def ensure_packages(wheels: Path, site: Path) -> dict[str, Any]:
    """Install the carried wheels (offline, no dependency resolution) when a needed module
    is missing; returns what was found and done, and the PYTHONPATH entry to use."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    info: dict[str, Any] = {"missing_before": missing, "wheels_folder": str(wheels), "installed": [], "pythonpath": ""}
    if not missing:
        return info
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        info["note"] = f"no wheels in {wheels}: gather them as the README's GPU check section says"
        return info
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, found)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    info["pip_exit_code"] = proc.returncode
    info["pip_output"] = (proc.stdout + proc.stderr)[-2000:]
    info["installed"] = [w.name for w in found]
    info["pythonpath"] = str(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    info["missing_after"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return info


def run_stages(stages: list[tuple[str, float, list[str]]], env: dict[str, str], log_path: Path, total_budget: float,
               results_dir: Path) -> dict[str, dict[str, Any]]:
    """Run each ``(name, budget, command)`` in its own process group, in order, under its
    budget and what is left of ``total_budget``; a failure, a crash or a timeout is
    recorded and the next stage runs. A command may write its result as JSON to
    ``results_dir/<name>.json`` (the stage process does, as it goes)."""
    deadline = time.monotonic() + total_budget
    report: dict[str, dict[str, Any]] = {}
    with log_path.open("a") as logf:
        for name, budget, cmd in stages:
            left = deadline - time.monotonic()
            entry: dict[str, Any] = {"budget_s": budget}
            report[name] = entry
            if left < 5:
                entry.update(status="skipped", error=f"no time left of the {total_budget:.0f} s budget")
                print(f"[gpu-check] {name}: skipped (out of time)", flush=True)
                continue
            limit = min(budget, left)
            entry["limit_s"] = round(limit, 1)
            logf.write(f"\n===== {name} (limit {limit:.0f} s): {' '.join(cmd)}\n")
            logf.flush()
            print(f"[gpu-check] {name}: running (limit {limit:.0f} s)", flush=True)
            started = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
                entry["status"] = "ok" if code == 0 else "failed"
                entry["exit_code"] = code
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the stage's own group: pytest's children go too
                proc.wait()
                entry["status"] = "timeout"
                entry["error"] = f"over its {limit:.0f} s limit; what it had measured is kept"
            entry["seconds"] = round(time.monotonic() - started, 1)
            result = results_dir / f"{name}.json"
            if result.is_file():
                with contextlib.suppress(ValueError):
                    entry["result"] = json.loads(result.read_text())
            res = entry.get("result", {})
            if isinstance(res, dict) and "_error" in res:
                entry["error"] = res.pop("_error")
                entry["traceback"] = res.pop("_traceback", "")
            if entry["status"] == "failed" and "error" not in entry:
                entry["error"] = f"exit code {entry.get('exit_code')}"
            print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']} s"
                  + (f" ({entry['error']})" if entry.get("error") else ""), flush=True)
    return report


def out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "bench" / "out" / time.strftime("gpu-check-%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench gpu-check", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny sizes (about a minute)")
    p.add_argument("--out", default=None, help="report folder (default $OUT, else bench/out/gpu-check-<time>)")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for all stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--only", default=None, help="comma-separated stages: " + ",".join(s.name for s in STAGES))
    p.add_argument("--wheels", default=os.environ.get("LIPSYNC_WHEELS", str(ROOT / ".whl")), help="carried wheels (default .whl)")
    # the child's side
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = out_dir(a.out)
    if a.stage:
        sys.exit(run_stage_here(a.stage, Path(a.result or out / f"{a.stage}.json"), a.dry_run, out, a.stage_budget))

    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check report folder: {out}", flush=True)
    started = time.monotonic()
    names = [s.strip() for s in a.only.split(",")] if a.only else [s.name for s in STAGES]
    unknown = [n for n in names if n not in STAGE_FUNCS]
    if unknown:
        p.error(f"unknown stages {unknown}: {', '.join(STAGE_FUNCS)}")
    for stale in (REPORT_MD, REPORT_JSON, LOG_FILE, JUNIT):
        (out / stale).unlink(missing_ok=True)
    log_path = out / LOG_FILE
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        packages = ensure_packages(Path(a.wheels), Path(tempfile.gettempdir()) / "lipsync-wheels-site")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if packages["pythonpath"]:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (packages["pythonpath"], env.get("PYTHONPATH", "")) if x)
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 1))
        total = a.budget or (DRY_BUDGET_S if a.dry_run else DEFAULT_BUDGET_S)
        plan = []
        for stage in STAGES:
            if stage.name not in names:
                continue
            budget = stage.dry_budget_s if a.dry_run else stage.budget_s
            cmd = [sys.executable, "-m", "bench.gpu_check", "--stage", stage.name, "--result", str(Path(tmp) / f"{stage.name}.json"),
                   "--out", str(out), "--stage-budget", str(budget), *(["--dry-run"] if a.dry_run else [])]
            plan.append((stage.name, budget, cmd))
        stages = run_stages(plan, env, log_path, total, Path(tmp))
    report = {
        "check": "MuseTalk GPU check", "dry_run": a.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.monotonic() - started, 1), "budget_s": total, "packages": packages, "stages": stages,
        "summary": summarise(stages, a.dry_run),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1, default=str))
    markdown = render_markdown(report)
    (out / REPORT_MD).write_text(markdown)
    print("\n" + markdown, flush=True)
    print(f"gpu-check: report in {out / REPORT_MD} and {out / REPORT_JSON} ({report['seconds']} s)", flush=True)
    sys.exit(0 if all(s.get("status") == "ok" for s in stages.values()) else 1)


# ---- the report ----


def _rows(stage: dict[str, Any], key: str = "rows") -> list[dict[str, Any]]:
    res = stage.get("result") or {}
    rows = res.get(key) if isinstance(res, dict) else None
    return rows if isinstance(rows, list) else []


def summarise(stages: dict[str, dict[str, Any]], dry: bool) -> list[str]:
    """The headline findings, one line each."""
    lines = []
    env = stages.get("env", {}).get("result", {}) or {}
    if env:
        gpu = env.get("gpu", {}).get("name", "CPU (dry run)")
        lines.append(f"{gpu}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
                     f"{env.get('matmul', 'matmul')}: {env.get('matmul_tflops', 0):.3g} TFLOP/s")
    ceiling = float(env.get("matmul_tflops") or 0)
    for name in ("bench-eager", "bench-cudagraph", "bench-compile"):
        rows = _rows(stages.get(name, {}))
        if rows:
            best = max(rows, key=lambda r: r["frames_per_s"])
            res = stages[name].get("result", {})
            share = f", {100 * best['tflops'] / ceiling:.0f} % of the matmul ceiling" if ceiling and not dry else ""
            label = f"{name} ({res.get('runner', '?')}, {res.get('dtype', '?')})" + (f" [{res['fallback']}]" if res.get("fallback") else "")
            lines.append(f"{label}: best {best['frames_per_s']:.1f} frames/s at "
                         f"batch {best['batch']}, {best['tflops']:.3g} TFLOP/s{share}; "
                         f"{max(r['sessions_25fps'] for r in rows)} sessions at 25 fps")
    eager = stages.get("bench-eager", {})
    one = {r["batch"]: r for r in _rows(eager)}
    for r in _rows(eager, "rows_2_chunks"):
        if r["batch"] in one:
            gain = r["frames_per_s"] / one[r["batch"]]["frames_per_s"] - 1
            lines.append(f"two batches of {r['batch']} per render call: {r['frames_per_s']:.1f} frames/s against "
                         f"{one[r['batch']]['frames_per_s']:.1f} with one ({100 * gain:+.0f} %)")
    base = (eager.get("result") or {}).get("dtype", "?")
    for r in _rows(eager, "rows_bf16"):
        if r["batch"] in one:
            lines.append(f"bf16 at batch {r['batch']}: {r['frames_per_s']:.1f} frames/s ({base} {one[r['batch']]['frames_per_s']:.1f})")
    prec = stages.get("precision", {}).get("result", {}) or {}
    for dt in ("fp16", "bf16"):
        if isinstance(prec.get(dt), dict):
            r = prec[dt]
            lines.append(f"{dt} against fp32: {r['psnr_db']:.1f} dB PSNR of decoded faces (worst frame {r['psnr_db_worst_frame']:.1f}, "
                         f"VAE decode alone {r['psnr_db_vae_only']:.1f}), {r['nonfinite']} non-finite")
    mem = _rows(stages.get("memory", {}))
    if len(mem) >= 2 and "engine_mb" in mem[-1]:
        slope = (mem[-1]["engine_mb"] - mem[0]["engine_mb"]) / max(mem[-1]["sessions"] - mem[0]["sessions"], 1)
        lines.append(f"memory: {mem[-1]['engine_mb']:.0f} MB held by the engine at {mem[-1]['sessions']} sessions "
                     f"(+{slope:.1f} MB a session), peak {mem[-1]['peak_mb']:.0f} MB allocated")
    tests = (stages.get("tests", {}).get("result") or {}).get("outcomes")
    if tests:
        c = tests["counts"]
        lines.append(f"tests on the device: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
    bad = [f"{n} {s.get('status')}" for n, s in stages.items() if s.get("status") != "ok"]
    lines.append("stages: all ok" if not bad else "stages not ok: " + ", ".join(bad))
    return lines


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "(none)\n"
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _f(v: Any, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _sweep_table(rows: list[dict[str, Any]]) -> str:
    headers = ["batch", "per call", "frames/s", "render ms", "UNet ms", "VAE ms", "blend ms", "to-host ms", "ring write ms",
               "host wait ms", "TFLOP/s", "25 fps sessions", "peak MB", "first call s"]
    body = []
    for r in rows:
        st = r.get("stage_ms", {})
        body.append([r["batch"], r.get("chunks", 1), _f(r["frames_per_s"]), _f(r["render_ms"]), _f(st.get("unet", 0)),
                     _f(st.get("vae_decode", 0)), _f(st.get("blend", 0), 2), _f(st.get("to_host", 0), 2), _f(st.get("ring_write", 0), 2),
                     _f(st.get("host_wait", 0), 2), _f(r["tflops"], 2), r["sessions_25fps"], _f(r.get("peak_mem_mb", "-"), 0),
                     _f(r.get("warmup_s", 0), 1)])
    return _table(headers, body)


def render_markdown(report: dict[str, Any]) -> str:
    stages = report["stages"]
    md = [f"# MuseTalk GPU check{' (dry run on the CPU: tiny models, the numbers mean nothing)' if report['dry_run'] else ''}\n",
          f"{report['started']}, {report['seconds']} s of a {report['budget_s']:.0f} s budget.\n", "## Summary\n"]
    md += [f"- {line}" for line in report["summary"]]
    md.append("\n## Stages\n")
    md.append(_table(["stage", "status", "seconds", "limit s", "note"],
                     [[n, s.get("status"), s.get("seconds", "-"), s.get("limit_s", "-"), str(s.get("error", ""))[:200]]
                      for n, s in stages.items()]))
    pk = report["packages"]
    md.append("\n## Packages\n")
    md.append(f"Missing before: {', '.join(pk['missing_before']) or 'none'}; wheels installed from {pk['wheels_folder']}: "
              f"{', '.join(pk['installed']) or 'none'}"
              + (f"; still missing: {', '.join(pk.get('missing_after', []))}" if pk.get("missing_after") else "")
              + (f"; {pk['note']}" if pk.get("note") else "") + "\n")
    env = stages.get("env", {}).get("result") or {}
    if env:
        md.append("\n## Machine\n")
        md.append(_table(["what", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                             for k, v in env.items() if not k.startswith("_")]))
    prec = stages.get("precision", {}).get("result") or {}
    if prec:
        md.append(f"\n## Precision: against fp32 on the same random {prec.get('size', '')} weights, {prec.get('frames')} faces\n")
        md.append(f"fp32 faces: {100 * prec.get('fp32_saturated_fraction', 0):.1f} % of pixels clipped at 0 or 255, std "
                  f"{_f(prec.get('fp32_face_std', 0))} levels (random weights decode to noise: PSNR is a numeric check, not a look).\n\n")
        md.append(_table(["dtype", "PSNR dB", "worst frame dB", "VAE decode alone dB", "UNet rel. error", "max level diff", "non-finite"],
                         [[dt, _f(r["psnr_db"]), _f(r["psnr_db_worst_frame"]), _f(r["psnr_db_vae_only"]), f"{r['unet_rel_error']:.2e}",
                           _f(r["max_abs_level_diff"], 0), r["nonfinite"]]
                          for dt in ("fp16", "bf16") if isinstance(r := prec.get(dt), dict)]))
    titles = {
        "rows": "one batch per render call", "rows_2_chunks": "two batches per render call (pipelined)",
        "rows_no_overlap": "copies back on the compute stream (overlap=False)", "rows_bf16": "bf16",
    }
    for name in ("bench-eager", "bench-cudagraph", "bench-compile"):
        res = stages.get(name, {}).get("result") or {}
        if not res:
            continue
        md.append(f"\n## {name}: runner {res.get('runner')}, {res.get('dtype', 'fp16')}, {res.get('frame', '')} frames\n")
        facts = [f"{k} {_f(res[k], 2)}" for k in ("build_s", "setup_s", "features_ms_per_frame", "gflop_per_frame_used") if k in res]
        facts += [str(res["fallback"])] if res.get("fallback") else []
        if facts:
            md.append("; ".join(facts) + " (ms per stage are per batch; render ms per call; first call s: warm-up, compile included)\n")
        for key, title in titles.items():
            if res.get(key):
                md.append(f"\n{title}:\n\n" + _sweep_table(res[key]))
    mem = _rows(stages.get("memory", {}))
    if mem:
        res = stages["memory"]["result"]
        md.append(f"\n## Device memory as sessions grow (weights {_f(res.get('weights_mb', '-'), 0)} MB; avatars {res.get('avatar')})\n")
        keys = ["sessions", "frames_rendered", "engine_mb", "patch_bank_mb", "peak_mb", "reserved_mb"]
        md.append(_table(keys, [[_f(r.get(k, "-"), 0) for k in keys] for r in mem]))
    tests = stages.get("tests", {}).get("result") or {}
    if tests:
        md.append(f"\n## Tests on the device\n\n`{tests.get('command', '')}`: {tests.get('summary', '')}\n")
        problems = (tests.get("outcomes") or {}).get("problems", [])
        if problems:
            md.append("\n" + _table(["test", "kind", "message"],
                                     [[p["test"], p["kind"], p["message"].replace("|", "/")] for p in problems]))
    for name, s in stages.items():
        if s.get("traceback"):
            md.append(f"\n## {name} error\n\n```\n{s['traceback'][-1500:]}\n```\n")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
