"""Training in more than one process: the process group, DDP or FSDP2, and the torchrun launcher.

The pretrain stage stays one Prefect task. With ``distributed.nproc_per_node > 1``
it writes a small JSON spec and starts ``torchrun`` as a subprocess (``launch``);
torchrun starts ``python -m lmpipe.distributed <spec>`` once per process, and each
process runs the ordinary ``lmpipe.train.train`` loop with its ``DistContext``.
Only rank 0 writes checkpoints, metrics.jsonl and MLflow metrics (into the stage's
run, whose id comes through the environment); the launcher streams every line the
processes print to a callback (the Prefect log), and any rank that fails makes
torchrun, and so the task, fail, so that a retry resumes from the last checkpoint.

The data a rank trains on is fixed by ``lmpipe.loader.sequence_range``: together
the ranks see exactly what one process with ``world_size`` times the gradient
accumulation would, so a DDP run's losses match a single process's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SPEC_FILE = "distributed_spec.json"
SUMMARY_FILE = "distributed_summary.json"
PROGRESS_PREFIX = "lmpipe-progress "  # lines the launcher turns into on_progress calls
ERROR_PREFIX = "lmpipe-error "  # a rank's exception, in one line, for the launcher's error message


class DistributedTrainingError(RuntimeError):
    """torchrun or one of its processes failed; the message holds each rank's error and the last lines.

    ``retryable`` is False when a rank failed on something a retry would meet again
    (bad data or settings, a diverged loss) and True when a process died or lost
    its peers (killed, out of memory, a network or device fault): then a retry
    resumes from the last checkpoint.
    """

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[type, tuple[str, bool]]:  # Prefect persists failed states: keep it picklable
        return type(self), (str(self), self.retryable)


# A rank failing with one of these would fail again on a retry.
_FATAL = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError,
          FileNotFoundError, PermissionError)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the training processes; the default is a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"  # "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, strategy: str, environ: Mapping[str, str] = os.environ) -> DistContext:
        """torchrun's RANK / LOCAL_RANK / WORLD_SIZE."""
        return cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)),
                   int(environ.get("WORLD_SIZE", 1)), strategy)


def init_process_group(ctx: DistContext, device: torch.device, backend: str) -> torch.device:
    """Join the group torchrun set up; returns this rank's device (cuda:<local_rank> on GPUs)."""
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
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
        from torch.nn.parallel import DistributedDataParallel

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
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP (what its no_sync() context toggles)
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


# ---------------------------------------------------------------- the launcher (parent side)


def launch(spec: dict[str, Any], work_dir: Path, nproc: int, *, on_line: Callable[[str], None],
           on_progress: Callable[[int, int], None] | None = None, env: Mapping[str, str] | None = None,
           ) -> dict[str, Any]:
    """Run ``python -m lmpipe.distributed`` under torchrun on this node; returns rank 0's summary.

    Every output line of every process goes to ``on_line`` as it arrives (progress
    lines to ``on_progress`` instead). A non-zero exit of torchrun, which follows the
    failure of any rank, raises DistributedTrainingError with the last lines.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    (work_dir / SUMMARY_FILE).unlink(missing_ok=True)  # never trust a summary of an earlier attempt
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmpipe.distributed", str(spec_path)]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS":
                 os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1, env=child_env) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
                    done, total = line[len(PROGRESS_PREFIX):].split("/")
                    on_progress(int(done), int(total))
                    continue
                if line.startswith(ERROR_PREFIX):
                    errors.append(line[len(ERROR_PREFIX):])
                tail.append(line)
                on_line(line)
        except BaseException:  # a callback failed or the task was cancelled: do not leave training running
            proc.terminate()
            raise
        code = proc.wait()
    summary_path = work_dir / SUMMARY_FILE
    if code != 0 or not summary_path.is_file():
        raise DistributedTrainingError(
            f"torchrun with {nproc} processes exited with code {code}"
            + ("" if code else f" but wrote no {SUMMARY_FILE}") + "".join(f"\n  {e}" for e in errors)
            + "\nlast lines:\n  " + "\n  ".join(tail),
            retryable=not any(" fatal: " in e for e in errors),
        )
    return json.loads(summary_path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the worker (one per process)


def _worker(spec_path: Path) -> None:
    from lmpipe.config import ModelConfig, TrainConfig
    from lmpipe.shards import TokenSplit
    from lmpipe.tracking import StageRun
    from lmpipe.train import summary_json, train

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    train_cfg = TrainConfig.model_validate(spec["train"])
    ctx = DistContext.from_env(train_cfg.distributed.strategy)
    run = StageRun.from_env() if ctx.is_main else None

    def progress(done: int, total: int) -> None:
        print(f"{PROGRESS_PREFIX}{done}/{total}", flush=True)

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum} (torchrun stops the other ranks when one fails)")

    # torchrun sends SIGTERM to the surviving ranks: unwind, so rank 0's buffered metrics reach MLflow.
    signal.signal(signal.SIGTERM, terminated)
    try:
        summary = train(
            ModelConfig.model_validate(spec["model"]), train_cfg, spec["vocab_size"],
            TokenSplit(Path(spec["shards"]), "train"), TokenSplit(Path(spec["shards"]), "val"),
            Path(spec["work_dir"]), tokenizer_fingerprint=spec["tokenizer_fingerprint"],
            log_metrics=run.log_metrics if run else None, on_progress=progress if ctx.is_main else None,
            stop_after=spec.get("stop_after"), dist_ctx=ctx,
        )
        if ctx.is_main:
            tmp = spec_path.parent / (SUMMARY_FILE + ".tmp")
            tmp.write_text(json.dumps(summary_json(summary)), encoding="utf-8")
            os.replace(tmp, spec_path.parent / SUMMARY_FILE)
    except BaseException as err:
        from lmpipe.train import TrainingDivergedError

        kind = "fatal" if isinstance(err, (*_FATAL, TrainingDivergedError)) else "transient"
        print(f"{ERROR_PREFIX}rank {ctx.rank} {kind}: {type(err).__name__}: {' '.join(str(err).split())}",
              flush=True)
        raise
    finally:
        # torchrun's SIGTERM may come while the error unwinds: it must not cut the last metrics' flush short
        # (torchrun waits before it sends SIGKILL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if run is not None:
            try:
                run.flush()
            except Exception as err:  # noqa: BLE001 - never hide the training error behind a tracking one
                print(f"could not send the last metrics to MLflow: {err}", flush=True)
        shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
