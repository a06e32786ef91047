"""The one-call GPU check (``./run.sh gpu-check``): its dry run on this CPU goes through
every stage and writes the report; a failing or hanging stage is recorded and the next
one still runs; carried wheels are installed offline only when a module is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, int]:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out))  # the device machine's return folder
    proc = subprocess.run(["bash", "run.sh", "gpu-check", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    return out, proc.stdout, proc.stderr, proc.returncode


# about a minute and a half on two cores: one dry run serves every test below
@pytest.mark.slow
@pytest.mark.timeout(450)
def test_dry_run_goes_through_every_stage_and_writes_one_report(dry_run: tuple[Path, str, str, int]) -> None:
    out, output, errors, code = dry_run
    assert code == 0, (output + errors)[-3000:]
    assert output.splitlines()[0] == f"gpu-check report folder: {out}"  # the folder is named first
    assert {p.name for p in out.iterdir()} <= {"gpu-check.md", "gpu-check.json", "gpu-check.log", "pytest-junit.xml"}
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True
    assert list(report["stages"]) == [s.name for s in gpu_check.STAGES]
    assert all(s["status"] == "ok" for s in report["stages"].values()), report["stages"]
    stages = report["stages"]
    for name in ("bench-eager", "bench-cudagraph", "bench-compile"):
        rows = stages[name]["result"]["rows"]
        assert rows and all(r["frames_per_s"] > 0 and r["stage_ms"]["unet"] > 0 for r in rows)
    assert stages["bench-cudagraph"]["result"]["runner"] == "eager"  # no CUDA: the fallback, said so
    assert stages["bench-eager"]["result"]["rows_2_chunks"] and stages["bench-eager"]["result"]["rows_bf16"]
    for dtype in ("fp16", "bf16"):
        assert 20 < stages["precision"]["result"][dtype]["psnr_db"] < 100
    assert [r["sessions"] for r in stages["memory"]["result"]["rows"]] == [1, 4]
    counts = stages["tests"]["result"]["outcomes"]["counts"]
    assert counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    markdown = (out / "gpu-check.md").read_text()
    for heading in ("## Summary", "## Precision", "## bench-eager", "## Device memory", "## Tests on the device"):
        assert heading in markdown
    assert markdown.strip() in output  # printed too: the device tool returns the output's tail


def _stage(name: str, budget: float, code: str, results: Path) -> tuple[str, float, list[str]]:
    return name, budget, [sys.executable, "-c", code.replace("RESULT", str(results / f"{name}.json"))]


def test_a_failing_crashing_or_hanging_stage_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    plan = [
        _stage("raises", 20, "import json; json.dump({'rows': [1]}, open('RESULT', 'w')); raise SystemExit(3)", results),
        _stage("hangs", 1.5, "import json, time; json.dump({'rows': [2]}, open('RESULT', 'w')); time.sleep(60)", results),
        _stage("fine", 20, "import json; json.dump({'rows': [3]}, open('RESULT', 'w'))", results),
    ]
    started = time.monotonic()
    report = gpu_check.run_stages(plan, dict(os.environ), tmp_path / "log", 60, results)
    assert time.monotonic() - started < 30
    assert [report[n]["status"] for n in ("raises", "hangs", "fine")] == ["failed", "timeout", "ok"]
    # what a stage had measured before it failed or ran out of time is kept
    assert [report[n]["result"]["rows"] for n in ("raises", "hangs", "fine")] == [[1], [2], [3]]
    assert "exit code 3" in report["raises"]["error"] and "limit" in report["hangs"]["error"]


def test_stages_past_the_total_budget_are_skipped_not_run(tmp_path: Path) -> None:
    plan = [_stage("slow", 10, "import time; time.sleep(2.5)", tmp_path), _stage("late", 10, "pass", tmp_path)]
    report = gpu_check.run_stages(plan, dict(os.environ), tmp_path / "log", 6.0, tmp_path)
    assert report["slow"]["status"] == "ok" and report["late"]["status"] == "skipped"


def test_report_renders_partial_and_failed_stages(tmp_path: Path) -> None:
    row = {"batch": 8, "chunks": 1, "frames_per_s": 250.0, "render_ms": 32.0, "features_ms": 1.0, "tflops": 197.5,
           "sessions_25fps": 9, "stage_ms": {"unet": 8.0, "vae_decode": 20.0}, "warmup_s": 3.0}
    stages = {
        "env": {"status": "ok", "result": {"gpu": {"name": "NVIDIA H200"}, "torch": "2.11.0", "matmul_tflops": 780.0}},
        "bench-eager": {"status": "timeout", "error": "over its 90 s limit",
                        "result": {"runner": "eager", "dtype": "float16", "rows": [row]}},
        "tests": {"status": "failed", "error": "pytest exited 1", "result": {"outcomes": {
            "counts": {"passed": 3, "failed": 1, "errors": 0, "skipped": 0},
            "problems": [{"test": "t::x", "kind": "failed", "message": "assert 1 | 2"}]}}},
    }
    report = {"dry_run": False, "started": "now", "seconds": 1.0, "budget_s": 465.0, "stages": stages,
              "packages": {"missing_before": ["diffusers"], "wheels_folder": ".whl", "installed": ["diffusers-0.42.1-py3-none-any.whl"]},
              "summary": gpu_check.summarise(stages, dry=False)}
    markdown = gpu_check.render_markdown(report)
    assert "250.0 frames/s at batch 8" in markdown and "25 % of the matmul ceiling" in markdown
    assert "| bench-eager | timeout |" in markdown and "3 passed, 1 failed" in markdown
    assert "assert 1 / 2" in markdown  # a pipe would break the table


def _wheel(folder: Path, module: str) -> Path:
    """A minimal pure-Python wheel, as pip download leaves them."""
    path = folder / f"{module}-0.1-py3-none-any.whl"
    info = f"{module}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_carried_wheels_are_installed_offline_only_when_a_module_is_missing(tmp_path: Path, monkeypatch) -> None:
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "lipsync_probe_mod")
    monkeypatch.setattr(gpu_check, "NEEDED", {"json": "present anyway"})
    assert gpu_check.ensure_packages(wheels, tmp_path / "site")["installed"] == []
    monkeypatch.setattr(gpu_check, "NEEDED", {"lipsync_probe_mod": "the probe"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    empty = gpu_check.ensure_packages(tmp_path / "nowhere", tmp_path / "site")
    assert empty["installed"] == [] and "gather them" in empty["note"]
    info = gpu_check.ensure_packages(wheels, tmp_path / "site")
    assert info["missing_before"] == ["lipsync_probe_mod"] and info["missing_after"] == [], info
    assert info["pythonpath"] == str(tmp_path / "site") and (tmp_path / "site" / "lipsync_probe_mod").is_dir()


def test_report_folder_is_out_when_set(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.out_dir(None) == tmp_path
    assert gpu_check.out_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("OUT")
    assert gpu_check.out_dir(None).parent == ROOT / "bench" / "out"
