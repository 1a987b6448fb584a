"""Who a process is, in a form another process (on this host or another) can check: host, pid, start time.

A lease on a stage's output and the MLflow runs a pipeline opens record their
owner this way, so that a later run can tell a live owner from one a kill left
behind. A pid alone is not enough (pids are reused), so the owner also records
when its process started; a process that is gone, a zombie, or a pid now held
by a process that started at another time is not the owner any more. Only
processes of this host can be checked; an owner on another host is reported as
``None`` (unknown), and the caller decides by other means (a heartbeat).
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: the fields after it follow the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # zombie or dead: killed, not yet reaped by its parent
        return None
    return int(fields[19])  # field 22 of stat


def _start_marker(pid: int) -> str:
    ticks = _start_ticks(pid)
    return str(ticks) if ticks is not None else ""


@dataclass(frozen=True)
class ProcessOwner:
    """A process: the user it runs as, its host, pid and start time (empty where /proc is not available)."""

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
        return cls(user=user, host=socket.gethostname(), pid=os.getpid(), started=_start_marker(os.getpid()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessOwner:
        return cls(user=str(data.get("user", "")), host=str(data.get("host", "")), pid=int(data.get("pid", 0)),
                   started=str(data.get("started", "")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def alive(self) -> bool | None:
        """True if this process still runs, False if it is gone, None if it is on another host (unknown)."""
        if self.host != socket.gethostname():
            return None
        if self.pid == os.getpid():
            return True
        if os.path.isdir("/proc"):
            ticks = _start_ticks(self.pid)
            return ticks is not None and (not self.started or str(ticks) == self.started)
        try:  # no /proc (macOS): the pid alone
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid}"
