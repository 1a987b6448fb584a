"""A lease on a stage's output: one process builds ``<stage>/<fingerprint>`` at a time, others wait and reuse it.

The lease is a small JSON file next to the output, ``<fingerprint>.lease``, naming
its holder (user, host, pid and the process's start time, a random token) and a
heartbeat counter the holder's thread bumps every ``heartbeat_s``. It lives on
the filesystem only, so runs on several machines sharing a work directory
coordinate without any database:

- taking a free lease is one atomic ``link()`` of a fully written file (fails
  if a lease is there; readers never see a half-written lease);
- a waiter logs once whom it waits for, and polls until the lease is released;
- a lease is stale when its holder is a process of this host that is gone (a
  kill), at once; or when the waiter has seen its heartbeat stand still for
  ``stale_s`` of the waiter's own clock (another host's holder: no clock of two
  machines is compared). A stale lease is taken over under a second, short-lived
  ``.takeover`` lock, which removes it only if it is still the stale one; so two
  waiters never both take over, and a fresh lease is never removed;
- the holder checks the lease is still its own before it publishes; a holder
  that lost it (frozen longer than ``stale_s``) fails instead of publishing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from lmpipe.processes import ProcessOwner

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".lease"
STALE_ENV = "LMPIPE_LEASE_STALE_S"
DEFAULT_STALE_S = 120.0


class LeaseLostError(RuntimeError):
    """Another process took this stage's lease over: this one's output is not published."""


def lease_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + LEASE_SUFFIX)


def stale_seconds() -> float:
    """The configured stale time (``lease_stale_s``, handed to every process of a run through the environment)."""
    value = os.environ.get(STALE_ENV)
    return float(value) if value else DEFAULT_STALE_S


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Seen:
    """What a waiter saw of a lease it does not hold: its content, and since when (monotonic) it stood still."""

    token: str
    beat: int
    since: float


@dataclass
class Lease:
    """Hold ``lease_path(out_dir)`` while building ``out_dir``; ``with Lease(...)`` waits for it."""

    out_dir: Path
    stale_s: float = field(default_factory=stale_seconds)
    poll_s: float = 0.5
    heartbeat_s: float | None = None  # default: a quarter of stale_s, at most 10 s
    owner: ProcessOwner = field(default_factory=ProcessOwner.current)
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    _beat: int = 0
    _started: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lost: bool = False

    @property
    def path(self) -> Path:
        return lease_path(Path(self.out_dir))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # --- holding ---

    def acquire(self) -> None:
        """Wait until this process holds the lease (taking over a stale one); then heartbeat it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        seen: _Seen | None = None
        told: str | None = None
        while True:
            holder = _read(self.path)
            if holder is None:  # free: try to take it (another process may be quicker)
                if self._create():
                    break
                continue
            seen = _observe(seen, holder)
            if self._stale(holder, seen):
                self._take_over(holder)
                seen = None
                continue
            if told != holder["token"]:
                told = holder["token"]
                who = ProcessOwner.from_dict(holder["owner"]).describe()
                log.info("%s: waiting for %s, which has been building it since %s (lease %s)",
                         _name(self.out_dir), who, holder.get("started", "?"), self.path)
            time.sleep(self.poll_s)
        interval = self.heartbeat_s if self.heartbeat_s is not None else min(10.0, self.stale_s / 4)
        self._thread = threading.Thread(target=self._heartbeat, args=(interval,), daemon=True,
                                        name=f"lease-{_name(self.out_dir)}")
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still this process's (call before publishing)."""
        holder = _read(self.path)
        if self._lost or holder is None or holder.get("token") != self.token:
            who = ProcessOwner.from_dict(holder["owner"]).describe() if holder else "nobody"
            raise LeaseLostError(f"{_name(self.out_dir)}: the lease {self.path} was taken over (now held by {who}) "
                                 f"after this process's heartbeat stood still for over {self.stale_s:g} s; "
                                 "its output is not published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner.to_dict(), "token": self.token, "beat": self._beat,
                "started": self._started, "heartbeat": _now(), "stale_s": self.stale_s}

    def _create(self) -> bool:
        """Atomically create the lease from a fully written file; False if one is there."""
        self._started = _now()
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        _write(tmp, self._record())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            holder = _read(self.path)
            if holder is None or holder.get("token") != self.token:
                self._lost = True
                log.error("%s: lost the lease %s to %s", _name(self.out_dir), self.path,
                          ProcessOwner.from_dict(holder["owner"]).describe() if holder else "nobody")
                return
            self._beat += 1
            tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
            _write(tmp, self._record())
            os.replace(tmp, self.path)

    # --- waiting ---

    def _stale(self, holder: dict[str, Any], seen: _Seen) -> bool:
        owner = ProcessOwner.from_dict(holder["owner"])
        alive = owner.alive()
        if alive is False:
            log.warning("%s: %s, which held the lease, is gone (killed?): taking it over",
                        _name(self.out_dir), owner.describe())
            return True
        if time.monotonic() - seen.since >= self.stale_s:
            log.warning("%s: the lease of %s has had no heartbeat for %.0f s (stale after %g s): taking it over",
                        _name(self.out_dir), owner.describe(), time.monotonic() - seen.since, self.stale_s)
            return True
        return False

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove the stale lease, if it is still that one, under the ``.takeover`` lock."""
        lock = self.path.with_name(self.path.name + ".takeover")
        tmp = lock.with_name(f"{lock.name}.{self.token}.tmp")
        _write(tmp, {"owner": self.owner.to_dict(), "token": self.token})
        try:
            os.link(tmp, lock)
        except FileExistsError:
            # Someone else is taking it over; their lock is left behind only if they were killed in these few lines.
            other = _read(lock)
            if other is not None and ProcessOwner.from_dict(other["owner"]).alive() is False:
                lock.unlink(missing_ok=True)
            time.sleep(self.poll_s)
            return
        finally:
            tmp.unlink(missing_ok=True)
        try:
            now = _read(self.path)
            if now is not None and now.get("token") == stale["token"] and now.get("beat") == stale["beat"]:
                self.path.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)


def discard_dead_lease(out_dir: Path) -> None:
    """Remove the lease of a finished output if its holder is a process of this host that is gone (killed
    between publishing the output and releasing the lease); any other lease is left to its holder."""
    holder = _read(lease_path(Path(out_dir)))
    if holder is not None and ProcessOwner.from_dict(holder["owner"]).alive() is False:
        lease_path(Path(out_dir)).unlink(missing_ok=True)


def _observe(seen: _Seen | None, holder: dict[str, Any]) -> _Seen:
    token, beat = str(holder.get("token")), int(holder.get("beat", 0))
    if seen is None or seen.token != token or seen.beat != beat:
        return _Seen(token, beat, time.monotonic())
    return seen


def _read(path: Path) -> dict[str, Any] | None:
    """The lease's record; None if there is none. A file that is not a lease record (damaged by hand, or
    replaced mid-read on a filesystem without atomic renames) reads as an unknown holder whose heartbeat never
    moves, so it is taken over once it has stood for the stale time."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and "token" in data and "owner" in data:
        return data
    return {"token": f"unreadable:{len(text)}", "beat": 0, "owner": {"user": "?", "host": "?", "pid": 0}}


def _write(path: Path, record: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _name(out_dir: Path) -> str:
    """``<stage>/<fingerprint>`` for log lines."""
    out_dir = Path(out_dir)
    return f"{out_dir.parent.name}/{out_dir.name}"
