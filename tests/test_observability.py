"""What an operator watches: /metrics in Prometheus' format, /health, and the session id
on the log lines about a session. In-process (``tests/support/harness.py``)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.harness import ToneTTS, running_server


async def test_metrics_expose_sessions_latency_and_errors_without_session_ids(tmp_path: Path) -> None:
    async with running_server(tmp_path) as h:
        viewer = await h.viewer()
        viewer.session.say("Counted.")
        await h.until(lambda: not viewer.session.is_speaking)
        await h.post("/human", {"sessionid": "nope", "text": "x"})  # a 404
        async with h.client.get("/metrics") as resp:
            text = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/plain"
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert values["lipsync_sessions"] == "1" and values["lipsync_worker_up"] == "1"
        assert values["lipsync_first_frame_seconds_count"] == "1" and values["lipsync_utterances_total"] == "1"
        assert float(values["lipsync_first_frame_seconds_sum"]) > 0
        assert values['lipsync_http_errors_total{status="404"}'] == "1"
        assert "# TYPE lipsync_first_frame_seconds histogram" in text
        assert viewer.session.id not in text


async def test_metrics_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    async with running_server(tmp_path, token="t0k") as h:
        async with h.client.get("/metrics") as resp:
            assert resp.status == 401
        async with h.client.get("/metrics", headers={"Authorization": "Bearer t0k"}) as resp:
            assert resp.status == 200


async def test_health_says_whether_the_worker_runs(tmp_path: Path) -> None:
    async with running_server(tmp_path, token="t0k") as h:  # open even with a token: load balancers ask it
        async with h.client.get("/health") as resp:
            body = await resp.json()
        assert resp.status == 200 and body["data"]["worker"]["alive"] is True
        await h.worker.stop()
        async with h.client.get("/health") as resp:
            body = await resp.json()
        assert resp.status == 503 and body["data"]["ok"] is False and "worker" in body["msg"]


async def test_log_lines_about_a_session_carry_its_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, tts=ToneTTS(fail_after=0)) as h:
        viewer = await h.viewer()
        viewer.session.say("This fails.")
        await h.until(lambda: not viewer.session.is_speaking)
    failed = [r.getMessage() for r in caplog.records if "TTS failed" in r.getMessage()]
    assert failed and all(m.startswith(f"[{viewer.session.id}]") for m in failed), failed
