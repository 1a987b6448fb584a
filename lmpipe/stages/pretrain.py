"""Stage pretrain: a GPT from scratch on the pretraining shards, in one process or under torchrun."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lmpipe.artifacts import BuildOutput, StageResult
from lmpipe.config.training import ModelConfig, TrainConfig
from lmpipe.model.device import resolve_device
from lmpipe.stages.contract import run_stage
from lmpipe.stages.training import open_splits, publish_model, tokenizer_info
from lmpipe.training.data import TrainData
from lmpipe.training.launch import launch
from lmpipe.training.loop import SILENT, Reporters, TrainSummary, train
from lmpipe.training.validation import check_split_lengths


def run_pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    shards: StageResult,
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    report: Reporters = SILENT,
    tracking_env: Mapping[str, str] | None = None,
) -> StageResult:
    """Stage: pretrain from scratch on the shards; publishes model/ and metrics.jsonl.

    An interrupted run leaves its checkpoints in the stage's .partial directory and
    the next call with the same fingerprint resumes from them. With
    ``distributed.nproc_per_node > 1`` the loop runs under torchrun: its processes'
    lines go to ``report.lines`` and rank 0 logs metrics into the run ``tracking_env`` names
    (``StageRun.env``) instead of through ``report.metrics``.
    """

    def build(tmp: Path) -> BuildOutput:
        _, tok_fp, vocab_size = tokenizer_info(tokenizer)
        train_src, val_src = open_splits(shards, tok_fp, "data.pretrain")
        nproc = train_cfg.distributed.nproc_per_node
        if nproc == 1:
            summary = train(model_cfg, train_cfg, vocab_size, TrainData(train_src, val_src), tmp,
                            tokenizer_fingerprint=tok_fp, log_metrics=report.metrics, on_progress=report.progress)
        else:
            check_split_lengths(model_cfg.block_size, train_src, val_src)  # before starting any process
            if resolve_device(train_cfg.device).type == "cuda" and nproc > torch.cuda.device_count():
                raise ValueError(f"pretrain.distributed.nproc_per_node={nproc}, but only "
                                 f"{torch.cuda.device_count()} CUDA devices are visible")
            spec = {"model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                    "vocab_size": vocab_size, "shards": str(shards.out_dir), "tokenizer_fingerprint": tok_fp,
                    "work_dir": str(tmp)}
            result = launch(spec, tmp, nproc, on_line=report.lines, on_progress=report.progress, env=tracking_env)
            summary = TrainSummary(**(result | {"checkpoint": Path(result["checkpoint"])}))
        return publish_model(tmp, summary)

    return run_stage("pretrain", fingerprint, out_dir, build, keep_partial=True)
