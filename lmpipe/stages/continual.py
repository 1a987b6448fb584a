"""Stage continue: continued pretraining of the champion's weights on the new documents, with replay."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lmpipe.artifacts import BuildOutput, StageResult
from lmpipe.config.continual import ContinualConfig
from lmpipe.config.training import ModelConfig
from lmpipe.data.shards import SplicedSource, replay_pieces
from lmpipe.model.checkpoint import STATE_FILE
from lmpipe.stages.contract import run_stage
from lmpipe.stages.training import open_splits, publish_model, tokenizer_info
from lmpipe.training.data import TrainData
from lmpipe.training.loop import SILENT, Reporters, train

log = logging.getLogger(__name__)

REPLAY_STRETCHES = 64  # how many evenly spaced passages of earlier data the replay share is cut into


def continual_steps(cfg: ContinualConfig, stream_tokens: int, block_size: int) -> int:
    """Steps for ``cfg.epochs`` passes over ``stream_tokens``, within [min_steps, max_steps]."""
    if cfg.batch_size == "auto" and cfg.batch_tokens is None:
        return cfg.max_steps  # the batch is found on the device; the cap decides
    per_step = cfg.sequences_per_step(block_size) * block_size
    return max(cfg.min_steps, min(cfg.max_steps, math.ceil(cfg.epochs * stream_tokens / per_step)))


def run_continue(cfg: ContinualConfig, model_cfg: ModelConfig, init: Path, new: StageResult, replay: StageResult,
                 tokenizer: StageResult, out_dir: str | Path, fingerprint: str, *,
                 report: Reporters = SILENT) -> StageResult:
    """Stage: ``init``'s weights trained on ``new``'s documents (both splits: all of them are new) with
    ``cfg.replay_fraction`` of the tokens from ``replay``'s train split (fresh optimizer and schedule); validated on
    ``replay``'s val split, the fixed held-out set the champion gate also scores.

    Publishes model/ and metrics.jsonl like pretrain, and what it trained on: new and replayed tokens, steps.
    """

    def build(tmp: Path) -> BuildOutput:
        _, tok_fp, vocab_size = tokenizer_info(tokenizer)
        if not (Path(init) / STATE_FILE).is_file():
            raise FileNotFoundError(f"continual: the champion's weights {str(init)!r} are not a checkpoint "
                                    f"directory (no {STATE_FILE})")
        new_train, new_val = open_splits(new, tok_fp, "the new documents' shards")
        pool, held_out = open_splits(replay, tok_fp, "the replay shards")
        new_tokens = new_train.num_tokens + new_val.num_tokens
        want = round(new_tokens * cfg.replay_fraction / (1.0 - cfg.replay_fraction))
        pieces = replay_pieces(pool, want, REPLAY_STRETCHES)
        stream = SplicedSource([(new_train, 0, new_train.num_tokens), (new_val, 0, new_val.num_tokens), *pieces])
        steps = continual_steps(cfg, stream.num_tokens, model_cfg.block_size)
        summary = train(model_cfg, cfg.model_copy(update={"max_steps": steps}), vocab_size,
                        TrainData(stream, held_out), tmp, tokenizer_fingerprint=tok_fp, init_from=Path(init),
                        log_metrics=report.metrics, on_progress=report.progress)
        out = publish_model(tmp, summary)
        replayed = stream.num_tokens - new_tokens
        # How much of the stream the steps covered: below 1 when max_steps cut the passes short.
        coverage = summary.tokens_seen / stream.num_tokens
        if coverage < cfg.epochs:
            log.warning("continual: %d steps trained on %.2f passes over the new documents and their replay share, "
                        "not continual.epochs=%g: continual.max_steps=%d capped them", steps, coverage, cfg.epochs,
                        cfg.max_steps)
        out.metrics |= {"new_tokens": float(new_tokens), "replay_tokens": float(replayed),
                        "replay_share": replayed / stream.num_tokens, "passes": coverage}
        out.meta |= {"init_checkpoint": str(init),
                     "new_documents": new_train.num_documents + new_val.num_documents}
        return out

    return run_stage("continue", fingerprint, out_dir, build, keep_partial=True)
