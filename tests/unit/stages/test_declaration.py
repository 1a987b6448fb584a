"""Stages declare once what they read; fingerprints and output directories follow from it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from prefect.cache_policies import NO_CACHE

import tasks.stages as stages
from lmpipe.artifacts import StageResult
from lmpipe.config import load_config
from lmpipe.stages.fingerprint import STAGE_ENTRY
from lmpipe.tracking.runs import TrackingContext

# Task arguments that are not part of any fingerprint, and why.
NOT_FINGERPRINTED = {
    "ctx",  # where to log and write: the work directory holds the output, it is not in the fingerprint
    "field", "corpus_field", "clean_field", "label",  # names for messages and the UI
    "chunks", "encoded",  # the chunk results: a function of the declared config and upstream
    "encode_batch_size",  # how fast the deterministic encoder runs, never what it writes
    "benchmark_files",  # where the files of benchmark_sha256 are
    # whether an empty split (shard) or an empty corpus (clean) fails the stage; what a stage writes does not
    # depend on it (a finished empty clean stage fails a caller for whom it must not be empty)
    "may_be_empty",
    "lineage",  # tags naming stages upstream of the fine-tuned model, whose fingerprint covers them
}


TASKS = [(stages.download, stages.DOWNLOAD), (stages.clean_chunk, stages.CLEAN_CHUNK), (stages.clean, stages.CLEAN),
         (stages.train_tokenizer, stages.TOKENIZER), (stages.encode_chunk, stages.ENCODE_CHUNK),
         (stages.shard, stages.SHARD), (stages.pretrain, stages.PRETRAIN), (stages.finetune, stages.FINETUNE),
         (stages.classify, stages.CLASSIFY), (stages.evaluate, stages.EVALUATE), (stages.register, stages.REGISTER),
         (stages.champion, stages.CHAMPION), (stages.continue_pretrain, stages.CONTINUE)]


def test_every_task_argument_is_declared_or_known_not_to_count():
    assert {spec.stage for _, spec in TASKS} == set(STAGE_ENTRY)
    for task, spec in TASKS:
        params = set(inspect.signature(task.fn).parameters)
        declared = set(spec.configs) | set(spec.inputs) | set(spec.upstreams)
        assert declared <= params, spec.stage
        assert params - declared == params & NOT_FINGERPRINTED, spec.stage
        # the stage directory is the only cache: Prefect keys nothing and persists nothing
        assert task.cache_policy is NO_CACHE and task.persist_result is False and task.cache_key_fn is None
        # the body locates its output from its own arguments, with its own spec, before anything else
        first = inspect.getsource(task.fn).split(":\n", 1)[1].strip().splitlines()[0]
        match = re.fullmatch(r"fp, out_dir = ([A-Z_]+)\.locate\(locals\(\)\)", first)
        assert match and getattr(stages, match[1]) is spec, (spec.stage, first)


def _pretrain_fp(*overrides: str) -> str:
    cfg = load_config(None, list(overrides))
    up = StageResult(stage="up", fingerprint="u", out_dir="unused")
    return stages.PRETRAIN.fingerprint({"model_cfg": cfg.model, "cfg": cfg.pretrain, "shards": up, "tokenizer": up})


def test_eval_interval_changes_the_pretrained_model_only_with_early_stopping():
    assert _pretrain_fp("pretrain.eval_interval=50") == _pretrain_fp("pretrain.eval_interval=100")
    stopping = "pretrain.early_stopping_patience=3"
    assert _pretrain_fp(stopping, "pretrain.eval_interval=50") != _pretrain_fp(stopping, "pretrain.eval_interval=100")
    # what cannot change the model still does not count, with early stopping or without
    assert _pretrain_fp(stopping, "pretrain.log_interval=1", "pretrain.threads=2", "pretrain.peak_flops=1e12") \
        == _pretrain_fp(stopping)
    assert _pretrain_fp("pretrain.batch_size=8", "pretrain.grad_accum_steps=2") != _pretrain_fp()  # fingerprinted


def test_locate_puts_the_output_under_the_workdir(tmp_path: Path):
    cfg = load_config(None)
    up = StageResult(stage="up", fingerprint="u", out_dir="unused")
    ctx = TrackingContext(workdir=str(tmp_path), uri="sqlite:///x.db", experiment_id="0", parent_run_id="p")
    args = {"model_cfg": cfg.model, "cfg": cfg.pretrain, "shards": up, "tokenizer": up, "ctx": ctx}
    fp, out_dir = stages.PRETRAIN.locate(args)
    assert out_dir == tmp_path / "pretrain" / fp


@pytest.mark.parametrize("override", ["classify.eval_interval=7"])
def test_classify_validation_cadence_does_not_count(override):
    base = "classify={path: l.csv}"
    fps = []
    for extra in ([], [override]):
        cfg = load_config(None, [base, *extra])
        up = StageResult(stage="up", fingerprint="u", out_dir="unused")
        fps.append(stages.CLASSIFY.fingerprint({"model_cfg": cfg.model, "cfg": cfg.classify, "base": up,
                                                "tokenizer": up, "data_sha256": "d", "init_sha256": None}))
    assert fps[0] == fps[1]
