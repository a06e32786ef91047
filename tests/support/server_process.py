"""Start ``python -m server`` on a free loopback port and wait until it answers.

Used by the benchmarks and the test suite, so both measure the server as users run it.
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *args: str, log_path: Path | None = None, python: str | Path | None = None) -> None:
        """``python``: the environment to run the server from (default: this one; the
        integrations' tests run in environments of their own and pass the main one's)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or self.data_dir / f"server-{self.port}.log"
        defaults = {"--engine": "cpu", "--tts": "espeak"}
        extra = [x for k, v in defaults.items() if k not in args for x in (k, v)]
        cmd = [
            str(python or sys.executable), "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), *extra, *args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the server's lifetime, closed by stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
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

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as r:
            return json.load(r)["data"]

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

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
