"""The server's handle on the inference worker process.

Starts the worker with spawn, sends it messages, and hands what it sends back to its
handler on the asyncio loop. A reader thread blocks on the result queue (so the event
loop never does) and also notices when the worker dies or hangs; the client then starts a
new one with new queues (a queue whose other end died holding its lock is not safe to
reuse) and tells its handler, which re-opens the live sessions.

A hang is silence: the worker sends a ``Heartbeat`` from a thread of its own about twice a
second, so once it is ready, a worker that sends nothing for ``heartbeat_s`` (stopped,
wedged in a call that holds the GIL, swapped out for good) is killed with SIGKILL and
replaced exactly as if it had crashed. A long render is not silence: the heartbeat
thread keeps beating through it. Before the worker is ready the start timeout applies
instead, so loading a large engine is never mistaken for a hang.

Starting a worker (creating its queues, spawning the process: a fork and exec of the
whole server process) runs on a thread of the client's own, so a restart does not freeze
the event loop, and with it every session's video.

``WorkerLink`` is what the server needs of a worker and ``WorkerHandler`` what a worker
needs of the server; the server's tests put a stand-in on either side.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any, Protocol, TypeAlias

from pipeline.messages import FromWorker, Heartbeat, Shutdown, ToWorker, WorkerError, WorkerReady
from pipeline.worker import HEARTBEAT_EVERY_S, WorkerConfig, run_worker

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2
DEFAULT_HEARTBEAT_S = 5.0
MIN_HEARTBEAT_S = 2 * HEARTBEAT_EVERY_S  # a shorter bound would take one late beat for a hang


class WorkerStartError(RuntimeError):
    pass


class WorkerHandler(Protocol):
    """The side that owns the sessions: told every message (heartbeats excepted), and every restart."""

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


_Spawned: TypeAlias = tuple[BaseProcess, "Queue[ToWorker]", "Queue[FromWorker]"]


class WorkerClient:
    """``heartbeat_s``: a ready worker silent this long is killed and replaced (None: never)."""

    def __init__(
        self,
        config: WorkerConfig,
        handler: WorkerHandler,
        start_timeout: float = 300.0,
        heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
    ) -> None:
        if heartbeat_s is not None and heartbeat_s < MIN_HEARTBEAT_S:
            raise ValueError(f"heartbeat_s must be at least {MIN_HEARTBEAT_S} s: the worker beats every {HEARTBEAT_EVERY_S} s")
        self.config = config
        self._handler = handler
        self._start_timeout = start_timeout
        self._heartbeat_s = heartbeat_s
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
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None

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
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ready = loop.create_future()
        if self._spawner is None:
            # a thread of our own: a restart never waits behind the default executor's work
            self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spawn")
        old_reader = self._reader
        spawning = loop.run_in_executor(self._spawner, self._spawn, old_reader)
        try:
            process, inbox, outbox = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(_kill_spawned)  # stopped mid-spawn: the new process must not outlive us
            raise
        except Exception as exc:  # fork failed (out of memory, process limit): worth retrying
            raise WorkerStartError(f"could not start the worker process: {type(exc).__name__}: {exc}") from exc
        self._retire_queues()
        self._process, self._inbox, self._outbox = process, inbox, outbox
        self._stop_reader = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(loop, process, outbox, self._stop_reader), name="worker-reader", daemon=True
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

    def _spawn(self, old_reader: threading.Thread | None) -> _Spawned:
        """The blocking part of a start, on the spawner thread: the last worker's reader
        finishing, new queues, and the fork and exec of the new process."""
        if old_reader is not None:
            old_reader.join(2 * READ_TIMEOUT_S + 1)  # it has reported the death and is returning
        inbox: Queue[ToWorker] = self._ctx.Queue()
        outbox: Queue[FromWorker] = self._ctx.Queue()
        process = self._ctx.Process(target=run_worker, args=(self.config, inbox, outbox), name="lipsync-worker", daemon=True)
        try:
            process.start()
        except BaseException:
            _close_queues(inbox, outbox)
            raise
        return process, inbox, outbox

    def send(self, msg: ToWorker) -> None:
        """Non-blocking: multiprocessing queues hand the pickling to a feeder thread. While
        a worker is being replaced, messages are dropped: the new one starts from nothing
        and the handler re-opens its sessions when it is ready."""
        if self._inbox is not None:
            self._inbox.put(msg)

    def _read(
        self, loop: asyncio.AbstractEventLoop, process: BaseProcess, outbox: Queue[FromWorker], stop: threading.Event
    ) -> None:
        heard = time.monotonic()
        ready = False  # the heartbeat bound applies once the worker is ready
        slow = False  # the loop was last reported busy for longer than the heartbeat bound
        limit = self._heartbeat_s
        while not stop.is_set():
            try:
                msg = outbox.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                if not process.is_alive():
                    if not stop.is_set():
                        _post(loop, self._died, process, None)
                    return
                silent = time.monotonic() - heard
                if ready and limit is not None and silent > limit and not stop.is_set():
                    process.kill()  # SIGKILL: a stopped process cannot catch it, and dies when continued
                    process.join(5)
                    _post(loop, self._died, process, f"sent nothing for {silent:.1f} s (hung or stopped); killed it")
                    return
                continue
            except (EOFError, OSError):
                if not stop.is_set():
                    _post(loop, self._died, process, None)
                return
            heard = time.monotonic()
            if isinstance(msg, Heartbeat):
                busy = limit is not None and msg.busy_s > limit
                if busy and not slow:
                    log.warning("worker pid %s has been busy in one pass of its loop for %.1f s (still beating)", msg.pid, msg.busy_s)
                slow = busy
                continue
            if isinstance(msg, WorkerReady):
                ready = True
            _post(loop, self._dispatch, msg)

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

    def _died(self, process: BaseProcess, why: str | None) -> None:
        if self._closing or process is not self._process:
            return
        why = why or f"died (exit code {process.exitcode})"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerStartError(f"the worker exited during start-up (exit code {process.exitcode})"))
            return
        log.error("worker pid %s %s; starting a new one", process.pid, why)
        self._retire_queues()  # nothing more goes to a dead worker
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

    def _retire_queues(self) -> None:
        """Close the current worker's queues (its reader has stopped using them)."""
        inbox, outbox = self._inbox, self._outbox
        self._inbox = self._outbox = None
        _close_queues(inbox, outbox)

    async def _kill(self) -> None:
        self._stop_reader.set()
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 5)

    async def stop(self, timeout: float = 5.0) -> None:
        self._closing = True
        restart = self._restart_task
        if restart is not None and not restart.done():
            restart.cancel()
            await asyncio.gather(restart, return_exceptions=True)
        process = self._process
        if process is not None:
            if process.is_alive():
                self.send(Shutdown())
                await asyncio.get_running_loop().run_in_executor(None, process.join, timeout)
            if process.is_alive():
                log.warning("worker did not stop in %.0f s; killing it", timeout)
                process.kill()
                await asyncio.get_running_loop().run_in_executor(None, process.join, 5)
        self._stop_reader.set()
        reader = self._reader
        if reader is not None:  # before its queue closes: a closed descriptor may be reused under it
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 2 * READ_TIMEOUT_S + 1)
        self._retire_queues()
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
            self._spawner = None


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Run ``callback`` on the loop, from the reader thread; nothing if the loop is gone."""
    with contextlib.suppress(RuntimeError):  # the loop was closed under us (a test ending without stop())
        loop.call_soon_threadsafe(callback, *args)


def _close_queues(*queues: Queue[Any] | None) -> None:
    for q in queues:
        if q is not None:
            q.cancel_join_thread()  # a feeder stuck on a dead reader must not hold up exit
            q.close()


def _kill_spawned(spawning: asyncio.Future[_Spawned]) -> None:
    if spawning.cancelled() or spawning.exception() is not None:
        return
    process, inbox, outbox = spawning.result()
    process.kill()
    _close_queues(inbox, outbox)
