"""The server's handle on the inference worker process.

Starts the worker with spawn, sends it messages, and hands what it sends back to its
handler on the asyncio loop. A reader thread blocks on the result queue (so the event
loop never does) and also notices when the worker dies; the client then starts a new one
with new queues (a queue whose other end died holding its lock is not safe to reuse) and
tells its handler, which re-opens the live sessions.

``WorkerLink`` is what the server needs of a worker and ``WorkerHandler`` what a worker
needs of the server; the server's tests put a stand-in on either side.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Protocol

from pipeline.messages import FromWorker, Shutdown, ToWorker, WorkerError, WorkerReady
from pipeline.worker import WorkerConfig, run_worker

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2


class WorkerStartError(RuntimeError):
    pass


class WorkerHandler(Protocol):
    """The side that owns the sessions: told every message, and every restart."""

    def on_worker_message(self, msg: FromWorker) -> None: ...

    async def on_worker_restart(self) -> None: ...


class WorkerLink(Protocol):
    """What the server uses of the worker (``WorkerClient``, or a test's stand-in)."""

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def ready_info(self) -> WorkerReady | None: ...

    async def start(self) -> WorkerReady: ...

    def send(self, msg: ToWorker) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...


class WorkerClient:
    def __init__(self, config: WorkerConfig, handler: WorkerHandler, start_timeout: float = 300.0) -> None:
        self.config = config
        self._handler = handler
        self._start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._process: BaseProcess | None = None
        self._inbox: Queue[ToWorker] | None = None
        self._outbox: Queue[FromWorker] | None = None
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[WorkerReady] | None = None
        self._closing = False
        self._ready_info: WorkerReady | None = None
        self._restarts = 0
        self._restart_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def ready_info(self) -> WorkerReady | None:
        return self._ready_info

    async def start(self) -> WorkerReady:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        inbox: Queue[ToWorker] = self._ctx.Queue()
        outbox: Queue[FromWorker] = self._ctx.Queue()
        self._inbox, self._outbox = inbox, outbox
        process = self._ctx.Process(target=run_worker, args=(self.config, inbox, outbox), name="lipsync-worker", daemon=True)
        self._process = process
        process.start()
        self._stop_reader = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(self._loop, process, outbox, self._stop_reader), name="worker-reader", daemon=True
        )
        self._reader.start()
        try:
            ready = await asyncio.wait_for(self._ready, self._start_timeout)
        except asyncio.TimeoutError as exc:
            await self._kill()
            raise WorkerStartError(f"the {self.config.engine} worker did not start within {self._start_timeout:.0f} s") from exc
        except WorkerStartError:
            await self._kill()
            raise
        self._ready_info = ready
        log.info("worker pid %s ready: engine %s, batches of up to %d", self.pid, ready.engine, ready.max_batch)
        return ready

    def send(self, msg: ToWorker) -> None:
        """Non-blocking: multiprocessing queues hand the pickling to a feeder thread."""
        if self._inbox is not None:
            self._inbox.put(msg)

    def _read(
        self, loop: asyncio.AbstractEventLoop, process: BaseProcess, outbox: Queue[FromWorker], stop: threading.Event
    ) -> None:
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

    def _dispatch(self, msg: FromWorker) -> None:
        if self._ready is not None and not self._ready.done():
            if isinstance(msg, WorkerReady):
                self._ready.set_result(msg)
                return
            if isinstance(msg, WorkerError) and not msg.session_id:
                self._ready.set_exception(WorkerStartError(msg.message))
                return
        try:
            self._handler.on_worker_message(msg)
        except Exception:
            log.exception("handling worker message %r failed", type(msg).__name__)

    def _died(self, process: BaseProcess) -> None:
        if self._closing or process is not self._process:
            return
        code = process.exitcode
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerStartError(f"the worker exited during start-up (exit code {code})"))
            return
        log.error("worker pid %s died (exit code %s); starting a new one", process.pid, code)
        self._restart_task = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        self._stop_reader.set()
        self._restarts += 1
        delay = min(5.0, 0.5 * self._restarts)
        started = time.monotonic()
        while not self._closing:
            try:
                await self.start()
                break
            except WorkerStartError as exc:
                log.error("worker restart failed: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        if not self._closing:
            log.info("worker back after %.2f s", time.monotonic() - started)
            await self._handler.on_worker_restart()

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
