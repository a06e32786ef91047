"""Which device and precision the MuseTalk tests run on.

``LIPSYNC_TEST_DEVICE`` (default ``cpu``) and ``LIPSYNC_TEST_DTYPE`` (default ``fp32``:
the tests' tolerances are float32's, so CUDA runs them with TF32 off too). Tests written
for it ask ``musetalk_test_device()``.

As a pytest plugin it also moves the older MuseTalk tests, which construct their engines
with ``device="cpu"``, onto that device without touching them: ``MuseTalkEngine`` then
resolves "cpu" to the test device and "auto" precision to the test dtype.

    LIPSYNC_TEST_DEVICE=cuda python -m pytest -p tests.support.device_select tests/test_musetalk_engine.py

With the variable unset (or ``cpu``) the plugin changes nothing. With
``LIPSYNC_TEST_RESULTS=path`` it also appends each test's outcome to ``path`` as a JSON
line as soon as it is known, so a run cut off by a time limit still says what it saw
(the GPU check reads it).
"""
from __future__ import annotations

import json
import os
from typing import Any

ENV_DEVICE = "LIPSYNC_TEST_DEVICE"
ENV_DTYPE = "LIPSYNC_TEST_DTYPE"
ENV_RESULTS = "LIPSYNC_TEST_RESULTS"


def musetalk_test_device() -> str:
    return os.environ.get(ENV_DEVICE, "").strip() or "cpu"


def musetalk_test_dtype() -> str:
    return os.environ.get(ENV_DTYPE, "").strip() or "fp32"


def on_cuda() -> bool:
    return musetalk_test_device().startswith("cuda")


def redirect_engines() -> bool:
    """Point ``MuseTalkEngine``'s device and dtype choice at the test device; False when
    there is nothing to redirect (CPU, or no torch)."""
    device, dtype = musetalk_test_device(), musetalk_test_dtype()
    if device == "cpu":
        return False
    try:
        import torch

        from pipeline.engines.musetalk import engine as module
    except ImportError:
        return False
    if getattr(module.pick_device, "_redirected", False):
        return True
    pick_device, pick_dtype = module.pick_device, module.pick_dtype

    def redirected_device(name: str) -> torch.device:
        return pick_device(device if name == "cpu" else name)

    def redirected_dtype(name: str, device: torch.device) -> torch.dtype:
        return pick_dtype(dtype if name == "auto" else name, device)

    redirected_device._redirected = True  # type: ignore[attr-defined]  # a marker: redirect once
    module.pick_device = redirected_device
    module.pick_dtype = redirected_dtype
    if device.startswith("cuda"):
        # float32 means float32 here: cuDNN would otherwise run convolutions in TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return True


# ---- pytest plugin hooks (``-p tests.support.device_select``) ----


def pytest_configure(config: Any) -> None:
    redirect_engines()


def pytest_report_header(config: Any) -> str:
    return f"MuseTalk tests on {musetalk_test_device()} ({musetalk_test_dtype()}; {ENV_DEVICE}, {ENV_DTYPE})"


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get(ENV_RESULTS)
    # a test's outcome is its call phase's, or a setup/teardown phase that did not pass
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    message = ""
    if report.outcome != "passed":
        lines = str(report.longrepr).strip().splitlines() if report.longrepr else []
        # the assertion or exception line ("E   ...") says most; else the last line
        message = next((ln[1:].strip() for ln in lines if ln.startswith("E ")), lines[-1] if lines else "")
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome, "seconds": round(report.duration, 2),
            "message": message[:300]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
