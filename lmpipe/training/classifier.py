"""What the sequence classifier trains with: its batches and objective, put into the one training loop.

Its scores (accuracy, macro-F1) are the caller's: the classify stage passes them in
as ``score``, so training does not depend on evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.config.training import ClassifyConfig
from lmpipe.data.labelled import EncodedSet
from lmpipe.model.classifier import GPTClassifier, collate, configure_optimizer, lm_targets
from lmpipe.model.device import autocast_for
from lmpipe.training.loop import LogMetrics, Loop, OnProgress, run_loop
from lmpipe.training.metrics import MetricLogger
from lmpipe.training.schedule import Schedule
from lmpipe.training.step import TrainStep
from lmpipe.training.validation import Validator


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of example indices: one seeded permutation per epoch, concatenated, cut every batch_size."""
    epoch, buffer = 0, np.empty(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, np.random.default_rng([seed, epoch]).permutation(n)])
            epoch += 1
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


class ExampleBatches:
    """Training batches of labelled texts in ``batch_order``: (idx, lengths, labels) on the device."""

    def __init__(self, examples: EncodedSet, batch_size: int, seed: int, pad_id: int, device: torch.device) -> None:
        self.examples, self.pad_id, self.device = examples, pad_id, device
        self.order = batch_order(len(examples), batch_size, seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = next(self.order)
        idx, lengths = collate([self.examples.ids[i] for i in batch], self.pad_id, self.device)
        y = torch.tensor([self.examples.targets[i] for i in batch], dtype=torch.long, device=self.device)
        return idx, lengths, y


class ClassifierObjective(nn.Module):
    """The classifier as the training step drives it: (idx, lengths, labels) -> (logits, loss), the loss being
    cross-entropy plus ``lm_loss_weight`` times GPT-1's auxiliary language-modelling loss on the texts."""

    def __init__(self, model: GPTClassifier, lm_loss_weight: float) -> None:
        super().__init__()
        self.model, self.lm_loss_weight = model, lm_loss_weight

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = lm_targets(idx, lengths) if self.lm_loss_weight > 0 else None
        logits, lm_loss = self.model(idx, lengths, targets)
        loss = F.cross_entropy(logits.float(), labels)
        if lm_loss is not None:
            loss = loss + self.lm_loss_weight * lm_loss
        return logits, loss


def fit_classifier(
    model: GPTClassifier, train: EncodedSet, cfg: ClassifyConfig, score: Callable[[], dict[str, float]], *,
    metrics_path: Path | None = None, log_metrics: LogMetrics | None = None, on_progress: OnProgress | None = None,
) -> tuple[MetricLogger, float]:
    """Train every weight for cfg.max_steps steps (AdamW, warmup then cosine decay, clipping); ``score`` the
    model every cfg.eval_interval steps and after the last (its ``val/...`` values, ``val/loss`` among them,
    go to the tracker and into metrics.jsonl's row of the step). The final weights are the model's.

    Seed the global RNG before building the model: the head's init and dropout
    draw from it. One row per step is appended to ``metrics_path`` (None: none are
    written). Returns the metric rows (``MetricLogger.rows``) and the seconds taken.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    optimizer = configure_optimizer(model, cfg, device.type)
    batches = ExampleBatches(train, cfg.batch_size, cfg.seed, model.eot_id, device)
    step = TrainStep(ClassifierObjective(model, cfg.lm_loss_weight), optimizer,
                     Schedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps), batches.next,
                     grad_clip=cfg.grad_clip, autocast=autocast_for(device),
                     advice=lambda: f"Lower classify.learning_rate={cfg.learning_rate:g}.")
    metrics = MetricLogger(metrics_path, log_interval=cfg.eval_interval)  # the tracker hears at validations only
    model.train()
    run_loop(Loop(step, metrics, Validator(score, cfg.eval_interval, cfg.max_steps, in_rows=True), cfg.max_steps,
                  "classify", log_metrics=log_metrics, on_progress=on_progress))
    return metrics, time.perf_counter() - started
