"""Which process opened a run, and whether that process is still alive.

Every MLflow run lmpipe opens is tagged with its owner: the host name, the process id
and the process's start time. The start time tells a dead process from a new one that
was given the same pid later. On Linux it is ``<boot id>/<pid namespace>/<start in clock
ticks since boot>``, exact and comparable between processes; elsewhere psutil's creation
time (seconds since the epoch).

Only a process of this host can be checked. A run owned by another host is never
judged dead: from here nothing says whether that process still runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST_TAG = "lmpipe.host"
PID_TAG = "lmpipe.pid"
PID_START_TAG = "lmpipe.pid_start"

_PROC = Path("/proc")


def _linux_boot() -> str | None:
    """This boot and pid namespace ("<boot id>/<namespace inode>"), or None where there is no /proc."""
    try:
        boot = (_PROC / "sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat(_PROC / "self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/{namespace}"


def probe(pid: int) -> tuple[bool, str | None]:
    """(whether pid is a live process, its start time or None if unknown). A zombie is not alive."""
    boot = _linux_boot()
    if boot is not None:
        try:
            stat = (_PROC / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            return False, None
        except OSError:
            return True, None
        # "pid (comm) state ... starttime(22nd field)"; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
            return False, None
        return True, f"{boot}/{fields[19]}"
    import psutil  # not Linux: psutil knows the process table

    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False, None
        return True, f"{proc.create_time():.3f}"
    except psutil.NoSuchProcess:
        return False, None
    except psutil.Error:  # e.g. access denied: it exists
        return True, None


def process_start(pid: int | None = None) -> str | None:
    """The start time of process ``pid`` (this process by default) as ``PID_START_TAG`` records it."""
    return probe(os.getpid() if pid is None else pid)[1]


def owner_tags() -> dict[str, str]:
    """The tags that say which process opens a run: ``HOST_TAG``, ``PID_TAG``, ``PID_START_TAG``."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: process_start() or "unknown"}


def _same_start(recorded: str, now: str) -> bool:
    if "/" in recorded or "/" in now:  # Linux: boot/namespace/ticks, exact
        return recorded == now
    try:  # psutil's creation time: seconds, computed from a boot time that may drift by a second
        return abs(float(recorded) - float(now)) < 1.0
    except ValueError:
        return recorded == now


def owner_dead(tags: dict[str, str]) -> bool:
    """True only if the process these owner tags name is known to be gone.

    False when it is alive, and when nothing can be told: no owner tags (a run opened by an
    older lmpipe), another host, or (Linux) another pid namespace on this host (another
    container). A host whose boot id changed was rebooted since: its processes are gone.
    """
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return False
    recorded = tags.get(PID_START_TAG, "unknown")
    boot = _linux_boot()
    if boot is not None and recorded.count("/") == 2:
        rec_boot, rec_ns, _ticks = recorded.split("/")
        if rec_boot != boot.split("/")[0]:
            return True  # this host has been rebooted since the owner started
        if rec_ns != boot.split("/")[1]:
            return False  # another pid namespace: its pids are not ours to look up
    alive, start = probe(pid)
    if not alive:
        return True
    return start is not None and recorded != "unknown" and not _same_start(recorded, start)
