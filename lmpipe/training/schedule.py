"""The learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math

from lmpipe.config.training import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) step: linear warmup, then cosine from learning_rate to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    ratio = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
