"""Load and soak: many real aiortc clients, each in its own process, come and go.

``python -m bench load [--clients N] [--speaking K] [--seconds S] ...`` keeps N clients
connected to a server it starts (``ServerProcess``, CPU engine) or one given by
``--url``. K of them talk to it: text (``POST /human``), text cut off by
``/interrupt_talk``, uploaded audio (``/humanaudio``), with a pause between; the rest
only watch. Each client leaves after ``--session-seconds`` (jittered) and a new one
takes its place until the time is up. Then every client has left and the server is
given ``--settle`` seconds.

It reports:

* per client: video frames delivered (decoded) and missing (holes in the RTP
  timestamps), video gaps over 100 ms (between frames complete on the wire, and
  between decoded frames), the largest gap;
* text -> first speaking audio packet on the wire (as ``bench realtime`` measures it),
  the server's own figure for the same (queued -> first frame decided, from the
  ``speaking_started`` event), upload -> first speaking audio, interrupt -> silence;
  p50 / p95 / max;
* the server's and the worker's RSS, PSS, anonymous memory, open fds and threads, and
  the ``/dev/shm`` ``lipsync_*`` entries: fresh, at the start (after one warm-up
  session), their peak while clients are connected, and at the end (every client gone,
  after the settle time); CPU used during the load.

``--json PATH`` also writes every sample (one a second) for plotting a soak.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.table import print_table

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "LOADRESULT "
SILENT = 0.01  # RMS of an audio packet below which it counts as silence (as bench realtime)
GAP_S = 0.1  # a video gap longer than this is counted
QUIET_S = 0.2  # before each action, the client waits for this much silence on the wire
TEXTS = [
    "Hello, how are you today?",
    "The weather is lovely this afternoon.",
    "I can help you with that right away.",
    "Thanks for waiting, here is what I found for you.",
    "Sure. Let me check that.",
]
LONG_TEXT = " ".join(["This answer goes on for quite a while, so that there is plenty of time to cut it off."] * 3)
ACTIONS = ("say", "interrupt", "upload")


# ---------------------------------------------------------------- one client (its own process)


@dataclass
class ClientSpec:
    url: str
    slot: int
    index: int
    speaking: bool
    lifetime_s: float  # from the moment it connects
    deadline: float  # time.time() after which it leaves whatever its lifetime
    seed: int
    mix: dict[str, float]
    think: tuple[float, float]


def speech_wav(seconds: float = 1.6, rate: int = 16_000) -> bytes:
    """A speech-like sound (a voiced buzz at 140 Hz, four syllables a second) as a wav."""
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    pcm = 0.25 * voice / np.abs(voice).max() * syllables
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


class _Utterances:
    """The session's WebSocket events, by utterance: when each started and ended."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.server_latency_ms: dict[str, float] = {}

    def _event(self, table: dict[str, asyncio.Event], utt: str) -> asyncio.Event:
        return table.setdefault(utt, asyncio.Event())

    def on(self, event: dict[str, Any]) -> None:
        utt = event.get("utterance")
        if not utt:
            return
        if event.get("event") == "speaking_started":
            self.server_latency_ms[utt] = float(event.get("latency_ms", math.nan))
            self._event(self.started, utt).set()
        elif event.get("event") == "speaking_ended":
            self._event(self.started, utt).set()
            self._event(self.ended, utt).set()

    async def wait_started(self, utt: str, timeout: float) -> None:
        await asyncio.wait_for(self._event(self.started, utt).wait(), timeout)

    async def wait_ended(self, utt: str, timeout: float) -> None:
        await asyncio.wait_for(self._event(self.ended, utt).wait(), timeout)


@dataclass
class _Action:
    kind: str  # say, interrupt, upload
    sent: float  # monotonic: the request was sent
    quiet: bool = True  # the wire was silent when it was sent: its latency can be measured
    utterance: str = ""
    done: float = math.nan  # its speech ended (or was cut)
    cut: float = math.nan  # the interrupt was sent


async def _wait_quiet(received: Any, seconds: float = QUIET_S, timeout: float = 5.0) -> bool:
    """Wait until the last ``seconds`` of audio packets on the wire were silent. The
    server says an utterance ended when its last frame is decided; its audio can still be
    on the way (later still when the audio track runs behind), and a latency measured
    from then would time the old speech's tail."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        recent = [p for p in received.audio_packets[-100:] if p.t >= now - seconds]
        if len(recent) >= seconds / 0.02 * 0.5 and all(p.rms <= SILENT for p in recent):
            return True
        if now >= deadline:
            return False
        await asyncio.sleep(0.02)


async def _talk(client: Any, utts: _Utterances, spec: ClientSpec, end: float, actions: list[_Action], errors: list[str]) -> None:
    from tests.support.client import ApiFailure

    rng = random.Random(spec.seed)
    kinds = [k for k in ACTIONS if spec.mix.get(k, 0) > 0]
    weights = [spec.mix[k] for k in kinds]
    wav = speech_wav()
    await asyncio.sleep(rng.uniform(*spec.think))
    while kinds and time.monotonic() + 2.0 < end:
        kind = rng.choices(kinds, weights)[0]
        quiet = await _wait_quiet(client.received)
        action = _Action(kind, time.monotonic(), quiet)
        actions.append(action)
        try:
            if kind == "upload":
                action.utterance = (await client.upload_audio(wav, "speech.wav"))["data"]["utterance"]
            else:
                text = LONG_TEXT if kind == "interrupt" else rng.choice(TEXTS)
                action.utterance = (await client.say(text))["data"]["utterance"]
            if kind == "interrupt":
                await utts.wait_started(action.utterance, 15)
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                action.cut = time.monotonic()
                await client.interrupt()
            await utts.wait_ended(action.utterance, max(5.0, end - time.monotonic() + 5))
            action.done = time.monotonic()
        except (ApiFailure, TimeoutError, asyncio.TimeoutError, OSError) as exc:
            errors.append(f"{kind}: {exc!r}"[:300])
            if isinstance(exc, ApiFailure) and exc.status == 404:
                return  # the session is gone
        await asyncio.sleep(rng.uniform(*spec.think))


def _gaps(times: Sequence[float]) -> tuple[int, float, list[tuple[float, float]]]:
    """How many gaps between consecutive times exceed GAP_S, the largest (ms), and each
    such gap as (monotonic time it ended, ms): the clock is the machine's, so the driver
    can line gaps up with other clients' joins and leaves."""
    if len(times) < 2:
        return 0, math.nan, []
    t = np.asarray(times)
    d = np.diff(t)
    big = np.flatnonzero(d > GAP_S)
    return int(big.size), float(d.max() * 1000), [(float(t[i + 1]), float(d[i] * 1000)) for i in big]


def _client_figures(received: Any, actions: list[_Action], utts: _Utterances) -> dict[str, Any]:
    from bench.realtime_bench import first_speech, silence_after

    video = [v for v in received.video]
    wire = [v.t for v in received.video_packets]
    idx = sorted({round(v.pts / 3600) for v in video})
    gaps_wire, max_wire, at_wire = _gaps(wire)
    gaps_dec, max_dec, _at = _gaps([v.t for v in video])
    text_ms: list[float] = []
    server_ms: list[float] = []
    upload_ms: list[float] = []
    interrupt_ms: list[float] = []
    for a in actions:
        if not a.utterance or not a.quiet:
            continue
        limit = (a.cut if not math.isnan(a.cut) else a.done) if not math.isnan(a.done) else math.inf
        got = first_speech(received, a.sent, packets=True)
        if got is not None and got[0] <= limit + 0.2:
            (upload_ms if a.kind == "upload" else text_ms).append((got[0] - a.sent) * 1000)
        if a.kind != "upload" and a.utterance in utts.server_latency_ms:
            server_ms.append(utts.server_latency_ms[a.utterance])
        if not math.isnan(a.cut):
            t = silence_after(received, a.cut, packets=True)
            if t is not None:
                interrupt_ms.append((t - a.cut) * 1000)
    return {
        "frames": len(video),
        "frames_wire": len(wire),
        "missing": (idx[-1] - idx[0] + 1 - len(idx)) if idx else 0,
        "gaps_wire": gaps_wire,
        "gaps_decoded": gaps_dec,
        "max_gap_wire_ms": max_wire,
        "max_gap_decoded_ms": max_dec,
        "gap_times_wire": at_wire,
        "text_sent": [a.sent for a in actions if a.kind != "upload"],
        "text_ms": text_ms,
        "server_ms": server_ms,
        "upload_ms": upload_ms,
        "interrupt_ms": interrupt_ms,
        "actions": {k: sum(a.kind == k for a in actions) for k in ACTIONS},
        "not_quiet": sum(not a.quiet for a in actions),  # sent while old speech still arrived: not timed
    }


async def run_client(spec: ClientSpec) -> dict[str, Any]:
    from tests.support.client import AvatarClient

    out: dict[str, Any] = {"slot": spec.slot, "index": spec.index, "speaking": spec.speaking, "errors": []}
    started = time.monotonic()
    client = AvatarClient(spec.url, keep_images=False, tap_packets=True)
    reader: asyncio.Task[None] | None = None
    try:
        await client.connect(timeout=30)
        out["session_id"] = client.session_id
        out["connect_ms"] = (time.monotonic() - started) * 1000
        connected = time.monotonic()
        out["connected_at"] = connected
        end = connected + max(0.0, min(spec.lifetime_s, spec.deadline - time.time()))
        utts = _Utterances()
        actions: list[_Action] = []
        if spec.speaking:
            stream = await client.events()

            async def read_events() -> None:
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    while True:
                        utts.on(await stream.next(timeout=3600))

            reader = asyncio.ensure_future(read_events())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_talk(client, utts, spec, end, actions, out["errors"]), max(1.0, end - time.monotonic()) + 20)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        out["seconds"] = time.monotonic() - connected
        out["left_at"] = time.monotonic()
        out.update(_client_figures(client.received, actions, utts))
    except Exception as exc:  # reported, never raised: one client's failure is a figure
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if reader is not None:
            reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 15)
    return out


def client_main(spec_json: str) -> None:
    """Entry point of a client process: runs one client, prints its figures as one line."""
    logging.basicConfig(level=logging.ERROR)
    raw = json.loads(spec_json)
    raw["think"] = tuple(raw["think"])
    result = asyncio.run(run_client(ClientSpec(**raw)))
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver


@dataclass
class LoadOptions:
    clients: int = 4
    speaking: int | None = None  # None: every client speaks
    seconds: float = 60.0
    session_seconds: float = 20.0  # 0: a client stays the whole run
    min_session_s: float = 6.0  # no new client joins with less than this left
    settle_s: float = 10.0
    think: tuple[float, float] = (0.3, 1.0)
    mix: dict[str, float] = field(default_factory=lambda: {"say": 6.0, "interrupt": 2.0, "upload": 2.0})
    join_stagger_s: float = 0.5
    sample_every_s: float = 1.0
    warmup: bool = True
    seed: int = 1


class Sampler:
    """Samples the server and its worker from outside, once a second, in phases."""

    def __init__(self, url: str, server_pid: int | None) -> None:
        self.url = url.rstrip("/")
        self.server_pid = server_pid
        self.worker_pid: int | None = None
        self.phase = "fresh"
        self.samples: list[dict[str, Any]] = []
        self.rings: set[str] = set()  # every ring segment seen mapped by the server or worker
        self.session_ids: set[str] = set()  # sessions the clients opened (ring names start lipsync_<id>_)
        self.client_pids: set[int] = set()  # client processes running now
        self._client_cpu: dict[int, float] = {}  # CPU seconds of every client process, last seen

    def ours(self, names: set[str]) -> set[str]:
        """Of these /dev/shm entries, the ones that belong to this server's sessions."""
        return {n for n in names if n in self.rings or n[len("lipsync_"):].split("_")[0] in self.session_ids}

    async def take(self, http: Any) -> dict[str, Any]:
        from tests.support import proc_stats

        stats: dict[str, Any] = {}
        try:
            async with http.get(self.url + "/stats", timeout=5) as resp:
                stats = (await resp.json())["data"]
            self.worker_pid = stats.get("worker_pid") or self.worker_pid
        except Exception as exc:
            stats = {"error": repr(exc)}
        server = proc_stats.sample(self.server_pid)
        worker = proc_stats.sample(self.worker_pid)
        shm = proc_stats.shm_entries()
        for pid in (self.server_pid, self.worker_pid):
            if pid is not None:
                self.rings |= proc_stats.mapped_shm(pid)
        mine = self.ours(set(shm))
        for pid in self.client_pids:
            self._client_cpu[pid] = max(self._client_cpu.get(pid, 0.0), proc_stats.cpu_s(pid))
        busy, total = proc_stats.machine_cpu_s()
        row = {
            "t": time.time(),
            "phase": self.phase,
            "server": server.as_dict() if server else None,
            "worker": worker.as_dict() if worker else None,
            "shm_entries": len(mine),  # this server's ring segments in /dev/shm
            "shm_bytes": sum(shm[n] for n in mine),
            "shm_all": len(shm),  # every lipsync_* entry, other servers' included
            "sessions": stats.get("sessions"),
            "frames_rendered": stats.get("frames_rendered"),
            "skipped": stats.get("video_frames_skipped_total"),
            "worker_restarts": stats.get("worker_restarts"),
            "machine_busy_s": busy,  # every core, since boot
            "machine_total_s": total,
            "clients_cpu_s": sum(self._client_cpu.values()),  # every client process so far, this driver not included
            "driver_cpu_s": proc_stats.cpu_s(os.getpid()),
            "loadavg": float(Path("/proc/loadavg").read_text().split()[0]),
        }
        if self.server_pid is not None:
            row["server_fd_kinds"] = dict(proc_stats.fd_kinds(self.server_pid)) if server else {}
        self.samples.append(row)
        return row

    async def run(self, http: Any, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.take(http)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


async def _spawn_client(spec: ClientSpec, hard_timeout: float, sampler: Sampler | None = None) -> dict[str, Any]:
    body = json.dumps({**spec.__dict__, "think": list(spec.think)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.load_bench", "--client", body,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    if sampler is not None:
        sampler.client_pids.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), hard_timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"slot": spec.slot, "index": spec.index, "speaking": spec.speaking, "errors": [],
                "error": f"client process ran past {hard_timeout:.0f} s; killed"}
    finally:
        if sampler is not None:
            sampler.client_pids.discard(proc.pid)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return {"slot": spec.slot, "index": spec.index, "speaking": spec.speaking, "errors": [],
            "error": f"client process exited {proc.returncode} without figures: {' / '.join(tail)}"[:500]}


async def _slot(url: str, slot: int, speaking: bool, opts: LoadOptions, deadline: float, results: list[dict[str, Any]],
                sampler: Sampler) -> None:
    rng = random.Random(opts.seed * 1000 + slot)
    await asyncio.sleep(slot * opts.join_stagger_s)
    index = 0
    while True:
        left = deadline - time.time()
        if left < opts.min_session_s or (index and opts.session_seconds <= 0):
            return
        lifetime = opts.session_seconds * rng.uniform(0.7, 1.3) if opts.session_seconds > 0 else left
        spec = ClientSpec(url, slot, index, speaking, min(lifetime, left), deadline, rng.randrange(1 << 30), opts.mix, opts.think)
        got = await _spawn_client(spec, spec.lifetime_s + 120, sampler)
        if got.get("session_id"):
            sampler.session_ids.add(got["session_id"])
        results.append(got)
        index += 1


async def _warm_up(url: str, sampler: Sampler) -> None:
    """One short session that speaks once: what the first session builds for good (the
    avatar's memory map, idle frame conversions, thread pools) is then in the start figures."""
    spec = ClientSpec(url, -1, 0, True, 4.0, time.time() + 4.0, 0, {"say": 1.0}, (0.2, 0.2))
    got = await _spawn_client(spec, 90)
    if "error" in got:
        raise RuntimeError(f"warm-up client failed: {got['error']}")
    sampler.session_ids.add(got["session_id"])


async def _settle(sampler: Sampler, http: Any, seconds: float, every: float) -> None:
    """Wait until the server has closed every session, then ``seconds`` more."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = await sampler.take(http)
        if row.get("sessions") == 0:
            break
        await asyncio.sleep(every)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(min(every, max(0.0, end - time.monotonic())))
        await sampler.take(http)


async def run_load(url: str, opts: LoadOptions, server_pid: int | None = None) -> dict[str, Any]:
    """Run the load against ``url`` and return the report (see ``print_report``)."""
    import aiohttp

    from tests.support.proc_stats import pid_listening_on

    if server_pid is None and url.startswith(("http://127.", "http://localhost")):
        server_pid = pid_listening_on(int(url.rsplit(":", 1)[1].split("/")[0]))
    speaking = opts.clients if opts.speaking is None else min(opts.speaking, opts.clients)
    sampler = Sampler(url, server_pid)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        await sampler.take(http)
        if opts.warmup:
            sampler.phase = "warm-up"
            await _warm_up(url, sampler)
            await _settle(sampler, http, 2.0, opts.sample_every_s)
        sampler.phase = "start"
        await sampler.take(http)
        sampler.phase = "load"
        began = time.time()
        deadline = began + opts.seconds
        stop = asyncio.Event()
        sampling = asyncio.ensure_future(sampler.run(http, opts.sample_every_s, stop))
        slots = [_slot(url, i, i < speaking, opts, deadline, results, sampler) for i in range(opts.clients)]
        await asyncio.gather(*slots)
        load_s = time.time() - began
        stop.set()
        await sampling
        sampler.phase = "settle"
        await _settle(sampler, http, opts.settle_s, opts.sample_every_s)
        sampler.phase = "end"
        await sampler.take(http)
    return {
        "url": url,
        "options": {**opts.__dict__, "speaking": speaking},
        "load_seconds": load_s,
        "clients": results,
        "samples": sampler.samples,
        "server_pid": server_pid,
    }


# ---------------------------------------------------------------- the report


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else math.nan


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0f}"


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables show (and the test asserts)."""
    clients = report["clients"]
    ok = [c for c in clients if "error" not in c]
    every: dict[str, list[float]] = {k: [] for k in ("text_ms", "server_ms", "upload_ms", "interrupt_ms", "connect_ms")}
    for c in ok:
        for k in every:
            v = c.get(k)
            if isinstance(v, list):
                every[k].extend(v)
            elif v is not None:
                every[k].append(v)
    samples = report["samples"]
    load = [s for s in samples if s["phase"] == "load"]
    start = next((s for s in samples if s["phase"] == "start"), samples[0])
    fresh = samples[0]
    end = samples[-1]
    skipped = [s["skipped"] for s in samples if isinstance(s.get("skipped"), int)]

    def cpu(proc: str) -> float:
        xs = [s for s in load if s.get(proc)]
        if len(xs) < 2:
            return math.nan
        return (xs[-1][proc]["cpu_s"] - xs[0][proc]["cpu_s"]) / (xs[-1]["t"] - xs[0]["t"]) * 100

    def share(key: str) -> float:
        """CPU of ``key`` during the load, % of one core."""
        if len(load) < 2:
            return math.nan
        return (load[-1][key] - load[0][key]) / (load[-1]["t"] - load[0]["t"]) * 100

    machine = share("machine_busy_s")
    ours = [cpu("server"), cpu("worker"), share("clients_cpu_s"), share("driver_cpu_s")]

    return {
        "clients": len(clients),
        "failed": [c for c in clients if "error" in c],
        "frames": sum(c["frames"] for c in ok),
        "missing": sum(c["missing"] for c in ok),
        "gaps_wire": sum(c["gaps_wire"] for c in ok),
        "gaps_decoded": sum(c["gaps_decoded"] for c in ok),
        "max_gap_wire_ms": max((c["max_gap_wire_ms"] for c in ok if not math.isnan(c["max_gap_wire_ms"])), default=math.nan),
        "latency": every,
        "errors": [e for c in ok for e in c["errors"]],
        "not_quiet": sum(c.get("not_quiet", 0) for c in ok),
        "skipped_by_server": (skipped[-1] - skipped[0]) if len(skipped) > 1 else 0,
        "fresh": fresh,
        "start": start,
        "end": end,
        "load": load,
        "cpu_server": cpu("server"),
        "cpu_worker": cpu("worker"),
        "cpu_clients": share("clients_cpu_s"),
        "cpu_machine": machine,
        "cpu_cores": round(share("machine_total_s") / 100) if len(load) > 1 else 0,
        "cpu_others": machine - sum(x for x in ours if not math.isnan(x)),
        "loadavg_max": max((x["loadavg"] for x in load), default=math.nan),
        "worker_restarts": (end.get("worker_restarts") or 0) - (fresh.get("worker_restarts") or 0),
    }


def print_report(report: dict[str, Any]) -> dict[str, Any]:
    s = summarize(report)
    o = report["options"]
    title = (f"{o['clients']} clients ({o['speaking']} speaking), {report['load_seconds']:.0f} s, "
             f"sessions of ~{o['session_seconds']:.0f} s")
    rows = []
    for c in sorted(report["clients"], key=lambda c: (c["slot"], c["index"])):
        name = f"{c['slot']}.{c['index']}"
        if "error" in c:
            rows.append([name, "yes" if c["speaking"] else "no", "-", "-", "-", "-", "-", c["error"][:80]])
            continue
        acts = c["actions"]
        rows.append([
            name, "yes" if c["speaking"] else "no", f"{c['seconds']:.0f}", c["frames"], c["missing"],
            f"{c['gaps_wire']} / {c['gaps_decoded']}", f"{_ms(c['max_gap_wire_ms'])} / {_ms(c['max_gap_decoded_ms'])}",
            f"{acts['say']} / {acts['interrupt']} / {acts['upload']}" + (f"; {len(c['errors'])} errors" if c["errors"] else ""),
        ])
    print_table(f"Clients: {title}", ["client", "speaks", "s", "frames delivered", "missing",
                                      "gaps > 100 ms (wire / decoded)", "max gap ms (wire / decoded)",
                                      "say / interrupt / upload"], rows)

    lat = s["latency"]

    def lat_row(label: str, key: str, bar: str) -> list[Any]:
        return [label, len(lat[key]), *(_ms(_pct(lat[key], q)) for q in (50, 95, 100)), bar]

    lrows = [
        lat_row("text -> first speaking audio packet (client, wire)", "text_ms", "p95 <= 250"),
        lat_row("text -> first frame decided (server's speaking_started)", "server_ms", ""),
        lat_row("upload (1.6 s wav) -> first speaking audio packet", "upload_ms", ""),
        lat_row("interrupt -> silent audio packets", "interrupt_ms", "<= 100"),
        lat_row("connect (offer -> first video frame decoded)", "connect_ms", ""),
    ]
    print_table(f"Latency (ms): {title}", ["measure", "n", "p50", "p95", "max", "bar"], lrows)

    def val(sample: dict[str, Any], proc: str, key: str, scale: float = 1.0) -> float:
        got = sample.get(proc)
        return got[key] / scale if got else math.nan

    def peak(proc: str, key: str, scale: float = 1.0) -> float:
        xs = [val(x, proc, key, scale) for x in s["load"]]
        xs = [x for x in xs if not math.isnan(x)]
        return max(xs) if xs else math.nan

    def fmt(x: float, unit: str) -> str:
        return "-" if math.isnan(x) else (f"{x:.0f}" if unit != "MB" else f"{x:.1f}")

    rrows = []
    for proc in ("server", "worker"):
        for key, label, scale, unit in (("rss_kb", "RSS MB", 1024, "MB"), ("pss_kb", "PSS MB", 1024, "MB"),
                                        ("anon_kb", "anonymous MB", 1024, "MB"), ("fds", "open fds", 1, ""),
                                        ("threads", "threads", 1, "")):
            f0, st, pk, en = (val(s["fresh"], proc, key, scale), val(s["start"], proc, key, scale),
                              peak(proc, key, scale), val(s["end"], proc, key, scale))
            rrows.append([f"{proc} {label}", fmt(f0, unit), fmt(st, unit), fmt(pk, unit), fmt(en, unit),
                          "-" if math.isnan(en - st) else (f"{en - st:+.1f}" if unit == "MB" else f"{en - st:+.0f}")])
    shm_peak = max((x["shm_entries"] for x in s["load"]), default=0)
    rrows.append(["/dev/shm lipsync_* entries (this server's rings)", s["fresh"]["shm_entries"], s["start"]["shm_entries"],
                  shm_peak, s["end"]["shm_entries"], f"{s['end']['shm_entries'] - s['start']['shm_entries']:+d}"])
    rrows.append(["/dev/shm lipsync_* entries (any process)", s["fresh"]["shm_all"], s["start"]["shm_all"],
                  max((x["shm_all"] for x in s["load"]), default=0), s["end"]["shm_all"],
                  f"{s['end']['shm_all'] - s['start']['shm_all']:+d}"])
    sess_peak = max((x["sessions"] or 0 for x in s["load"]), default=0)
    rrows.append(["sessions open", s["fresh"]["sessions"], s["start"]["sessions"], sess_peak, s["end"]["sessions"], ""])
    print_table(f"Server and worker: {title} (start = after one warm-up session; end = every client gone + {o['settle_s']:.0f} s)",
                ["measure", "fresh", "start", "peak under load", "end", "end - start"], rrows)

    gap_ok = s["gaps_wire"] == 0
    p95 = _pct(lat["text_ms"], 95)
    print(f"\nframes delivered {s['frames']}, missing {s['missing']}, skipped by the server {s['skipped_by_server']}; "
          f"video gaps > 100 ms: {s['gaps_wire']} on the wire, {s['gaps_decoded']} decoded "
          f"(max {_ms(s['max_gap_wire_ms'])} ms on the wire); "
          f"CPU during load (% of one core): server {_ms(s['cpu_server'])}, worker {_ms(s['cpu_worker'])}, "
          f"clients {_ms(s['cpu_clients'])}, other processes {_ms(s['cpu_others'])}, "
          f"machine {_ms(s['cpu_machine'])} of {100 * s['cpu_cores']}; "
          f"worker restarts {s['worker_restarts']}; failed clients {len(s['failed'])}; request errors {len(s['errors'])}; "
          f"actions not timed (old speech still arriving when sent) {s['not_quiet']}")
    verdict = "met" if (p95 <= 250 and gap_ok and not s["failed"]) else "missed"
    print(f"target (text -> first audio p95 <= 250 ms, no video gap > 100 ms on the wire): {verdict} "
          f"(p95 {_ms(p95)} ms, {s['gaps_wire']} gaps)")
    for e in s["errors"][:5]:
        print(f"  request error: {e}")
    return s


# ---------------------------------------------------------------- command line


def _mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ACTIONS:
            raise argparse.ArgumentTypeError(f"--mix takes {', '.join(ACTIONS)}=WEIGHT, got {part!r}")
        out[key] = float(value or 1)
    return out


async def capacity(url: str, opts: LoadOptions, server_pid: int | None, most: int, seconds: float) -> list[list[Any]]:
    """Per-machine capacity: 1, 2, ... speaking sessions that stay the whole run, until the
    bar (text -> first audio p95 <= 250 ms, no video gap > 100 ms on the wire, no failure)
    is missed twice in a row; one table row per count."""
    rows: list[list[Any]] = []
    misses = 0
    for k in range(1, most + 1):
        trial = replace(opts, clients=k, speaking=k, seconds=seconds, session_seconds=0.0, settle_s=3.0, warmup=k == 1)
        s = summarize(await run_load(url, trial, server_pid))
        p95 = _pct(s["latency"]["text_ms"], 95)
        met = p95 <= 250 and s["gaps_wire"] == 0 and not s["failed"]
        rows.append([k, _ms(_pct(s["latency"]["text_ms"], 50)), _ms(p95), s["gaps_wire"], _ms(s["max_gap_wire_ms"]),
                     s["skipped_by_server"], f"{s['cpu_server']:.0f} / {s['cpu_worker']:.0f} / {s['cpu_clients']:.0f}",
                     f"{s['cpu_machine']:.0f}", "yes" if met else "no"])
        misses = 0 if met else misses + 1
        if misses == 2:
            break
    return rows


def _pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadOptions()
    p.add_argument("--clients", type=int, default=d.clients, help="clients connected at once (each its own process)")
    p.add_argument("--speaking", type=int, default=None, help="how many of them talk (default: all); the rest only watch")
    p.add_argument("--seconds", type=float, default=d.seconds, help="how long clients keep coming")
    p.add_argument("--session-seconds", type=float, default=d.session_seconds,
                   help="a client leaves after about this long (+-30%%) and a new one joins; 0: clients stay the whole run")
    p.add_argument("--settle", type=float, default=d.settle_s, help="seconds after the last client left before the end figures")
    p.add_argument("--think", type=_pair, default=d.think, metavar="LO,HI", help="pause between a client's actions, seconds")
    p.add_argument("--mix", type=_mix, default=d.mix, metavar="say=6,interrupt=2,upload=2", help="weights of the actions")
    p.add_argument("--join-stagger", type=float, default=d.join_stagger_s, help="seconds between the first clients' joins")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up session before the start figures")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--url", default=None, help="load this server instead of starting one (same machine for process figures)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid (default: whoever listens on its port)")
    p.add_argument("--data-dir", default=None, help="data dir of the server started (default: a temporary one)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server started (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the whole report, every sample included, here")
    p.add_argument("--capacity", type=int, default=0, metavar="MAX",
                   help="instead: 1, 2, ... MAX speaking sessions for --seconds each, until the bar is missed twice; "
                        "the most that meet it is this machine's capacity (the server's --avatar sets the resolution)")


def options_from(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(clients=args.clients, speaking=args.speaking, seconds=args.seconds, session_seconds=args.session_seconds,
                       settle_s=args.settle, think=args.think, mix=args.mix, join_stagger_s=args.join_stagger,
                       warmup=args.warmup, seed=args.seed)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.server_process import ServerProcess

    opts = options_from(args)
    if args.capacity:
        return await _run_capacity(args, opts)
    if args.url:
        report = await run_load(args.url, opts, args.server_pid)
    else:
        data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-load-"))
        server_args = ["--max-sessions", str(opts.clients + 2), "--log-level", "WARNING", *args.server_arg]
        with ServerProcess(data_dir, *server_args) as server:
            report = await run_load(server.url, opts, server.proc.pid)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, default=str))
        print(f"\nreport with every sample: {args.json}")
    return report


async def _run_capacity(args: argparse.Namespace, opts: LoadOptions) -> dict[str, Any]:
    from tests.support.server_process import ServerProcess

    seconds = args.seconds if args.seconds != LoadOptions().seconds else 30.0
    if args.url:
        rows = await capacity(args.url, opts, args.server_pid, args.capacity, seconds)
    else:
        data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-load-"))
        server_args = ["--max-sessions", str(args.capacity + 2), "--log-level", "WARNING", *args.server_arg]
        with ServerProcess(data_dir, *server_args) as server:
            rows = await capacity(server.url, opts, server.proc.pid, args.capacity, seconds)
    print_table(
        f"Capacity: speaking sessions held for {seconds:.0f} s each, clients on this machine too "
        f"({os.cpu_count()} cores; server args: {' '.join(args.server_arg) or 'defaults'})",
        ["speaking sessions", "text -> audio p50 ms", "p95 ms (bar 250)", "gaps > 100 ms", "max gap ms",
         "frames skipped", "CPU % server / worker / clients", "machine %", "meets the bar"],
        rows,
    )
    best = max((r[0] for r in rows if r[-1] == "yes"), default=0)
    print(f"\ncapacity of this machine: {best} speaking session(s) meet the bar "
          "(the clients' own CPU is in the figures: on a server without them it holds more)")
    return {"capacity": best, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--client"]:
        client_main(argv[1])
        return
    p = argparse.ArgumentParser(prog="python -m bench load", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
