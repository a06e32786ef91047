"""The web client in a real browser: Debian's Chromium driven by Playwright against a real
server process. Covers web/webrtcapi.html (connect, speak, interrupt, record, disconnect)
and web/webrtc.html (view only).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; another binary through
``LIPSYNC_CHROMIUM``) and the ``playwright`` package; skipped without them. Set
``LIPSYNC_WEB_TEST_URL=http://host:port`` to test a server that is already running
instead of starting one.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS

SCREENSHOT = Path(os.environ.get("LIPSYNC_WEB_SCREENSHOT", "/tmp/webrtcapi.png"))

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LIPSYNC_CHROMIUM)", allow_module_level=True)
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed: pip install playwright", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHORT = "Hello! I am the lip sync avatar, and this sentence checks that my mouth moves."
LONG = " ".join(
    [
        "This is a long sentence that goes on and on so that there is plenty of time to interrupt it.",
        "The avatar keeps talking about nothing in particular, one word after another,",
        "until somebody presses the interrupt button and it has to stop at once.",
    ]
    * 3
)

# Draws the current video frame to a small canvas and returns mean grey levels over a
# grid of cells: enough to see a mouth move, small enough to ship back as JSON.
GRAB_JS = """
(video) => {
  const W = 64, H = 36;
  const c = document.createElement("canvas");
  c.width = W; c.height = H;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage(video, 0, 0, W, H);
  const d = g.getImageData(0, 0, W, H).data;
  const out = new Array(W * H);
  for (let i = 0; i < W * H; i++) out[i] = (d[4 * i] + d[4 * i + 1] + d[4 * i + 2]) / 3;
  return { t: video.currentTime, px: out };
}
"""

# Audio energy the browser received so far (inbound-rtp totalAudioEnergy, Chrome).
AUDIO_JS = """
async () => {
  const pc = window.avatarClient && window.avatarClient.pc;
  if (!pc) return null;
  let energy = null, bytes = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      bytes = s.bytesReceived || 0;
      if (typeof s.totalAudioEnergy === "number") energy = s.totalAudioEnergy;
    }
  });
  return { energy, bytes };
}
"""


@pytest.fixture(scope="module")
def base_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("LIPSYNC_WEB_TEST_URL")
    if url:
        return url.rstrip("/")
    return request.getfixturevalue("server").url  # tests/conftest.py: python -m server on a free port


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page_errors() -> list[str]:
    """JavaScript errors the page threw (filled by the ``page`` fixture)."""
    return []


@pytest.fixture
def page(browser, base_url: str, page_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base_url)
    pg = context.new_page()
    pg.on("pageerror", lambda exc: page_errors.append(str(exc)))
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


def api(base_url: str, path: str, body: dict | None = None, secret: str = "") -> tuple[int, dict]:
    """A chatbot back end's call, with the session secret the page shows."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Session-Secret": secret}
    req = urllib.request.Request(base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_playing(page: Page, timeout: float = 30.0) -> None:
    """The video element shows frames and its clock moves."""
    page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v.readyState >= 2 && v.videoWidth > 0 && v.currentTime > 0; }",
        timeout=timeout * 1000,
    )
    t0 = page.evaluate("document.getElementById('video').currentTime")
    page.wait_for_timeout(600)
    t1 = page.evaluate("document.getElementById('video').currentTime")
    assert t1 > t0 + 0.2, f"video is not advancing: currentTime {t0} -> {t1}"


def grab(page: Page) -> dict:
    return page.eval_on_selector("#video", GRAB_JS)


def motion(frames: list[dict], threshold: float = 24.0) -> int:
    """How many grid cells changed by more than ``threshold`` grey levels across the frames
    (max minus min): codec noise stays under it, a mouth opening does not."""
    cells = zip(*(f["px"] for f in frames), strict=True)
    return sum(1 for values in cells if max(values) - min(values) > threshold)


def sample_frames(page: Page, seconds: float, every_ms: int = 120) -> list[dict]:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        frames.append(grab(page))
        page.wait_for_timeout(every_ms)
    return frames


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    """A warbling tone as a 16-bit mono wav: loud enough to move the mouth."""
    n = int(seconds * rate)
    samples = (
        int(12000 * math.sin(2 * math.pi * 180 * i / rate) * (0.6 + 0.4 * math.sin(2 * math.pi * 4 * i / rate)))
        for i in range(n)
    )
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{n}h", *samples))
    return buf.getvalue()


def session_count(base_url: str) -> int | None:
    status, body = api(base_url, "/stats")
    return body.get("data", {}).get("sessions") if status == 200 else None


def test_webrtcapi_page(page: Page, base_url: str, page_errors: list[str]) -> None:
    started = time.monotonic()
    page.goto("/webrtcapi.html")
    expect(page.locator("#sessionid")).to_have_text("")
    expect(page.locator("#send")).to_be_disabled()

    # -- connect: a session id and a playing video with an audio track --
    page.click("#connect")
    expect(page.locator("#sessionid")).not_to_have_text("", timeout=30_000)
    session_id = page.inner_text("#sessionid").strip()
    secret = page.inner_text("#secret").strip()
    wait_playing(page)
    connected_s = time.monotonic() - started
    tracks = page.evaluate("(() => { const s = document.getElementById('video').srcObject;"
                           " return [s.getVideoTracks().length, s.getAudioTracks().length]; })()")
    assert tracks == [1, 1], f"expected one video and one audio track, got {tracks}"
    assert page.evaluate("document.getElementById('video').playsInline") is True
    code, body = api(base_url, "/is_speaking", {"sessionid": session_id}, secret)
    assert code == 200 and body["code"] == 0 and body["data"] is False, body

    speaking = page.locator("#speaking")
    expect(speaking).to_have_attribute("data-speaking", "false")

    # -- silence: how much does the picture move on its own? --
    silent_frames = sample_frames(page, 1.5)
    silent_motion = motion(silent_frames)
    audio_before = page.evaluate(AUDIO_JS)

    # -- speak over the WebSocket (Enter sends), watch the mouth move --
    page.fill("#text", SHORT)
    t_send = time.monotonic()
    page.press("#text", "Enter")
    expect(page.locator("#text")).to_have_value("")
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    first_speech_s = time.monotonic() - t_send
    speech_frames = sample_frames(page, 1.5)
    speech_motion = motion(speech_frames)
    expect(speaking).to_have_attribute("data-speaking", "false", timeout=60_000)
    audio_after = page.evaluate(AUDIO_JS)
    speech_s = time.monotonic() - t_send

    assert len({tuple(round(p) for p in f["px"]) for f in speech_frames}) > 1, "the video did not change while speaking"
    assert speech_motion >= max(4, 2 * silent_motion), (
        f"the picture barely moved while speaking: {speech_motion} of 2304 cells changed speaking, {silent_motion} silent"
    )
    assert audio_after and audio_after["bytes"] > (audio_before or {}).get("bytes", 0), "no audio arrived"
    if audio_before and audio_before["energy"] is not None and audio_after["energy"] is not None:
        assert audio_after["energy"] > audio_before["energy"], "the browser received no audible speech"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)

    # -- Send button, with "interrupt current speech" ticked, and the Interrupt button --
    page.check("#interrupt-on-send")
    page.fill("#text", LONG)
    page.click("#send")
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    page.wait_for_timeout(800)
    page.screenshot(path=str(SCREENSHOT))  # mid-sentence, the speaking dot lit
    t_int = time.monotonic()
    page.click("#interrupt")
    expect(speaking).to_have_attribute("data-speaking", "false", timeout=1_000)
    interrupt_s = time.monotonic() - t_int
    page.wait_for_timeout(1_200)  # two /is_speaking polls: the server agrees it stopped
    expect(speaking).to_have_attribute("data-speaking", "false")
    code, body = api(base_url, "/is_speaking", {"sessionid": session_id}, secret)
    assert body.get("data") is False, f"/is_speaking after interrupt: {code} {body}"
    wait_playing(page)  # idle frames go on after the interrupt

    # -- record a short clip; the page offers a download link --
    page.click("#record-start")
    expect(page.locator("#record-stop")).to_be_enabled()
    page.fill("#text", "Recording this.")
    page.press("#text", "Enter")
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(speaking).to_have_attribute("data-speaking", "false", timeout=30_000)
    page.click("#record-stop")
    link = page.locator("#record-link")
    expect(link).to_be_visible(timeout=30_000)
    href = link.get_attribute("href")
    assert href and href.startswith(base_url), href
    with urllib.request.urlopen(href, timeout=10) as r:
        clip = r.read()
    assert r.status == 200 and len(clip) > 1000, f"recording download: HTTP {r.status}, {len(clip)} bytes"

    # -- a server error reaches the status line: upload a file that is not audio --
    page.set_input_files("#audio-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio at all " * 20}])
    page.click("#upload")
    expect(page.locator("#status.error")).to_be_visible(timeout=10_000)
    assert page.inner_text("#status").strip(), "the error message is empty"

    # -- a real audio file is spoken --
    page.set_input_files("#audio-file", files=[{"name": "tone.wav", "mimeType": "audio/wav", "buffer": tone_wav(1.5)}])
    page.click("#upload")
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(page.locator("#status.error")).to_have_count(0)
    expect(speaking).to_have_attribute("data-speaking", "false", timeout=30_000)

    assert not page_errors, page_errors

    # -- disconnect: the page resets, the server closes the session --
    before = session_count(base_url)
    page.click("#disconnect")
    expect(page.locator("#sessionid")).to_have_text("")
    expect(page.locator("#connect")).to_be_enabled()
    expect(page.locator("#send")).to_be_disabled()
    assert page.evaluate("document.getElementById('video').srcObject") is None
    if before is not None:
        deadline = time.monotonic() + 15
        while session_count(base_url) >= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_count(base_url) < before, "the server kept the session after the browser closed its peer connection"
    print(
        f"\nconnected+playing {connected_s:.1f} s; first speech {first_speech_s:.2f} s after Enter; "
        f"utterance {speech_s:.1f} s; interrupt {interrupt_s * 1000:.0f} ms; "
        f"changed cells speaking {speech_motion} vs silent {silent_motion}; screenshot {SCREENSHOT}"
    )


def test_unknown_avatar_error_is_shown(page: Page, page_errors: list[str]) -> None:
    page.goto("/webrtcapi.html")
    page.fill("#avatar", "no-such-avatar")
    page.click("#connect")
    status = page.locator("#status.error")
    expect(status).to_be_visible(timeout=15_000)
    assert "no-such-avatar" in page.inner_text("#status")
    expect(page.locator("#sessionid")).to_have_text("")
    expect(page.locator("#connect")).to_be_enabled()
    assert not page_errors, page_errors


def test_viewer_page_connects_and_plays(page: Page, base_url: str, page_errors: list[str]) -> None:
    page.goto("/webrtc.html")
    expect(page.locator("#sessionid")).not_to_have_text("", timeout=30_000)
    wait_playing(page)
    session_id = page.inner_text("#sessionid").strip()
    secret = page.inner_text("#secret").strip()
    # It is view only, but the session is a real one: speech sent over HTTP shows up.
    code, body = api(base_url, "/human", {"sessionid": session_id, "text": "Viewer check.", "type": "echo"}, secret)
    assert code == 200 and body["code"] == 0, body
    deadline = time.monotonic() + 20
    while api(base_url, "/is_speaking", {"sessionid": session_id}, secret)[1].get("data") is not True:
        assert time.monotonic() < deadline, "the viewer's session never started speaking"
        time.sleep(0.05)
    assert page.locator("textarea, #send, #interrupt").count() == 0, "the viewer must not have controls"
    assert not page_errors, page_errors
