"""A real deployment: `prefect server` on loopback with its own home, a process work pool,
`prefect deploy` from prefect.yaml, a worker, a deployment run of the tiny pipeline, and two runs of the
scheduled continual deployment after it."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.device_slots import GPU_LIMIT, default_slots
from tests.conftest import tiny_config
from tests.servers import PrefectServer, prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def _wait_scheduled_runs(server: PrefectServer, deployment_id: str, timeout: float) -> int:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline = time.monotonic() + timeout
    while True:
        count = server.post("/flow_runs/count", body)
        if count or time.monotonic() > deadline:
            return count
        time.sleep(2)


def _states(server: PrefectServer, flow_run_id: str) -> list[dict]:
    """The flow run's states, oldest first."""
    states: list[dict] = server.get(f"/flow_run_states/?flow_run_id={flow_run_id}")  # type: ignore[assignment]
    return sorted(states, key=lambda s: s["timestamp"])


def test_deploy_and_run_through_a_worker(tmp_path):
    with prefect_server(tmp_path) as server:
        server.prefect("work-pool", "create", "lmpipe-local", "--type", "process")
        deployed = server.prefect("deploy", "--all")
        assert {"lmpipe-pipeline/pipeline", "lmpipe-continual/nightly", "lmpipe-data/data"} <= set(
            re.findall(r"lmpipe-[a-z]+/[a-z]+", deployed))
        # The UI renders the run form from this schema: the typed config, with the demo as defaults.
        deployment = server.get("/deployments/name/lmpipe-pipeline/pipeline")
        schema = deployment["parameter_openapi_schema"]
        assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
        assert {"data", "tokenizer", "model", "pretrain", "finetune", "continual", "eval", "tracking"} <= set(
            schema["definitions"]["PipelineConfig"]["properties"])
        assert deployment["schedules"] == []  # started from the UI; the schedule is the continual flow's
        nightly = server.get("/deployments/name/lmpipe-continual/nightly")
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert nightly["parameter_openapi_schema"]["properties"]["config"]["$ref"].endswith("/PipelineConfig")
        # One run of each at a time; another one started meanwhile waits its turn (prefect.yaml's options).
        for served in (deployment, nightly):
            assert served["global_concurrency_limit"]["limit"] == 1  # the field `concurrency_limit` is left empty
            assert served["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        # The server's scheduler turns the cron schedule into upcoming runs (it failed silently with
        # SQLAlchemy 2.1, hence the pin).
        assert _wait_scheduled_runs(server, nightly["id"], timeout=60) > 0

        cfg = tiny_config(tmp_path / "work")
        params = {"config": cfg.model_dump(mode="json")}
        started = server.prefect("deployment", "run", "lmpipe-pipeline/pipeline", "--params", json.dumps(params))
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        with server.worker("lmpipe-local", tmp_path):
            state = server.wait_final(flow_run_id, timeout=400)
            assert state == "COMPLETED", (server.logs / "worker.log").read_text()[-4000:]
            # The first training task made the `gpu` limit, one slot per device, and gave its slot back.
            gpu = server.get(f"/v2/concurrency_limits/{GPU_LIMIT}")
            assert (gpu["limit"], gpu["active_slots"]) == (default_slots(), 0)

            # The scheduled deployment, twice at once, with the pipeline run's config: one run waits for the
            # other's slot (ENQUEUE), then runs. The pipeline run's champion has been trained on every document
            # in the files: nothing new, both times.
            continual_ids = [server.post(f"/deployments/{nightly['id']}/create_flow_run", {"parameters": params})["id"]
                             for _ in range(2)]
            finals = [server.wait_final(run_id, timeout=300) for run_id in continual_ids]
            assert finals == ["COMPLETED", "COMPLETED"], (server.logs / "worker.log").read_text()[-4000:]
        worker_log = (server.logs / "worker.log").read_text(errors="replace")
        histories = {run_id: _states(server, run_id) for run_id in continual_ids}
        names = {k: [s["name"] for s in v] for k, v in histories.items()}

        def running(run_id: str) -> datetime:
            return next(datetime.fromisoformat(s["timestamp"]) for s in histories[run_id] if s["type"] == "RUNNING")

        # The two never ran at once: the later one started running after the earlier one ended. It waited for
        # the slot when the worker took both in one poll (as a rule: they are created together); the earlier
        # one never waits.
        first, second = sorted(continual_ids, key=running)
        assert datetime.fromisoformat(histories[first][-1]["timestamp"]) <= running(second), names
        assert "AwaitingConcurrencySlot" not in names[first], names

    # A normal run is quiet: no progress bars, no MLflow warnings, in the worker's log (it holds the runs' output).
    for noise in ("%|", "CloudPickle", "WARNING mlflow", "Downloading artifacts"):
        assert noise not in worker_log, noise

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    parents = {r.data.tags["prefect.flow_run_id"]: r for r in client.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}
    # Every run, the pipeline's and the scheduled ones, is a parent run in the one experiment.
    assert set(parents) == {flow_run_id, *continual_ids}
    assert all(r.info.status == "FINISHED" for r in parents.values())
    pipeline = parents[flow_run_id]
    # A deployed run's MLflow runs link its page on the server's UI (the description is markdown in MLflow's UI).
    page = f"{server.ui}/flow-runs/flow-run/{flow_run_id}"
    assert pipeline.data.tags["prefect.flow_run_url"] == page
    assert f"]({page}) (id `{flow_run_id}`)." in pipeline.data.tags["mlflow.note.content"]
    assert str(client.get_model_version_by_alias("lmpipe-gpt", "candidate").version) == "1"
    for run_id in continual_ids:
        scheduled = parents[run_id].data
        assert scheduled.tags["lmpipe.flow"] == "continual"
        assert scheduled.tags["lmpipe.continual.outcome"] == "nothing new"
        assert scheduled.metrics["continual.new_bytes"] == 0.0 and scheduled.metrics["continual.steps"] == 0.0
    # Nothing was trained or registered: the pipeline run's version is still the champion, and the only one.
    assert [str(v.version) for v in client.search_model_versions("name='lmpipe-gpt'")] == ["1"]
    assert str(client.get_model_version_by_alias("lmpipe-gpt", "champion").version) == "1"
