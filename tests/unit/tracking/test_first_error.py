"""The error that failed a stage or a flow is the one raised, even when the store cannot record the failure.

The store fails for real: a directory where SQLite creates its rollback journal, so no write transaction can
start (as when the disk is full), whoever runs the test (root ignores file modes).
"""

from __future__ import annotations

import errno

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lmpipe.config.evaluation import TrackingConfig
from lmpipe.tracking.runs import open_pipeline_run, stage_run

UNWRITABLE = ("MlflowException: (sqlite3.OperationalError) disk I/O error (the error raised is the one that failed "
              "the run)")


def test_a_stage_failure_is_raised_when_recording_it_fails_too(workdir, lmpipe_warnings):
    ctx = open_pipeline_run(TrackingConfig(), workdir, "p", {}, {})
    journal = workdir / "mlflow.db-journal"
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as raised, stage_run(ctx, "pretrain", "fp", {}) as run:
        run.log_metrics({"loss": 2.5}, step=1)  # buffered: written when the stage ends
        journal.mkdir()
        raise disk_full
    assert raised.value is disk_full and raised.value.__context__ is None
    assert lmpipe_warnings == [
        f"could not log the metrics still buffered for MLflow run {run.run_id} (pretrain): {UNWRITABLE}",
        f"could not mark MLflow run {run.run_id} (pretrain) FAILED: {UNWRITABLE}",
    ]

    journal.rmdir()
    assert MlflowClient(ctx.uri).get_run(run.run_id).info.status == "RUNNING"  # as a kill leaves it


def test_recording_errors_still_raise_when_the_stage_succeeds(workdir, lmpipe_warnings):
    ctx = open_pipeline_run(TrackingConfig(), workdir, "p", {}, {})
    with pytest.raises(MlflowException, match=r"disk I/O error"), \
            stage_run(ctx, "pretrain", "fp", {}) as run:
        run.log_metrics({"loss": 2.5}, step=1)
        (workdir / "mlflow.db-journal").mkdir()
    assert lmpipe_warnings == []


def test_a_flow_failure_is_raised_when_recording_it_fails_too(workdir, lmpipe_warnings):
    from flows.ledger import tracked_flow
    from tests.conftest import tiny_config

    config = tiny_config(workdir)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as raised, tracked_flow(config, "pipeline") as (ctx, _ledger):
        (workdir / "mlflow.db-journal").mkdir()
        raise disk_full
    assert raised.value is disk_full and raised.value.__context__ is None
    # No stage ran, so the stage summary is stages.json alone, in the artifact store (files), which still works.
    assert lmpipe_warnings == [f"could not mark MLflow run {ctx.parent_run_id} FAILED: {UNWRITABLE}"]
