"""Everything MLflow: runs, batched metrics, artifacts, the served model and the registry.

The only module of the library that imports mlflow. It logs through
``MlflowClient`` with explicit run ids, never through the fluent API's
thread-local "active run": stages run in Prefect worker threads, where a bare
``mlflow.log_metric`` would silently open a new top-level run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from lmpipe.artifacts import StageResult
from lmpipe.config.evaluation import TrackingConfig
from lmpipe.data.shards import MANIFEST_FILE
from lmpipe.tracking.links import NOTE_TAG, FlowRunRef, mlflow_ui, run_page
from lmpipe.tracking.owners import HOST_TAG, PID_TAG, owner_dead, owner_tags
from lmpipe.tracking.store import STORE_FILE, default_store
from lmpipe.tracking.uris import is_server_uri

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # MLflow's limit on metrics per log_batch call


class TrackingContext(BaseModel):
    """What a stage needs to log into the pipeline's MLflow run; small and picklable."""

    uri: str
    experiment_id: str
    parent_run_id: str
    workdir: str
    flow_run: FlowRunRef | None = None  # the orchestrator's run: tagged on every run and linked in its description


def resolve_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """The configured URI, or a SQLite store under the work directory (MLflow 3 refuses ./mlruns)."""
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(Path(workdir).resolve() / STORE_FILE).as_posix()}"


def is_database_uri(uri: str) -> bool:
    """Whether ``uri`` is a database MLflow opens itself (``sqlite:``, ``postgresql://``, ``mysql+pymysql://``...):
    then nothing keeps artifacts for it but the location lmpipe gives its experiment."""
    return urllib.parse.urlsplit(uri).scheme.split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


SERVER_TIMEOUT_S = 10.0  # how long a tracking server may take to answer its health check


def check_server(uri: str | None, what: str) -> None:
    """For a tracking server's URI, fail at once (ConnectionError naming ``what``, the setting or option that
    gave it) when nothing answers there; MLflow's own client would retry for about four minutes first.

    Any HTTP answer counts, an error status too (a proxy or an authenticating front asks for credentials
    on ``/health``): only a refused or timed-out connection means there is no server.
    """
    if not is_server_uri(uri):
        return
    health = f"{str(uri).rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_TIMEOUT_S):  # noqa: S310 - http(s) only, checked above
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise ConnectionError(f"{what}={uri!r}: no MLflow tracking server answers at {health} ({reason}); start "
                              "it (`mlflow server ...`, README: Team set-up) or leave tracking.uri unset to use "
                              "the work directory's own store") from None


def _git(*args: str) -> str | None:
    """A git command's output in the library's checkout; None outside one (an installed package) or without git."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_commit() -> str:
    commit = _git("rev-parse", "HEAD")
    return commit or "unknown"


def git_dirty() -> str:
    """"true" when tracked files differ from the commit (the code that ran is not the commit's), "false" when not,
    "unknown" outside a checkout. Untracked files do not count: a work directory or notes beside the code."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if status is None else str(bool(status)).lower()


CONFIG_ARTIFACT = "config.yaml"  # the parent run's copy of the resolved configuration
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # what MLflow 3's UI offers as "ML"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/models to dotted keys: {"model": {"n_layer": 4}} -> {"model.n_layer": 4}."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def client_for(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)  # the registry and pyfunc logging read the global URI
    return MlflowClient(tracking_uri=uri)


def open_pipeline_run(cfg: TrackingConfig, workdir: str | Path, run_name: str, params: dict[str, Any],
                      tags: dict[str, str], flow_run: FlowRunRef | None = None) -> TrackingContext:
    """Create the experiment if needed and start the parent run. The experiment's artifacts are under the work
    directory, or where a tracking server keeps them.

    A tracking server (``cfg.uri`` ``http://host:port``) that does not answer is an error at once
    (``check_server``). Without ``cfg.uri``, the work directory's own store is created first
    (``lmpipe.tracking.store``: built aside and moved into place, never seen half-made) or checked. Runs of
    the experiment that a killed process of this host left RUNNING are marked KILLED (``mark_killed_runs``).

    ``params`` (the resolved configuration) are the run's params and its artifact ``config.yaml``. The run's
    description names ``flow_run`` (with a link to its page when it has one), and so does each stage's run.
    """
    uri = resolve_uri(cfg, workdir)
    check_server(uri, "tracking.uri")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    local_artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
    # A server keeps the artifacts where it is told to (--artifacts-destination, served through it); a database
    # opened directly has no artifact store of its own, so they go under the work directory.
    artifacts = local_artifacts if is_database_uri(uri) else None
    if not cfg.uri:
        default_store(Path(workdir).resolve() / STORE_FILE, local_artifacts)
    client = client_for(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        # MLflow 3's UI asks which kind an experiment is (GenAI or model training) and records it in this tag.
        exp_id = client.create_experiment(cfg.experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    else:
        exp_id = exp.experiment_id
        mark_killed_runs(client, exp_id)
    note = (_flow_run_note(flow_run)
            + f"\n\nThe resolved configuration is this run's artifact `{CONFIG_ARTIFACT}`. Each stage that ran "
              "is a nested run; `stages.json` lists every stage, ran or reused, with its fingerprint.")
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"lmpipe.git_commit": git_commit(), "lmpipe.git_dirty": git_dirty(), **tags,
                                  **(flow_run.tags() if flow_run else {}), NOTE_TAG: note, **owner_tags()})
    ctx = TrackingContext(uri=uri, experiment_id=exp_id, parent_run_id=run.info.run_id,
                          workdir=str(Path(workdir).resolve()), flow_run=flow_run)
    try:
        _log_params(client, ctx.parent_run_id, params)
        client.log_text(ctx.parent_run_id, yaml.safe_dump(params, sort_keys=False), CONFIG_ARTIFACT)
    except BaseException:
        record_failure(f"mark MLflow run {ctx.parent_run_id} FAILED",
                       lambda: client.set_terminated(ctx.parent_run_id, status="FAILED"))
        raise
    return ctx


def _flow_run_note(flow_run: FlowRunRef | None) -> str:
    return flow_run.note() if flow_run else "Not started by a Prefect flow run."


KILLED_BY_TAG = "lmpipe.killed"  # on a run marked KILLED: why


def mark_killed_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of the experiment left RUNNING by a process of this host that is gone.

    Every run lmpipe opens carries its owner (``lmpipe.tracking.owners``: host, pid, the
    process's start time). A run still RUNNING whose owner is on this host and dead (its pid
    gone, or now another process's) was killed before it could end: it gets status KILLED
    and an end time (now: when it died is not known), and the models it was logging
    (LoggedModels still PENDING) are marked FAILED. A run of a live process, e.g. a
    pipeline running beside this one, stays RUNNING. So do runs of other hosts, and runs
    without owner tags: from here nothing tells whether their process still runs.
    Returns the ids of the runs marked KILLED.
    """
    host = socket.gethostname()
    killed: list[str] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' AND "
                                  f"tags.`{HOST_TAG}` = '{host}'", max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if owner_dead(tags):
                client.set_tag(run.info.run_id, KILLED_BY_TAG,
                               f"its process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} was gone when a later "
                               "pipeline run started")
                client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
                killed.append(run.info.run_id)
        token = page.token
        if not token:
            break
    for run_id in killed:
        for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    if killed:
        log.warning("marked %d MLflow run(s) KILLED, left RUNNING by a process that is gone: %s",
                    len(killed), ", ".join(killed))
    return killed


def record_failure(what: str, action: Callable[[], object]) -> None:
    """Record a failure (in MLflow) while its exception propagates: an error doing so is logged, not raised.

    The store may be failing for the same reason as the stage (a full disk), and an error
    raised here would replace the one the user has to see. ``what``: what ``action`` does,
    for the warning ("mark MLflow run ... FAILED").
    """
    try:
        action()
    except Exception as err:
        first_line = next(iter(str(err).splitlines()), "")  # an SQL error goes on with the statement
        log.warning("could not %s: %s: %s (the error raised is the one that failed the run)", what,
                    type(err).__name__, first_line)


def close_run(ctx: TrackingContext, run_id: str, status: str) -> None:
    client_for(ctx.uri).set_terminated(run_id, status=status)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)


class StageRun:
    """A stage's nested MLflow run. Metrics are buffered and written in batches."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 200) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = client_for(uri)
        self.flush_every = flush_every
        self._pending: list[Metric] = []

    def env(self) -> dict[str, str]:
        """Environment that lets another process (a torchrun worker) log into this run: ``from_env``."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_RUN_ID": self.run_id}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StageRun | None:
        """The run ``env`` handed over, or None when there is none (training without tracking)."""
        if "MLFLOW_RUN_ID" not in environ or "MLFLOW_TRACKING_URI" not in environ:
            return None
        return cls(environ["MLFLOW_TRACKING_URI"], environ["MLFLOW_RUN_ID"])

    def log_params(self, params: dict[str, Any]) -> None:
        _log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Buffer metrics; one store call per `flush_every` values, not per value (3 ms each on SQLite)."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                continue
            self._pending.append(Metric(key, float(value), now, int(step)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under artifact_path."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_shards(self, shards: StageResult, context: str = "train") -> None:
        """A corpus's token shards (a shard stage's result) as a dataset input of this run (``shard_dataset``)."""
        log_inputs(self.client, self.run_id, [shard_dataset(shards, context)])

    def log_result(self, result: StageResult, artifacts: Sequence[str] = ()) -> None:
        """The stage's summary metrics, its file hashes as an artifact, and the named output files."""
        self.log_metrics(result.metrics, step=0)
        self.flush()
        self.set_tags({"lmpipe.out_dir": result.out_dir, "lmpipe.reused_output": result.meta.get("reused", False)})
        self.client.log_dict(self.run_id, result.files, "stage_files.json")
        for name in artifacts:
            path = result.path(name)
            if path.is_dir():  # e.g. model/ -> the run's model/ folder
                self.log_artifact(path, name)
            elif path.is_file():
                self.log_artifact(path, str(Path(name).parent) if "/" in name else None)


DIGEST_CHARS = 32  # of a manifest's sha256 in a dataset's digest: MLflow stores 36 characters at most


# What the store says when two processes insert the same dataset row at once (SQLite, PostgreSQL, MySQL).
_DUPLICATE_KEY = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def log_inputs(client: MlflowClient, run_id: str, datasets: list[DatasetInput], attempts: int = 3) -> None:
    """``client.log_inputs``, safe against another run logging the same dataset at the same moment.

    MLflow looks a dataset (experiment, name, digest) up and inserts it when it is not there, in one transaction;
    two runs sharing a corpus's shards (two configs started together) can both miss it, and the second insert
    breaks the table's unique key. That transaction is rolled back whole and the dataset now exists, so the call
    is made again and links it.
    """
    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as err:
            if attempt == attempts or not any(text in str(err) for text in _DUPLICATE_KEY):
                raise
            log.info("dataset inputs of run %s: another run logged the same dataset at once; logging again", run_id)


def shard_dataset(shards: StageResult, context: str) -> DatasetInput:
    """A shard stage's output as an MLflow dataset input: named after its corpus, ``digest`` the first
    ``DIGEST_CHARS`` hex digits of the manifest's sha256 (all of it in the profile), source the shard directory,
    profile the tokens and documents of each split; tagged with ``context`` (``train``) as ``mlflow.data`` does."""
    manifest = json.loads(shards.path(MANIFEST_FILE).read_text(encoding="utf-8"))
    sha256 = shards.files[MANIFEST_FILE]
    profile = {f"{split}_{count}": entry[count] for split, entry in manifest["splits"].items()
               for count in ("tokens", "documents")}
    dataset = Dataset(name=manifest["corpus"], digest=sha256[:DIGEST_CHARS], source_type="local",
                      source=json.dumps({"uri": shards.out_dir}),
                      profile=json.dumps({**profile, "manifest_sha256": sha256, "shard_fingerprint": shards.fingerprint,
                                          "tokenizer_fingerprint": manifest["tokenizer_fingerprint"]}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def stage_run_that_built(uri: str, experiment_id: str, fingerprint: str) -> str | None:
    """The id of the latest FINISHED stage run with ``fingerprint``: the run that built that stage's directory (a
    reused stage opens none of its own); None when this experiment has none (the directory was built against
    another store or experiment)."""
    runs = client_for(uri).search_runs([experiment_id], f"tags.`lmpipe.fingerprint` = '{fingerprint}' AND "
                                       "attributes.status = 'FINISHED'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


@contextmanager
def stage_run(ctx: TrackingContext, stage: str, fingerprint: str, params: dict[str, Any],
              tags: dict[str, str] | None = None, *, name: str | None = None) -> Iterator[StageRun]:
    """A nested run for one stage; FINISHED when the block succeeds, FAILED when it raises.

    ``name``: the run's name, as the flow labels the stage (``clean/wikitext2``: which corpus); the
    ``lmpipe.stage`` tag is the stage itself (``clean``).

    When the block raises, that error is what propagates: one in recording the failure (the
    store failing too) is logged as a warning (``record_failure``).
    """
    client = client_for(ctx.uri)
    label = name or stage
    note = (f"Stage `{label}` (fingerprint `{fingerprint}`) of the lmpipe run "
            f"[{ctx.parent_run_id}]({run_page(ctx.experiment_id, ctx.parent_run_id)}). "
            + _flow_run_note(ctx.flow_run))
    run = client.create_run(
        ctx.experiment_id,
        run_name=label,
        tags={PARENT_TAG: ctx.parent_run_id, "lmpipe.stage": stage, "lmpipe.fingerprint": fingerprint,
              "lmpipe.git_commit": git_commit(), **(ctx.flow_run.tags() if ctx.flow_run else {}), NOTE_TAG: note,
              **(tags or {}), **owner_tags()},
    )
    sr = StageRun(ctx.uri, run.info.run_id)
    # In the task's log (the library's logger goes to the orchestrator's): where this stage's records are.
    log.info("%s: MLflow run %s, %s", label, sr.run_id, mlflow_ui(ctx.uri).run(ctx.experiment_id, sr.run_id))
    try:
        sr.log_params(params)
        yield sr
    except BaseException:  # recorded as far as the store allows; the stage's own error is the one raised
        record_failure(f"log the metrics still buffered for MLflow run {sr.run_id} ({stage})", sr.flush)
        record_failure(f"mark MLflow run {sr.run_id} ({stage}) FAILED",
                       lambda: client.set_terminated(sr.run_id, status="FAILED"))
        raise
    sr.flush()
    client.set_terminated(sr.run_id, status="FINISHED")


def log_parent_figures(ctx: TrackingContext, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """Figures and tags on the flow's parent run, in one call (a continual run's report)."""
    now = int(time.time() * 1000)
    client_for(ctx.uri).log_batch(ctx.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)


def set_parent_summary(ctx: TrackingContext, results: dict[str, StageResult], outcomes: list[dict[str, Any]]) -> None:
    """Put every stage's metrics, fingerprint and cache status on the parent run.

    A cached stage opens no child run of its own, so without this a fully cached
    run would have nothing to compare in the MLflow UI.
    """
    client = client_for(ctx.uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"{label}.{key}", float(value), now, 0)
               for label, result in results.items() for key, value in result.metrics.items()
               if value is not None and math.isfinite(float(value))]
    tags = [RunTag(f"lmpipe.stage.{o['label']}", f"{o['status']} {o['fingerprint']}") for o in outcomes]
    for i in range(0, max(len(metrics), 1), BATCH_LIMIT):
        client.log_batch(ctx.parent_run_id, metrics=metrics[i : i + BATCH_LIMIT], tags=tags if i == 0 else [],
                         synchronous=True)
    client.log_dict(ctx.parent_run_id, {"stages": outcomes}, "stages.json")
