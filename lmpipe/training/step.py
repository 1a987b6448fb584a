"""One optimizer step, whole: learning rate, micro-batches with gradient accumulation, clipping, the non-finite
check, the update."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.training.distributed import DistContext, full_tensor, mean_over_ranks, set_grad_sync, sum_over_ranks
from lmpipe.training.optimizer import LR_SCALE, TrainOptimizer
from lmpipe.training.schedule import Schedule

Batch = tuple[torch.Tensor, ...]  # the model's positional inputs; the last one holds the targets


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the update was not applied."""


class TrainStep:
    """Optimizer step ``s``: set lr, forward and backward over ``accum`` micro-batches, clip, check, update.

    ``model(*batch, **forward_kwargs)`` returns (output, loss) for a micro-batch
    from ``next_batch`` (the GPT: (x, y) -> (logits, loss); the classifier's
    objective: (idx, lengths, labels) -> (logits, loss)). ``grad_clip`` 0 measures
    the norm and never clips. ``advice``: what the divergence error tells the user
    to do (it is called only then, so it may name the newest checkpoint).
    """

    def __init__(
        self, model: nn.Module, optimizer: TrainOptimizer, schedule: Schedule,
        next_batch: Callable[[], Batch], *, accum: int = 1, grad_clip: float = 0.0,
        autocast: contextlib.AbstractContextManager | None = None, dist_ctx: DistContext | None = None,
        per_token: bool = False, forward_kwargs: dict[str, Any] | None = None,
        advice: Callable[[], str] = lambda: "",
    ) -> None:
        self.model, self.optimizer, self.schedule, self.next_batch = model, optimizer, schedule, next_batch
        self.accum, self.per_token, self.advice = accum, per_token, advice
        self.max_norm = grad_clip if grad_clip > 0 else math.inf  # inf: measure the norm, never clip
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.dist_ctx = dist_ctx if dist_ctx is not None else DistContext()
        self.forward_kwargs = forward_kwargs or {}

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Take (0-based) optimizer step ``step``; returns (mean loss, grad norm) on the device, and the lr
        (the schedule's: Muon's groups take it times their ``lr_scale``)."""
        lr = self.schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get(LR_SCALE, 1.0)
        loss, grad_norm = self.forward_backward()
        # The one sync per optimizer step (never per micro step): the update must be
        # skipped, not undone, when the loss or gradients are not finite.
        if not torch.isfinite(loss + grad_norm).item():
            raise TrainingDivergedError(
                f"step {step + 1}: loss {loss.item()} / gradient norm {grad_norm.item()} is not finite at "
                f"learning rate {lr:g}; the update was skipped and training stopped. {self.advice()}".rstrip()
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the step's micro-batches; returns (mean loss, grad norm), on the device.

        Without masked targets every micro-batch holds the same number of targets, and
        the step's loss is the mean of the micro-batch means. With them (``per_token``:
        SFT), micro-batches hold different numbers of targets, so each micro-batch's
        loss is weighted by its share of the targets of the whole step on every rank:
        the loss and the gradients are then the mean over the global batch's targets,
        whatever micro_batch x accum_steps x ranks it is split into.
        Gradients are all-reduced once, on the last micro-batch. Leaves the (clipped)
        gradients in place: ``__call__`` decides whether to apply them.
        """
        accum, dist_ctx = self.accum, self.dist_ctx
        batches = [self.next_batch() for _ in range(accum)] if self.per_token else None
        if batches is not None:
            counts = [(b[-1] != IGNORE_INDEX).sum() for b in batches]
            # DDP/FSDP average the ranks' gradients, hence world_size / (targets on all ranks)
            scale = dist_ctx.world_size / sum_over_ranks(torch.stack(counts).sum(), dist_ctx).clamp(min=1)
        loss_sum: torch.Tensor | None = None
        for micro in range(accum):
            set_grad_sync(self.model, micro == accum - 1)
            batch = self.next_batch() if batches is None else batches[micro]
            with self.autocast:
                _, loss = self.model(*batch, **self.forward_kwargs)
            if batches is None:
                loss = loss / accum  # the gradients then sum to the mean over micro-batches
            else:
                loss = loss * (counts[micro] * scale)  # this micro-batch's summed loss over the step's targets
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            loss.backward()
        assert loss_sum is not None
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        return mean_over_ranks(loss_sum, dist_ctx), grad_norm.detach()
