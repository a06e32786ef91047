"""Where MuseTalk's weight files come from, where they live, and whether they are usable.

Everything lives under ``<data>/models/`` in the layout the MuseTalk reference uses, so a
folder fetched by its own ``download_weights.sh`` works here too::

    models/
      musetalk/musetalk.json, pytorch_model.bin          UNet v1.0
      musetalkV15/musetalk.json, unet.pth                UNet v1.5
      sd-vae/config.json, diffusion_pytorch_model.{safetensors,bin}
      whisper/tiny.pt                                    (or HF whisper-tiny: config.json + pytorch_model.bin)
      face-parse-bisent/79999_iter.pth                   optional: blending masks
      dwpose/dw-ll_ucoco_384.pth                         optional: 68 face landmarks via mmpose

``python -m models download`` records each verified file's size and SHA-256 in
``models/manifest.json``. At start-up a file is checked cheaply (present, the recorded
size, and a readable container: zip directory, safetensors header, JSON); a full hash
check is ``python -m models verify``. A file that fails is reported, never replaced by
random weights.

This module imports no torch, so the check runs where torch is not installed. Its errors
are the models' own (``WeightsError``); an engine turns them into its ``EngineUnavailable``.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VERSIONS: tuple[str, ...] = ("v15", "v1")
DEFAULT_VERSION = "v15"
MANIFEST = "manifest.json"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
WHISPER_TINY_SHA256 = "65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9"
WHISPER_TINY_URL = f"https://openaipublic.azureedge.net/main/whisper/models/{WHISPER_TINY_SHA256}/tiny.pt"


@dataclass(frozen=True)
class WeightSpec:
    """One file: where it comes from and where it goes.

    ``repo`` + ``filename`` name a Hugging Face hub file; ``url`` a plain HTTPS one.
    ``size`` / ``sha256`` are set where they are published; otherwise the downloader
    takes them from the hub (an LFS file's ETag is its SHA-256) and records them.
    ``alternatives`` are other local names accepted in its place (a ``.bin`` VAE where
    we fetch ``.safetensors``; the HF layout of whisper-tiny).
    """

    key: str
    role: str  # what the loader uses it as: unet-config, unet, vae-config, vae, whisper, ...
    local: str  # relative to <data>/models
    description: str
    repo: str | None = None
    filename: str | None = None
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    versions: tuple[str, ...] = VERSIONS
    optional: bool = False
    alternatives: tuple[str, ...] = ()
    manual: str = ""  # how to get it by hand when the download source is a mirror

    @property
    def source_url(self) -> str:
        if self.url:
            return self.url
        endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
        return f"{endpoint}/{self.repo}/resolve/main/{self.filename}"


SPECS: tuple[WeightSpec, ...] = (
    WeightSpec("unet-config-v1", "unet-config", "musetalk/musetalk.json", "MuseTalk v1.0 UNet config",
               repo="TMElyralab/MuseTalk", filename="musetalk/musetalk.json", versions=("v1",)),
    WeightSpec("unet-v1", "unet", "musetalk/pytorch_model.bin", "MuseTalk v1.0 UNet weights (3.4 GB)",
               repo="TMElyralab/MuseTalk", filename="musetalk/pytorch_model.bin", versions=("v1",)),
    WeightSpec("unet-config-v15", "unet-config", "musetalkV15/musetalk.json", "MuseTalk v1.5 UNet config",
               repo="TMElyralab/MuseTalk", filename="musetalkV15/musetalk.json", versions=("v15",)),
    WeightSpec("unet-v15", "unet", "musetalkV15/unet.pth", "MuseTalk v1.5 UNet weights (3.4 GB)",
               repo="TMElyralab/MuseTalk", filename="musetalkV15/unet.pth", versions=("v15",)),
    WeightSpec("vae-config", "vae-config", "sd-vae/config.json", "sd-vae-ft-mse config",
               repo="stabilityai/sd-vae-ft-mse", filename="config.json"),
    WeightSpec("vae", "vae", "sd-vae/diffusion_pytorch_model.safetensors", "sd-vae-ft-mse weights (335 MB)",
               repo="stabilityai/sd-vae-ft-mse", filename="diffusion_pytorch_model.safetensors",
               alternatives=("sd-vae/diffusion_pytorch_model.bin",)),
    WeightSpec("whisper", "whisper", "whisper/tiny.pt", "Whisper tiny (openai-whisper checkpoint, 75 MB)",
               url=WHISPER_TINY_URL, sha256=WHISPER_TINY_SHA256,
               alternatives=("whisper/model.safetensors", "whisper/pytorch_model.bin")),
    WeightSpec("face-parsing", "face-parsing", "face-parse-bisent/79999_iter.pth", "BiSeNet face parsing (optional, 51 MB)",
               repo="vivym/face-parsing-bisenet", filename="79999_iter.pth", optional=True,
               manual="the original is zllrunning/face-parsing.PyTorch's Google Drive file "
                      "154JgKpzCPW82qINcVieuPH3fZ2e0P812 (gdown --id 154JgKpzCPW82qINcVieuPH3fZ2e0P812)"),
    WeightSpec("dwpose", "dwpose", "dwpose/dw-ll_ucoco_384.pth", "DWPose whole-body landmarks (optional, needs mmpose)",
               repo="yzd-v/DWPose", filename="dw-ll_ucoco_384.pth", optional=True),
)
OPTIONAL_KEYS: tuple[str, ...] = tuple(s.key for s in SPECS if s.optional)


def models_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / "models"


def spec(key: str) -> WeightSpec:
    for s in SPECS:
        if s.key == key:
            return s
    raise KeyError(f"no weight file {key!r}; known: {', '.join(s.key for s in SPECS)}")


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown MuseTalk version {version!r}; choose one of {', '.join(VERSIONS)}")
    return version


def specs_for(version: str, optional: tuple[str, ...] = ()) -> list[WeightSpec]:
    """The files ``version`` needs, plus the optional ones named."""
    check_version(version)
    return [s for s in SPECS if version in s.versions and (not s.optional or s.key in optional)]


def download_command(version: str, data_dir: Path | str | None = None) -> str:
    cmd = f"python -m models download --version {version}"
    if data_dir is not None and Path(data_dir) != Path("data"):
        cmd += f" --data-dir {data_dir}"
    return cmd


# ---- manifest ------------------------------------------------------------------------


def read_manifest(data_dir: Path | str) -> dict[str, dict]:
    path = models_dir(data_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def record_in_manifest(data_dir: Path | str, local: str, size: int, sha256: str | None, source: str = "") -> None:
    """Note a verified file (the downloader does this; so do the tests' checkpoint writers)."""
    root = models_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data_dir)
    manifest[local] = {"size": int(size), "sha256": sha256, "source": source}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(root / MANIFEST)


# ---- checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightProblem:
    spec: WeightSpec
    path: Path
    reason: str  # "missing" | "corrupt"
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.reason}: {self.path}{extra}"


def resolve(data_dir: Path | str, s: WeightSpec) -> Path | None:
    """The file present for ``s`` (its own name first, then the alternatives), or None."""
    root = models_dir(data_dir)
    for rel in (s.local, *s.alternatives):
        p = root / rel
        if p.is_file():
            return p
    return None


def structure_problem(path: Path) -> str:
    """Why ``path`` cannot be a complete weight file, or "" if it looks whole.

    Cheap checks that catch the usual damage (a truncated or interrupted download,
    an HTML error page saved under the weight's name) without reading gigabytes.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    name = path.name
    with path.open("rb") as f:
        head = f.read(8)
    if name.endswith(".json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return f"not valid JSON: {exc}"
        return ""
    if name.endswith(".safetensors"):
        if size < 8:
            return "too short for a safetensors file"
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            return "safetensors header runs past the end of the file"
        with path.open("rb") as f:
            f.seek(8)
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return "unreadable safetensors header"
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            return f"size {size} does not match its header ({8 + n + max(ends, default=0)}): truncated?"
        return ""
    # torch.save: a zip archive since torch 1.6 (its central directory is at the end,
    # so a truncated file fails this), or the legacy pickle format (starts 0x80).
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                if not z.namelist():
                    return "empty zip archive"
        except zipfile.BadZipFile as exc:
            return f"damaged zip archive ({exc}): truncated?"
        return ""
    if head[:1] == b"\x80":
        return ""
    if head.lstrip()[:1] in (b"<", b"{"):
        return "looks like an HTML/JSON error page, not weights"
    return "not a PyTorch checkpoint"


def file_problem(data_dir: Path | str, s: WeightSpec) -> WeightProblem | None:
    path = resolve(data_dir, s)
    if path is None:
        return WeightProblem(s, models_dir(data_dir) / s.local, "missing")
    rel = path.relative_to(models_dir(data_dir)).as_posix()
    recorded = read_manifest(data_dir).get(rel)
    size = path.stat().st_size
    expected = (recorded or {}).get("size") or (s.size if rel == s.local else None)
    if expected is not None and size != int(expected):
        return WeightProblem(s, path, "corrupt", f"{size} bytes, expected {expected}")
    why = structure_problem(path)
    if why:
        return WeightProblem(s, path, "corrupt", why)
    return None


def check_weights(data_dir: Path | str, version: str = DEFAULT_VERSION, optional: tuple[str, ...] = ()) -> list[WeightProblem]:
    """Every required file of ``version`` (and the ``optional`` ones named) that is
    missing or damaged; empty when all are usable."""
    return [p for s in specs_for(version, optional) if (p := file_problem(data_dir, s)) is not None]


def optional_present(data_dir: Path | str, key: str) -> Path | None:
    """The optional file ``key`` if it is present and looks whole, else None."""
    s = spec(key)
    problem = file_problem(data_dir, s)
    if problem is None:
        return resolve(data_dir, s)
    if problem.reason == "corrupt":
        log.warning("ignoring %s: %s; re-fetch it with python -m models download --with %s", s.description, problem, key)
    return None


class WeightsError(RuntimeError):
    """Weight files that cannot serve: missing, damaged, or not the expected weights."""


class MissingWeights(WeightsError):
    """Weights missing or damaged. The message names the command that fetches them."""

    def __init__(self, version: str, data_dir: Path | str, problems: list[WeightProblem]) -> None:
        self.version = version
        self.data_dir = Path(data_dir)
        self.problems = list(problems)
        lines = "; ".join(str(p) for p in self.problems) or "weights unusable"
        super().__init__(
            f"MuseTalk {version} weights are not usable under {models_dir(data_dir)}: {lines}. "
            f"Fetch them with: {download_command(version, data_dir)}"
        )


def require_weights(data_dir: Path | str, version: str) -> dict[str, Path]:
    """``role -> path`` of ``version``'s files, or MissingWeights naming what is wrong."""
    problems = check_weights(data_dir, version)
    if problems:
        raise MissingWeights(version, data_dir, problems)
    paths: dict[str, Path] = {}
    for s in specs_for(version):
        path = resolve(data_dir, s)
        if path is None:  # removed since the check
            raise MissingWeights(version, data_dir, [WeightProblem(s, models_dir(data_dir) / s.local, "missing")])
        paths[s.role] = path
    return paths
