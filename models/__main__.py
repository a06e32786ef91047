"""``python -m models download|check|verify``: get MuseTalk's weights and check them.

    python -m models download [--version v15|v1|all] [--with face-parsing] [--with dwpose]
    python -m models check    [--version v15|v1|all]     # fast: present, size, container
    python -m models verify   [--version v15|v1|all]     # slow: full SHA-256
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .weights import DEFAULT_VERSION, OPTIONAL_KEYS, VERSIONS, check_weights, models_dir

log = logging.getLogger("models")


def _versions(arg: str) -> list[str]:
    return list(VERSIONS) if arg == "all" else [arg]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models", description="MuseTalk weight files: download and check.")
    p.add_argument("command", choices=["download", "check", "verify"])
    p.add_argument("--version", default=DEFAULT_VERSION, choices=[*VERSIONS, "all"],
                   help="MuseTalk version (default %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LIPSYNC_DATA_DIR", "data")),
                   help="data directory; weights go to DATA_DIR/models (env LIPSYNC_DATA_DIR)")
    p.add_argument("--with", dest="optional", action="append", default=[], choices=[*OPTIONAL_KEYS, "all"],
                   help="also fetch an optional file: face-parsing (better blending masks), dwpose (needs mmpose)")
    p.add_argument("--endpoint", default=None, help="Hugging Face hub or mirror (default $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optional = tuple(OPTIONAL_KEYS) if "all" in a.optional else tuple(a.optional)
    status = 0
    for version in _versions(a.version):
        if a.command == "download":
            from .download import DownloadError, download_weights

            try:
                download_weights(a.data_dir, version, optional, endpoint=a.endpoint, progress=not a.quiet, force=a.force)
            except DownloadError as exc:
                log.error("%s", exc)
                return 1
            problems = check_weights(a.data_dir, version, optional)
        elif a.command == "verify":
            from .download import verify_weights

            problems = verify_weights(a.data_dir, version, optional)
        else:
            problems = check_weights(a.data_dir, version, optional)
        if problems:
            status = 1
            log.error("MuseTalk %s: %d problem(s) under %s:", version, len(problems), models_dir(a.data_dir))
            for p in problems:
                log.error("  %s", p)
            extra = "".join(f" --with {p.spec.key}" for p in problems if p.spec.optional)
            log.error("fix with: python -m models download --version %s --data-dir %s%s", version, a.data_dir, extra)
        else:
            log.info("MuseTalk %s: all weights present under %s", version, models_dir(a.data_dir))
    return status


if __name__ == "__main__":
    sys.exit(main())
