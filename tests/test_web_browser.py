"""The pages in a real browser: Debian's Chromium driven by Playwright against real server
processes (``python -m server``). Covers web/webrtcapi.html feature by feature (connect,
the status line back to idle after speech, a phone-sized layout, blank text, the avatar
and voice pickers, the latency readout, interrupt, record and download, audio upload,
chat with and without a chat model), web/viewer.html watching another page's session,
and web/webrtc.html.

Every test fails on a JavaScript error or a console error the page did not expect, and
leaves screenshots under ``$LIPSYNC_ARTIFACTS`` (default ``tests/artifacts/``).

The module starts two servers on one data directory (the default avatar plus a cropped
portrait one, so switching avatars shows in the video's size): one without a chat model,
one with a local OpenAI-compatible fake (``tests.support.fake_openai``) as its chat model.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; another binary through
``LIPSYNC_CHROMIUM``) and the ``playwright`` package; skipped without them. Set
``LIPSYNC_WEB_TEST_URL=http://host:port`` to test a server that is already running
instead (the chat-model test is then skipped).
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.server_process import ROOT, ServerProcess

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LIPSYNC_CHROMIUM)", allow_module_level=True)
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed: pip install playwright", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("LIPSYNC_ARTIFACTS") or ROOT / "tests" / "artifacts")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
PORTRAIT = "portrait"  # the default avatar cropped to 320x512: another size, so a switch shows
PORTRAIT_X = (96, 416)
CHAT_REPLY = "Hello there. I am a small test model, and I answer in two sentences."

SHORT = "Hello! I am the lip sync avatar, and this sentence checks that my mouth moves."
VIEWER_LINE = "Hello to everyone watching: my mouth moves for you too."
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

NO_SIDEWAYS_SCROLL_JS = """
() => {
  const d = document.documentElement;
  const wide = [...document.querySelectorAll("body *")]
    .filter((el) => el.getBoundingClientRect().right > d.clientWidth + 0.5)
    .map((el) => `${el.tagName.toLowerCase()}#${el.id}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`);
  return { scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, bodyScrollWidth: document.body.scrollWidth, wide: wide.slice(0, 5) };
}
"""


# ---- servers, a chat model, the browser ----


class ChatModel:
    """``tests.support.fake_openai.FakeOpenAI`` on a loop of its own thread: the sync tests'
    local OpenAI-compatible chat model."""

    def __init__(self) -> None:
        from tests.support.fake_openai import ChatScript, FakeOpenAI

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-openai", daemon=True)
        self.thread.start()
        self.fake = FakeOpenAI()
        self.fake.chat = ChatScript(reply=CHAT_REPLY, delay_s=0.05)  # ~0.7 s: the transcript shows it stream
        self.base_url = asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def web_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with the default avatar (copied from the suite's, built once) and
    ``portrait``: the default cropped to 320x512."""
    from avatars.avatar import avatar_dir, save_avatar
    from avatars.default import DEFAULT_NAME, ensure_default_avatar

    avatar = ensure_default_avatar(data_dir)
    try:
        frames = np.ascontiguousarray(np.stack([np.asarray(avatar.frames[k])[:, slice(*PORTRAIT_X)] for k in range(avatar.num_frames)]))
        landmarks = avatar.landmarks.copy()
        landmarks[..., 0] -= PORTRAIT_X[0]
    finally:
        avatar.release()
    path = tmp_path_factory.mktemp("web-data")
    shutil.copytree(avatar_dir(data_dir, DEFAULT_NAME), avatar_dir(path, DEFAULT_NAME))
    save_avatar(path, PORTRAIT, frames, landmarks, meta={"kind": "image", "source": "the default avatar, cropped"}).release()
    return path


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest) -> Iterator[dict]:
    """Both servers start at once (the chat one in the background) and stop at the end."""
    if os.environ.get("LIPSYNC_WEB_TEST_URL"):
        yield {"url": os.environ["LIPSYNC_WEB_TEST_URL"].rstrip("/"), "chat": None, "model": None}
        return
    web_data: Path = request.getfixturevalue("web_data")
    model = ChatModel()
    plain = ServerProcess(web_data, "--log-level", "WARNING")
    chat = ServerProcess(web_data, "--log-level", "WARNING", "--chat-base-url", model.base_url, "--chat-model", "fake-chat")
    try:
        yield {"url": plain.wait_ready().url, "chat": chat, "model": model}
    finally:
        plain.stop()
        chat.stop()
        model.close()


@pytest.fixture(scope="module")
def base_url(servers: dict) -> str:
    return servers["url"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Problems:
    """JavaScript errors and console errors of a test's pages; ``allow`` the expected ones
    (a 4xx a test provokes logs "Failed to load resource")."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        self._pages: list[Page] = []

    def watch(self, page: Page) -> Page:
        if any(p is page for p in self._pages):
            return page
        self._pages.append(page)
        page.on("pageerror", lambda exc: self.seen.append(f"page error: {exc}"))
        page.on("console", lambda m: m.type == "error" and self.seen.append(f"console error: {m.text} @ {m.location.get('url', '')}"))
        page.set_default_timeout(30_000)
        return page

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [s for s in self.seen if not any(p.search(s) for p in self.allowed)]


@pytest.fixture
def problems() -> Problems:
    return Problems()


@pytest.fixture
def open_page(browser: Browser, problems: Problems) -> Iterator:
    """``open_page(url, viewport=DESKTOP)``: a page in a fresh context; at the end of the
    test every page must be free of unexpected errors."""
    contexts = []

    def make(base: str, viewport: dict = DESKTOP) -> Page:
        ctx = browser.new_context(viewport=viewport, base_url=base, accept_downloads=True)
        contexts.append(ctx)
        ctx.on("page", problems.watch)  # pages the page opens (a viewer) too
        return problems.watch(ctx.new_page())

    yield make
    for ctx in contexts:
        ctx.close()
    assert not problems.unexpected(), problems.unexpected()


@pytest.fixture
def page(open_page, base_url: str) -> Page:
    return open_page(base_url)


def shot(page: Page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


# ---- helpers ----


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
    page.wait_for_timeout(500)
    t1 = page.evaluate("document.getElementById('video').currentTime")
    assert t1 > t0 + 0.2, f"video is not advancing: currentTime {t0} -> {t1}"


def connect(page: Page, path: str = "/webrtcapi.html") -> tuple[str, str]:
    """Open the page, press Connect, wait for playing video: (session id, secret)."""
    page.goto(path)
    expect(page.locator("#status")).to_have_attribute("data-state", "offline")
    page.click("#connect")
    expect(page.locator("#sessionid")).not_to_have_text("", timeout=30_000)
    wait_playing(page)
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    return page.text_content("#sessionid").strip(), page.text_content("#secret").strip()


def say(page: Page, text: str, key: str = "Enter") -> None:
    page.fill("#text", text)
    page.press("#text", key)
    expect(page.locator("#text")).to_have_value("")


def video_size(page: Page) -> list[int]:
    return page.evaluate("(() => { const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight]; })()")


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


def sideways(page: Page) -> dict:
    return page.evaluate(NO_SIDEWAYS_SCROLL_JS)


# ---- the control page ----


def test_connect_speak_and_status_returns_to_idle(page: Page, base_url: str) -> None:
    """Connect plays video and sound; speech lights the badge, the status line says
    Speaking… and then Idle; the mouth moves; the transcript and the latency readout fill."""
    started = time.monotonic()
    page.goto("/webrtcapi.html")
    expect(page.locator("#send")).to_be_disabled()
    session_id, secret = connect(page)
    connected_s = time.monotonic() - started
    tracks = page.evaluate("(() => { const s = document.getElementById('video').srcObject;"
                           " return [s.getVideoTracks().length, s.getAudioTracks().length]; })()")
    assert tracks == [1, 1], f"expected one video and one audio track, got {tracks}"
    assert page.evaluate("document.getElementById('video').playsInline") is True
    code, body = api(base_url, "/is_speaking", {"sessionid": session_id}, secret)
    assert code == 200 and body["data"] is False, body
    speaking, status = page.locator("#speaking"), page.locator("#status")
    expect(speaking).to_have_attribute("data-speaking", "false")
    expect(page.locator("#latency-value")).to_have_text("—")

    silent_motion = motion(sample_frames(page, 1.2))
    audio_before = page.evaluate(AUDIO_JS)
    # What a "message" listener sees of client.speaking when speaking_ended arrives (it must be false).
    page.evaluate("window.__ended = []; window.avatarClient.addEventListener('message', (e) =>"
                  " e.detail.event === 'speaking_ended' && window.__ended.push(window.avatarClient.speaking))")

    t_send = time.monotonic()
    say(page, SHORT)
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(status).to_have_attribute("data-state", "speaking")
    expect(status).to_have_text("Speaking…")
    first_speech_s = time.monotonic() - t_send
    speech_frames = sample_frames(page, 1.5)
    shot(page, "speaking")
    speech_motion = motion(speech_frames)

    # The status line comes back to idle once the speech has played out (it used to stay "Speaking…").
    expect(status).to_have_attribute("data-state", "idle", timeout=60_000)
    expect(status).to_contain_text("Idle")
    expect(speaking).to_have_attribute("data-speaking", "false")
    assert page.evaluate("window.__ended") == [False], "a message listener saw speaking still on after speaking_ended"
    speech_s = time.monotonic() - t_send
    audio_after = page.evaluate(AUDIO_JS)
    page.wait_for_timeout(1_200)  # two /is_speaking polls agree: still idle
    expect(status).to_have_attribute("data-state", "idle")

    assert speech_motion >= max(4, 2 * silent_motion), (
        f"the picture barely moved while speaking: {speech_motion} of 2304 cells changed speaking, {silent_motion} silent"
    )
    assert audio_after and audio_after["bytes"] > (audio_before or {}).get("bytes", 0), "no audio arrived"
    if audio_before and audio_before["energy"] is not None and audio_after["energy"] is not None:
        assert audio_after["energy"] > audio_before["energy"], "the browser received no audible speech"

    # The latency readout: send -> first speaking frame, measured in the page, with the server's figure.
    readout = page.inner_text("#latency-value")
    match = re.fullmatch(r"(\d+) ms", readout)
    assert match, f"latency readout {readout!r}"
    latency_ms = int(match.group(1))
    assert 0 < latency_ms < first_speech_s * 1000 + 1000, (latency_ms, first_speech_s)
    detail = page.inner_text("#latency-detail")
    assert re.search(r"event \d+ ms", detail) and re.search(r"server \d+ ms", detail), detail

    # The transcript has the line, no longer marked as speaking.
    line = page.locator("#transcript li.avatar")
    expect(line).to_have_count(1)
    expect(line).to_contain_text(SHORT)
    expect(line).not_to_have_class(re.compile("speaking"))
    shot(page, "idle")
    print(f"\nconnected+playing {connected_s:.1f} s; first speech {first_speech_s:.2f} s after Enter (page readout "
          f"{readout}, {detail}); utterance {speech_s:.1f} s; changed cells speaking {speech_motion} vs silent {silent_motion}")


def test_phone_viewport_has_no_sideways_scroll(open_page, base_url: str) -> None:
    page = open_page(base_url, PHONE)
    page.goto("/webrtcapi.html")
    expect(page.locator("#avatar")).to_have_attribute("data-loaded", "true")
    expect(page.locator("#voice")).to_have_attribute("data-loaded", "true")
    empty = sideways(page)
    shot(page, "phone-empty")
    assert empty["scrollWidth"] <= empty["clientWidth"], f"the empty page scrolls sideways at 390 px: {empty}"
    connect(page)
    say(page, "Phone check.")
    expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=30_000)
    live = sideways(page)
    shot(page, "phone-live")
    assert live["scrollWidth"] <= live["clientWidth"], f"the page with video scrolls sideways at 390 px: {live}"
    stage = page.locator("#stage").bounding_box()
    assert stage and stage["width"] <= PHONE["width"], stage
    # The controls a person needs first are on screen without scrolling.
    for sel in ("#connect", "#avatar"):
        box = page.locator(sel).bounding_box()
        assert box and box["y"] + box["height"] <= PHONE["height"], (sel, box)


def test_blank_text_gives_feedback(page: Page) -> None:
    connect(page)
    hint = page.locator("#text-hint")
    expect(hint).to_be_hidden()
    page.fill("#text", "   \n ")
    page.click("#send")
    expect(hint).to_be_visible()
    expect(hint).to_contain_text("Type something")
    expect(page.locator("#text")).to_have_attribute("aria-invalid", "true")
    assert page.evaluate("document.activeElement.id") == "text"
    expect(page.locator("#transcript li")).to_have_count(0)  # nothing was sent
    shot(page, "blank-text")
    page.fill("#text", "Now there is something.")  # typing clears the hint
    expect(hint).to_be_hidden()
    expect(page.locator("#text")).to_have_attribute("aria-invalid", "false")


def test_avatar_picker_lists_avatars_and_reconnects(page: Page, base_url: str) -> None:
    code, body = api(base_url, "/avatars")
    assert code == 200, body
    names = [a["name"] for a in body["data"]["avatars"]]
    if PORTRAIT not in names:
        pytest.skip(f"the server under test has no {PORTRAIT!r} avatar: {names}")
    page.goto("/webrtcapi.html")
    expect(page.locator("#avatar")).to_have_attribute("data-loaded", "true")
    options = page.locator("#avatar option")
    expect(options).to_have_count(len(names))
    assert sorted(options.evaluate_all("os => os.map((o) => o.value)")) == sorted(names)
    expect(page.locator("#avatar")).to_have_value(body["data"]["default"])
    expect(page.locator(f"#avatar option[value={PORTRAIT}]")).to_contain_text("320×512")

    first, first_secret = connect(page)
    assert video_size(page) == [512, 512]
    page.select_option("#avatar", PORTRAIT)  # while connected: reconnects with it
    page.wait_for_function(f"window.avatarClient.sessionid && window.avatarClient.sessionid !== {json.dumps(first)}")
    page.wait_for_function("document.getElementById('video').videoWidth === 320")
    wait_playing(page)
    assert video_size(page) == [320, 512]
    second = page.text_content("#sessionid").strip()
    assert second != first
    assert f"avatar={PORTRAIT}" in page.url  # a reload keeps the choice
    shot(page, "avatar-portrait")
    # The old session is gone on the server; a reload reconnects to the chosen avatar.
    code, _ = api(base_url, "/is_speaking", {"sessionid": first}, first_secret)
    assert code == 404, f"the first session still answers: {code}"
    page.reload()
    expect(page.locator("#avatar")).to_have_value(PORTRAIT)


def test_voice_picker_lists_the_servers_voices(page: Page, base_url: str) -> None:
    code, body = api(base_url, "/voices")
    assert code == 200, f"GET /voices: {code} {body}"
    voices = body["data"]["voices"]
    assert voices, body
    page.goto("/webrtcapi.html")
    select = page.locator("#voice")
    expect(select).to_be_enabled()
    expect(page.locator("#voice option")).to_have_count(len(voices) + 1)  # and "Default"
    values = page.locator("#voice option").evaluate_all("os => os.map((o) => o.value)")
    assert values[0] == "" and sorted(values[1:]) == sorted(v["id"] for v in voices)
    if body["data"].get("default"):
        expect(page.locator("#voice option").first).to_contain_text("Default")
    # Speak with a chosen voice (not the default): it speaks, no error.
    other = next((v["id"] for v in voices if v["id"] != body["data"].get("default")), voices[0]["id"])
    page.select_option("#voice", other)
    connect(page)
    say(page, "A different voice.")
    expect(page.locator("#status")).to_have_attribute("data-state", "speaking", timeout=20_000)
    expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=30_000)
    shot(page, "voice")
    page.reload()  # the choice is remembered
    expect(page.locator("#voice")).to_have_value(other)


def test_interrupt_stops_speech(page: Page, base_url: str) -> None:
    session_id, secret = connect(page)
    speaking = page.locator("#speaking")
    page.check("#interrupt-on-send")
    page.fill("#text", LONG)
    page.click("#send")
    expect(speaking).to_have_attribute("data-speaking", "true", timeout=20_000)
    page.wait_for_timeout(800)
    shot(page, "interrupt-before")
    t_int = time.monotonic()
    page.click("#interrupt")
    expect(speaking).to_have_attribute("data-speaking", "false", timeout=1_000)
    interrupt_s = time.monotonic() - t_int
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    expect(page.locator("#status")).to_contain_text("Interrupted")
    page.wait_for_timeout(1_200)  # two /is_speaking polls: the server agrees it stopped
    expect(speaking).to_have_attribute("data-speaking", "false")
    code, body = api(base_url, "/is_speaking", {"sessionid": session_id}, secret)
    assert body.get("data") is False, f"/is_speaking after interrupt: {code} {body}"
    expect(page.locator("#transcript li.avatar .tag[data-tag=interrupted]")).to_have_count(1)
    wait_playing(page)  # idle frames go on after the interrupt
    shot(page, "interrupt-after")
    print(f"\ninterrupt {interrupt_s * 1000:.0f} ms")


def test_record_yields_a_downloadable_mp4(page: Page, base_url: str) -> None:
    connect(page)
    page.click("#record-start")
    expect(page.locator("#record-stop")).to_be_enabled()
    expect(page.locator("#record-time")).to_have_text(re.compile(r"0:0\d"))
    say(page, "Recording this.")
    expect(page.locator("#speaking")).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(page.locator("#speaking")).to_have_attribute("data-speaking", "false", timeout=30_000)
    page.click("#record-stop")
    link = page.locator("#record-link")
    expect(link).to_be_visible(timeout=30_000)
    href = link.get_attribute("href")
    assert href and href.startswith(base_url), href
    shot(page, "record")
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename.endswith(".mp4"), download.suggested_filename
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    saved = ARTIFACTS / "web-recording.mp4"
    download.save_as(saved)
    data = saved.read_bytes()
    assert len(data) > 1000 and data[4:8] == b"ftyp", f"not an mp4: {len(data)} bytes, {data[:16]!r}"


def test_audio_upload_speaks_and_bad_files_say_why(page: Page, problems: Problems) -> None:
    problems.allow(r"Failed to load resource: the server responded with a status of 4\d\d .*@ .*/humanaudio")
    connect(page)
    page.set_input_files("#audio-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio at all " * 20}])
    page.click("#upload")
    expect(page.locator("#status.error")).to_be_visible(timeout=10_000)
    assert page.inner_text("#status").strip(), "the error message is empty"
    page.set_input_files("#audio-file", files=[{"name": "tone.wav", "mimeType": "audio/wav", "buffer": tone_wav(1.5)}])
    page.click("#upload")
    expect(page.locator("#speaking")).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(page.locator("#status.error")).to_have_count(0)
    expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=30_000)


def test_unknown_avatar_error_is_shown(page: Page, problems: Problems) -> None:
    problems.allow(r"status of 404 .*@ .*/offer")
    page.goto("/webrtcapi.html?avatar=no-such-avatar")
    expect(page.locator("#avatar")).to_have_value("no-such-avatar")
    page.click("#connect")
    expect(page.locator("#status.error")).to_be_visible(timeout=15_000)
    assert "no-such-avatar" in page.inner_text("#status")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#sessionid")).to_have_text("")
    expect(page.locator("#connect")).to_be_enabled()


def test_chat_without_a_chat_model_shows_the_servers_message(page: Page, base_url: str, problems: Problems) -> None:
    problems.allow(r"status of 4\d\d .*@ .*/human$")
    session_id, secret = connect(page)
    code, body = api(base_url, "/human", {"sessionid": session_id, "type": "chat", "text": "Hi"}, secret)
    if code == 200:
        pytest.skip("the server under test has a chat model")
    assert 400 <= code < 500, (code, body)
    page.check("input[name=mode][value=chat]")
    page.fill("#text", "Hello, who are you?")
    page.press("#text", "Enter")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "error", timeout=10_000)
    shown = page.inner_text("#status")
    assert body["msg"].rstrip(".")[:60].lower() in shown.lower(), (shown, body["msg"])
    expect(page.locator("#text")).to_have_value("Hello, who are you?")  # given back to send again
    expect(page.locator("#transcript li.user .tag")).to_have_text("not sent")
    expect(page.locator("#transcript li.avatar")).to_have_count(0)
    shot(page, "chat-unconfigured")


def test_chat_with_a_model_streams_the_reply_into_the_transcript(open_page, servers: dict) -> None:
    if servers["chat"] is None:
        pytest.skip("LIPSYNC_WEB_TEST_URL: no chat model of this module's own")
    url = servers["chat"].wait_ready().url
    page = open_page(url)
    connect(page)
    page.check("input[name=mode][value=chat]")
    # Every text the reply's line shows, as it changes.
    page.evaluate("""() => { window.__shown = [];
      new MutationObserver(() => { const p = document.querySelector('#transcript li.avatar p');
        if (p && p.textContent !== window.__shown.at(-1)) window.__shown.push(p.textContent); })
      .observe(document.getElementById('transcript'), { subtree: true, childList: true, characterData: true }); }""")
    say(page, "Hi! Who are you?")
    expect(page.locator("#transcript li.user")).to_contain_text("Hi! Who are you?")
    reply = page.locator("#transcript li.avatar")
    expect(reply).to_have_count(1, timeout=20_000)
    expect(page.locator("#status")).to_have_attribute("data-state", "speaking", timeout=20_000)
    expect(reply).to_contain_text(CHAT_REPLY, timeout=20_000)
    shot(page, "chat-speaking")
    shown = [t for t in page.evaluate("window.__shown") if t]
    assert len(shown) >= 3 and shown[-1] == CHAT_REPLY, f"the reply did not stream into the transcript: {shown}"
    assert all(CHAT_REPLY.startswith(t) for t in shown), shown
    expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=60_000)
    expect(page.locator("#latency-value")).to_have_text(re.compile(r"^\d+ ms$"))
    calls = servers["model"].fake.chat_calls
    assert calls and calls[-1].body["messages"][-1]["content"] == "Hi! Who are you?", [c.body for c in calls]
    shot(page, "chat-idle")


# ---- watching a session ----


def test_viewer_watches_the_same_session(open_page, base_url: str, problems: Problems) -> None:
    control = open_page(base_url)
    control.goto(f"/webrtcapi.html?avatar={PORTRAIT}")
    control.click("#connect")
    wait_playing(control)
    session_id = control.text_content("#sessionid").strip()
    before = session_count(base_url)
    link = control.locator("#viewer-link")
    expect(link).to_be_visible()
    expect(link).to_have_text("Open a viewer")
    with control.context.expect_page() as info:
        link.click()
    viewer = info.value
    assert "viewer.html" in viewer.url and f"sessionid={session_id}" in viewer.url, viewer.url
    expect(viewer.locator("#status")).to_have_attribute("data-state", re.compile("idle|speaking"), timeout=30_000)
    wait_playing(viewer)
    assert video_size(viewer) == video_size(control), "the viewer shows another picture than the session's"
    assert viewer.evaluate("window.avatarClient.watching") is True
    assert viewer.evaluate("!!window.avatarClient.es && !window.avatarClient.ws"), "the viewer listens on GET /events"
    assert viewer.evaluate("window.avatarClient.sessionid") == session_id
    assert viewer.locator("textarea, #send, #interrupt").count() == 0, "the viewer must not have controls"
    if before is not None:
        assert session_count(base_url) == before, "the viewer opened a session of its own"

    silent_motion = motion(sample_frames(viewer, 1.0))
    say(control, VIEWER_LINE)
    expect(viewer.locator("#speaking")).to_have_attribute("data-speaking", "true", timeout=20_000)
    expect(viewer.locator("#caption")).to_have_text(VIEWER_LINE)
    speech_motion = motion(sample_frames(viewer, 1.5))
    shot(viewer, "viewer-speaking")
    shot(control, "viewer-control")
    assert speech_motion >= max(4, 2 * silent_motion), f"the viewer's picture barely moved: {speech_motion} vs {silent_motion}"
    expect(viewer.locator("#status")).to_have_attribute("data-state", "idle", timeout=30_000)

    # A second viewer shares it too; closing a viewer leaves the session running.
    second = control.context.new_page()
    second.goto(viewer.url)
    wait_playing(second)
    second.close()
    control.wait_for_timeout(500)
    expect(control.locator("#status")).not_to_have_attribute("data-state", "error")
    assert control.evaluate("window.avatarClient.sessionid") == session_id
    wait_playing(control)
    wait_playing(viewer)
    # The control page disconnects: the viewer says the session ended.
    control.click("#disconnect")
    expect(viewer.locator("#status")).to_contain_text("The session ended", timeout=15_000)
    expect(viewer.locator("#stage")).not_to_have_class(re.compile("live"))


def test_viewer_without_a_session_says_how_to_get_one(open_page, base_url: str) -> None:
    page = open_page(base_url, PHONE)
    page.goto("/viewer.html")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#status")).to_contain_text("Open a viewer")
    layout = sideways(page)
    assert layout["scrollWidth"] <= layout["clientWidth"], f"the viewer scrolls sideways at 390 px: {layout}"
    shot(page, "viewer-phone-no-session")


def test_webrtc_page_opens_its_own_session(page: Page, base_url: str) -> None:
    page.goto("/webrtc.html")
    expect(page.locator("#sessionid")).not_to_have_text("", timeout=30_000)
    wait_playing(page)
    session_id = page.text_content("#sessionid").strip()
    secret = page.text_content("#secret").strip()
    # It is view only, but the session is a real one: speech sent over HTTP shows up.
    code, body = api(base_url, "/human", {"sessionid": session_id, "text": "Viewer check.", "type": "echo"}, secret)
    assert code == 200 and body["code"] == 0, body
    deadline = time.monotonic() + 20
    while api(base_url, "/is_speaking", {"sessionid": session_id}, secret)[1].get("data") is not True:
        assert time.monotonic() < deadline, "the page's session never started speaking"
        time.sleep(0.05)
    assert page.locator("textarea, #send, #interrupt").count() == 0, "the viewer must not have controls"
