"""Debian's Chromium driven by Playwright (which cannot download its own browser here):
where it is, the flags a closed network needs, and the probe the browser benchmark
installs into the page."""
from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = os.environ.get("LIPSYNC_CHROMIUM", "/usr/bin/chromium")
# Headless, and no background connections: on a closed network Chromium's own lookups
# are refused many at a time. Audio may autoplay without a click.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

PROBE_JS_PATH = Path(__file__).with_name("browser_probe.js")


def probe_js() -> str:
    """The page-side recorder of what Chromium plays (``window.__bench``)."""
    return PROBE_JS_PATH.read_text()
