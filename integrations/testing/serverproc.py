"""Start the repository's server (``python -m server``, from the main environment) for the
integrations' tests (pipecat, LiveKit): their environments have the framework, not the server's packages."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
# the main environment's python (./run.sh makes it; LIPSYNC_VENV as in run.sh), relative to the repository
SERVER_PYTHON = ROOT / (os.environ.get("LIPSYNC_SERVER_PYTHON") or Path(os.environ.get("LIPSYNC_VENV", ".venv"), "bin", "python"))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / f"server-{self.port}.log"
        cmd = [str(SERVER_PYTHON), "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(data_dir), "--engine", "cpu", "--tts", "espeak", *args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the server's lifetime
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/digital_human/check", timeout=1) as r:
                    if json.load(r).get("status") == "Server is running":
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
