"""LiveKit: this server as the face of a LiveKit voice agent.

The avatar worker itself (``integrations/livekit``, module ``lipsync_livekit``) lives in an
environment of its own: livekit 1.1.21, which livekit-agents 1.8.9 pins, needs protobuf >= 5
and this server's mediapipe 0.10.21 needs protobuf < 5, so the two cannot share one. The
worker is a client of this server (``/offer`` for the frames, ``/audio_stream`` for the
agent's speech), so it needs nothing of the server's. What lives here runs in the server's
environment: finding that worker's Python (``worker_python``), ``python -m server.livekit``
handing over to it, and the ``/livekit/launch`` route starting one worker per request.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

WORKER_MODULE = "lipsync_livekit"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV_PYTHON = REPO_ROOT / "integrations" / "livekit" / ".venv" / "bin" / "python"
INSTALL_HINT = (
    "the LiveKit avatar worker is not installed: it needs an environment of its own (livekit needs protobuf >= 5, "
    "this server's mediapipe protobuf < 5): python3 -m venv integrations/livekit/.venv && "
    "integrations/livekit/.venv/bin/pip install -e integrations/livekit "
    "(or set LIPSYNC_LIVEKIT_PYTHON to a Python that has lipsync-livekit installed)"
)


def worker_python(configured: str | None = None) -> str | None:
    """The Python that runs the worker: ``configured`` (or ``LIPSYNC_LIVEKIT_PYTHON``), else
    ``integrations/livekit/.venv`` when it exists; None when there is none."""
    chosen = configured or os.environ.get("LIPSYNC_LIVEKIT_PYTHON")
    if chosen:
        return shutil.which(chosen) or (chosen if Path(chosen).is_file() else None)
    return str(DEFAULT_VENV_PYTHON) if DEFAULT_VENV_PYTHON.is_file() else None
