"""Real servers for the tests that need one, each on a free loopback port, in its own session (stopping it stops
everything it started), with its log in a file: `prefect server` with a process worker, `mlflow ui`, and a team's
tracking services, PostgreSQL and an `mlflow server` on it.

PostgreSQL is the system's (Debian's ``postgresql`` package; ``.ci/run`` installs it). Its
programs are found through ``pg_config --bindir`` or under ``/usr/lib/postgresql/<version>/bin``.
``initdb`` and ``postgres`` refuse to run as root, so as root they run as ``nobody`` (tests
and CI run as root) in a directory that user owns. Missing PostgreSQL is an error naming the
package to install: these tests never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- a team's tracking services

INSTALL_HINT = ("PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found: install the system's "
                "PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`), "
                "or put its bin directory on PATH. `.ci/run` installs it.")
UNPRIVILEGED = "nobody"  # the user PostgreSQL runs as when the tests run as root
DEBIAN_BINDIRS = Path("/usr/lib/postgresql")  # <major version>/bin: Debian keeps the server's programs off PATH


def postgres_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``; AssertionError naming what to install."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    versions = DEBIAN_BINDIRS.glob("*/bin")  # the newest major version first
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise AssertionError(INSTALL_HINT)


def _as_unprivileged() -> dict[str, Any]:
    """Popen arguments that run a program as ``UNPRIVILEGED`` when this process is root, else as it is."""
    if os.geteuid() != 0:
        return {}
    import pwd

    user = pwd.getpwnam(UNPRIVILEGED)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    database: str

    @property
    def url(self) -> str:
        """The SQLAlchemy URL MLflow's server takes (``postgresql://``: the psycopg2 driver)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"


@contextmanager
def postgres(database: str = "mlflow", user: str = "lmpipe") -> Iterator[Postgres]:
    """A PostgreSQL cluster in a temporary directory, listening on a free loopback port (trust auth), with an
    empty ``database``; stopped (fast shutdown) and removed afterwards."""
    bindir = postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
    as_user = _as_unprivileged()
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data = root / "data"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    made = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--encoding=UTF8",
                           "--no-sync"], capture_output=True, text=True, env=env, cwd=root,
                          **as_user)
    if made.returncode != 0:
        raise RuntimeError(f"initdb failed in {root} (exit {made.returncode}): {made.stdout}{made.stderr}")
    port = free_port()
    # No Unix socket outside the temporary directory (the system's socket directory is not ours to write).
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
    started = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-o", options,
                              "-w", "-t", "60", "start"], capture_output=True, text=True, env=env, cwd=root,
                             **as_user)
    if started.returncode != 0:
        log = (root / "postgres.log").read_text(errors="replace") if (root / "postgres.log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}{log}")
    try:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        con.close()
        yield Postgres(port=port, user=user, database=database)
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       env=env, cwd=root, check=False, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:<port>: what tracking.uri is set to
    artifacts: Path  # --artifacts-destination: where the server keeps the artifacts it serves
    log: Path


@contextmanager
def mlflow_server(backend_store_uri: str, root: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` (this environment's) on a free loopback port: ``backend_store_uri`` as its backend store,
    artifacts served through it from ``root/artifacts``; ready once ``/health`` answers; stopped afterwards."""
    port = free_port()
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = root / "mlflow-server.log"
    proc = start([MLFLOW, "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
                  "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "2"], {**os.environ}, log, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, 120, f"mlflow server (log: {log})")
        yield MlflowServer(url=url, artifacts=artifacts, log=log)
    finally:
        stop(proc)
