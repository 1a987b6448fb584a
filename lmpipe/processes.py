"""Who a process is, in a form another process (on this host or another) can check: host, pid, start time.

A lease on a stage's output and the MLflow runs a pipeline opens record their
owner this way, so that a later run can tell a live owner from one a kill left
behind. A pid alone is not enough (pids are reused), so the owner also records
when its process started: on Linux ``<boot id>/<pid namespace>/<start in clock
ticks since boot>``, exact and comparable between processes; elsewhere psutil's
creation time (seconds since the epoch). A process that is gone, a zombie, or a
pid now held by a process that started at another time is not the owner any
more; a host whose boot id changed has been rebooted since, so its processes
are gone. Only processes of this host (and pid namespace) can be checked: an
owner elsewhere is reported as ``None`` (unknown), and the caller decides by
other means (a heartbeat), or leaves it alone.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def _same_start(recorded: str, now: str) -> bool:
    if "/" in recorded or "/" in now:  # Linux: boot/namespace/ticks, exact
        return recorded == now
    try:  # psutil's creation time: seconds, computed from a boot time that may drift by a second
        return abs(float(recorded) - float(now)) < 1.0
    except ValueError:
        return recorded == now



@dataclass(frozen=True)
class ProcessOwner:
    """A process: the user it runs as, its host, pid and start time (``process_start``; empty if unknown)."""

    user: str
    host: str
    pid: int
    started: str

    @classmethod
    def current(cls) -> ProcessOwner:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            user = str(os.getuid())
        return cls(user=user, host=socket.gethostname(), pid=os.getpid(), started=process_start() or "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessOwner:
        return cls(user=str(data.get("user", "")), host=str(data.get("host", "")), pid=int(data.get("pid", 0)),
                   started=str(data.get("started", "")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def alive(self) -> bool | None:
        """True if this process still runs, False if it is known to be gone, None if it cannot be told here
        (another host, or another pid namespace of this host: another container)."""
        if self.host != socket.gethostname():
            return None
        boot = _linux_boot()
        if boot is not None and self.started.count("/") == 2:
            recorded_boot, recorded_ns, _ticks = self.started.split("/")
            if recorded_boot != boot.split("/")[0]:
                return False  # this host has been rebooted since the owner started
            if recorded_ns != boot.split("/")[1]:
                return None
        alive, start = probe(self.pid)
        if not alive:
            return False
        return not (start is not None and self.started and not _same_start(self.started, start))

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid}"
