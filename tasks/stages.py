"""One thin Prefect task per stage.

Each task: fingerprint and output directory from its StageSpec (what the stage reads, declared
once, given the task's arguments: ``SPEC.locate(locals())`` first thing), a nested MLflow
run, one call into lmpipe, the stage's files and metrics logged, and a Prefect
artifact where a person would look for one. A stage whose finished directory is
there (and matches its record) returns it at once, with no MLflow run: the
stage directory is the only cache, so Prefect neither caches nor persists task
results. Retries live in the decorators. A training stage that trains holds slots of Prefect's
``gpu`` concurrency limit meanwhile (``tasks.device_slots``); a reused one takes none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from lmpipe.artifacts import StageResult
from lmpipe.config.continual import ContinualConfig
from lmpipe.config.data import CleanConfig, CorpusConfig, ShardConfig, TokenizerConfig
from lmpipe.config.evaluation import EvalConfig, TrackingConfig
from lmpipe.config.training import ClassifyConfig, FinetuneConfig, ModelConfig, TrainConfig
from lmpipe.data.sft import HELD_OUT_FILE, HELD_OUT_META
from lmpipe.data.shards import VAL_BY_DOCUMENT
from lmpipe.data.sources import TransientDownloadError
from lmpipe.eval.report import LOSS_CURVES, embed_images
from lmpipe.stages.champion import run_champion
from lmpipe.stages.classify import PREDICTIONS_FILE, REPORT_FILE, run_classify
from lmpipe.stages.clean import nonempty, run_clean, run_clean_chunk
from lmpipe.stages.continual import run_continue
from lmpipe.stages.contract import reuse
from lmpipe.stages.declaration import StageSpec
from lmpipe.stages.download import run_download
from lmpipe.stages.evaluate import run_evaluate
from lmpipe.stages.finetune import run_finetune
from lmpipe.stages.pretrain import run_pretrain
from lmpipe.stages.register import run_register
from lmpipe.stages.shard import run_encode_chunk, run_shard
from lmpipe.stages.tokenizer import run_train_tokenizer
from lmpipe.tracking.links import link, mlflow_ui
from lmpipe.tracking.runs import StageRun, TrackingContext, stage_run, stage_run_that_built
from lmpipe.training.launch import DistributedTrainingError
from lmpipe.training.loop import Reporters
from tasks.device_slots import device_slots
from tasks.progress import PrefectProgress

# The stage directory is the only cache: Prefect neither keys task results nor persists them a second time.
ON_DISK_ONLY: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def stage_task(**options: Any) -> Callable[[Callable[..., StageResult]], Any]:
    """``@task`` for a stage: ``ON_DISK_ONLY``, and a failure logged as one line (which task run, the error's type
    and message) before Prefect logs the traceback, so the reason is the first thing a reader of the log sees."""

    def decorate(fn: Callable[..., StageResult]) -> Any:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> StageResult:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                get_run_logger().error("%s failed: %s", task_run.name or fn.__name__, one_line(err))
                raise

        return task(**options, **ON_DISK_ONLY)(body)

    return decorate


def one_line(err: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _transient_only(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry network hiccups, not a 404 or a checksum mismatch."""
    return isinstance(state.result(raise_on_failure=False), TransientDownloadError)


def _rank_lost(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a torchrun job whose process died (it resumes from its last checkpoint), not bad settings."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, DistributedTrainingError) and err.retryable


# local_sha256: the content of local source files, so editing a corpus in place re-runs the data stages.
# val_fraction and the corpus's own cleaning do not change what is read, except the Gutenberg cut, which is made
# on whole files before they are split (gutenberg_boilerplate: the corpus's cleaning's setting).
DOWNLOAD = StageSpec("download", configs=("corpus",),
                     inputs=("local_sha256", "chunk_bytes", "strict", "gutenberg_boilerplate"),
                     not_read=(("corpus", frozenset({"val_fraction", "clean"})),))


@stage_task(name="download", retries=3, retry_delay_seconds=[2, 10, 30], retry_jitter_factor=0.5,
            retry_condition_fn=_transient_only)
def download(corpus: CorpusConfig, field: str, chunk_bytes: int, strict: bool, ctx: TrackingContext,
             local_sha256: list[str | None] | None = None, label: str | None = None,
             gutenberg_boilerplate: bool = False) -> StageResult:
    fp, out_dir = DOWNLOAD.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with stage_run(ctx, "download", fp, {field: corpus, "data.chunk_bytes": chunk_bytes, "data.strict": strict,
                                         "gutenberg_boilerplate": gutenberg_boilerplate},
                   {"lmpipe.corpus": corpus.name}, name=label) as run:
        result = run_download(corpus, out_dir, fp, field=field, chunk_bytes=chunk_bytes, strict=strict,
                              download_dir=Path(ctx.workdir) / "downloads",
                              gutenberg_boilerplate=gutenberg_boilerplate)
        run.log_result(result, ["sources.json", "read_report.json"])
    issues = result.meta.get("read_issues") or {}
    if any(issues.values()):
        get_run_logger().warning("%s: skipped bad records %s (see read_report.json)", field, issues)
        create_table_artifact(table=[{"issue": k, "records": v} for k, v in sorted(issues.items()) if v],
                              key=f"read-issues-{_key(field)}",
                              description=f"Bad records skipped while reading {field} (data.strict=false)")
    return result


# One task per chunk of the downloaded documents; no MLflow run of its own (the clean stage's run reports
# the totals), so thousands of chunks do not mean thousands of runs.
CLEAN_CHUNK = StageSpec("clean_chunk", configs=("cfg",), inputs=("chunk",), upstreams=("docs",))


@stage_task(name="clean_chunk")
def clean_chunk(cfg: CleanConfig, docs: StageResult, chunk: str, ctx: TrackingContext) -> StageResult:
    fp, out_dir = CLEAN_CHUNK.locate(locals())
    return run_clean_chunk(cfg, docs.path(chunk), out_dir, fp)


# The chunks are a function of (cfg, docs), so they are not part of the fingerprint.
CLEAN = StageSpec("clean", configs=("cfg",), upstreams=("docs",))


@stage_task(name="clean")
def clean(cfg: CleanConfig, docs: StageResult, chunks: list[StageResult], corpus_field: str, clean_field: str,
          ctx: TrackingContext, label: str | None = None, may_be_empty: bool = False) -> StageResult:
    fp, out_dir = CLEAN.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return nonempty(done, may_be_empty)
    with stage_run(ctx, "clean", fp, {clean_field: cfg}, {"lmpipe.corpus_field": corpus_field}, name=label) as run:
        result = run_clean(cfg, chunks, out_dir, fp, corpus_field=corpus_field, clean_field=clean_field,
                           before_split=docs.meta.get("before_split"), may_be_empty=may_be_empty)
        run.log_result(result, ["clean_report.json", "removed.parquet"])
        rows = result.meta["report"]
        samples = [{"step": step, **example} for step, examples in result.meta["samples"].items()
                   for example in examples]
        _publish_table(run, rows, "clean_report_table.json", f"clean-{_key(corpus_field)}",
                       f"Cleaning of {corpus_field}: documents and bytes per step")
        if "languages" in result.meta:  # language id on
            _publish_table(run, result.meta["languages"], "clean_languages_table.json",
                           f"languages-{_key(corpus_field)}",
                           f"Cleaning of {corpus_field}: documents and bytes per language, in and out")
        _publish_table(run, samples, "removed_samples_table.json", f"removed-{_key(corpus_field)}",
                       f"Examples of documents removed from {corpus_field}, with the reason "
                       "(every removal is in the stage's removed.parquet)")
    return result


TOKENIZER = StageSpec("train_tokenizer", configs=("cfg",), upstreams=("docs",))


@stage_task(name="train_tokenizer")
def train_tokenizer(cfg: TokenizerConfig, docs: StageResult, ctx: TrackingContext,
                    label: str | None = None) -> StageResult:
    fp, out_dir = TOKENIZER.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with stage_run(ctx, "train_tokenizer", fp, {"tokenizer": cfg}, name=label) as run:
        result = run_train_tokenizer(cfg, docs, out_dir, fp)
        run.log_result(result, ["tokenizer.json", "tokenizer_meta.json"])
    return result


# encode_batch_size changes how fast, never what: the encoder is deterministic.
ENCODE_CHUNK = StageSpec("encode_chunk", inputs=("chunk", "val_fraction", "val_split"),
                         upstreams=("docs", "tokenizer"))


@stage_task(name="encode_chunk")
def encode_chunk(docs: StageResult, chunk: str, tokenizer: StageResult, val_fraction: float, encode_batch_size: int,
                 ctx: TrackingContext, val_split: str = VAL_BY_DOCUMENT) -> StageResult:
    fp, out_dir = ENCODE_CHUNK.locate(locals())
    return run_encode_chunk(docs.path(chunk), tokenizer, val_fraction, encode_batch_size, out_dir, fp,
                            val_split=val_split)


SHARD = StageSpec("shard", configs=("cfg", "corpus"), inputs=("val_split",), upstreams=("docs", "tokenizer"),
                  not_read=(("corpus", frozenset({"clean"})),))


@stage_task(name="shard")
def shard(cfg: ShardConfig, corpus: CorpusConfig, docs: StageResult, encoded: list[StageResult],
          tokenizer: StageResult, corpus_field: str, ctx: TrackingContext, may_be_empty: tuple[str, ...] = (),
          label: str | None = None, val_split: str = VAL_BY_DOCUMENT) -> StageResult:
    fp, out_dir = SHARD.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with stage_run(ctx, "shard", fp, {"data.shard": cfg, "val_fraction": corpus.val_fraction, "val_split": val_split},
                   {"lmpipe.corpus_field": corpus_field}, name=label) as run:
        result = run_shard(cfg, corpus, encoded, tokenizer, out_dir, fp, corpus_field=corpus_field,
                           may_be_empty=may_be_empty, val_split=val_split)
        run.log_result(result, ["manifest.json"])
    return result


PRETRAIN = StageSpec("pretrain", configs=("model_cfg", "cfg"), upstreams=("shards", "tokenizer"))


@stage_task(name="pretrain", retries=2, retry_delay_seconds=5, retry_condition_fn=_rank_lost)
def pretrain(model_cfg: ModelConfig, cfg: TrainConfig, shards: StageResult, tokenizer: StageResult,
             ctx: TrackingContext, label: str | None = None) -> StageResult:
    fp, out_dir = PRETRAIN.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with device_slots(cfg.distributed.nproc_per_node), \
            stage_run(ctx, "pretrain", fp, {"model": model_cfg, "pretrain": cfg}, name=label) as run:
        run.log_shards(shards)
        result = run_pretrain(model_cfg, cfg, shards, tokenizer, out_dir, fp,
                              report=Reporters(run.log_metrics, PrefectProgress("pretrain"), get_run_logger().info),
                              tracking_env=run.env())
        run.log_result(result, ["metrics.jsonl", "model"])
    return result


# sft_sha256 / init_sha256: the content of the SFT file and of an explicit starting checkpoint,
# not just their paths, decide the result.
# min_held_out: with mode sft, the champion gate's minimums, which the held-out SFT split meets (None otherwise).
FINETUNE = StageSpec("finetune", configs=("model_cfg", "cfg"), inputs=("sft_sha256", "init_sha256", "min_held_out"),
                     upstreams=("base", "shards", "tokenizer"))


@stage_task(name="finetune")
def finetune(model_cfg: ModelConfig, cfg: FinetuneConfig, base: StageResult | None, shards: StageResult | None,
             tokenizer: StageResult, ctx: TrackingContext, sft_sha256: str | None = None,
             init_sha256: str | None = None, min_held_out: tuple[int, int] | None = None,
             label: str | None = None) -> StageResult:
    fp, out_dir = FINETUNE.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    init = _init_checkpoint(cfg.init_checkpoint, base)
    with device_slots(1), stage_run(
            ctx, "finetune", fp, {"model": model_cfg, "finetune": cfg},
            {"lmpipe.init": str(init), **({"lmpipe.sft_sha256": sft_sha256} if sft_sha256 else {})},
            name=label) as run:
        if shards is not None:
            run.log_shards(shards)
        result = run_finetune(cfg, model_cfg, init, shards, tokenizer, out_dir, fp,
                              report=Reporters(run.log_metrics, PrefectProgress("finetune")),
                              min_held_out=(min_held_out[0], min_held_out[1]) if min_held_out else (1, 1))
        # adapter/: LoRA with save_adapter; HELD_OUT_FILE: the held-out SFT examples, mode sft
        run.log_result(result, ["metrics.jsonl", "model", "adapter", HELD_OUT_FILE])
    return result


# The champion's files are named by the registry (store, model, version) and checked against its weights' sha256.
CHAMPION = StageSpec("champion", inputs=("name", "version", "weights"), keyed_on_tracking_store=True)


@stage_task(name="champion", retries=2, retry_delay_seconds=5)
def champion(name: str, version: str, weights: str, ctx: TrackingContext, label: str | None = None) -> StageResult:
    fp, out_dir = CHAMPION.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    result = run_champion(ctx.uri, name, version, weights, out_dir, fp)
    get_run_logger().info("downloaded %s version %s (weights sha256 %s) into %s", name, version, weights, out_dir)
    return result


# min_new_documents decides whether the stage runs at all, not what it computes.
CONTINUE = StageSpec("continue", configs=("model_cfg", "cfg"), upstreams=("init", "new", "replay", "tokenizer"),
                     not_read=(("cfg", frozenset({"min_new_documents"})),))


@stage_task(name="continue")
def continue_pretrain(model_cfg: ModelConfig, cfg: ContinualConfig, init: StageResult, new: StageResult,
                      replay: StageResult, tokenizer: StageResult, ctx: TrackingContext,
                      label: str | None = None) -> StageResult:
    fp, out_dir = CONTINUE.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with device_slots(1), stage_run(ctx, "continue", fp, {"model": model_cfg, "continual": cfg},
                                    {"lmpipe.init": init.out_dir}, name=label) as run:
        result = run_continue(cfg, model_cfg, init.path("model"), new, replay, tokenizer, out_dir, fp,
                              report=Reporters(run.log_metrics, PrefectProgress("continue")))
        run.log_result(result, ["metrics.jsonl", "model"])
    return result


# data_sha256 / init_sha256: the labelled file's content and an explicit starting checkpoint's weights.
CLASSIFY = StageSpec("classify", configs=("model_cfg", "cfg"), inputs=("data_sha256", "init_sha256"),
                     upstreams=("base", "tokenizer"))


@stage_task(name="classify")
def classify(model_cfg: ModelConfig, cfg: ClassifyConfig, base: StageResult, tokenizer: StageResult,
             ctx: TrackingContext, data_sha256: str, init_sha256: str | None = None,
             label: str | None = None) -> StageResult:
    fp, out_dir = CLASSIFY.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    init = _init_checkpoint(cfg.init_checkpoint, base)
    with device_slots(1), stage_run(ctx, "classify", fp, {"model": model_cfg, "classify": cfg},
                                    {"lmpipe.init": str(init), "lmpipe.classify_sha256": data_sha256},
                                    name=label) as run:
        result = run_classify(cfg, model_cfg, init, tokenizer, out_dir, fp,
                              report=Reporters(run.log_metrics, PrefectProgress("classify")))
        run.log_result(result, ["metrics.jsonl", "model", PREDICTIONS_FILE, REPORT_FILE])
    get_run_logger().info("classifier: accuracy %.4f, macro-F1 %.4f on %d held-out examples",
                          result.metrics["accuracy"], result.metrics["macro_f1"], result.meta["val_examples"])
    create_markdown_artifact(markdown=result.meta["markdown"], key="classification-report",
                             description="The classifier's accuracy, macro-F1, per-class F1 and confusion matrix")
    return result


# benchmark_sha256: the content of the benchmark files actually scored (a Hub download or the local file), not
# just their paths, decides the report; benchmark_files only says where they are. reference: the earlier registered
# model the report compares with, so a new champion re-renders the report. The classifier is not an input: it
# has its own report, so changing only classify neither re-scores nor re-registers the language model.
# With finetune.mode=sft the models are also scored on the held-out SFT examples the fine-tuning stage wrote
# (HELD_OUT_META in its meta): its fingerprint, among the models', covers them.
EVALUATE = StageSpec("evaluate", configs=("cfg",), inputs=("benchmark_sha256", "reference"),
                     upstreams=("models", "corpora", "tokenizer"))


@stage_task(name="evaluate")
def evaluate(cfg: EvalConfig, models: dict[str, StageResult], corpora: dict[str, StageResult],
             tokenizer: StageResult, ctx: TrackingContext, benchmark_sha256: dict[str, str] | None = None,
             benchmark_files: dict[str, str] | None = None, reference: dict[str, Any] | None = None,
             label: str | None = None) -> StageResult:
    fp, out_dir = EVALUATE.locate(locals())
    if (done := reuse(out_dir)) is not None:
        _publish_report(done, ctx, stage_run_that_built(ctx.uri, ctx.experiment_id, fp))
        return done
    tags = {"lmpipe.reference": f"{reference['name']}/{reference['version']}"} if reference else None
    sft = next((m.path(m.meta[HELD_OUT_META]) for m in models.values() if HELD_OUT_META in m.meta), None)
    with stage_run(ctx, "evaluate", fp, {"eval": cfg}, tags, name=label) as run:
        checkpoints = {name: stage.path("model") for name, stage in models.items()}
        curves = {stage.stage: stage.path("metrics.jsonl") for stage in models.values()}
        result = run_evaluate(cfg, checkpoints, corpora, tokenizer, out_dir, fp, curves=curves,
                              benchmark_files={k: Path(v) for k, v in (benchmark_files or {}).items()},
                              reference=reference, sft=sft)
        run.log_result(result, ["report.json", "report.md", "samples.json", LOSS_CURVES])
        _publish_table(run, result.meta["held_out"], "held_out_table.json", "evaluation-held-out",
                       "Held-out loss, perplexity and bits per byte of each model on each corpus"
                       + (" and on the held-out SFT examples (sft/val)" if sft is not None else ""))
        _publish_table(run, result.meta["multiple_choice"], "benchmarks_table.json", "evaluation-benchmarks",
                       "Multiple-choice benchmarks: acc and acc_norm of each model")
    _publish_report(result, ctx, run.run_id)
    return result


def _publish_report(result: StageResult, ctx: TrackingContext, run_id: str | None) -> None:
    """The evaluation report as a Prefect markdown artifact, its loss curves inside it (a relative image path loads
    nothing there), ending with the MLflow run that built it: this stage's, or a reused stage's earlier one."""
    ui = mlflow_ui(ctx.uri)
    built = (f"MLflow run {link(run_id, ui.run(ctx.experiment_id, run_id))}" if run_id else
             "a run that is not in this MLflow experiment")
    reused = " (reused by this flow run)" if result.meta.get("reused") else ""
    create_markdown_artifact(markdown=embed_images(result.meta["markdown"], Path(result.out_dir))
                             + f"\n---\n\nBuilt by {built} in `{result.out_dir}`{reused}.\n",
                             key="evaluation-report",
                             description="Held-out loss, perplexity and bits per byte; "
                                         "multiple-choice benchmarks; samples; deltas to the champion")


# trained_on: the record of the pretraining files the model was trained on (lmpipe.data.increments.TrainedOn), or None.
# lineage: tags naming the stages the model came from, all upstream of finetuned already.
REGISTER = StageSpec("register", configs=("cfg",), inputs=("metric", "trained_on"),
                     upstreams=("finetuned", "tokenizer", "report"),
                     keyed_on_tracking_store=True)


@stage_task(name="register")
def register(cfg: TrackingConfig, finetuned: StageResult, tokenizer: StageResult, report: StageResult,
             ctx: TrackingContext, metric: str, trained_on: dict[str, Any] | None = None,
             lineage: dict[str, str] | None = None,
             label: str | None = None) -> StageResult:
    fp, out_dir = REGISTER.locate(locals())
    if (done := reuse(out_dir)) is not None:
        return done
    with stage_run(ctx, "register", fp, {"tracking": cfg, "promote_metric": metric}, name=label) as run:
        run.log_metrics({k: v for k, v in report.metrics.items() if k.startswith("finetuned.")})
        result = run_register(cfg, ctx, run, finetuned, tokenizer, out_dir, fp, metric=metric,
                              evaluation=report.metrics, trained_on=trained_on, lineage=lineage)
    decision = result.meta["promotion"]
    get_run_logger().info("registered %s version %s as @%s; %s", cfg.registered_model, result.meta["version"],
                          cfg.alias, ("promoted to @" if decision["promoted"] else "not promoted to @")
                          + f"{decision['alias']}: {decision['reason']}")
    create_markdown_artifact(
        key="promotion", description="The champion gate's decision",
        markdown=f"# {cfg.registered_model} version {result.meta['version']}\n\n"
                 f"**{'Promoted to' if decision['promoted'] else 'Not promoted to'} @{decision['alias']}**: "
                 f"{decision['reason']}\n")
    return result


# Each task's declaration, by task name (what lmpipe verify needs to locate a stage without running it).
SPECS: dict[str, StageSpec] = {spec.stage: spec for spec in (
    DOWNLOAD, CLEAN_CHUNK, CLEAN, TOKENIZER, ENCODE_CHUNK, SHARD, PRETRAIN, FINETUNE, CLASSIFY, EVALUATE, REGISTER,
    CHAMPION, CONTINUE)}


def _publish_table(run: StageRun, rows: list[dict[str, Any]], artifact_file: str, key: str, description: str) -> None:
    """Rows as an MLflow table artifact (the MLflow UI shows and compares them across runs) and a Prefect
    table artifact; nothing when there are no rows (e.g. every cleaning step switched off, no benchmarks)."""
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, in first-seen order
        run.client.log_table(run.run_id, {k: [r.get(k) for r in rows] for k in columns}, artifact_file)
        create_table_artifact(table=rows, key=key, description=description)


def _key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _init_checkpoint(explicit: str | None, base: StageResult | None) -> Path:
    """The checkpoint a fine-tuning stage starts from: the configured one, else the pretrained model."""
    if explicit:
        return Path(explicit)
    if base is None:
        raise ValueError("no init_checkpoint is configured and no pretrained model was given to start from")
    return base.path("model")
