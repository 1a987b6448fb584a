"""Runs left RUNNING by a SIGKILLed process are marked KILLED when the next pipeline run starts; runs of a live
process (a pipeline running beside it) and of other hosts are left alone."""

from __future__ import annotations

import os
import signal
import socket

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from lmpipe.config.evaluation import TrackingConfig
from lmpipe.processes import process_start
from lmpipe.tracking.owners import HOST_TAG, PID_START_TAG, PID_TAG, owner_dead, owner_tags
from lmpipe.tracking.runs import KILLED_BY_TAG, open_pipeline_run, stage_run
from tests.unit.tracking.test_store import fork, wait


def test_owner_tags_name_this_process_and_tell_a_dead_or_reused_pid():
    tags = owner_tags()
    assert tags == {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: process_start()}
    assert not owner_dead(tags)
    assert owner_dead({**tags, PID_START_TAG: tags[PID_START_TAG] + "0"})  # our pid, another process's start
    child = fork(lambda: None)
    wait(child)
    assert owner_dead({**tags, PID_TAG: str(child)})  # gone
    assert not owner_dead({**tags, HOST_TAG: "elsewhere", PID_TAG: str(child)})  # cannot tell: left alone
    assert not owner_dead({})  # no owner tags: an older lmpipe's run


def _pipeline_with_a_stage(workdir, ready_write: int, hold_read: int, experiment: str = "lmpipe") -> None:
    """A pipeline run and a stage run that is logging a model (a LoggedModel, PENDING), then waiting."""
    ctx = open_pipeline_run(TrackingConfig(experiment=experiment), workdir, "pipeline", {"a": 1}, {})
    with stage_run(ctx, "register", "fp", {}) as run:
        run.client.create_logged_model(ctx.experiment_id, source_run_id=run.run_id, name="model")
        os.write(ready_write, f"{ctx.parent_run_id} {run.run_id}\n".encode())
        os.read(hold_read, 1)


def test_runs_of_a_killed_process_are_marked_killed_and_a_live_ones_stay_running(tmp_path):
    ready_read, ready_write = os.pipe()
    hold_read, hold_write = os.pipe()
    # The store is created by the first child alone; then the other one starts: both are real processes.
    killed = fork(lambda: _pipeline_with_a_stage(tmp_path, ready_write, hold_read))
    killed_runs = os.read(ready_read, 200).decode().split()
    live = fork(lambda: _pipeline_with_a_stage(tmp_path, ready_write, hold_read))
    live_runs = os.read(ready_read, 200).decode().split()
    os.kill(killed, signal.SIGKILL)
    assert wait(killed) == -signal.SIGKILL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmpipe").experiment_id
    # A run of another host, whose process id is that of the killed one: nothing tells whether it is alive.
    other = client.create_run(exp, tags={HOST_TAG: "another-host", PID_TAG: str(killed), PID_START_TAG: "1"})
    assert {client.get_run(r).info.status for r in killed_runs + live_runs} == {"RUNNING"}

    ctx = open_pipeline_run(TrackingConfig(), tmp_path, "next", {}, {})
    for run_id in killed_runs:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags[KILLED_BY_TAG] == (f"its process {killed} on {socket.gethostname()} was gone when a "
                                                "later pipeline run started")
    for run_id in live_runs + [other.info.run_id, ctx.parent_run_id]:
        assert client.get_run(run_id).info.status == "RUNNING" and client.get_run(run_id).info.end_time is None
    models = {m.source_run_id: m.status for m in client.search_logged_models([exp])}
    assert models == {killed_runs[1]: LoggedModelStatus.FAILED, live_runs[1]: LoggedModelStatus.PENDING}

    os.write(hold_write, b"x")  # the live pipeline's stage ends: its run is FINISHED, as always
    assert wait(live) == 0
    assert client.get_run(live_runs[1]).info.status == "FINISHED"
    # Its process has ended without ending its pipeline run: the next run marks that one KILLED. A run marked
    # KILLED before is not touched again.
    end = client.get_run(killed_runs[0]).info.end_time
    open_pipeline_run(TrackingConfig(), tmp_path, "third", {}, {})
    assert client.get_run(killed_runs[0]).info.end_time == end
    assert client.get_run(live_runs[0]).info.status == "KILLED"
    assert client.get_run(ctx.parent_run_id).info.status == "RUNNING"  # this process's: alive
