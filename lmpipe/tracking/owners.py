"""Which process opened a run, as tags on the run, and whether that process is known to be gone.

Every MLflow run lmpipe opens is tagged with its owner (``lmpipe.processes.ProcessOwner``:
host, pid, process start time). Only a process of this host can be checked; a run owned by
another host is never judged dead: from here nothing says whether that process still runs.
"""

from __future__ import annotations

from lmpipe.processes import ProcessOwner

HOST_TAG = "lmpipe.host"
PID_TAG = "lmpipe.pid"
PID_START_TAG = "lmpipe.pid_start"


def owner_tags() -> dict[str, str]:
    """The tags that say which process opens a run: ``HOST_TAG``, ``PID_TAG``, ``PID_START_TAG``."""
    me = ProcessOwner.current()
    return {HOST_TAG: me.host, PID_TAG: str(me.pid), PID_START_TAG: me.started or "unknown"}


def owner_dead(tags: dict[str, str]) -> bool:
    """True only if the process these owner tags name is known to be gone.

    False when it is alive, and when nothing can be told: no owner tags (a run opened by an
    older lmpipe), another host, or (Linux) another pid namespace on this host (another
    container).
    """
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return False
    started = tags.get(PID_START_TAG, "unknown")
    owner = ProcessOwner(user="", host=tags.get(HOST_TAG, ""), pid=pid, started="" if started == "unknown" else started)
    return owner.alive() is False
