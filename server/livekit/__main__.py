"""``python -m server.livekit --url wss://... --token ... [--room NAME]``: one avatar worker.

Runs ``lipsync_livekit`` in the worker's own environment (see ``server.livekit``), with the
same arguments; says how to install it when there is none.
"""
from __future__ import annotations

import os
import sys

from server.livekit import INSTALL_HINT, WORKER_MODULE, worker_python


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    python = worker_python()
    if python is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    os.execv(python, [python, "-m", WORKER_MODULE, *args])  # replaces this process: signals and exit status are the worker's
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
