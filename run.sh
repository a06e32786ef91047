#!/usr/bin/env bash
# Real-Time Lip Sync: set up and run.
#
#   ./run.sh              set up (virtual environment + install), then serve on :8010
#                         with the default avatar and the CPU engine
#   ./run.sh test [ARGS]  set up with the test extras, then lint (ruff), type-check (mypy) and run
#                         the whole test suite (ARGS go to pytest), then the pipecat and LiveKit
#                         integrations' tests, each in its own environment (integrations/NAME/.venv;
#                         LIPSYNC_INTEGRATION_TESTS=0 leaves them out)
#   ./run.sh bench [...]  set up, then run the benchmarks (python -m bench ...)
#   ./run.sh gpu-check [--dry-run]
#                         the one-call MuseTalk check for a bare GPU machine (no set-up, no
#                         network: the machine's python3 with its CUDA torch, plus wheels
#                         carried in .whl/); one report under $OUT or bench/out/. --dry-run:
#                         the same path on this machine's CPU with tiny sizes (about a minute)
#
# Idempotent: the environment is (re)installed only when pyproject.toml changes.
# Settings: LIPSYNC_VENV (default .venv), PYTHON (default python3), and any server
# flag after the command, e.g. ./run.sh serve --port 9000.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LIPSYNC_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
MODE="${1:-serve}"
[ $# -gt 0 ] && shift

log() { printf '[run.sh] %s\n' "$*" >&2; }

if [ "$MODE" = gpu-check ]; then
    # Before any set-up: a bare GPU machine has no network to install from. The project's
    # environment runs it where it has torch (the dry run here), else the machine's python3.
    GPY="${LIPSYNC_GPU_PYTHON:-}"
    if [ -z "$GPY" ]; then
        if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
            GPY="$VENV/bin/python"
        else
            GPY="$PYTHON"
        fi
    fi
    log "gpu-check with $GPY"
    PYTHONUNBUFFERED=1 exec "$GPY" -m bench gpu-check "$@"
fi

"$PYTHON" - <<'PY' || { log "Python 3.10 or newer is needed (set PYTHON=/path/to/python3.x)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

install() {  # install() EXTRAS: only when pyproject.toml or the extras changed
    local extras="$1" stamp="$VENV/.lipsync-installed"
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    log "installing (extras: ${extras:-none})"
    "$PY" -m pip install -q --upgrade pip
    if [ -n "$extras" ] && [[ "$extras" == *musetalk* ]] && ! "$PY" -c "import torch" 2>/dev/null; then
        # Pinned so a CPU machine takes the local CPU build instead of pulling CUDA packages;
        # GPU users install their CUDA torch first and this step is skipped.
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    if [ -n "$extras" ]; then
        "$PY" -m pip install -q -e ".[$extras]"
    else
        "$PY" -m pip install -q -e .
    fi
    echo "$want" > "$stamp"
}

browser() {  # Debian's Chromium for the browser test (Playwright cannot download its own here)
    if [ -x /usr/bin/chromium ]; then return; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing Debian's chromium for the browser test"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || log "could not install chromium; the browser test will be skipped"
    else
        log "no /usr/bin/chromium (install Debian's 'chromium' package); the browser test will be skipped"
    fi
}

integration_env() {  # integrations/NAME in its own venv: pipecat's and livekit's protobuf pins clash with mediapipe's
    local dir="integrations/$1" venv="integrations/$1/.venv" want
    want="$(sha256sum "$dir/pyproject.toml" | cut -c1-16)"
    if [ ! -x "$venv/bin/python" ]; then
        log "creating $venv for the $1 integration"
        "$PYTHON" -m venv "$venv"
    fi
    if [ "$(cat "$venv/.lipsync-installed" 2>/dev/null)" != "$want" ]; then
        log "installing $dir[test] into $venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e "$dir[test]"
        echo "$want" > "$venv/.lipsync-installed"
    fi
}

integration_tests() {  # their own tests, against a real server from $VENV
    log "the $1 integration's tests (integrations/$1/.venv)"
    LIPSYNC_SERVER_PYTHON="$PY" "integrations/$1/.venv/bin/python" -m pytest -q "integrations/$1/tests"
}

case "$MODE" in
    serve)
        install ""
        # the defaults are port 8010, the default avatar and the CPU engine; LIPSYNC_* and
        # --config can change them (flags given here beat both)
        exec "$PY" -m server "$@"
        ;;
    test)
        install "musetalk,dev"
        browser
        log "ruff (lint) and mypy (types of the product and tests/support)"
        "$PY" -m ruff check --quiet .
        "$PY" -m mypy
        if [ "${LIPSYNC_INTEGRATION_TESTS:-1}" = 0 ]; then
            exec "$PY" -m pytest "$@"
        fi
        # the integrations' environments first: the main suite drives the LiveKit worker too
        for name in pipecat livekit; do integration_env "$name"; done
        "$PY" -m pytest "$@"
        for name in pipecat livekit; do integration_tests "$name"; done
        ;;
    bench)
        install "musetalk,dev"
        exec "$PY" -m bench "$@"
        ;;
    *)
        log "unknown command '$MODE': use './run.sh', './run.sh test', './run.sh bench' or './run.sh gpu-check'"
        exit 2
        ;;
esac
