"""Training in more than one process: the process group, DDP or FSDP2, and the torchrun launcher.

The pretrain stage stays one Prefect task. With ``distributed.nproc_per_node > 1``
it writes a small JSON spec and starts ``torchrun`` as a subprocess (``launch``);
torchrun starts ``python -m lmpipe.training.distributed <spec>`` once per process, and each
process runs the ordinary ``lmpipe.training.loop.train`` loop with its ``DistContext``.
Only rank 0 writes checkpoints, metrics.jsonl and MLflow metrics (into the stage's
run, whose id comes through the environment); the launcher streams every line the
processes print to a callback (the Prefect log), and any rank that fails makes
torchrun, and so the task, fail, so that a retry resumes from the last checkpoint.

The data a rank trains on is fixed by ``lmpipe.training.loader.sequence_range``: together
the ranks see exactly what one process with ``world_size`` times the gradient
accumulation would, so a DDP run's losses match a single process's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the training processes; the default is a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"  # "ddp" | "fsdp"
    backend: str = "auto"  # "auto" | "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, strategy: str, backend: str = "auto", environ: Mapping[str, str] = os.environ) -> DistContext:
        """torchrun's RANK / LOCAL_RANK / WORLD_SIZE, and how the run distributes (its config's ``distributed``)."""
        return cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)),
                   int(environ.get("WORLD_SIZE", 1)), strategy, backend)


def init_process_group(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the group torchrun set up; returns this rank's device (cuda:<local_rank> on GPUs)."""
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    backend = ctx.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # A long timeout: the other ranks wait at a barrier while rank 0 writes and hashes a checkpoint.
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=60))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP replica or FSDP2 shards for a multi-process run; the model itself otherwise.

    FSDP2 shards each transformer block and then the root (embeddings, final norm
    and the tied head), so only one block's full weights exist at a time. On CUDA
    its parameters are gathered in bf16 and gradients reduced in fp32.
    """
    if not ctx.active:
        return model
    if ctx.strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for block in model.transformer.h:  # type: ignore[union-attr]
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward all-reduces gradients: only the last micro-batch of a step needs to."""
    if isinstance(model, FSDPModule):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, DistributedDataParallel):  # what its no_sync() context toggles
        model.require_backward_grad_sync = sync


def mean_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of t over all ranks (SUM then divide: gloo has no AVG); asynchronous on the device."""
    return sum_over_ranks(t, ctx) / ctx.world_size if ctx.active else t


def sum_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of t over all ranks; asynchronous on the device."""
    if not ctx.active:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor; plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's obj, in rank order (on every rank)."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
