"""A real deployment: `prefect server` on loopback with its own home, a process work pool,
`prefect deploy` from prefect.yaml, a worker, and a deployment run of the tiny pipeline."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

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
        # The server's scheduler turns the cron schedule into upcoming runs (it failed silently with
        # SQLAlchemy 2.1, hence the pin).
        assert _wait_scheduled_runs(server, nightly["id"], timeout=60) > 0

        cfg = tiny_config(tmp_path / "work")
        params = json.dumps({"config": cfg.model_dump(mode="json")})
        started = server.prefect("deployment", "run", "lmpipe-pipeline/pipeline", "--params", params)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        with server.worker("lmpipe-local", tmp_path):
            state = server.wait_final(flow_run_id, timeout=400)
        assert state == "COMPLETED", (server.logs / "worker.log").read_text()[-4000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["prefect.flow_run_id"] == flow_run_id
    # A deployed run's MLflow runs link its page on the server's UI (the description is markdown in MLflow's UI).
    page = f"{server.ui}/flow-runs/flow-run/{flow_run_id}"
    assert parents[0].data.tags["prefect.flow_run_url"] == page
    assert f"]({page}) (id `{flow_run_id}`)." in parents[0].data.tags["mlflow.note.content"]
    assert str(client.get_model_version_by_alias("lmpipe-gpt", "candidate").version) == "1"
