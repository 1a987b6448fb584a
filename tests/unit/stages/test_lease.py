"""Leases: one process builds a stage's output, the others wait and reuse it; a dead holder's lease is taken over.

Real processes throughout: the builders are separate Python processes, the kills real SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lmpipe.artifacts import BuildOutput
from lmpipe.processes import ProcessOwner
from lmpipe.stages.contract import partial_dir, reuse, run_stage
from lmpipe.stages.lease import Lease, LeaseLostError, lease_path

ROOT = Path(__file__).resolve().parents[3]

# A builder process: run_stage on argv[1] whose build appends this pid to argv[2], sleeps argv[3] seconds,
# and writes out.txt (keep_partial: a resumed build also finds what the killed one left in the partial directory).
BUILDER = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    from lmpipe.artifacts import BuildOutput
    from lmpipe.stages.contract import run_stage

    logging.basicConfig(level=logging.INFO)
    out, log, sleep = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        before = sorted(p.name for p in tmp.iterdir())
        (tmp / f"progress-{os.getpid()}").write_text("x")
        time.sleep(sleep)
        (tmp / "out.txt").write_text("built")
        return BuildOutput(meta={"found": before})

    result = run_stage("s", "fp", out, build, keep_partial=True)
    print("REUSED" if result.meta.get("reused") else "BUILT", flush=True)
""")


def _builder(out: Path, log: Path, sleep: float, stale_s: float = 30) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMPIPE_LEASE_STALE_S": str(stale_s)}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(out), str(log), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_two_processes_build_a_stage_once_and_the_second_reuses_it(tmp_path: Path):
    out, log = tmp_path / "s" / "fp", tmp_path / "builds.log"
    first = _builder(out, log, sleep=2)
    _wait_for(lambda: log.exists())  # the first holds the lease and is building
    second = _builder(out, log, sleep=0)
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["BUILT", "REUSED"]
    assert log.read_text().splitlines() == [str(first.pid)]  # built once
    assert f"waiting for {ProcessOwner.current().user}@" in outs[1][1] and f"pid {first.pid}" in outs[1][1]
    assert (out / "out.txt").read_text() == "built"
    assert not lease_path(out).exists() and not partial_dir(out).exists()


def test_a_killed_holders_lease_is_taken_over_at_once_and_the_build_resumes(tmp_path: Path):
    out, log = tmp_path / "s" / "fp", tmp_path / "builds.log"
    victim = _builder(out, log, sleep=60)
    _wait_for(lambda: log.exists() and (partial_dir(out) / f"progress-{victim.pid}").exists())
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert lease_path(out).exists()  # the kill left its lease behind
    started = time.monotonic()
    heir = _builder(out, log, sleep=0, stale_s=600)  # the holder is gone: no need to wait for staleness
    stdout, stderr = heir.communicate(timeout=60)
    assert heir.returncode == 0 and stdout.strip() == "BUILT", stderr
    assert time.monotonic() - started < 30
    assert f"pid {victim.pid}, which held the lease, is gone (killed?): taking it over" in stderr
    # keep_partial: the heir found what the killed build had left (a training run resumes from it)
    result = json.loads((out / "stage_result.json").read_text())
    assert result["meta"]["found"] == [f"progress-{victim.pid}"]
    assert log.read_text().splitlines() == [str(victim.pid), str(heir.pid)]
    assert not lease_path(out).exists()


def test_a_lease_left_on_a_finished_output_by_a_kill_is_discarded_on_reuse(tmp_path: Path):
    out = tmp_path / "s" / "fp"
    run_stage("s", "fp", out, _build)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = ProcessOwner.current()
    lease_path(out).write_text(json.dumps({"owner": {**me.to_dict(), "pid": child.pid}, "token": "t", "beat": 0}))
    assert run_stage("s", "fp", out, _build).meta["reused"] is True
    assert not lease_path(out).exists()
    _foreign_lease(out)  # another host's: not ours to judge
    assert reuse(out).meta["reused"] is True and lease_path(out).exists()


def _foreign_lease(out: Path, beat: int = 0, token: str = "t0") -> None:
    """A lease held by a process of another host (whose liveness cannot be checked here)."""
    lease_path(out).parent.mkdir(parents=True, exist_ok=True)
    lease_path(out).write_text(json.dumps({"owner": {"user": "ann", "host": "elsewhere", "pid": 1, "started": "9"},
                                           "token": token, "beat": beat, "started": "then"}))


def _build(tmp: Path) -> BuildOutput:
    (tmp / "a.txt").write_text("a")
    return BuildOutput()


def test_another_hosts_lease_is_taken_over_only_after_its_heartbeat_stood_still(tmp_path: Path, caplog):
    out = tmp_path / "s" / "fp"
    _foreign_lease(out)
    stop = threading.Event()

    def beating() -> None:  # the other host's heartbeat, for 1.5 s, then it hangs (a frozen machine)
        for beat in range(1, 7):
            if stop.wait(0.25):
                return
            _foreign_lease(out, beat)

    beater = threading.Thread(target=beating)
    beater.start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lmpipe.stages.lease"):
        lease = Lease(out, stale_s=1.0, poll_s=0.05)
        lease.acquire()
        waited = time.monotonic() - started
        lease.release()
    stop.set()
    beater.join()
    # 1.5 s of beats, then 1 s standing still before the takeover
    assert 2.3 < waited < 10
    text = caplog.text
    assert "waiting for ann@elsewhere pid 1, which has been building it since then" in text
    assert "the lease of ann@elsewhere pid 1 has had no heartbeat for 1 s (stale after 1 s): taking it over" in text
    assert not lease_path(out).exists()


def test_a_waiter_reuses_what_another_hosts_holder_published(tmp_path: Path):
    out = tmp_path / "s" / "fp"
    _foreign_lease(out)

    def finish() -> None:  # the other host publishes its result, then releases the lease
        time.sleep(0.5)
        run_stage("s", "fp", tmp_path / "elsewhere" / "fp", _build)
        (tmp_path / "elsewhere" / "fp").rename(out)
        lease_path(out).unlink()

    other = threading.Thread(target=finish)
    other.start()
    result = run_stage("s", "fp", out, lambda tmp: pytest.fail("the waiter must not build"))
    other.join()
    assert result.meta["reused"] is True and (out / "a.txt").read_text() == "a"


def test_a_holder_whose_lease_was_taken_over_does_not_publish(tmp_path: Path):
    out = tmp_path / "s" / "fp"

    def build(tmp: Path) -> BuildOutput:
        (tmp / "a.txt").write_text("a")
        _foreign_lease(out, token="theirs")  # taken over while this process was frozen
        return BuildOutput()

    with pytest.raises(LeaseLostError, match=r"s/fp: the lease .* was taken over \(now held by ann@elsewhere pid 1\)"):
        run_stage("s", "fp", out, build)
    assert not out.exists()
    assert json.loads(lease_path(out).read_text())["token"] == "theirs"  # their lease is left alone


def test_an_unreadable_lease_is_taken_over_after_the_stale_time(tmp_path: Path, monkeypatch):
    out = tmp_path / "s" / "fp"
    out.parent.mkdir(parents=True)
    lease_path(out).write_text("{not json")
    monkeypatch.setenv("LMPIPE_LEASE_STALE_S", "0.5")
    result = run_stage("s", "fp", out, _build)
    assert result.files == {"a.txt": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"}
    assert not lease_path(out).exists()


def test_the_heartbeat_moves_while_the_lease_is_held(tmp_path: Path):
    out = tmp_path / "s" / "fp"
    with Lease(out, stale_s=0.4, heartbeat_s=0.05) as lease:
        first = json.loads(lease.path.read_text())
        _wait_for(lambda: json.loads(lease.path.read_text())["beat"] >= 3, timeout=5)
        now = json.loads(lease.path.read_text())
        assert now["token"] == first["token"] and now["owner"] == ProcessOwner.current().to_dict()
        lease.check()
    assert not lease_path(out).exists()


def test_a_process_owner_knows_a_dead_or_reused_pid():
    me = ProcessOwner.current()
    assert me.alive() is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = ProcessOwner(me.user, me.host, child.pid, "1")
    assert gone.alive() is False
    assert ProcessOwner(me.user, me.host, me.pid, "not-my-start").alive() is False  # this pid, another start
    assert ProcessOwner(me.user, me.host, os.getppid(), "0").alive() is False  # the pid lives, but started later
    assert ProcessOwner(me.user, "elsewhere", me.pid, me.started).alive() is None
