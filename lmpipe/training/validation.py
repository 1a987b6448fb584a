"""Validation: batches of token windows, the loss training reports, and when to validate."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lmpipe.data.shards import TokenSource
from lmpipe.model.gpt import IGNORE_INDEX


def eval_offsets(num_tokens: int, block_size: int, n: int) -> np.ndarray:
    """n window starts spread evenly over the split: the same validation windows every time."""
    last = num_tokens - (block_size + 1)
    return np.arange(n, dtype=np.int64) * last // max(n - 1, 1)


def get_batch(
    src: TokenSource, offsets: np.ndarray, block_size: int, device: torch.device, mask: TokenSource | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (B, T); y is x shifted by one, IGNORE_INDEX where the mask is 0."""
    buf = torch.from_numpy(np.stack([src.window(int(o), block_size + 1) for o in offsets]))  # (B, T+1)
    x = buf[:, :-1].contiguous()  # (B, T)
    # A copy, always: for one window the slice is already contiguous, so .contiguous() would return a
    # view sharing memory with x, and masking y would write IGNORE_INDEX into the inputs.
    y = buf[:, 1:].clone(memory_format=torch.contiguous_format)  # (B, T)
    if mask is not None:
        m = torch.from_numpy(np.stack([mask.window(int(o), block_size + 1) for o in offsets]))[:, 1:]  # (B, T)
        y[m == 0] = IGNORE_INDEX
    return x.to(device), y.to(device)


def check_split_lengths(block_size: int, train_src: TokenSource, val_src: TokenSource) -> None:
    """A window is block_size + 1 tokens; fail before training if a split cannot hold one."""
    need = block_size + 1
    if train_src.num_tokens <= need:
        raise ValueError(
            f"model.block_size={block_size} needs more than {need} tokens in the train split, which has "
            f"{train_src.num_tokens}: use a smaller model.block_size or more training data"
        )
    if val_src.num_tokens < need:
        raise ValueError(
            f"model.block_size={block_size} is longer than the validation split ({val_src.num_tokens} tokens; "
            f"a window needs {need}): use a smaller model.block_size or a larger val_fraction"
        )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, src: TokenSource, offsets: np.ndarray, batch_size: int, block_size: int, device: torch.device,
    autocast: contextlib.AbstractContextManager, mask: TokenSource | None = None, doc_sep: int | None = None,
) -> float:
    """Mean loss per target token over fixed windows, in eval mode (no dropout, no RNG drawn); doc_sep as
    in ``TrainData``. Token-weighted, so the figure does not depend on ``batch_size`` (a short last batch, or
    batches with more masked targets, count for what they hold)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(offsets), batch_size):
        x, y = get_batch(src, offsets[i : i + batch_size], block_size, device, mask)
        with autocast:
            _, loss = model(x, y, doc_sep=doc_sep)
        n = (y != IGNORE_INDEX).sum()
        loss_sum += loss.double() * n
        count += n
    model.train()
    return (loss_sum / count.clamp(min=1)).item()


class Validator:
    """When to validate (every ``interval`` steps and after the last) and how: ``evaluate`` returns the scores
    to log, ``val/loss`` among them (what early stopping compares). ``in_rows``: the scores also go into
    the step's metrics.jsonl row, ``val/x`` as ``val_x`` (the classifier's rows)."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], interval: int, max_steps: int, *,
                 in_rows: bool = False) -> None:
        self.evaluate, self.interval, self.max_steps, self.in_rows = evaluate, interval, max_steps, in_rows

    def should_validate(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.max_steps

    def __call__(self) -> dict[str, float]:
        return self.evaluate()


def row_values(scores: dict[str, float]) -> dict[str, float]:
    """Validation scores as metrics.jsonl columns: ``val/loss`` -> ``val_loss``."""
    return {k.replace("/", "_"): v for k, v in scores.items()}
