"""The Prefect flows. They read like the DAG in the architecture:

    download -> clean -> train_tokenizer -> shard -> pretrain -> finetune -> evaluate -> register
                                                    pretrain -> classify (when configured)

Cleaning and sharding are map/reduce: one clean_chunk (encode_chunk) task per
chunk of documents on the ``data.runner`` task runner, then one clean (shard)
task that combines them in chunk order. The fine-tuning corpus goes through its
own download/clean/shard with the tokenizer trained on the pretraining corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.ledger import StageRunner, tracked_flow
from flows.notify import notify_failure
from lmpipe.artifacts import StageResult, sha256_file
from lmpipe.config.data import CorpusConfig
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import SFTFinetuneConfig
from lmpipe.data.increments import check_watchable, first_record
from lmpipe.data.sources import local_source_digests
from lmpipe.eval.benchmark_files import resolve_benchmarks
from lmpipe.stages.preflight import check_context_fits, check_inputs
from lmpipe.stages.shard import choose_val_split
from lmpipe.tracking.registry import champion_metrics, lineage_tags
from lmpipe.tracking.runs import TrackingContext
from tasks.stages import (
    classify,
    clean,
    clean_chunk,
    download,
    encode_chunk,
    evaluate,
    finetune,
    pretrain,
    register,
    shard,
    train_tokenizer,
)

DIGEST_CACHE = "downloads/digests.json"  # under the work directory: local files' sha256 by (path, size, mtime)


def _documents(config: PipelineConfig, corpus: CorpusConfig, field: str, ctx: TrackingContext,
               ledger: StageRunner, may_be_empty: bool = False) -> tuple[StageResult, StageResult]:
    """The corpus downloaded (what was read: its files' sizes and sha256) and cleaned (``may_be_empty``: cleaning
    may remove every document, see run_clean)."""
    delay = config.data.download_retry_delay_s
    fetch = download.with_options(retries=config.data.download_retries,
                                  retry_delay_seconds=[delay * 5**i for i in range(config.data.download_retries)] or 0)
    digests = local_source_digests(corpus, cache_file=Path(ctx.workdir) / DIGEST_CACHE)
    cfg, clean_field = (corpus.clean, f"{field}.clean") if corpus.clean else (config.data.clean, "data.clean")
    docs = ledger.run(fetch, f"download/{corpus.name}", corpus=corpus, field=field,
                      chunk_bytes=config.data.chunk_bytes, strict=config.data.strict, ctx=ctx, local_sha256=digests,
                      gutenberg_boilerplate=cfg.gutenberg_boilerplate)
    chunks = ledger.map(clean_chunk, f"clean_chunk/{corpus.name}", docs.meta["chunks"], cfg=cfg, docs=docs, ctx=ctx)
    return docs, ledger.run(clean, f"clean/{corpus.name}", cfg=cfg, docs=docs, chunks=chunks, corpus_field=field,
                            clean_field=clean_field, ctx=ctx, may_be_empty=may_be_empty)


def _shards(config: PipelineConfig, corpus: CorpusConfig, field: str, docs: StageResult, tokenizer: StageResult,
            ctx: TrackingContext, ledger: StageRunner, may_be_empty: tuple[str, ...] = ()) -> StageResult:
    val_split = choose_val_split(docs, corpus.val_fraction, may_be_empty)  # by document, or inside one book
    encoded = ledger.map(encode_chunk, f"encode_chunk/{corpus.name}", docs.meta["chunks"], docs=docs,
                         tokenizer=tokenizer, val_fraction=corpus.val_fraction, val_split=val_split,
                         encode_batch_size=config.data.shard.encode_batch_size, ctx=ctx)
    return ledger.run(shard, f"shard/{corpus.name}", cfg=config.data.shard, corpus=corpus, docs=docs,
                      encoded=encoded, tokenizer=tokenizer, corpus_field=field, ctx=ctx, may_be_empty=may_be_empty,
                      val_split=val_split)


def _prepare(config: PipelineConfig, ctx: TrackingContext,
             ledger: StageRunner) -> tuple[StageResult, dict[str, StageResult], dict[str, Any] | None]:
    """Both corpora as token shards, with the tokenizer trained on the pretraining corpus; and the record of the
    pretraining files read (``first_record``: what lmpipe-continual later compares with), None if they are not
    local files."""
    pre = config.data.pretrain
    read, pre_docs = _documents(config, pre, "data.pretrain", ctx, ledger)
    tokenizer = ledger.run(train_tokenizer, cfg=config.tokenizer, docs=pre_docs, ctx=ctx)
    corpora = {pre.name: _shards(config, pre, "data.pretrain", pre_docs, tokenizer, ctx, ledger)}
    finetune_shards(config, tokenizer, ctx, ledger, corpora)
    return tokenizer, corpora, _read_record(config, read)


def finetune_shards(config: PipelineConfig, tokenizer: StageResult, ctx: TrackingContext, ledger: StageRunner,
                    corpora: dict[str, StageResult]) -> None:
    """The fine-tuning corpus's shards (when there is one) into ``corpora``, encoded with ``tokenizer``."""
    ft = config.data.finetune
    if ft is not None:
        _, ft_docs = _documents(config, ft, "data.finetune", ctx, ledger)
        corpora[ft.name] = _shards(config, ft, "data.finetune", ft_docs, tokenizer, ctx, ledger)


def _read_record(config: PipelineConfig, read: StageResult) -> dict[str, Any] | None:
    """What the download stage read of the pretraining files (each file's size and sha256 as read), as the record
    of a model trained from scratch on them."""
    try:
        check_watchable(config.data.pretrain, "data.pretrain")
    except ValueError:
        return None  # URLs, Hub datasets or read limits: no continual runs on this corpus
    pre = config.data.pretrain
    return first_record(pre, pre.clean or config.data.clean, read.meta, int(read.metrics["documents"])).to_json()


def _digest(path: str | None, name: str = "") -> str | None:
    """sha256 of a file the config points at (a checkpoint: of its weights), for the fingerprint."""
    return sha256_file(Path(path) / name) if path else None


def _train_and_register(config: PipelineConfig, ctx: TrackingContext, ledger: StageRunner, tokenizer: StageResult,
                        corpora: dict[str, StageResult], bench_files: dict[str, Path],
                        trained_on: dict[str, Any] | None, base: StageResult | None = None) -> StageResult:
    """Pretraining (unless ``base`` is the pretrained model already), fine-tuning (and the classifier), evaluation
    and registration, on prepared shards; the register stage's result. ``trained_on``: the record of the
    pretraining files the model is trained on, registered with it."""
    ft_shards = corpora.get(config.data.finetune.name) if config.data.finetune else None
    if base is None:
        base = ledger.run(pretrain, model_cfg=config.model, cfg=config.pretrain,
                          shards=corpora[config.data.pretrain.name], tokenizer=tokenizer, ctx=ctx)
    sft_cfg = config.finetune if isinstance(config.finetune, SFTFinetuneConfig) else None
    sft_sha256 = _digest(sft_cfg.sft_path) if sft_cfg else None
    tuned = ledger.run(finetune, model_cfg=config.model, cfg=config.finetune, base=base,
                       shards=ft_shards if sft_cfg is None else None, sft_sha256=sft_sha256,
                       init_sha256=_digest(config.finetune.init_checkpoint, "model.safetensors"),
                       min_held_out=config.sft_min_held_out(), tokenizer=tokenizer, ctx=ctx)
    if config.classify is not None:
        ledger.run(classify, model_cfg=config.model, cfg=config.classify, base=base, tokenizer=tokenizer,
                   ctx=ctx, data_sha256=_digest(config.classify.path),
                   init_sha256=_digest(config.classify.init_checkpoint, "model.safetensors"))
    # The champion to compare with, decided now so that it is part of the evaluation's fingerprint.
    reference = champion_metrics(ctx.uri, config.tracking.registered_model, config.tracking.champion_alias,
                                 finetune=tuned.fingerprint)
    # After SFT, both models are also scored on the held-out examples fine-tuning wrote (the champion gate's
    # default metric).
    report = ledger.run(evaluate, cfg=config.eval, models={"base": base, "finetuned": tuned}, corpora=corpora,
                        benchmark_sha256={n: _digest(str(p)) for n, p in bench_files.items()} or None,
                        benchmark_files={n: str(p) for n, p in bench_files.items()} or None,
                        reference=reference, tokenizer=tokenizer, ctx=ctx)
    return ledger.run(register, cfg=config.tracking, finetuned=tuned, tokenizer=tokenizer, report=report, ctx=ctx,
                      metric=config.champion_metric(), trained_on=trained_on,
                      lineage=lineage_tags(tokenizer=tokenizer, corpora=corpora, pretrain=base, finetune=tuned,
                                           sft_sha256=sft_sha256))


@flow(name="lmpipe-pipeline", log_prints=True, validate_parameters=True, on_failure=[notify_failure])
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 - the Prefect form's default
    """Corpus to registered model: data, tokenizer, shards, pretraining, fine-tuning, evaluation, registry.

    Args:
        config: The whole run, one section per stage; the defaults are the demo (configs/demo.yaml).
    """
    with tracked_flow(config, "pipeline") as (ctx, ledger):
        check_inputs(config)
        # The benchmark files to score (Hub downloads or local fallbacks), fetched and format-checked before any
        # stage runs; their content is part of the evaluation's fingerprint.
        bench_files = resolve_benchmarks(config.eval.benchmarks, Path(ctx.workdir) / "benchmarks")
        tokenizer, corpora, trained_on = _prepare(config, ctx, ledger)
        check_context_fits(config, corpora, tokenizer, bench_files)
        _train_and_register(config, ctx, ledger, tokenizer, corpora, bench_files, trained_on)
    return ledger.summary(ctx)


@flow(name="lmpipe-data", log_prints=True, validate_parameters=True, on_failure=[notify_failure])
def prepare_data(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 - the Prefect form's default
    """The data stages alone: both corpora downloaded, cleaned and sharded, and the tokenizer.

    Args:
        config: The whole run's configuration; these stages read its data and tokenizer sections.
    """
    with tracked_flow(config, "data") as (ctx, ledger):
        check_inputs(config, training=False)
        _prepare(config, ctx, ledger)
    return ledger.summary(ctx)
