"""Everything MLflow: runs, batched metrics, artifacts, the served model and the registry.

The only module of the library that imports mlflow. It logs through
``MlflowClient`` with explicit run ids, never through the fluent API's
thread-local "active run": stages run in Prefect worker threads, where a bare
``mlflow.log_metric`` would silently open a new top-level run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from pydantic import BaseModel

from lmpipe.config import TrackingConfig
from lmpipe.handoff import GENERATION_DEFAULTS  # module level: the signature's defaults decide the register stage
from lmpipe.tokenizer import META_FILE, TOKENIZER_FILE
from lmpipe.stage import StageResult

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # MLflow's limit on metrics per log_batch call


class TrackingContext(BaseModel):
    """What a stage needs to log into the pipeline's MLflow run; small and picklable."""

    uri: str
    experiment_id: str
    parent_run_id: str
    workdir: str
    flow_run_id: str | None = None  # the orchestrator's run id, tagged on every stage's run


def resolve_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """The configured URI, or a SQLite store under the work directory (MLflow 3 refuses ./mlruns)."""
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db').as_posix()}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


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


def _client(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)  # the registry and pyfunc logging read the global URI
    return MlflowClient(tracking_uri=uri)


def open_pipeline_run(cfg: TrackingConfig, workdir: str | Path, run_name: str, params: dict[str, Any],
                      tags: dict[str, str], flow_run_id: str | None = None) -> TrackingContext:
    """Create the experiment if needed (artifacts under the work directory) and start the parent run."""
    uri = resolve_uri(cfg, workdir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
        exp_id = client.create_experiment(cfg.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={"lmpipe.git_commit": git_commit(), **tags})
    ctx = TrackingContext(uri=uri, experiment_id=exp_id, parent_run_id=run.info.run_id,
                          workdir=str(Path(workdir).resolve()), flow_run_id=flow_run_id)
    try:
        _log_params(client, ctx.parent_run_id, params)
    except BaseException:
        client.set_terminated(ctx.parent_run_id, status="FAILED")
        raise
    return ctx


def close_run(ctx: TrackingContext, run_id: str, status: str) -> None:
    _client(ctx.uri).set_terminated(run_id, status=status)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)


class StageRun:
    """A stage's nested MLflow run. Metrics are buffered and written in batches."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 200) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
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

    def log_result(self, result: StageResult, artifacts: list[str] = ()) -> None:
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


@contextmanager
def stage_run(ctx: TrackingContext, stage: str, fingerprint: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """A nested run for one stage; FINISHED when the block succeeds, FAILED when it raises."""
    client = _client(ctx.uri)
    run = client.create_run(
        ctx.experiment_id,
        run_name=stage,
        tags={PARENT_TAG: ctx.parent_run_id, "lmpipe.stage": stage, "lmpipe.fingerprint": fingerprint,
              "lmpipe.git_commit": git_commit(),
              **({"prefect.flow_run_id": ctx.flow_run_id} if ctx.flow_run_id else {}), **(tags or {})},
    )
    sr = StageRun(ctx.uri, run.info.run_id)
    try:
        sr.log_params(params)
        yield sr
    except BaseException:
        sr.flush()
        client.set_terminated(sr.run_id, status="FAILED")
        raise
    sr.flush()
    client.set_terminated(sr.run_id, status="FINISHED")


# ---------------------------------------------------------------------------------------------
# The served model: a pyfunc that generates text, registered with an alias.


class GPTTextGenerator(mlflow.pyfunc.PythonModel):
    """Serves a checkpoint as text generation: a list of prompts in, a list of completions out.

    A chat SFT model takes each prompt as a user turn in its chat template and
    returns the assistant's reply (``lmpipe.evaluate.generate_samples``'s chat mode).
    The params are checked, and default, as ``lmpipe generate``'s options
    (``lmpipe.handoff.generation_params``); an empty prompt generates from the
    end-of-text token. The model runs on CUDA when the machine has it.
    """

    def load_context(self, context: Any) -> None:
        import torch

        from lmpipe.checkpoint import load_model, read_state
        from lmpipe.evaluate import is_chat_model
        from lmpipe.tokenizer import meta_eot_id
        from lmpipe.tokenizer import load_tokenizer

        checkpoint = Path(context.artifacts["checkpoint"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(checkpoint, device=self.device)
        self.chat = is_chat_model(read_state(checkpoint))
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))
        meta = context.artifacts.get("tokenizer_meta")  # absent from models registered before it was logged
        self.start_id = meta_eot_id(self.tokenizer, Path(meta) if meta else None, missing_ok=True)

    # The type hint is one MLflow infers no signature from (it would replace the explicit one, which declares
    # the params), and what the model gets once MLflow has checked the input against that signature. With no
    # hint at all, MLflow warns "Add type hints to the `predict` method" whenever this class is defined.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Prompts (a one-column DataFrame, or a list of strings when called directly) -> list[str] of completions."""
        from lmpipe.evaluate import generate_samples
        from lmpipe.handoff import check_prompts, generation_params

        if hasattr(model_input, "iloc"):  # a DataFrame, as MLflow hands the input over
            model_input = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            model_input = [model_input]
        prompts = check_prompts(model_input)
        samples = generate_samples(
            self.model, self.tokenizer, prompts, **generation_params(params),
            device=getattr(self, "device", "cpu"), start_id=getattr(self, "start_id", None),
            chat=getattr(self, "chat", False),
        )
        return [s["completion"] for s in samples]


def served_signature() -> Any:
    """The served model's signature: strings in and out, and the params of ``lmpipe generate`` with its defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    types = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double", "seed": "long"}
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(key, types[key], default)
                                              for key, default in GENERATION_DEFAULTS.items()]))


def register_model(run: StageRun, cfg: TrackingConfig, checkpoint_dir: Path,
                   tokenizer_dir: Path, pip_requirements: list[str]) -> dict[str, Any]:
    """Log the model as a pyfunc in the stage's run and register a new version; no alias is moved.

    The artifacts are the checkpoint directory, tokenizer.json (what serving loads)
    and tokenizer_meta.json (what ``lmpipe export`` needs for the special tokens).
    ``cfg.alias`` (returned, with the URI it gives) is moved by ``run_register``, through
    ``promote_if_better``, once the version carries every tag that describes it.
    """
    library_dir = Path(__file__).resolve().parent
    # The fluent API is needed for log_model; opening the stage's own child run in this thread is
    # safe (it is not the parent, and this stage ends with it).
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=GPTTextGenerator(),
            artifacts={"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_dir / TOKENIZER_FILE),
                       "tokenizer_meta": str(tokenizer_dir / META_FILE)},
            code_paths=[str(library_dir)],
            pip_requirements=pip_requirements,
            signature=served_signature(),
            input_example=["ROMEO:"],
            registered_model_name=cfg.registered_model,
        )
    version = str(info.registered_model_version)
    return {
        "name": cfg.registered_model,
        "version": version,
        "alias": cfg.alias,
        "model_uri": f"models:/{cfg.registered_model}@{cfg.alias}",
        "logged_model_uri": info.model_uri,
    }


METRIC_TAG = "lmpipe.metric."  # + metric name: the version's evaluation figure, for later gates
DECISION_TAG = "lmpipe.promotion"
FINETUNE_TAG = "lmpipe.finetune_fingerprint"  # the fine-tune stage a version came from
CHAMPION_BEFORE_TAG = "lmpipe.champion_before"  # the version the gate compared it with ("none": there was none)
EVAL_PREFIX = "finetuned."  # the evaluation metrics the register stage logs in the version's run


def _alias_holder(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version ``alias`` points at, or None (no such alias, or no such registered model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def champion_metrics(uri: str, name: str, alias: str, *, finetune: str | None = None) -> dict[str, Any] | None:
    """The registered model an evaluation compares with, and the ``finetuned.*`` metrics logged with it.

    That is the version ``name@alias`` points at, except for a fine-tuned model
    (``finetune``: its fine-tune stage's fingerprint) that is registered already: then
    the version that held the alias when it was first registered, as the gate
    recorded it (None if there was none). So a model is never compared with itself,
    and re-running a registered model's config gives its evaluation the same
    reference as before: the report stays cached and nothing is registered twice.
    The metrics are those the register stage logged in the run that registered the
    reference (its ``run_id``): the figures of that model's own evaluation.

    Returns ``{"name", "alias", "version", "run_id", "metrics"}``, or None.
    """
    client = _client(uri)
    version = _alias_holder(client, name, alias)
    if finetune is not None:
        same = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(FINETUNE_TAG) == finetune
                and CHAMPION_BEFORE_TAG in v.tags]
        if same:
            before = min(same, key=lambda v: int(v.version)).tags[CHAMPION_BEFORE_TAG]
            try:
                version = None if before == "none" else client.get_model_version(name, before)
            except mlflow.exceptions.MlflowException:  # deleted since
                version = None
    if version is None:
        return None
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    return {"name": name, "alias": alias, "version": str(version.version), "run_id": version.run_id,
            "metrics": {k: float(v) for k, v in sorted(metrics.items()) if k.startswith(EVAL_PREFIX)}}


def _champion_figures(client: MlflowClient, champion: Any, keys: tuple[str, ...]) -> dict[str, float | None]:
    """The champion version's figures for ``keys``: its ``METRIC_TAG`` tags (the gate writes them), else the
    metrics of the run that registered it (the register stage logs every ``finetuned.*`` figure there, and
    ``champion_metrics`` reads them for the report); None where neither has one."""
    found: dict[str, float | None] = {key: None for key in keys}
    for key in keys:
        if champion.tags.get(METRIC_TAG + key) is not None:
            found[key] = float(champion.tags[METRIC_TAG + key])
    if any(v is None for v in found.values()) and champion.run_id:
        try:
            logged = client.get_run(champion.run_id).data.metrics
        except mlflow.exceptions.MlflowException:  # the run was deleted since
            logged = {}
        for key in keys:
            if found[key] is None and key in logged:
                found[key] = float(logged[key])
    return found


def promote_if_better(client: MlflowClient, name: str, version: str, metric: str, value: float, *,
                      mode: str, alias: str, tags: Mapping[str, str] | None = None,
                      aliases: tuple[str, ...] = (), scored: tuple[str, float] | None = None) -> dict[str, Any]:
    """The promotion gate: point ``alias`` at ``version`` only if it beats the version the alias holds.

    The new version is tagged with ``tags`` (where it came from), its figure (and, with
    ``scored``, how much it was scored on) and the version it was compared with
    (``CHAMPION_BEFORE_TAG``), then with the decision (promoted or kept, both figures,
    why), which is also returned. Only then do aliases move: ``aliases`` whatever the
    decision, ``alias`` if promoted. So a crash or a registry error between the steps
    never leaves an alias on a version without the tags that ``champion_metrics`` and
    the next gate read: the alias move is the last state change.

    The champion's figure is its ``lmpipe.metric.<metric>`` tag or, without one (it was
    promoted under another metric), the figure logged in the run that registered it; a
    champion with neither is replaced: there is nothing to compare. ``scored``
    (``("finetuned.<corpus>.tokens" or "finetuned.<benchmark>.n", amount)``): the new
    figure counts only against one scored on the same amount, as the evaluation report
    compares them; otherwise the champion stays ("not comparable"), since a different
    token budget or benchmark limit moves the figure by itself. A non-finite figure is
    never promoted.
    """
    value = float(value)
    for key, tag in (tags or {}).items():
        client.set_model_version_tag(name, version, key, tag)
    client.set_model_version_tag(name, version, METRIC_TAG + metric, repr(value))
    amount = None
    if scored is not None:
        amount = float(scored[1])
        # exact (a count): the next gate compares it with ==, so "{:g}"'s 6 digits would lock the champion in
        client.set_model_version_tag(name, version, METRIC_TAG + scored[0],
                                     str(int(amount)) if amount.is_integer() else repr(amount))
    champion = _alias_holder(client, name, alias)
    client.set_model_version_tag(name, version, CHAMPION_BEFORE_TAG,
                                 "none" if champion is None else str(champion.version))
    figures = {} if champion is None else _champion_figures(client, champion,
                                                            (metric,) + ((scored[0],) if scored else ()))
    best = figures.get(metric)
    best_amount = figures.get(scored[0]) if scored else None
    if not math.isfinite(value):
        promoted, reason = False, f"{metric} is {value}, not a finite figure"
    elif champion is None:
        promoted, reason = True, f"no @{alias} yet"
    elif best is None:
        promoted, reason = True, (f"@{alias} (version {champion.version}) has no {metric} to compare: neither a "
                                  f"{METRIC_TAG}{metric} tag nor a figure logged in its registration run")
    elif scored is not None and best_amount != amount:
        unit = "examples" if scored[0].endswith(".n") else "tokens"
        then = f"{best_amount:,.0f} {unit}" if best_amount is not None else f"an unlogged number of {unit}"
        promoted, reason = False, (f"not comparable: {metric} {value:.6g} vs {best:.6g} of version "
                                   f"{champion.version}, scored on {then} then, {amount:,.0f} now "
                                   "(the champion is kept; evaluate both on as much to compare)")
    else:
        promoted = value < best if mode == "min" else value > best
        op = ("<" if promoted else ">=") if mode == "min" else (">" if promoted else "<=")
        reason = f"{metric} {value:.6g} {op} {best:.6g} of version {champion.version} ({mode} wins)"
    client.set_model_version_tag(name, version, DECISION_TAG, f"{'promoted' if promoted else 'not promoted'}: {reason}")
    for moved in aliases:
        client.set_registered_model_alias(name, moved, version)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    return {
        "metric": metric, "mode": mode, "alias": alias, "value": value,
        "champion_version": None if champion is None else str(champion.version),
        "champion_value": best, "scored": amount, "champion_scored": best_amount,
        "promoted": promoted, "reason": reason,
    }


def missing_store(tracking_uri: str | None) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI when it does not exist (opening it would create an
    empty store), else None."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/x.db or sqlite:///relative.db
    if not path or path == ":memory:":
        return None
    return None if Path(path).is_file() else Path(path)


def _model_location(client: MlflowClient, model_uri: str) -> str:
    """Where the files of a model URI (``lmpipe.handoff.MODEL_URI_FORMS``) are, found through ``client``
    alone: MLflow's own resolution of ``models:/`` and ``runs:/`` reads the process-wide registry URI."""
    from lmpipe.handoff import MODEL_URI_FORMS

    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        path = path.strip("/")
        if not run_id or not path:
            raise ValueError(f"model {model_uri!r}: expected runs:/<run id>/<model name>; accepted: {MODEL_URI_FORMS}")
        run = client.get_run(run_id)
        # MLflow 3 logs a model as a LoggedModel of the run (its own artifact location), not in the run's artifacts.
        logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
                                             order_by=[{"field_name": "creation_timestamp", "ascending": False}])
        return logged[0].artifact_location if logged else f"{run.info.artifact_uri.rstrip('/')}/{path}"
    rest = model_uri[len("models:/"):].strip("/")
    name, sep, alias = rest.partition("@")
    if sep:
        version = client.get_model_version_by_alias(name, alias).version
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise mlflow.exceptions.MlflowException(f"Registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
    elif rest.startswith("m-"):  # a LoggedModel's id, as registration.json's logged_model_uri gives it
        return client.get_logged_model(rest).artifact_location
    else:
        raise ValueError(f"model {model_uri!r} names no version: accepted forms are {MODEL_URI_FORMS}")
    if not name:
        raise ValueError(f"model {model_uri!r} names no model: accepted forms are {MODEL_URI_FORMS}")
    return client.get_model_version_download_uri(name, version)


def download_model_files(model_uri: str, tracking_uri: str | None, dest: Path) -> tuple[Path, Path]:
    """A logged or registered model's checkpoint directory and tokenizer directory, downloaded into dest.

    ``model_uri``: one of ``lmpipe.handoff.MODEL_URI_FORMS``. A ``sqlite:`` store that does
    not exist is an error (FileNotFoundError naming it), not an empty store created on the spot.
    """
    store = missing_store(tracking_uri)
    if store is not None:
        raise FileNotFoundError(f"model {model_uri!r}: the MLflow store {store} does not exist ({tracking_uri})")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # not a default registry in cwd
    try:
        source = _model_location(client, model_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                         tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(f"model {model_uri!r} could not be found in {tracking_uri}: {err.message}") from None
    if not (local / "MLmodel").is_file():
        raise ValueError(f"model {model_uri!r} is not an MLflow model (no MLmodel file at {source})")
    artifacts = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))["flavors"]["python_function"]
    paths = {name: local / entry["path"] for name, entry in artifacts.get("artifacts", {}).items()}
    if "checkpoint" not in paths or "tokenizer" not in paths:
        raise ValueError(f"model {model_uri!r} is not an lmpipe model (its artifacts are {sorted(paths)})")
    return paths["checkpoint"], paths["tokenizer"].parent


def served_requirements() -> list[str]:
    """Exact versions of what the served model imports, so MLflow need not infer them (~8 s a call)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "tokenizers", "safetensors", "numpy", "pydantic", "pyyaml", "pandas", "pyarrow")]


def scored_key(metric: str) -> str | None:
    """The metric that says how much ``metric`` was scored on: ``finetuned.<corpus>.tokens`` for a held-out
    figure, ``finetuned.<benchmark>.n`` for a benchmark's (as the evaluate stage logs them); None otherwise."""
    from lmpipe.evaluate import MC_METRICS, METRICS, SCORED

    stem, _, stat = metric.rpartition(".")
    kind = "held_out" if stat in METRICS else "multiple_choice" if stat in MC_METRICS else None
    return f"{stem}.{SCORED[kind]}" if stem and kind else None


def run_register(cfg: TrackingConfig, ctx: TrackingContext, run: StageRun, finetuned: StageResult,
                 tokenizer: StageResult, out_dir: Path, fingerprint: str, *, metric: str,
                 evaluation: dict[str, float]) -> StageResult:
    """The register stage: the fine-tuned model logged, registered and aliased, the promotion gate
    applied to ``evaluation[metric]``; the outcome on disk and on the stage's run."""
    from lmpipe.stage import BuildOutput, run_stage, write_json_atomic

    if metric not in evaluation:
        raise ValueError(f"tracking.promote_metric={metric!r} is not in the evaluation ({sorted(evaluation)})")
    key = scored_key(metric)
    # How much the figure was scored on, for the gate to compare it only with a figure scored on as much.
    scored = (key, evaluation[key]) if key is not None and key in evaluation else None

    def build(tmp: Path) -> BuildOutput:
        info = register_model(run, cfg, finetuned.path("model"), Path(tokenizer.out_dir), served_requirements())
        # Where the version came from (and, tagged by the gate, what it was up against): champion_metrics finds
        # its reference again. Every tag is written before cfg.alias and the champion alias move.
        info["promotion"] = promote_if_better(run.client, cfg.registered_model, info["version"], metric,
                                              evaluation[metric], mode=cfg.promote_mode, alias=cfg.champion_alias,
                                              tags={FINETUNE_TAG: finetuned.fingerprint}, aliases=(cfg.alias,),
                                              scored=scored)
        run.set_tags({DECISION_TAG: info["promotion"]["reason"],
                      DECISION_TAG + ".promoted": info["promotion"]["promoted"]})
        write_json_atomic(tmp / "registration.json", {**info, "tracking_uri": ctx.uri})
        return BuildOutput(metrics={"version": float(info["version"]),
                                    "promoted": float(info["promotion"]["promoted"])}, meta=info)

    return run_stage("register", fingerprint, out_dir, build)


def set_parent_summary(ctx: TrackingContext, results: dict[str, StageResult], outcomes: list[dict[str, Any]]) -> None:
    """Put every stage's metrics, fingerprint and cache status on the parent run.

    A cached stage opens no child run of its own, so without this a fully cached
    run would have nothing to compare in the MLflow UI.
    """
    client = _client(ctx.uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"{label}.{key}", float(value), now, 0)
               for label, result in results.items() for key, value in result.metrics.items()
               if value is not None and math.isfinite(float(value))]
    tags = [RunTag(f"lmpipe.stage.{o['label']}", f"{o['status']} {o['fingerprint']}") for o in outcomes]
    for i in range(0, max(len(metrics), 1), BATCH_LIMIT):
        client.log_batch(ctx.parent_run_id, metrics=metrics[i : i + BATCH_LIMIT], tags=tags if i == 0 else [],
                         synchronous=True)
    client.log_dict(ctx.parent_run_id, {"stages": outcomes}, "stages.json")
