"""One optimizer step: forward and backward over its micro-batches, gradient clipping."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.training.distributed import DistContext, full_tensor, mean_over_ranks, set_grad_sync, sum_over_ranks
from lmpipe.training.loader import BatchLoader


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the update was not applied."""


def _step(
    model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, loader: BatchLoader, accum: int,
    max_norm: float, autocast: contextlib.AbstractContextManager, dist_ctx: DistContext,
    doc_sep: int | None = None, per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches; returns (mean loss, grad norm), on the device.

    Without masked targets every micro-batch holds the same number of targets, and
    the step's loss is the mean of the micro-batch means. With them (``per_token``:
    SFT), micro-batches hold different numbers of targets, so each micro-batch's
    loss is weighted by its share of the targets of the whole step on every rank:
    the loss and the gradients are then the mean over the global batch's targets,
    whatever micro_batch x accum_steps x ranks it is split into.
    Gradients are all-reduced once, on the last micro-batch. Leaves the (clipped)
    gradients in place: the caller decides whether to apply them.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = [loader.next() for _ in range(accum)] if per_token else None
    if batches is not None:
        counts = [(y != IGNORE_INDEX).sum() for _, y in batches]
        # DDP/FSDP average the ranks' gradients, hence world_size / (targets on all ranks)
        scale = dist_ctx.world_size / sum_over_ranks(torch.stack(counts).sum(), dist_ctx).clamp(min=1)
    loss_sum: torch.Tensor | None = None
    for micro in range(accum):
        set_grad_sync(model, micro == accum - 1)
        x, y = loader.next() if batches is None else batches[micro]
        with autocast:
            _, loss = model(x, y, doc_sep=doc_sep)
        if batches is None:
            loss = loss / accum  # the gradients then sum to the mean over micro-batches
        else:
            loss = loss * (counts[micro] * scale)  # this micro-batch's summed loss over the step's targets
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        loss.backward()
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return mean_over_ranks(loss_sum, dist_ctx), grad_norm.detach()
