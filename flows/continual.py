"""The continual flow: the scheduled run that has something to do when new documents arrive.

    champion -> new documents? -- no --> report "nothing new"
                    | yes
    download/clean/shard the new parts and the origin (champion's tokenizer)
      -> continue (champion's weights; new tokens + replay) -> finetune -> evaluate -> register (gate)

With no @champion yet (or one registered without a record of its data), the run trains the line's first model
from scratch, as lmpipe-pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.ledger import Ledger, tracked_flow
from flows.notify import notify_failure
from flows.pipeline import _documents, _prepare, _shards, _train_and_register, finetune_shards
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.data.increments import (
    Delta,
    TrainedOn,
    check_settings,
    check_watchable,
    materialize,
    new_parts,
    next_record,
    origin_parts,
)
from lmpipe.eval.benchmark_files import resolve_benchmarks
from lmpipe.model.checkpoint import MODEL_DIR, check_compatible, read_state
from lmpipe.stages.preflight import check_context_fits, check_inputs
from lmpipe.stages.training import tokenizer_info
from lmpipe.tracking.registry import WEIGHTS_TAG
from lmpipe.tracking.runs import TrackingContext, log_parent_figures
from lmpipe.tracking.trained_on import champion_trained_on
from tasks.stages import champion, continue_pretrain

VIEWS_DIR = "continual"  # <workdir>/continual/: the new parts and the origin, copied out of the sources


@flow(name="lmpipe-continual", log_prints=True, validate_parameters=True, on_failure=[notify_failure])
def continual(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 - the Prefect form's default
    """New documents in the pretraining corpus's files: the @champion trained on, fine-tuned, evaluated, gated.

    Args:
        config: The whole run, one section per stage (continual: what is trained on the new documents); the
            defaults are the demo (configs/demo.yaml).
    """
    config = _unpinned(config)
    with tracked_flow(config, "continual") as (ctx, ledger):
        check_inputs(config)
        pre, track = config.data.pretrain, config.tracking
        check_watchable(pre, "data.pretrain")
        bench_files = resolve_benchmarks(config.eval.benchmarks, Path(ctx.workdir) / "benchmarks")
        line = champion_trained_on(ctx.uri, track.registered_model, track.champion_alias)
        record = line[1] if line is not None else None
        if line is None or record is None:
            get_run_logger().info("%s@%s %s: training the first model of the line from scratch",
                                  track.registered_model, track.champion_alias,
                                  "does not exist" if line is None else "has no record of what it was trained on")
            tokenizer, corpora, trained_on = _prepare(config, ctx, ledger)
            check_context_fits(config, corpora, tokenizer, bench_files)
            registered = _train_and_register(config, ctx, ledger, tokenizer, corpora, bench_files, trained_on)
            _report(ctx, ledger, "first", None, Delta(), registered)
            return ledger.summary(ctx)
        version = line[0]
        check_settings(record, pre, pre.clean or config.data.clean, "data.pretrain",
                       f"{track.registered_model} version {version.version}")
        delta = new_parts(record, pre, "data.pretrain")
        if not delta.parts:
            _report(ctx, ledger, "nothing new", (version, record), delta, None)
            return ledger.summary(ctx)
        start = ledger.run(champion, f"champion/{track.registered_model}", name=track.registered_model,
                           version=str(version.version), weights=version.tags[WEIGHTS_TAG], ctx=ctx)
        # The champion's shape must be the config's, before anything is encoded or trained.
        _, tok_fp, vocab_size = tokenizer_info(start)
        check_compatible(read_state(start.path(MODEL_DIR)), config.model, vocab_size, tok_fp,
                         field=f"model (against {track.registered_model}@{track.champion_alias})")
        # The champion's tokenizer encodes everything (the new parts, the origin: held-out set and replay pool, the
        # fine-tuning corpus), named by its content: a new champion with the same tokenizer re-encodes nothing.
        tokenizer = start.model_copy(update={"fingerprint": f"tokenizer-{tok_fp[:16]}"})
        views = Path(ctx.workdir) / VIEWS_DIR
        increment = materialize(delta.parts, pre, "new", views).model_copy(update={"name": f"{pre.name}.new"})
        # Cleaning may remove every new document: that is too little new, not an error.
        new_read, new_docs = _documents(config, increment, "data.pretrain", ctx, ledger, may_be_empty=True)
        kept = new_docs.metrics["docs_out"]
        if kept < config.continual.min_new_documents:
            _report(ctx, ledger, "too little new", (version, record), delta, None, kept,
                    cleaned_away=new_docs.meta.get("empty"))
            return ledger.summary(ctx)
        origin = materialize(origin_parts(record, pre, "data.pretrain"), pre, "origin", views)
        _, origin_docs = _documents(config, origin, "data.pretrain", ctx, ledger)
        corpora = {pre.name: _shards(config, origin, "data.pretrain", origin_docs, tokenizer, ctx, ledger)}
        # Every new document trains: the split of the new ones may leave either side empty.
        new_shards = _shards(config, increment, "data.pretrain", new_docs, tokenizer, ctx, ledger,
                             may_be_empty=("train", "val"))
        finetune_shards(config, tokenizer, ctx, ledger, corpora)
        check_context_fits(config, corpora, tokenizer, bench_files)
        base = ledger.run(continue_pretrain, model_cfg=config.model, cfg=config.continual, init=start,
                          new=new_shards, replay=corpora[pre.name], tokenizer=tokenizer, ctx=ctx)
        after = next_record(record, delta, int(new_read.metrics["documents"]))
        registered = _train_and_register(config, ctx, ledger, tokenizer, corpora, bench_files, after.to_json(),
                                         base=base)
        ran = next(o.status for o in ledger.outcomes if o.label == "continue") == "ran"
        _report(ctx, ledger, "trained" if ran else "tried before", (version, record), delta, registered, kept,
                base.metrics if ran else None)
    return ledger.summary(ctx)


def _unpinned(config: PipelineConfig) -> PipelineConfig:
    """The config without sha256 pins on the pretraining files: continual runs expect them to grow, and check
    every file against the champion's record instead."""
    pre = config.data.pretrain
    if all(s.sha256 is None for s in pre.sources):
        return config
    get_run_logger().info("data.pretrain's sha256 pins are not checked by continual runs (the files may grow): "
                          "each file is checked against the record of what the champion was trained on")
    sources = [s.model_copy(update={"sha256": None}) for s in pre.sources]
    data = config.data.model_copy(update={"pretrain": pre.model_copy(update={"sources": sources})})
    return config.model_copy(update={"data": data})


def _report(ctx: TrackingContext, ledger: Ledger, outcome: str, before: tuple[Any, TrainedOn] | None,
            delta: Delta, registered: Any, new_documents: float = 0.0,
            trained: dict[str, float] | None = None, cleaned_away: str | None = None) -> None:
    """The run's report: a Prefect artifact and figures on the MLflow parent run, the same names every run, so
    scheduled runs line up in MLflow's charts. ``cleaned_away``: the clean stage's account of why no new
    document survived it."""
    figures = {"continual.new_files": float(len(delta.parts)), "continual.new_bytes": float(delta.new_bytes),
               "continual.new_documents": float(new_documents),
               "continual.trained_tokens": (trained or {}).get("new_tokens", 0.0)
               + (trained or {}).get("replay_tokens", 0.0),
               "continual.steps": (trained or {}).get("steps", 0.0)}
    lines = [f"# Continual run: {outcome}", ""]
    if before is not None:
        version, record = before
        lines.append(f"Champion before: version {version.version}, trained on {record.files()} files, "
                     f"{record.documents} documents, {record.bytes:,} bytes in {record.runs} training run(s).")
    if outcome == "nothing new":
        lines.append("\nNothing new in the pretraining files since then: nothing was trained.")
    elif outcome == "tried before":
        lines.append("\nThe same new documents and the same champion as a run before: its candidate (below) is "
                     "reused, nothing was trained.")
    elif outcome == "too little new":
        lines.append(f"\nOnly {new_documents:.0f} new documents after cleaning (continual.min_new_documents is "
                     "more): nothing was trained; they count again next run.")
        if cleaned_away is not None:
            lines.append(f"\nNo new document survived cleaning: {cleaned_away}")
    if delta.parts:
        lines += ["", "| source | file | what | from byte | bytes |", "|---|---|---|---:|---:|"]
        lines += [f"| {p['source']} | {p['file']} | {p['why']} | {p['from_byte']:,} | {p['bytes']:,} |"
                  for p in delta.describe()]
    if trained is not None:
        lines.append(f"\nTrained {trained['steps']:.0f} steps on {trained['new_tokens']:,.0f} new tokens "
                     f"({new_documents:.0f} new documents) and {trained['replay_tokens']:,.0f} replayed "
                     f"tokens (replay share {trained['replay_share']:.2f}).")
    if registered is not None:
        meta = registered.meta
        decision = meta["promotion"]
        figures["continual.promoted"] = float(decision["promoted"])
        lines.append(f"\n**{meta['name']} version {meta['version']}: "
                     f"{'promoted to' if decision['promoted'] else 'not promoted to'} @{decision['alias']}** "
                     f"({decision['reason']})")
    markdown = "\n".join(lines) + "\n"
    get_run_logger().info("%s", markdown)
    create_markdown_artifact(markdown=markdown, key="continual-report",
                             description="What was new, how much was trained, the champion gate's decision")
    log_parent_figures(ctx, figures, {"lmpipe.continual.outcome": outcome})
