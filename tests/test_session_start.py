"""A session starts on idle frames while the engine is still making its material for the
avatar (a first use can take longer than a person waits for video); speech sent meanwhile
waits behind the open and is spoken once the worker has it."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import server.manager
from server.errors import ErrorCode
from server.events import ErrorEvent
from tests.support.harness import running_server


async def test_a_session_starts_before_a_slow_engine_has_opened_it_and_speaks_once_it_has(tmp_path: Path) -> None:
    async with running_server(tmp_path, open_delay_s=server.manager.OPEN_GRACE_S + 1.0) as h:
        started = time.monotonic()
        viewer = await h.viewer()
        assert time.monotonic() - started < server.manager.OPEN_GRACE_S + 0.5
        assert not viewer.session.opened.done()
        await h.until(lambda: len(viewer.video) >= 5, timeout=2.0)  # idle video meanwhile
        status, body = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hello there."})
        assert status == 200
        utterance = body["data"]["utterance"]
        await h.until(lambda: bool(viewer.shown(utterance)), timeout=10.0)
        assert viewer.session.opened.done()


async def test_a_session_the_worker_fails_to_open_late_is_closed_with_an_error_event(tmp_path: Path) -> None:
    async with running_server(tmp_path, fail_open=True, open_delay_s=server.manager.OPEN_GRACE_S + 0.5) as h:
        viewer = await h.viewer()
        events = viewer.session.events.subscribe()
        await h.until(lambda: len(h.manager) == 0, timeout=10.0)
        error = await asyncio.wait_for(anext(events), 1.0)
        assert error["event"] == ErrorEvent.kind and error["code"] == int(ErrorCode.WORKER_UNAVAILABLE)
        assert "could not open the session" in error["msg"]
