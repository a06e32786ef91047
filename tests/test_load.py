"""A short load run (``python -m bench load``'s own code): real aiortc clients, each in
its own process, talk, interrupt, upload audio, leave and are replaced; the server keeps
delivering frames and, once they have all left, gives back the descriptors and the
shared-memory rings their sessions took, and the memory they freed."""
from __future__ import annotations

import pytest

from bench.load_bench import LoadOptions, run_load, summarize
from tests.support import proc_stats

pytestmark = pytest.mark.slow


async def test_short_load_delivers_frames_and_gives_back_fds_rings_and_memory(make_server) -> None:
    srv = make_server("--max-sessions", "4")
    opts = LoadOptions(
        clients=2, seconds=12.0, session_seconds=5.0, min_session_s=3.0, settle_s=5.0,
        think=(0.2, 0.5), mix={"say": 2.0, "interrupt": 1.0, "upload": 1.0}, seed=7,
    )
    report = await run_load(srv.url, opts, srv.proc.pid)
    s = summarize(report)

    assert srv.proc.poll() is None, f"the server died under load:\n{srv.log()}"
    assert not s["failed"], [c["error"] for c in s["failed"]]
    assert s["worker_restarts"] == 0
    clients = report["clients"]
    assert len(clients) >= 4, "each slot's first client should have left and been replaced"
    for c in clients:
        # 25 frames a second while connected; a loaded 2-core machine may skip a few
        assert c["frames"] >= 0.7 * 25 * c["seconds"], c
    assert s["latency"]["text_ms"], "no speech reached any client"
    assert sum(c["actions"]["upload"] + c["actions"]["interrupt"] for c in clients) > 0

    start, end = s["start"], s["end"]
    assert end["sessions"] == 0
    assert end["shm_entries"] == start["shm_entries"] == 0, "a session's ring outlived it"
    assert not report["samples"][-1]["shm_entries"]
    left = proc_stats.shm_entries()
    assert not any(name[len("lipsync_"):].split("_")[0] in {c.get("session_id") for c in clients} for name in left)
    assert end["server"]["fds"] == start["server"]["fds"], (start["server_fd_kinds"], end["server_fd_kinds"])
    assert end["worker"]["fds"] == start["worker"]["fds"]
    # the heap the sessions freed is handed back once none is open (server.heap)
    assert end["server"]["anon_kb"] <= start["server"]["anon_kb"] + 40 * 1024, (start["server"], end["server"])
