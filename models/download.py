"""Fetch MuseTalk's weight files from their public hubs, resumably, and verify them.

Plain HTTP(S) with the standard library, for the Hugging Face hub and for plain URLs
alike, so there is one code path to test: a ``.part`` file grows next to the target and
a later run continues it with a ``Range`` request; the finished file is checked against
its size and SHA-256 (published ones where they exist, else what the hub reports: an
LFS file's ETag *is* its SHA-256) before it is renamed into place and recorded in
``models/manifest.json``. ``HF_ENDPOINT`` selects a hub mirror, as for huggingface_hub.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPMessage
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from .weights import (
    HF_DEFAULT_ENDPOINT,
    WeightProblem,
    WeightSpec,
    download_command,
    models_dir,
    read_manifest,
    record_in_manifest,
    resolve,
    specs_for,
    structure_problem,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0
USER_AGENT = "realtime-lipsync-models/0.1 (python urllib)"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A download failed; the message says why and what to do about it."""


@dataclass(frozen=True)
class RemoteFile:
    url: str  # what to GET (redirects are followed)
    size: int | None
    sha256: str | None


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def source_url(s: WeightSpec, endpoint: str | None = None) -> str:
    if s.url:
        return s.url
    return f"{_endpoint(endpoint)}/{s.repo}/resolve/main/{s.filename}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage,
                         newurl: str) -> urllib.request.Request | None:
        return None  # surface the 3xx: the hub puts the file's size and hash on it


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT, **(headers or {})})


def _clean_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256_RE.match(value) else None


def remote_file(s: WeightSpec, endpoint: str | None = None, timeout: float = TIMEOUT_S) -> RemoteFile:
    """Size and hash of ``s`` as its source reports them (one HEAD request)."""
    url = source_url(s, endpoint)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(_request(url, "HEAD"), timeout=timeout) as r:
            headers, status = r.headers, r.status
    except urllib.error.HTTPError as exc:
        if exc.code not in (301, 302, 303, 307, 308):
            raise
        headers, status = exc.headers, exc.code
    linked_size = headers.get("X-Linked-Size") or ""
    length = headers.get("Content-Length") or ""
    if linked_size.isdigit():
        size: int | None = int(linked_size)
    elif status < 300 and length.isdigit():
        size = int(length)
    else:
        size = None  # a bare redirect's Content-Length is the redirect body's
    sha = s.sha256
    if sha is None and s.repo:  # only the hub promises that an LFS ETag is the SHA-256
        sha = _clean_etag(headers.get("X-Linked-ETag")) or _clean_etag(headers.get("ETag"))
    size = s.size or size
    return RemoteFile(url, size, sha)


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class _Progress:
    """tqdm when it is installed, a log line every few seconds otherwise."""

    def __init__(self, name: str, total: int | None, initial: int, enabled: bool) -> None:
        self._bar = None
        self._name, self._total, self._done = name, total, initial
        self._last_log = 0.0
        if not enabled:
            self._enabled = False
            return
        self._enabled = True
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name)

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and time.monotonic() - self._last_log > 5.0:
            self._last_log = time.monotonic()
            total = f" of {self._total / 1e6:.0f} MB" if self._total else ""
            log.info("%s: %.0f MB%s", self._name, self._done / 1e6, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> str:
    """Download ``url`` to ``dest``, resuming ``dest.part``; verify; return the SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the file: not ours to continue
        have = 0
    hasher = hashlib.sha256()
    if have:
        with part.open("rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
    if size is None or have < size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with urllib.request.urlopen(_request(url, headers=headers), timeout=timeout) as r:
            if have and r.status != 206:
                log.info("%s: the server does not resume; starting over", dest.name)
                have, hasher = 0, hashlib.sha256()
            mode = "ab" if have else "wb"
            length = r.headers.get("Content-Length")
            total = size if size is not None else (have + int(length) if length and length.isdigit() else None)
            bar = _Progress(dest.name, total, have, progress)
            try:
                with part.open(mode) as f:
                    while chunk := r.read(CHUNK):
                        f.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
    got = part.stat().st_size
    digest = hasher.hexdigest()
    if size is not None and got != size:
        raise DownloadError(
            f"{dest.name}: got {got} bytes, expected {size}; run the command again to resume"
        )
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise DownloadError(
            f"{dest.name}: SHA-256 {digest} does not match the published {sha256}; "
            "the partial file was removed, run the command again"
        )
    os.replace(part, dest)
    why = structure_problem(dest)
    if why:
        dest.unlink()
        raise DownloadError(f"{dest.name} from {url} is not a usable file ({why}); run the command again")
    return digest


def _offline_reason(exc: BaseException) -> str | None:
    """A short reason when ``exc`` means the host cannot be reached at all."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError) else exc
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, OSError) and not isinstance(exc, urllib.error.HTTPError):
        return str(reason) or type(reason).__name__
    return None


def _offline_message(
    host: str, reason: str, version: str, data_dir: Path, todo: Iterable[WeightSpec], endpoint: str | None
) -> str:
    lines = [
        f"cannot reach {host} ({reason}): this machine looks offline, or the model hub is blocked.",
        "Ways forward:",
        f"  - on a machine with internet: {download_command(version, data_dir)}, then copy "
        f"{models_dir(data_dir)} here (same layout)",
        "  - or set HF_ENDPOINT to a reachable Hugging Face mirror and run the command again",
        f"  - or fetch these files by hand into {models_dir(data_dir)}:",
    ]
    for s in todo:
        lines.append(f"      {source_url(s, endpoint)}  ->  {s.local}" + (f"   ({s.manual})" if s.manual else ""))
    lines.append("Partial downloads are kept and resume on the next run.")
    return "\n".join(lines)


def _recorded_ok(data_dir: Path, s: WeightSpec) -> bool:
    """Present, as the manifest recorded it after a verified download."""
    path = resolve(data_dir, s)
    if path is None:
        return False
    recorded = read_manifest(data_dir).get(path.relative_to(models_dir(data_dir)).as_posix())
    if not recorded:
        return False
    return path.stat().st_size == recorded.get("size") and not structure_problem(path)


def _adopt(data_dir: Path, s: WeightSpec, path: Path, info: RemoteFile | None) -> bool:
    """Whether a file already there (fetched by hand or by the reference's script) can
    stay: whole, and matching the source's size and hash where they are known."""
    if structure_problem(path):
        return False
    rel = path.relative_to(models_dir(data_dir)).as_posix()
    if rel != s.local:
        log.info("%s: using the %s already present", s.description, rel)  # e.g. a .bin VAE
        return True
    if info is None or (info.size is not None and path.stat().st_size != info.size):
        return False
    digest = sha256_of(path) if info.sha256 else None
    if info.sha256 and digest != info.sha256:
        log.warning("%s does not match its source's SHA-256; fetching it again", path)
        return False
    record_in_manifest(data_dir, rel, path.stat().st_size, digest, info.url)
    log.info("%s: the file present matches its source; kept", path)
    return True


def download_weights(
    data_dir: Path | str,
    version: str,
    optional: tuple[str, ...] = (),
    *,
    endpoint: str | None = None,
    progress: bool = True,
    force: bool = False,
    timeout: float = TIMEOUT_S,
) -> list[Path]:
    """Fetch every file ``version`` needs (plus the ``optional`` ones) into ``<data>/models``."""
    data_dir = Path(data_dir)
    wanted = specs_for(version, optional)
    done: list[Path] = []
    for i, s in enumerate(wanted):
        if not force and _recorded_ok(data_dir, s):
            log.info("%s: present (%s)", s.description, resolve(data_dir, s))
            continue
        present = None if force else resolve(data_dir, s)
        is_alternative = present is not None and present.relative_to(models_dir(data_dir)).as_posix() != s.local
        if present is not None and is_alternative and _adopt(data_dir, s, present, None):
            continue
        dest = models_dir(data_dir) / s.local
        url = source_url(s, endpoint)
        try:
            info = remote_file(s, endpoint, timeout)
            if present is not None and _adopt(data_dir, s, present, info):
                continue
            log.info("fetching %s from %s", s.description, url)
            digest = fetch(info.url, dest, size=info.size, sha256=info.sha256, progress=progress, timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            reason = _offline_reason(exc)
            host = urlparse(url).hostname or url
            if reason is not None:
                todo = [t for t in wanted[i:] if not _recorded_ok(data_dir, t)]
                raise DownloadError(_offline_message(host, reason, version, data_dir, todo, endpoint)) from None
            if isinstance(exc, urllib.error.HTTPError):
                hint = {401: "the hub asks for a login", 403: "access denied", 404: "not found (moved or renamed?)"}
                raise DownloadError(
                    f"{url}: HTTP {exc.code} {hint.get(exc.code, exc.reason)}. "
                    f"Fetch it by hand into {dest}" + (f" ({s.manual})" if s.manual else "")
                ) from None
            raise
        record_in_manifest(data_dir, s.local, dest.stat().st_size, digest, url)
        log.info("%s: verified (%d bytes, sha256 %s…)", dest, dest.stat().st_size, digest[:12])
        done.append(dest)
    return done


def verify_weights(data_dir: Path | str, version: str, optional: tuple[str, ...] = ()) -> list[WeightProblem]:
    """Full check: every present file hashed against its manifest entry or published hash."""
    data_dir = Path(data_dir)
    problems: list[WeightProblem] = []
    manifest = read_manifest(data_dir)
    for s in specs_for(version, optional):
        path = resolve(data_dir, s)
        if path is None:
            problems.append(WeightProblem(s, models_dir(data_dir) / s.local, "missing"))
            continue
        rel = path.relative_to(models_dir(data_dir)).as_posix()
        expected = (manifest.get(rel) or {}).get("sha256") or (s.sha256 if rel == s.local else None)
        why = structure_problem(path)
        if why:
            problems.append(WeightProblem(s, path, "corrupt", why))
        elif expected:
            digest = sha256_of(path)
            if digest != expected:
                problems.append(WeightProblem(s, path, "corrupt", f"sha256 {digest[:12]}… != {expected[:12]}…"))
        else:
            log.info("%s: no recorded hash (placed by hand?); structure looks whole", path)
    return problems


__all__ = ["DownloadError", "RemoteFile", "download_weights", "fetch", "remote_file", "sha256_of", "verify_weights"]
