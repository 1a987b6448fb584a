"""The MLflow Model Registry: registering versions, the champion gate, finding a registered model's files."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient

from lmpipe.artifacts import StageResult
from lmpipe.config.evaluation import TrackingConfig
from lmpipe.data.tokenizer import META_FILE, TOKENIZER_FILE
from lmpipe.tracking.runs import StageRun, client_for, git_commit, git_dirty
from lmpipe.tracking.serving import GPTTextGenerator, served_signature
from lmpipe.tracking.uris import MODEL_URI_FORMS

log = logging.getLogger(__name__)

def weights_sha256(checkpoint_dir: Path) -> str:
    """The sha256 of a checkpoint's weights: as its state.json records it, else computed."""
    from lmpipe.artifacts import sha256_file
    from lmpipe.model.checkpoint import WEIGHTS_FILE, read_state

    recorded = read_state(checkpoint_dir).get("files", {})
    digest = recorded.get(WEIGHTS_FILE) if isinstance(recorded, dict) else None
    return digest if isinstance(digest, str) else sha256_file(Path(checkpoint_dir) / WEIGHTS_FILE)


def find_version(client: MlflowClient, name: str, identity: Mapping[str, str]) -> Any | None:
    """The first version of ``name`` tagged with every ``identity`` tag, or None (none, or no such model)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    same = [v for v in versions if all(v.tags.get(k) == value for k, value in identity.items())]
    return min(same, key=lambda v: int(v.version)) if same else None


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger``'s warnings off for the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def lineage_tags(*, tokenizer: StageResult, corpora: Mapping[str, StageResult], pretrain: StageResult,
                 finetune: StageResult, sft_sha256: str | None = None) -> dict[str, str]:
    """What a registered version was made from, as its tags: the fingerprint of each corpus's shards (``corpora``:
    corpus name -> shard stage), of the tokenizer, pretraining and fine-tuning, and an SFT file's sha256.
    ``register_model`` adds the git commit and whether the tree was dirty. Each fingerprint is also the
    ``lmpipe.fingerprint`` tag of the stage run that built it (its dataset inputs: the shards' digests)."""
    return {**{f"{DATA_TAG}.{name}": shards.fingerprint for name, shards in corpora.items()},
            TOKENIZER_TAG: tokenizer.fingerprint, PRETRAIN_TAG: pretrain.fingerprint,
            FINETUNE_TAG: finetune.fingerprint,
            **({SFT_TAG: sft_sha256} if sft_sha256 else {})}


def register_model(run: StageRun, cfg: TrackingConfig, checkpoint_dir: Path, tokenizer_dir: Path,
                   pip_requirements: list[str], *, finetune: str | None = None,
                   lineage: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Log the model as a pyfunc in the stage's run and register it as a version; no alias is moved.

    The version is created with the tags that say which model it is (``WEIGHTS_TAG``: the
    sha256 of its weights; ``FINETUNE_TAG``: ``finetune``, its fine-tune stage's fingerprint)
    in the one registry call that creates it. Before anything is logged, a version with the
    same tags is looked for and, if there is one, returned (``existing``: True): a
    registration killed after MLflow created its version is found again, not repeated. So
    the same weights from the same fine-tuning are one version, however often the stage is
    killed and run again.

    The artifacts are the checkpoint directory, tokenizer.json (what serving loads)
    and tokenizer_meta.json (what ``lmpipe export`` needs for the special tokens).
    ``cfg.alias`` (returned, with the URI it gives) is moved by ``run_register``, through
    ``promote_if_better`` or ``recorded_decision``.

    ``lineage`` (``lineage_tags``), the git commit and whether the tree was dirty are tags of the version too:
    set when it is created, or on the version found again.
    """
    client = run.client
    identity = {WEIGHTS_TAG: weights_sha256(checkpoint_dir), **({FINETUNE_TAG: finetune} if finetune else {})}
    origin = {**(lineage or {}), GIT_COMMIT_TAG: git_commit(), GIT_DIRTY_TAG: git_dirty()}
    version = find_version(client, cfg.registered_model, identity)
    existing = version is not None
    if version is not None:
        for key, value in origin.items():
            client.set_model_version_tag(cfg.registered_model, version.version, key, value)
    if version is None:
        library_dir = Path(__file__).resolve().parent
        # The fluent API is needed for log_model; opening the stage's own child run in this thread is
        # safe (it is not the parent, and this stage ends with it).
        # MLflow warns that a python_model object is serialized with CloudPickle: this one is lmpipe's own class,
        # from the code it logs beside it, so the warning says nothing a user can act on.
        with mlflow.start_run(run_id=run.run_id), _quiet("mlflow.pyfunc"):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=GPTTextGenerator(),
                artifacts={"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_dir / TOKENIZER_FILE),
                           "tokenizer_meta": str(tokenizer_dir / META_FILE)},
                code_paths=[str(library_dir)],
                pip_requirements=pip_requirements,
                signature=served_signature(),
                input_example=["ROMEO:"],
            )
        # Leaving the fluent block ended the run (FINISHED) while the stage goes on: it is running again, as
        # MLflow resumes a run, so a kill from here on leaves it RUNNING (marked KILLED later), not FINISHED.
        client.update_run(run.run_id, status="RUNNING")
        _ensure_registered_model(client, cfg.registered_model)
        # Against a tracking server MLflow logs that it waits for the version to be READY, every time: noise.
        with _quiet("mlflow.store.model_registry.abstract_store"):
            version = client.create_model_version(cfg.registered_model, source=f"models:/{info.model_id}",
                                                  run_id=run.run_id, tags={**origin, **identity},
                                                  model_id=info.model_id)
        log.info("created %s version %s (fine-tune %s, weights sha256 %s)", cfg.registered_model, version.version,
                 identity.get(FINETUNE_TAG, "unknown"), identity[WEIGHTS_TAG])
    model_id = getattr(version, "model_id", None)
    return {
        "name": cfg.registered_model,
        "version": str(version.version),
        "alias": cfg.alias,
        "model_uri": f"models:/{cfg.registered_model}@{cfg.alias}",
        "logged_model_uri": f"models:/{model_id}" if model_id else version.source,
        "existing": existing,
    }


METRIC_TAG = "lmpipe.metric."  # + metric name: the version's evaluation figure, for later gates
DECISION_TAG = "lmpipe.promotion"
FINETUNE_TAG = "lmpipe.finetune_fingerprint"  # the fine-tune stage a version came from
CHAMPION_BEFORE_TAG = "lmpipe.champion_before"  # the version the gate compared it with ("none": there was none)
WEIGHTS_TAG = "lmpipe.weights_sha256"  # the sha256 of the version's model.safetensors
# Where a version came from (lineage_tags): each corpus's shard stage (DATA_TAG + ".<corpus>"), the tokenizer, the
# pretraining, an SFT file's sha256; the code's git commit and whether its tree was dirty.
DATA_TAG = "lmpipe.data_fingerprint"
TOKENIZER_TAG = "lmpipe.tokenizer_fingerprint"
PRETRAIN_TAG = "lmpipe.pretrain_fingerprint"
SFT_TAG = "lmpipe.sft_sha256"
GIT_COMMIT_TAG = "lmpipe.git_commit"
GIT_DIRTY_TAG = "lmpipe.git_dirty"
DECISION_DETAIL_TAG = DECISION_TAG + ".detail"  # the gate's whole decision, JSON: what a resumed registration returns
EVAL_PREFIX = "finetuned."  # the evaluation metrics the register stage logs in the version's run


def alias_holder(client: MlflowClient, name: str, alias: str) -> Any | None:
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

    Returns ``{"name", "alias", "version", "run_id", "metrics"}``, or None (also when ``uri`` is a SQLite store
    that does not exist yet: it is not created here).
    """
    if missing_store(uri) is not None:
        return None
    client = client_for(uri)
    version = alias_holder(client, name, alias)
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
                      aliases: tuple[str, ...] = (), scored: tuple[str, float] | None = None,
                      too_little: str | None = None) -> dict[str, Any]:
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
    never promoted. ``too_little`` (``held_out_shortfall``): the figure was scored on too
    little held-out data to decide on, and why; the gate then does not decide ("not
    decided: ..."), and no champion alias moves, whether or not there is a champion.
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
    champion = alias_holder(client, name, alias)
    client.set_model_version_tag(name, version, CHAMPION_BEFORE_TAG,
                                 "none" if champion is None else str(champion.version))
    figures = {} if champion is None else _champion_figures(client, champion,
                                                            (metric,) + ((scored[0],) if scored else ()))
    best = figures.get(metric)
    best_amount = figures.get(scored[0]) if scored else None
    if too_little is not None:
        promoted, reason = False, f"not decided: {too_little}"
    elif not math.isfinite(value):
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
    decision = {
        "metric": metric, "mode": mode, "alias": alias, "value": value,
        "champion_version": None if champion is None else str(champion.version),
        "champion_value": best, "scored": amount, "champion_scored": best_amount,
        "promoted": promoted, "decided": too_little is None, "reason": reason,
    }
    client.set_model_version_tag(name, version, DECISION_DETAIL_TAG, json.dumps(decision))
    client.set_model_version_tag(name, version, DECISION_TAG,
                                 reason if too_little else f"{'promoted' if promoted else 'not promoted'}: {reason}")
    for moved in aliases:
        client.set_registered_model_alias(name, moved, version)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    return decision


def recorded_decision(client: MlflowClient, name: str, version: str, *, alias: str,
                      aliases: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The gate's decision on a version decided before, with the aliases moved as it says; None if undecided.

    For a registration that was killed after ``promote_if_better`` tagged the decision:
    what it returned then (``DECISION_DETAIL_TAG``) is returned again, ``aliases`` point at
    the version and, if it was promoted, so does ``alias`` unless another version took it
    since (it holds neither this version nor the one the gate compared with): a later
    promotion is not undone. Every step is a no-op when already done.
    """
    mv = client.get_model_version(name, version)
    text = mv.tags.get(DECISION_TAG)
    if text is None:
        return None
    detail = mv.tags.get(DECISION_DETAIL_TAG)
    decision: dict[str, Any] = json.loads(detail) if detail else {
        "alias": alias, "promoted": text.startswith("promoted:"), "decided": not text.startswith("not decided:"),
        "reason": text if text.startswith("not decided:") else text.partition(": ")[2],
        "champion_version": mv.tags.get(CHAMPION_BEFORE_TAG)}
    for moved in aliases:
        client.set_registered_model_alias(name, moved, version)
    if decision["promoted"]:
        holder = alias_holder(client, name, alias)
        if holder is None or str(holder.version) in (str(version), mv.tags.get(CHAMPION_BEFORE_TAG)):
            client.set_registered_model_alias(name, alias, version)
    return decision


def current_aliases(uri: str, name: str, aliases: tuple[str, ...]) -> dict[str, str | None]:
    """The version each of ``aliases`` of registered model ``name`` points at now (None: it points nowhere)."""
    client = client_for(uri)
    found: dict[str, str | None] = {}
    for alias in aliases:
        holder = alias_holder(client, name, alias)
        found[alias] = None if holder is None else str(holder.version)
    return found


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
    """Where the files of a model URI (``lmpipe.tracking.handoff.MODEL_URI_FORMS``) are, found through ``client``
    alone: MLflow's own resolution of ``models:/`` and ``runs:/`` reads the process-wide registry URI."""

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

    ``model_uri``: one of ``lmpipe.tracking.handoff.MODEL_URI_FORMS``. A ``sqlite:`` store that does
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


def scored_key(metric: str) -> str | None:
    """The metric that says how much ``metric`` was scored on: ``finetuned.<corpus>.tokens`` for a held-out
    figure, ``finetuned.<benchmark>.n`` for a benchmark's (as the evaluate stage logs them); None otherwise."""
    from lmpipe.eval.heldout import MC_METRICS, METRICS, SCORED

    stem, _, stat = metric.rpartition(".")
    kind = "held_out" if stat in METRICS else "multiple_choice" if stat in MC_METRICS else None
    return f"{stem}.{SCORED[kind]}" if stem and kind else None


def held_out_shortfall(metric: str, evaluation: Mapping[str, float], *, min_examples: int,
                       min_tokens: int) -> str | None:
    """Why the gate must not decide on ``metric``: the held-out amount it was scored on (as the evaluate stage
    logs it beside the figure) that is below its minimum, in words; None when every logged amount is enough.

    A held-out loss counts its tokens (``finetuned.<corpus>.tokens``; after SFT also its
    examples, ``finetuned.sft/val.examples``); a benchmark figure its items
    (``finetuned.<benchmark>.n``). A figure decided on a handful of examples would move
    the champion on noise: one held-out SFT example of 14 tokens says nothing about
    which of two models is better.
    """
    from lmpipe.eval.heldout import MC_METRICS, METRICS, SCORED

    stem, _, stat = metric.rpartition(".")
    checks: list[tuple[str, int, str, str]] = []  # (amount key, minimum, what it counts, the config field)
    if stat in METRICS:
        checks.append((f"{stem}.examples", min_examples, "held-out example", "min_held_out_examples"))
        checks.append((f"{stem}.{SCORED['held_out']}", min_tokens, "held-out token", "min_held_out_tokens"))
    elif stat in MC_METRICS:
        checks.append((f"{stem}.{SCORED['multiple_choice']}", min_examples, "benchmark item",
                       "min_held_out_examples"))
    for key, minimum, what, config_field in checks:
        amount = evaluation.get(key)
        if amount is not None and amount < minimum:
            what += "" if amount == 1 else "s"
            return (f"{metric} was scored on {amount:,.0f} {what} ({key}), fewer than tracking.{config_field}="
                    f"{minimum:,}: too few to tell the models apart (the champion is kept; score on more held-out "
                    f"data, or lower tracking.{config_field})")
    return None
