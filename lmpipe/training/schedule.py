"""The learning-rate schedule: linear warmup, then cosine decay; plain numbers, for every training run."""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of (0-based) step: linear warmup, then cosine from max_lr to min_lr at step ``total``."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    decay_steps = max(total - warmup, 1)
    ratio = min((step - warmup) / decay_steps, 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


@dataclass(frozen=True)
class Schedule:
    """``lr_at``'s numbers: pretraining, fine-tuning and classification read them from their own settings."""

    max_lr: float
    min_lr: float
    warmup: int
    total: int

    def lr(self, step: int) -> float:
        return lr_at(step, max_lr=self.max_lr, min_lr=self.min_lr, warmup=self.warmup, total=self.total)
