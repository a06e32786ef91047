"""What a process holds, read from outside through ``/proc`` (Linux): resident and
proportional memory, anonymous memory, open file descriptors by kind, threads and CPU
time; the ``/dev/shm`` segments of the frame rings; and which process listens on a port.

The load benchmark samples the server and its worker with these while clients come and
go, and the load test checks that what sessions took is given back.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SHM_DIR = Path("/dev/shm")
RING_PREFIX = "lipsync_"
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcSample:
    pid: int
    rss_kb: int  # VmRSS: every resident page, shared ones (the avatar's memory map, rings) included
    pss_kb: int  # shared pages divided among the processes that map them
    anon_kb: int  # anonymous memory: the heap, malloc arenas, thread stacks (what a leak grows)
    shmem_kb: int  # resident shared memory mapped (the rings this process has attached)
    fds: int
    threads: int
    cpu_s: float  # user + system time so far

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in kB (Rss, Pss, Anonymous, Shared_Clean, ...)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, PermissionError):
        return out
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = _kb(value)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> Counter[str]:
    """Open descriptors by kind: ``socket``, ``pipe``, ``anon_inode:[eventfd]``,
    ``/dev/shm/...`` (as ``shm``), ``/dev/...``, other files (as ``file``)."""
    kinds: Counter[str] = Counter()
    folder = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(folder):
        try:
            target = os.readlink(folder / fd)
        except OSError:  # closed while we looked
            continue
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":")[0]] += 1
        elif target.startswith("anon_inode:"):
            kinds[target] += 1
        elif target.startswith("/dev/shm/"):
            kinds["shm"] += 1
        elif target.startswith("/dev/"):
            kinds[target] += 1
        else:
            kinds["file"] += 1
    return kinds


def sample(pid: int | None) -> ProcSample | None:
    """One look at ``pid``; None when there is no such process (or it is a zombie)."""
    if pid is None:
        return None
    try:
        status = _status(pid)
        if status.get("State", "").startswith("Z"):
            return None
        rollup = smaps_rollup(pid)
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu_s = (int(stat[11]) + int(stat[12])) / _TICKS  # utime, stime
        return ProcSample(
            pid=pid,
            rss_kb=_kb(status.get("VmRSS")),
            pss_kb=rollup.get("Pss", 0),
            anon_kb=rollup.get("Anonymous", _kb(status.get("RssAnon"))),
            shmem_kb=_kb(status.get("RssShmem")),
            fds=fd_count(pid),
            threads=int(status.get("Threads", "0")),
            cpu_s=cpu_s,
        )
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, every core summed."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / _TICKS, total / _TICKS


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0.0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(stat[11]) + int(stat[12])) / _TICKS


def shm_entries(prefix: str = RING_PREFIX) -> dict[str, int]:
    """``/dev/shm`` entries whose name starts with ``prefix``, and their sizes in bytes."""
    out: dict[str, int] = {}
    for p in SHM_DIR.glob(prefix + "*"):
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:
            continue
    return out


def mapped_shm(pid: int, prefix: str = RING_PREFIX) -> set[str]:
    """Names of the ``/dev/shm`` segments (``prefix*``) that ``pid`` has mapped now: the
    rings of its open sessions, so they can be told from other servers' segments."""
    out: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                i = line.find("/dev/shm/" + prefix)
                if i >= 0:
                    out.add(line[i + len("/dev/shm/") :].split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def pid_listening_on(port: int) -> int | None:
    """The process with a TCP socket listening on ``port`` (this machine, visible to us)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    return int(entry)
        except OSError:
            continue
    return None
