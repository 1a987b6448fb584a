"""Real servers for the tests that need one: `prefect server` with a process worker, and `mlflow ui`; each on a
free loopback port, in its own session (stopping it stops everything it started), with its log in a file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
MLFLOW = str(BIN / "mlflow")
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Until ``url`` answers 200; fails at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} at {url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@dataclass
class PrefectServer:
    api: str
    env: dict[str, str]
    logs: Path

    @property
    def ui(self) -> str:
        return self.api.removesuffix("/api")

    def prefect(self, *args: str) -> str:
        out = subprocess.run([PREFECT, "--no-prompt", *args], env=self.env, cwd=REPO, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def flow_run_state(self, flow_run_id: str) -> str:
        return self.get(f"/flow_runs/{flow_run_id}")["state"]["type"]

    def wait_final(self, flow_run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = self.flow_run_state(flow_run_id)
        while state not in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(2)
            state = self.flow_run_state(flow_run_id)
        return state

    @contextmanager
    def worker(self, pool: str, cwd: Path) -> Iterator[subprocess.Popen]:
        proc = start([PREFECT, "worker", "start", "--pool", pool], self.env, self.logs / "worker.log", cwd)
        try:
            yield proc
        finally:
            stop(proc)


@contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """`prefect server start` with its own PREFECT_HOME; the environment for the CLI, workers and flows."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PWD": str(REPO)}  # prefect.yaml's pull step runs flows in the directory deployed from
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    proc = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                 logs / "server.log")
    try:
        wait_http(f"{api}/health", proc, 120, "prefect server")
        yield PrefectServer(api, env, logs)
    finally:
        stop(proc)


@contextmanager
def mlflow_ui(store_uri: str, logs: Path) -> Iterator[str]:
    """`mlflow ui` on a store; its base URL."""
    port = free_port()
    proc = start([MLFLOW, "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1", "--port", str(port)],
                 {**os.environ}, logs / "mlflow-ui.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, 120, "mlflow ui")
        yield url
    finally:
        stop(proc)
