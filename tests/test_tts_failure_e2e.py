"""An online TTS that cannot reach its service: the client hears about it, the session lives on."""
from __future__ import annotations

import pytest

from tests.support.client import AvatarClient

pytestmark = pytest.mark.slow


async def test_unreachable_edge_tts_sends_an_error_event_and_the_session_stays_up(make_server) -> None:
    # A closed local port stands in for "no network", so the test means the same with or without internet.
    srv = make_server("--tts", "edge", "--tts-option", "proxy=http://127.0.0.1:9")
    async with AvatarClient(srv.url) as client:
        await client.connect()
        events = await client.events()
        await events.send("Hello from the cloud.")
        error = await events.until("error", timeout=20)
        assert error["code"] != 0 and "edge-tts" in error["msg"]
        ended = await events.until("speaking_ended", timeout=5)
        assert ended.get("error") is True
        assert await client.is_speaking() is False
        n = len(client.received.video)
        await events.close()
        import asyncio

        await asyncio.sleep(0.5)
        assert len(client.received.video) > n, "the session stopped streaming"
