"""Freed memory is handed back to the system once no session is open (``server.heap``)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

import server.manager
from server.heap import release_free_heap
from tests.support.harness import running_server

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")


@linux_only
def test_freed_heap_pages_held_by_malloc_go_back_to_the_system() -> None:
    # 200 MB in 1 KB blocks (past Python's small-object allocator, so malloc's), with
    # every 16th kept alive: freed, the rest stays in glibc's heap between live blocks.
    blocks = [bytes(1000) + i.to_bytes(4, "little") for i in range(200_000)]
    kept = blocks[::16]
    del blocks
    released = release_free_heap()
    assert released is not None
    assert released.released_mb > 100, released
    assert len(kept) == 12_500


async def test_the_last_session_closing_releases_freed_memory_once_the_server_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(server.manager, "RELEASE_AFTER_S", 0.05)
    monkeypatch.setattr(server.manager, "release_free_heap", lambda: calls.append(1))
    async with running_server(tmp_path) as h:
        first, second = await h.viewer(), await h.viewer()
        await h.manager.close(first.session.id)
        await asyncio.sleep(0.2)
        assert calls == [], "a session is still open"
        await h.manager.close(second.session.id)
        await h.until(lambda: calls == [1])
