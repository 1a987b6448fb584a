"""A real deployment: `prefect server` on loopback with its own home, a process work pool,
`prefect deploy` from prefect.yaml, a worker, and a deployment run of the tiny pipeline."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def _wait_scheduled_runs(api: str, deployment_id: str, timeout: float) -> int:
    body = json.dumps({"flow_runs": {"deployment_id": {"any_": [deployment_id]},
                                     "state": {"type": {"any_": ["SCHEDULED"]}}}}).encode()
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{api}/flow_runs/count", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            count = json.load(r)
        if count or time.monotonic() > deadline:
            return count
        time.sleep(2)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _flow_run_state(api: str, flow_run_id: str) -> str:
    with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as r:
        return json.load(r)["state"]["type"]


def test_deploy_and_run_through_a_worker(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PWD": str(REPO),  # prefect.yaml's pull step runs flows in the directory deployed from
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    worker = None
    try:
        _wait_healthy(api, server, timeout=120)

        def prefect(*args: str) -> str:
            out = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=180)
            assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
            return out.stdout

        prefect("work-pool", "create", "lmpipe-local", "--type", "process")
        deployed = prefect("deploy", "--all")
        assert "lmpipe-pipeline/nightly" in deployed and "lmpipe-data/data" in deployed
        # The UI renders the run form from this schema: the typed config, with the demo as defaults.
        with urllib.request.urlopen(f"{api}/deployments/name/lmpipe-pipeline/nightly", timeout=10) as r:
            deployment = json.load(r)
        schema = deployment["parameter_openapi_schema"]
        assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
        assert {"data", "tokenizer", "model", "pretrain", "finetune", "eval", "tracking"} <= set(
            schema["definitions"]["PipelineConfig"]["properties"])
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        # The server's scheduler turns the cron schedule into upcoming runs (it failed silently with
        # SQLAlchemy 2.1, hence the pin).
        assert _wait_scheduled_runs(api, deployment["id"], timeout=60) > 0

        cfg = tiny_config(tmp_path / "work")
        params = json.dumps({"config": cfg.model_dump(mode="json")})
        started = prefect("deployment", "run", "lmpipe-pipeline/nightly", "--params", params)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "lmpipe-local"], env=env, cwd=tmp_path,
                                  stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 400
        state = _flow_run_state(api, flow_run_id)
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline:
            time.sleep(2)
            state = _flow_run_state(api, flow_run_id)
        assert state == "COMPLETED", (logs / "worker.log").read_text()[-4000:]

        client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
        exp = client.get_experiment_by_name("lmpipe")
        parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.tags["prefect.flow_run_id"] == flow_run_id
        # A deployed run's MLflow runs link its page on the server's UI (the description is markdown in MLflow's UI).
        page = f"{api.removesuffix('/api')}/flow-runs/flow-run/{flow_run_id}"
        assert parents[0].data.tags["prefect.flow_run_url"] == page
        assert f"]({page}) (id `{flow_run_id}`)." in parents[0].data.tags["mlflow.note.content"]
        assert str(client.get_model_version_by_alias("lmpipe-gpt", "candidate").version) == "1"
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
