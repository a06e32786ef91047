"""Real-time figures as a browser PLAYS them: headless Chromium on web/webrtcapi.html.

The aiortc figures (``python -m bench realtime``) stop at the wire and at aiortc's own
buffers. Here the page itself is measured, through Chromium's jitter buffers, decoders,
audio output and compositor. Inside the page (``window.__bench``):

* audio, WebAudio tap: an AudioWorklet behind a MediaStreamAudioSourceNode on the remote
  track logs the RMS of every ~10 ms, stamped with the ``performance.now()`` at which
  the AudioContext says it reaches the output (``getOutputTimestamp``);
* audio, the <video> element's own path: ``getSynchronizationSources()`` says when each
  packet left the jitter buffer for the playout mixer, with the sender's level; plus
  the playout delay getStats reports (media-playout), that is when the element plays it;
* video: ``requestVideoFrameCallback`` logs every presented frame (expected display
  time, receive time, presented-frame count) with a mouth-change score: the share of
  lower-face pixels that differ from the newest idle frames before the text was sent.
  The threshold is calibrated on a second of idle frames first, so breathing, sway and
  blinks do not count;
* ``RTCPeerConnection.getStats()``: jitter buffers, decoded and dropped frames, audio
  energy, playout delay, and Chrome's own A/V estimate (estimatedPlayoutTimestamp).

The first moving mouth comes with the first faint sound, a frame before the audio
crosses the speech threshold; the same two detectors run on the stream as aiortc
decodes it (by media time) to separate that from what the browser adds.

Run: ``python -m bench browser [--trials 5] [-v]`` (starts its own server, CPU engine).
Needs the ``playwright`` Python package and a Chromium (``--chromium``, default
/usr/bin/chromium).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.realtime_bench import LONG, SHORT, SILENT
from bench.table import print_table
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, probe_js
from tests.support.client import Received
from tests.support.mouth import DEFAULT_MOUTH_ROI
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)

MOUTH_ROI = DEFAULT_MOUTH_ROI
PIXEL_DIFF = 24  # luma levels: a pixel this far from the idle reference has changed
REF_FRAMES = 3  # the idle reference: mean of the newest frames before the text is sent
CALIBRATION_HORIZON = 8  # frames (320 ms) after a reference the idle noise is measured over
MIN_MOUTH_THRESHOLD = 0.02  # share of changed pixels, whatever the calibration says
CALIBRATION_MARGIN = 2.0  # threshold = margin x the worst idle score seen in calibration
CUT_SILENT = 0.001  # RMS (-60 dBFS): the server's digital silence after an interrupt, not a quiet consonant
SILENCE_HOLD_MS = 100.0  # interrupt -> silence: quiet this long, and no speech after it
IDLE_BEFORE_MS = 1500  # idle before each trial, so the reference frames are idle ones
AFTER_INTERRUPT_MS = 1000  # how long to watch after /interrupt_talk

# Installed once into the page: window.__bench records what the page plays.
PROBE_JS = probe_js()


@dataclass
class Played:
    """What the page logged: audio windows (played ms, rms, window ms), frames, and audio
    packets leaving the jitter buffer (ms, sender's level, 20 ms)."""

    audio: list[tuple[float, float, float]]
    frames: list[dict[str, Any]]
    sources: list[tuple[float, float, float]]

    @classmethod
    def from_js(cls, data: dict[str, Any]) -> Played:
        return cls([tuple(a) for a in data["audio"]], data["frames"], [tuple(a) for a in data["sources"]])


@dataclass
class Figures:
    audio: list[float] = field(default_factory=list)  # text -> first speaking audio played
    audio_released: list[float] = field(default_factory=list)  # text -> it leaves the jitter buffer
    video: list[float] = field(default_factory=list)  # text -> first mouth-changed frame shown
    video_received: list[float] = field(default_factory=list)  # text -> that frame's last packet
    offset: list[float] = field(default_factory=list)  # that frame shown - that audio played
    offset_released: list[float] = field(default_factory=list)  # that frame shown - that audio leaves the jitter buffer
    silence: list[float] = field(default_factory=list)  # interrupt -> digital silence played
    quiet: list[float] = field(default_factory=list)  # interrupt -> RMS under SILENT played
    silence_released: list[float] = field(default_factory=list)  # interrupt -> silence leaves the jitter buffer
    onset_scores: list[float] = field(default_factory=list)  # mouth score of each detected frame
    stream_offset: list[float] = field(default_factory=list)  # the same offset by media time, aiortc-decoded
    chrome_offset: list[float] = field(default_factory=list)  # Chrome's estimatedPlayoutTimestamp, audio - video


# ---- analysis (pure functions over what was logged) ----


def first_loud(audio: Sequence[tuple[float, float, float]], after: float) -> float | None:
    """Time of the first audio window (played ~10 ms, or a 20 ms packet leaving the
    jitter buffer) after ``after`` louder than SILENT."""
    return next((t for t, rms, _d in audio if t >= after and rms > SILENT), None)


def first_over(scores: Sequence[tuple[Any, float]], threshold: float) -> Any | None:
    """The key of the first score over ``threshold`` that stays over it in the next one
    too (a single odd frame is not speech)."""
    for (key, s), (_k, nxt) in itertools.pairwise(scores):
        if s > threshold and nxt > threshold:
            return key
    return None


def first_mouth(frames: Sequence[dict[str, Any]], after: float, threshold: float) -> dict[str, Any] | None:
    """The first frame shown after ``after`` with the mouth changed."""
    shown = [(f, f["score"]) for f in frames if f["shown"] >= after and f["score"] is not None]
    return first_over(shown, threshold)


def silence_start(
    audio: Sequence[tuple[float, float, float]], after: float, level: float = CUT_SILENT, hold_ms: float = SILENCE_HOLD_MS
) -> float | None:
    """Played time from which audio stays at or under ``level``: the start of the first
    quiet run after ``after`` that lasts ``hold_ms`` and is not followed by sound (a
    pause between words is not an interruption)."""
    windows = [a for a in audio if a[0] >= after]
    last_loud = max((k for k, a in enumerate(windows) if a[1] > level), default=-1)
    quiet = windows[last_loud + 1 :]
    if not quiet or quiet[-1][0] + quiet[-1][2] - quiet[0][0] < hold_ms:
        return None
    return quiet[0][0]


def mouth_threshold(scores: Sequence[float]) -> float:
    """Threshold from idle noise: the worst scores idle frames reach within
    CALIBRATION_HORIZON frames of a reference, with a margin and a floor."""
    return max(MIN_MOUTH_THRESHOLD, CALIBRATION_MARGIN * max(scores, default=0.0))


def missed_callbacks(frames: Sequence[dict[str, Any]]) -> int:
    """Frames the compositor presented without a requestVideoFrameCallback seeing them."""
    counts = [f["presented"] for f in frames]
    return sum(max(0, b - a - 1) for a, b in itertools.pairwise(counts))


def roi_luma(image: np.ndarray) -> np.ndarray:
    """The page's luma of MOUTH_ROI for an RGB frame."""
    x, y, w, h = MOUTH_ROI
    roi = image[y : y + h, x : x + w].astype(np.float32)
    return roi @ np.array([0.299, 0.587, 0.114], np.float32)


def mouth_score(luma: np.ndarray, ref: np.ndarray) -> float:
    """The page's mouth score: share of ROI pixels more than PIXEL_DIFF from ``ref``."""
    return float(np.mean(np.abs(luma - ref) > PIXEL_DIFF))


def stream_onsets(received: Received, sent: float, threshold: float) -> tuple[float, float] | None:
    """Media times (s) of the first mouth-changed frame and of the first speaking ~10 ms
    of audio after ``sent``, as aiortc decoded them: the stream's own A/V content offset."""
    idle = [roi_luma(v.image) for v in received.video if v.t < sent and v.image is not None][-REF_FRAMES:]
    if not idle:
        return None
    ref = np.mean(idle, axis=0)
    scores = [(v.pts / 90_000, mouth_score(roi_luma(v.image), ref)) for v in received.video if v.t >= sent and v.image is not None]
    video = first_over(scores, threshold)
    audio = None
    for a in (a for a in received.audio if a.t >= sent):
        n = a.rate // 100
        loud = [k for k in range(0, len(a.samples), n) if np.sqrt(np.mean(a.samples[k : k + n] ** 2)) > SILENT]
        if loud:
            audio = a.pts / a.rate + loud[0] / a.rate
            break
    return (video, audio) if video is not None and audio is not None else None


def chrome_offsets(samples: Sequence[Sequence[float]], after: float) -> list[float]:
    """Video - audio offset (ms, same media time) from Chrome's estimatedPlayoutTimestamp
    samples (now, audio NTP ms, video NTP ms): a stream playing later media is early."""
    return [a - v for now, a, v in samples if now >= after]


def summarize_stats(stats: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows (figure, audio, video) from getStats inbound-rtp and media-playout reports."""
    by_kind = {s.get("kind"): s for s in stats if s["type"] == "inbound-rtp"}
    a, v = by_kind.get("audio", {}), by_kind.get("video", {})
    playout = next((s for s in stats if s["type"] == "media-playout"), {})

    def ratio(s: dict[str, Any], num: str, den: str, scale: float = 1000.0, fmt: str = "{:.1f} ms") -> str:
        return fmt.format(s[num] / s[den] * scale) if s.get(den) and num in s else "n/a"

    def plain(s: dict[str, Any], key: str, fmt: str = "{}") -> str:
        return fmt.format(s[key]) if key in s else "n/a"

    def jb(key: str) -> list[str]:
        return [ratio(a, key, "jitterBufferEmittedCount"), ratio(v, key, "jitterBufferEmittedCount")]

    return [
        ["jitter buffer delay, average (jitterBufferDelay / jitterBufferEmittedCount)", *jb("jitterBufferDelay")],
        ["jitter buffer target, average (jitterBufferTargetDelay / jitterBufferEmittedCount)", *jb("jitterBufferTargetDelay")],
        ["jitter buffer minimum, average (jitterBufferMinimumDelay / jitterBufferEmittedCount)", *jb("jitterBufferMinimumDelay")],
        ["audio playout delay, average (media-playout totalPlayoutDelay / totalSamplesCount)",
         ratio(playout, "totalPlayoutDelay", "totalSamplesCount"), ""],
        ["frames received / decoded / dropped", "",
         f"{plain(v, 'framesReceived')} / {plain(v, 'framesDecoded')} / {plain(v, 'framesDropped')}"],
        ["video decode time, average (totalDecodeTime / framesDecoded)", "", ratio(v, "totalDecodeTime", "framesDecoded")],
        ["packets received / lost", f"{plain(a, 'packetsReceived')} / {plain(a, 'packetsLost')}",
         f"{plain(v, 'packetsReceived')} / {plain(v, 'packetsLost')}"],
        ["totalAudioEnergy / totalSamplesDuration",
         f"{plain(a, 'totalAudioEnergy', '{:.3f}')} / {plain(a, 'totalSamplesDuration', '{:.1f} s')}", ""],
        ["concealed samples (concealedSamples / totalSamplesReceived)",
         ratio(a, "concealedSamples", "totalSamplesReceived", 100.0, "{:.2f} %"), ""],
        ["RTP interarrival jitter (last report)", plain(a, "jitter", "{:.3f} s"), plain(v, "jitter", "{:.3f} s")],
    ]


# ---- the browser session ----


class BrowserProbe:
    """One headless Chromium on webrtcapi.html, connected, with window.__bench installed."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.threshold = MIN_MOUTH_THRESHOLD

    async def js(self, expr: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expr, arg)

    async def connect(self, url: str) -> dict[str, Any]:
        await self.page.goto(url + "/webrtcapi.html")
        await self.page.click("#connect")
        await self.page.wait_for_function(
            "window.avatarClient.state === 'connected' && document.getElementById('video').readyState >= 2"
            " && document.getElementById('video').srcObject.getAudioTracks().length > 0",
            timeout=30_000,
        )
        info = await self.js(PROBE_JS, {"roi": list(MOUTH_ROI), "pixelDiff": PIXEL_DIFF, "refFrames": REF_FRAMES})
        log.info("page audio/video: %s", info)
        return info

    async def now(self) -> float:
        return await self.js("performance.now()")

    async def wait_idle(self, ms: int = IDLE_BEFORE_MS, timeout: float = 30.0) -> None:
        """Until the server is not speaking, then ``ms`` more: a clean idle reference."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.js("window.__bench.speaking()"):
            if loop.time() > deadline:
                raise TimeoutError("the avatar did not stop speaking")
            await asyncio.sleep(0.1)
        await asyncio.sleep(ms / 1000)

    async def calibrate(self, ms: int = 1000) -> float:
        """The mouth threshold from ``ms`` of idle frames: how far idle motion alone
        takes the score within CALIBRATION_HORIZON frames of a reference."""
        await self.wait_idle(0)
        cal = await self.js("([ms, h]) => window.__bench.calibrate(ms, h)", [ms, CALIBRATION_HORIZON])
        self.threshold = mouth_threshold(cal["worst"])
        log.info("mouth calibration: %d idle frames, worst idle score within %d frames %.4f, threshold %.4f",
                 cal["frames"], CALIBRATION_HORIZON, max(cal["worst"], default=float("nan")), self.threshold)
        return self.threshold

    async def say_trial(self, text: str, figures: Figures) -> None:
        await self.wait_idle()
        sent = await self.js("(text) => window.__bench.say(text)", text)
        t0 = sent["t0"]
        if not await self.js("([t, l]) => window.__bench.waitPlayed(t, l, 600, 20000)", [t0, SILENT]):
            log.warning("no speech played after /human (%s)", sent)
            return
        played = Played.from_js(await self.js("(t) => window.__bench.since(t)", t0 - 50))
        audio, frame = first_loud(played.audio, t0), first_mouth(played.frames, t0, self.threshold)
        log.info("say: /human answered in %.0f ms; audio %s, mouth frame %s", sent["answered"] - t0,
                 audio and f"{audio - t0:.0f} ms",
                 frame and f"shown {frame['shown'] - t0:.0f} ms, received {(frame['received'] or t0) - t0:.0f} ms, "
                 f"score {frame['score']:.3f}")
        if audio is not None:
            figures.audio.append(audio - t0)
        released = first_loud(played.sources, t0)
        if released is not None:
            figures.audio_released.append(released - t0)
        if frame is not None:
            figures.video.append(frame["shown"] - t0)
            figures.onset_scores.append(frame["score"])
            if frame["received"]:
                figures.video_received.append(frame["received"] - t0)
        if audio is not None and frame is not None:
            figures.offset.append(frame["shown"] - audio)
        if released is not None and frame is not None:
            figures.offset_released.append(frame["shown"] - released)

    async def interrupt_trial(self, text: str, speak_s: float, figures: Figures) -> None:
        await self.wait_idle()
        sent = await self.js("(text) => window.__bench.say(text)", text)
        if not await self.js("([t, l]) => window.__bench.waitPlayed(t, l, null, 20000)", [sent["t0"], SILENT]):
            log.warning("no speech played before the interrupt")
            return
        await asyncio.sleep(speak_s)
        asked = await self.js("window.__bench.interrupt()")
        t0 = asked["t0"]
        await asyncio.sleep(AFTER_INTERRUPT_MS / 1000)
        played = Played.from_js(await self.js("(t) => window.__bench.since(t)", t0))
        cut, quiet = silence_start(played.audio, t0), silence_start(played.audio, t0, SILENT)
        log.info("interrupt after %.2f s of speech: /interrupt_talk answered in %.0f ms; silence played %s (under %s: %s)",
                 speak_s, asked["answered"] - t0, cut and f"{cut - t0:.0f} ms", SILENT, quiet and f"{quiet - t0:.0f} ms")
        if cut is not None:
            figures.silence.append(cut - t0)
        if quiet is not None:
            figures.quiet.append(quiet - t0)
        released = silence_start(played.sources, t0)
        if released is not None:
            figures.silence_released.append(released - t0)


async def browser_figures(url: str, args: argparse.Namespace) -> tuple[Figures, list[dict[str, Any]], dict[str, Any], int, float]:
    """Every browser trial on one page: (figures, getStats, AudioContext info, missed
    frame callbacks, mouth threshold)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=args.chromium, args=CHROMIUM_ARGS, ignore_default_args=["--mute-audio"]
        )
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda e: log.warning("page error: %s", e))
            probe = BrowserProbe(page)
            await probe.connect(url)
            threshold = await probe.calibrate()
            figures = Figures()
            await probe.say_trial(SHORT, Figures())  # warm-up: TTS and jitter buffers settle
            started = await probe.now()
            for _ in range(args.trials):
                await probe.say_trial(SHORT, figures)
            # Interrupts land at different points of the sentence: a cut in a loud vowel
            # and one in a quiet consonant read differently against the SILENT threshold.
            for k in range(args.trials):
                await probe.interrupt_trial(LONG, 1.0 + 0.113 * (k % 5), figures)
            figures.chrome_offset = chrome_offsets(await probe.js("window.__bench.sync"), started)
            stats = await probe.js("window.__bench.stats()")
            info = await probe.js("window.__bench.info()")
            missed = missed_callbacks(await probe.js("window.__bench.frames"))
        finally:
            await browser.close()
    return figures, stats, info, missed, threshold


async def stream_offsets(url: str, threshold: float, utterances: int) -> list[float]:
    """The A/V content offset of the stream itself (ms, media time, no playout): the same
    mouth detector and audio threshold on frames and audio as aiortc decodes them."""
    from tests.support.client import AvatarClient as PyClient

    out: list[float] = []
    async with PyClient(url, keep_images=True) as client:
        await client.connect()
        for _ in range(utterances):
            await client.wait_speaking(False, timeout=30)
            await asyncio.sleep(IDLE_BEFORE_MS / 1000)
            sent = time.monotonic()
            await client.say(SHORT)
            await client.wait_speaking(True, timeout=10)
            await client.wait_speaking(False, timeout=20)
            await asyncio.sleep(0.3)
            onsets = stream_onsets(client.received, sent, threshold)
            for v in client.received.video:
                v.image = None  # keep memory flat
            if onsets is not None:
                out.append((onsets[0] - onsets[1]) * 1000)
    log.info("stream's own content offset (aiortc, media time): %s ms", [round(x) for x in out])
    return out


# ---- report ----


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _row(label: str, xs: Sequence[float], bar: str, signed: bool = False) -> list[str]:
    fmt = "{:+.0f} ms" if signed else "{:.0f} ms"
    worst = max(xs, key=abs) if xs else float("nan")
    return [label, fmt.format(_median(xs)), fmt.format(worst), bar]


def playout_delay_ms(stats: Sequence[dict[str, Any]]) -> float:
    """The element's audio playout delay after the jitter buffer (media-playout), ms."""
    p = next((s for s in stats if s["type"] == "media-playout" and s.get("totalSamplesCount")), None)
    return p["totalPlayoutDelay"] / p["totalSamplesCount"] * 1000 if p else float("nan")


def report(figures: Figures, stats: Sequence[dict[str, Any]], info: dict[str, Any], missed: int, threshold: float, trials: int) -> None:
    own = _median(figures.stream_offset)
    pd = playout_delay_ms(stats)
    element = f"jitter buffer release + {pd:.0f} ms playout delay"
    rows = [
        _row(f"text -> first speaking audio played (RMS > {SILENT}; WebAudio tap, AudioContext output time)", figures.audio, "<= 250 ms"),
        _row(f"  (the <video> element's own audio path: {element})", [x + pd for x in figures.audio_released], ""),
        _row("text -> first speaking frame shown (mouth starts to move; rVFC expectedDisplayTime)", figures.video, "<= 250 ms"),
        _row("  (that frame received: rVFC receiveTime)", figures.video_received, ""),
        _row(f"interrupt -> silence played (RMS <= {CUT_SILENT} for {SILENCE_HOLD_MS:.0f} ms and after; WebAudio tap)",
             figures.silence, "<= 100 ms"),
        _row(f"  (the same with the aiortc bench's threshold, RMS <= {SILENT})", figures.quiet, ""),
        _row(f"  (the <video> element's own audio path: {element})", [x + pd for x in figures.silence_released], ""),
        _row("A/V offset as played (first speaking frame shown - first speaking audio played)", figures.offset, "|x| <= 40 ms", True),
        _row("  (the same two events inside the stream, by media time: the mouth moves with the first faint sound)",
             figures.stream_offset, "", True),
        _row("A/V offset added by the browser (as played - inside the stream)", [x - own for x in figures.offset], "|x| <= 40 ms", True),
        _row("  (the same with the element's own audio path)", [x - pd - own for x in figures.offset_released], "", True),
        _row("A/V offset by Chrome's own playout clocks (estimatedPlayoutTimestamp, audio - video)",
             figures.chrome_offset, "|x| <= 40 ms", True),
    ]
    counts = f"{len(figures.audio)}/{len(figures.video)}/{len(figures.silence)} of {trials}"
    print_table(f"Real-time latency and sync as headless Chromium plays them (median, worst; {counts} trials)",
                ["measure", "median", "worst", "bar"], rows)
    stat_rows = [
        *summarize_stats(stats),
        ["AudioContext sampleRate / baseLatency / outputLatency",
         f"{info['sampleRate']} Hz / {info['baseLatency'] * 1000:.0f} ms / {info['outputLatency'] * 1000:.0f} ms", ""],
        ["frames presented without a requestVideoFrameCallback", "", str(missed)],
        ["mouth-change threshold (calibrated on idle) / median score of detected frames", "",
         f"{threshold:.3f} / {_median(figures.onset_scores):.3f}"],
    ]
    print_table("Chromium receiver statistics over the whole session (RTCPeerConnection.getStats)",
                ["figure", "audio", "video"], stat_rows)


# ---- main ----


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-browser-bench-"))
    with ServerProcess(data_dir, "--log-level", "WARNING") as server:
        figures, stats, info, missed, threshold = await browser_figures(server.url, args)
        figures.stream_offset = await stream_offsets(server.url, threshold, min(args.trials, 3))
    report(figures, stats, info, missed, threshold, args.trials)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--chromium", default=CHROMIUM, help="Chromium executable")
    p.add_argument("--data-dir", default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="log every trial")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench browser")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.verbose:
        log.setLevel(logging.INFO)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
