"""Training loop of the sequence classifier."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.config.training import ClassifyConfig, TrainConfig
from lmpipe.data.labelled import ClassifyData
from lmpipe.eval.classification import ClassMetrics, evaluate
from lmpipe.model.classifier import GPTClassifier, _model_device, collate, configure_optimizer, lm_targets
from lmpipe.model.device import autocast_for
from lmpipe.training.loop import LogMetrics, OnProgress
from lmpipe.training.schedule import lr_at
from lmpipe.training.step import TrainingDivergedError

# ---------------------------------------------------------------- training


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of example indices: one seeded permutation per epoch, concatenated, cut every batch_size."""
    epoch, buffer = 0, np.empty(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, np.random.default_rng([seed, epoch]).permutation(n)])
            epoch += 1
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


@dataclass
class FitResult:
    rows: list[dict[str, Any]]  # metrics.jsonl: one per step, val_* added at validation steps
    val_loss: float
    metrics: ClassMetrics
    predicted: list[str]  # of the val examples, in order
    seconds: float


def fit(
    model: GPTClassifier,
    data: ClassifyData,
    cfg: ClassifyConfig,
    *,
    metrics_path: Path | None = None,
    log_metrics: LogMetrics | None = None,
    on_progress: OnProgress | None = None,
) -> FitResult:
    """Train every weight for cfg.max_steps steps (AdamW, warmup then cosine decay, clipping); validate every
    cfg.eval_interval steps and after the last. The final weights are the model's.

    Seed the global RNG before building the model: the head's init and dropout
    draw from it. One row per step is appended to ``metrics_path``.
    """
    started = time.perf_counter()
    device = _model_device(model)
    autocast = autocast_for(device)
    optimizer = configure_optimizer(model, cfg, device.type)
    schedule = TrainConfig(max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                           warmup_steps=cfg.warmup_steps)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    order = batch_order(len(data.train), cfg.batch_size, cfg.seed)
    rows: list[dict[str, Any]] = []
    since_eval: list[float] = []
    val_loss, metrics, predicted = math.nan, None, []
    model.train()
    for step in range(cfg.max_steps):
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(order)
        idx, lengths = collate([data.train.ids[i] for i in batch], model.eot_id, device)
        y = torch.tensor([data.train.targets[i] for i in batch], dtype=torch.long, device=device)
        with autocast:
            logits, lm_loss = model(idx, lengths, lm_targets(idx, lengths) if cfg.lm_loss_weight > 0 else None)
        loss = F.cross_entropy(logits.float(), y)
        if lm_loss is not None:
            loss = loss + cfg.lm_loss_weight * lm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        loss_value, norm_value = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise TrainingDivergedError(
                f"classify step {step + 1}: loss {loss_value} / gradient norm {norm_value} is not finite at "
                f"learning rate {lr:g}; lower classify.learning_rate={cfg.learning_rate:g}")
        optimizer.step()
        done = step + 1
        row: dict[str, Any] = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value}
        since_eval.append(loss_value)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val_loss, metrics, predicted = evaluate(model, data.val)
            row |= {"val_loss": val_loss, "val_accuracy": metrics.accuracy, "val_macro_f1": metrics.macro_f1}
            if log_metrics is not None:
                log_metrics({"train/loss": sum(since_eval) / len(since_eval), "train/lr": lr, "val/loss": val_loss,
                             "val/accuracy": metrics.accuracy, "val/macro_f1": metrics.macro_f1}, done)
            since_eval.clear()
            if on_progress is not None:
                on_progress(done, cfg.max_steps)
        rows.append(row)
        if metrics_path is not None:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    assert metrics is not None  # the last step always validates
    return FitResult(rows, val_loss, metrics, predicted, time.perf_counter() - started)
