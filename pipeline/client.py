"""The server's handle on the inference worker process.

Starts the worker with spawn, sends it messages, and hands what it sends back to the
asyncio loop. A reader thread blocks on the result queue (so the event loop never
does) and also notices when the worker dies; the client then starts a new one with new
queues (a queue whose other end died holding its lock is not safe to reuse) and tells
its owner, who re-opens the live sessions.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.messages import Shutdown, WorkerError, WorkerReady
from pipeline.worker import WorkerConfig, run_worker

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2


class WorkerStartError(RuntimeError):
    pass


class WorkerClient:
    def __init__(
        self,
        config: WorkerConfig,
        on_message: Callable[[Any], None],
        on_restart: Callable[[], Awaitable[None]] | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._on_restart = on_restart
        self._start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._process: mp.process.BaseProcess | None = None
        self._inbox: Any = None
        self._outbox: Any = None
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._closing = False
        self.ready_info: WorkerReady | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def start(self) -> WorkerReady:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._inbox = self._ctx.Queue()
        self._outbox = self._ctx.Queue()
        self._process = self._ctx.Process(
            target=run_worker, args=(self.config, self._inbox, self._outbox), name="lipsync-worker", daemon=True
        )
        self._process.start()
        self._stop_reader = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(self._process, self._outbox, self._stop_reader), name="worker-reader", daemon=True
        )
        self._reader.start()
        try:
            self.ready_info = await asyncio.wait_for(self._ready, self._start_timeout)
        except asyncio.TimeoutError as exc:
            await self._kill()
            raise WorkerStartError(f"the {self.config.engine} worker did not start within {self._start_timeout:.0f} s") from exc
        except WorkerStartError:
            await self._kill()
            raise
        log.info("worker pid %s ready: engine %s %s", self.pid, self.ready_info.engine, self.ready_info.info)
        return self.ready_info

    def send(self, msg: Any) -> None:
        """Non-blocking: multiprocessing queues hand the pickling to a feeder thread."""
        if self._inbox is not None:
            self._inbox.put(msg)

    def _read(self, process: Any, outbox: Any, stop: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        while not stop.is_set():
            try:
                msg = outbox.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                if not process.is_alive():
                    if not stop.is_set():
                        loop.call_soon_threadsafe(self._died, process)
                    return
                continue
            except (EOFError, OSError):
                if not stop.is_set():
                    loop.call_soon_threadsafe(self._died, process)
                return
            loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: Any) -> None:
        if self._ready is not None and not self._ready.done():
            if isinstance(msg, WorkerReady):
                self._ready.set_result(msg)
                return
            if isinstance(msg, WorkerError) and not msg.session_id:
                self._ready.set_exception(WorkerStartError(msg.message))
                return
        try:
            self._on_message(msg)
        except Exception:
            log.exception("handling worker message %r failed", type(msg).__name__)

    def _died(self, process: Any) -> None:
        if self._closing or process is not self._process:
            return
        code = process.exitcode
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerStartError(f"the worker exited during start-up (exit code {code})"))
            return
        log.error("worker pid %s died (exit code %s); starting a new one", process.pid, code)
        asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        self._stop_reader.set()
        self.restarts += 1
        delay = min(5.0, 0.5 * self.restarts)
        started = time.monotonic()
        while not self._closing:
            try:
                await self.start()
                break
            except WorkerStartError as exc:
                log.error("worker restart failed: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        if self._on_restart is not None and not self._closing:
            log.info("worker back after %.2f s", time.monotonic() - started)
            await self._on_restart()

    async def _kill(self) -> None:
        self._stop_reader.set()
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 5)

    async def stop(self, timeout: float = 5.0) -> None:
        self._closing = True
        process = self._process
        if process is None:
            return
        if process.is_alive():
            self.send(Shutdown())
            await asyncio.get_running_loop().run_in_executor(None, process.join, timeout)
        if process.is_alive():
            log.warning("worker did not stop in %.0f s; killing it", timeout)
            process.kill()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 5)
        self._stop_reader.set()
        for q in (self._inbox, self._outbox):
            if q is not None:
                q.cancel_join_thread()
                q.close()
