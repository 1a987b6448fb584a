"""Running lmpipe for a team: training queues on the `gpu` concurrency limit, a cancelled or killed run
leaves no training process behind, a failed run notifies a webhook, and the CLI says first what failed.

Real parts throughout: Prefect's API (the session's harness, or a `prefect server` with a process
worker and the project's deployments), torchrun with 2 CPU processes (gloo), real signals, a webhook
receiver on loopback, and /proc to see which processes are left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, tiny_config
from tests.servers import prefect_server

pytestmark = pytest.mark.slow
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LATIN1 = "caf\u00e9 au lait\n".encode("latin-1") * 50  # not UTF-8: the download stage fails at once (strict)


def _latin1_overrides(tmp_path: Path) -> list[str]:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(LATIN1)
    return [f"data.pretrain.sources=[{{uri: '{bad}'}}]", "data.strict=true"]


def _latin1_error(tmp_path: Path) -> str:
    return (f"SourceContentError: data.pretrain.sources[0].uri: {tmp_path / 'latin1.txt'} line 1: not valid UTF-8: "
            "byte 0xe9 at offset 3 (invalid continuation byte); set data.strict=false to skip bad records")


def _processes_with(text: str) -> dict[int, str]:
    """Live processes whose command line holds ``text`` (a zombie's is empty: it is not counted)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _ranks(workdir: str) -> dict[int, str]:
    """The training processes (torchrun's ranks) of a job under ``workdir``; torchrun itself is not one."""
    return {pid: cmd for pid, cmd in _processes_with(str(workdir)).items()
            if "lmpipe.stages.torchrun_worker" in cmd and "--nproc_per_node" not in cmd}


def _stop_ranks(workdir: str) -> None:
    """SIGSTOP the ranks: like a rank busy in a long silent step, or hung in a collective, a stopped one writes
    nothing, so it would never learn from a broken output pipe that its launcher is gone; only a kill ends it."""
    for pid in _ranks(workdir):
        os.kill(pid, signal.SIGSTOP)


def _wait_for(condition, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def _all_gone(text: str, timeout: float = 90) -> None:
    """Every process whose command line holds ``text`` ends within ``timeout`` s (polled, not slept)."""
    deadline = time.monotonic() + timeout
    while (left := _processes_with(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == {}, f"still running: {left}"


# ---------------------------------------------------------------- the gpu concurrency limit


@pytest.mark.usefixtures("prefect_harness")
def test_training_tasks_take_turns_on_the_gpu_limit_and_reused_ones_take_no_slot(tmp_path, stages):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from lmpipe.tracking.runs import TrackingContext
    from tasks.device_slots import GPU_LIMIT
    from tasks.stages import pretrain
    from tests.unit.training.test_train import STAGE_MODEL, config

    tok, shards = stages
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    ctx = TrackingContext(uri=uri, experiment_id=exp, parent_run_id=client.create_run(exp).info.run_id,
                          workdir=str(tmp_path / "work"))
    cfgs = [config(max_steps=8, seed=seed) for seed in (1, 2)]  # two stages: two fingerprints

    @flow
    def two_trainings() -> list[str]:
        futures = [pretrain.with_options(task_run_name=f"pretrain/{i}").submit(
            model_cfg=STAGE_MODEL, cfg=cfg, shards=shards, tokenizer=tok, ctx=ctx, label=f"pretrain/{i}")
            for i, cfg in enumerate(cfgs)]
        return [f.result().meta.get("reused", False) for f in futures]

    with get_client(sync_client=True) as prefect:
        # Earlier training under this session's API made the limit already (one slot per device): start afresh.
        with contextlib.suppress(ObjectNotFound):
            prefect.delete_global_concurrency_limit_by_name(GPU_LIMIT)
        prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            assert two_trainings() == [False, False]
            runs = sorted(client.search_runs([exp], "tags.`lmpipe.stage` = 'pretrain'"),
                          key=lambda r: r.info.start_time)
            assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
            # The MLflow stage run opens after the slot is taken and closes before it is given back.
            first, second = runs
            assert first.info.end_time <= second.info.start_time, (first.info, second.info)
            assert prefect.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0

            # With the only slot taken elsewhere, stages that are already built are reused, not queued.
            done = threading.Event()
            with concurrency(GPU_LIMIT, occupy=1):
                outcome: list[list[bool]] = []
                thread = threading.Thread(target=lambda: (outcome.append(two_trainings()), done.set()), daemon=True)
                thread.start()
                reused_without_a_slot = done.wait(timeout=300)  # a task waiting for the slot would never end
                assert prefect.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 1
            assert reused_without_a_slot and outcome == [[True, True]]
        finally:
            prefect.delete_global_concurrency_limit_by_name(GPU_LIMIT)


# ---------------------------------------------------------------- no orphaned training processes

_LAUNCHER = """
import json, signal, sys
from pathlib import Path
from lmpipe.training.launch import launch
if sys.argv[3] == "raise":  # as Prefect's engine does: SIGTERM becomes an exception in the running task
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
launch(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), 2, on_line=print)
"""


@pytest.fixture
def training(tmp_path, stages) -> Iterator[tuple[subprocess.Popen, Path, str]]:
    """A process that launches a long 2-process torchrun training, once both ranks are training; its spec's
    path (in every training process's command line) and its output file."""
    from tests.flow.test_distributed import _spec

    def start(mode: str) -> tuple[subprocess.Popen, Path, str]:
        work = tmp_path / "work"
        spec = _spec(stages, work)
        spec["train"]["max_steps"] = 1_000_000
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(spec))
        out = tmp_path / "launcher.out"
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(spec_file), str(work), mode], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=open(out, "w"),
                                stderr=subprocess.STDOUT)
        started.append(proc)
        _wait_for(lambda: "lmpipe-progress " in out.read_text(errors="replace"), 300, "the first training step")
        assert len(_ranks(str(work))) == 2, _processes_with(str(work))
        return proc, out, str(work)

    started: list[subprocess.Popen] = []
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in _processes_with(str(tmp_path)):  # what a failed test left behind
        os.kill(pid, signal.SIGKILL)


@linux_only
@pytest.mark.parametrize("sig, mode", [(signal.SIGTERM, "raise"), (signal.SIGKILL, "plain")],
                         ids=["sigterm-raised-in-the-task", "sigkill"])
def test_a_stopped_or_killed_launcher_leaves_no_training_process(training, sig, mode):
    proc, out, work = training(mode)
    _stop_ranks(work)
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    _all_gone(work)  # torchrun and both ranks
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)


@linux_only
def test_a_killed_torchrun_takes_its_ranks_with_it_and_the_stage_fails_retryable(training):
    proc, out, work = training("plain")
    (torchrun,) = psutil.Process(proc.pid).children()
    _stop_ranks(work)
    torchrun.kill()
    assert proc.wait(timeout=120) == 1
    _all_gone(work)
    assert "DistributedTrainingError: torchrun with 2 processes exited with code -9" in out.read_text(
        errors="replace")


# ---------------------------------------------------------------- a real server: cancel, notify


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`prefect server`, the work pool, `prefect deploy --all` from prefect.yaml, a Webhook block named
    lmpipe-failures pointing at a receiver on loopback, and a process worker."""
    tmp = tmp_path_factory.mktemp("server")
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with prefect_server(tmp) as server:
            server.env.pop("PREFECT_LOGGING_LEVEL", None)
            server.prefect("work-pool", "create", "lmpipe-local", "--type", "process")
            server.prefect("deploy", "--all")
            hook_url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
            subprocess.run([sys.executable, "-c", "import sys; from prefect.blocks.webhook import Webhook; "
                            "Webhook(url=sys.argv[1]).save('lmpipe-failures')", hook_url],
                           env=server.env, check=True, timeout=120)
            with server.worker("lmpipe-local", tmp):
                yield {"server": server, "received": _Receiver.received}
    finally:
        receiver.shutdown()


def _start(deployed: dict[str, Any], cfg) -> str:
    started = deployed["server"].prefect("deployment", "run", "lmpipe-pipeline/pipeline", "--params",
                                         json.dumps({"config": cfg.model_dump(mode="json")}))
    return re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)


def _wait_state(deployed: dict[str, Any], flow_run_id: str, timeout: float = 400) -> str:
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    state = _wait_for(lambda: (s := deployed["server"].flow_run_state(flow_run_id)) in final and s, timeout,
                      f"flow run {flow_run_id} to end", interval=1)
    return state


@linux_only
@pytest.mark.deployment
def test_cancelling_a_deployment_run_stops_its_torchrun_processes(tmp_path, deployed):
    cfg = tiny_config(tmp_path / "work", "pretrain.distributed.nproc_per_node=2", "pretrain.device=cpu",
                      "pretrain.max_steps=1000000")
    flow_run_id = _start(deployed, cfg)
    _wait_for(lambda: len(_ranks(cfg.workdir)) == 2, 400, "both ranks to start")
    _stop_ranks(cfg.workdir)
    deployed["server"].prefect("flow-run", "cancel", flow_run_id)
    assert _wait_state(deployed, flow_run_id, timeout=180) == "CANCELLED"
    _all_gone(cfg.workdir)  # torchrun and both ranks
    # The cancelled task gave its slot of the gpu limit back on the way out (it would otherwise stay taken
    # until its lease ran out).
    assert deployed["server"].get("/v2/concurrency_limits/gpu")["active_slots"] == 0


@pytest.mark.deployment
def test_a_failed_deployment_run_posts_its_url_stage_and_error_to_the_webhook(tmp_path, deployed):
    cfg = tiny_config(tmp_path / "work", *_latin1_overrides(tmp_path))
    flow_run_id = _start(deployed, cfg)
    assert _wait_state(deployed, flow_run_id) == "FAILED"
    (note,) = _wait_for(lambda: [n for n in deployed["received"] if n["flow_run_id"] == flow_run_id], 60,
                        "the notification")
    url = f"{deployed['server'].ui}/runs/flow-run/{flow_run_id}"
    assert note["url"] == url and note["stage"] == "download/wikitext2"
    assert note["error"] == _latin1_error(tmp_path)
    assert note["text"] == (f"lmpipe run {note['flow_run']} failed at download/wikitext2: {_latin1_error(tmp_path)}"
                            f"\n{url}")


@pytest.mark.usefixtures("prefect_harness")
def test_the_notification_goes_to_the_webhook_block_lmpipe_notify_block_names(monkeypatch):
    from prefect import flow
    from prefect.blocks.webhook import Webhook

    from flows.notify import BLOCK_ENV, DEFAULT_BLOCK, notify_failure

    handlers = {name: type(name, (_Receiver,), {"received": []}) for name in ("team-alerts", DEFAULT_BLOCK)}
    receivers = {name: ThreadingHTTPServer(("127.0.0.1", 0), handler) for name, handler in handlers.items()}
    for name, receiver in receivers.items():
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        Webhook(url=f"http://127.0.0.1:{receiver.server_address[1]}/hook").save(name, overwrite=True)

    @flow(on_failure=[notify_failure])
    def fails() -> None:
        raise RuntimeError("the team's block gets this")

    monkeypatch.setenv(BLOCK_ENV, "team-alerts")
    try:
        state = fails(return_state=True)
    finally:
        for name, receiver in receivers.items():
            receiver.shutdown()
            Webhook.delete(name)  # no other test's failed flow notifies a receiver that is gone
    assert state.is_failed()
    [note] = handlers["team-alerts"].received
    assert note["flow_run_id"] == str(state.state_details.flow_run_id) and note["stage"] is None
    assert note["error"] == "RuntimeError: the team's block gets this"
    assert handlers[DEFAULT_BLOCK].received == []


# ---------------------------------------------------------------- the CLI on a failed run


def test_a_failed_cli_run_ends_with_its_one_line_error_and_where_the_traceback_is(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # a user's shell: ephemeral API
    workdir = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(REPO / "configs" / "tiny.yaml"),
                           f"workdir={workdir}", *_latin1_overrides(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    (log_file,) = (workdir / "logs").glob("run-*.log")
    block = proc.stderr[proc.stderr.index("\nlmpipe: run failed"):].strip().splitlines()
    assert block[:2] == [f"lmpipe: run failed at download/wikitext2: {_latin1_error(tmp_path)}",
                         f"  full log, with the traceback: {log_file}"]
    assert "Traceback" not in "\n".join(block)  # nothing after the one line but where to look
    log = log_file.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in log and "raise SourceContentError(" in log
    assert "Task run 'download/wikitext2' - download/wikitext2 failed: " + _latin1_error(tmp_path) in log
