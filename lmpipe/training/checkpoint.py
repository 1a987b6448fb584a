"""Writing and resuming training checkpoints: weights, optimizer state, every rank's RNG, written atomically.

A run keeps its two newest checkpoints, so when the newest fails verification on
resume there is one to fall back to (``resume_checkpoint``). Reading a
checkpoint's weights for evaluation or serving is ``lmpipe.model.checkpoint``.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lmpipe.artifacts import save_safetensors
from lmpipe.model.checkpoint import (
    FORMAT_VERSION,
    OPTIMIZER_FILE,
    TIED_KEY,
    WEIGHTS_FILE,
    CheckpointError,
    _load_weights,
    _step_dirs,
    _step_of,
    read_state,
    seal_checkpoint,
    step_dir,
    verify_checkpoint,
)
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.training.distributed import DistContext, barrier, gather_objects
from lmpipe.training.early_stopping import EarlyStopping
from lmpipe.training.optimizer import TrainOptimizer, optimizer_parts

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # early stopping: the checkpoint of the lowest val loss so far (weights only)
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed verification, set aside as ".step-N.damaged"
log = logging.getLogger(__name__)

# ---------------------------------------------------------------- RNG states


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """All global RNG states as JSON-able values (bytes as base64)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())  # this process's device (one per rank)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ---------------------------------------------------------------- writing


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def capture(model: nn.Module, optimizer: TrainOptimizer | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Full CPU copies of the weights (tied head dropped) and of the optimizer state.

    ``model`` may be a GPT, or one wrapped by DDP or sharded by FSDP2; under FSDP
    this is a collective (every rank calls it) and ranks other than 0 get empty dicts.
    """
    sd = get_model_state_dict(model, options=_FULL)
    if getattr(model, "module", model).tied:  # (DDP keeps the GPT in .module) the head is the token embedding
        sd.pop(TIED_KEY, None)
    weights = {k: cast(torch.Tensor, v).detach().contiguous() for k, v in sd.items()}
    opt = (get_optimizer_state_dict(model, optimizer_parts(optimizer), options=_FULL) if optimizer is not None
           else None)
    return weights, opt


def save_checkpoint(
    root: Path, step: int, model: GPT, optimizer: TrainOptimizer, state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Checkpoint a single-process model: ``capture`` then ``write_checkpoint``."""
    weights, opt = capture(model, optimizer)
    return write_checkpoint(root, step, model.config, weights, opt, state, keep=keep)


def write_checkpoint(
    root: Path, step: int, config: GPTConfig, weights: dict[str, torch.Tensor], optimizer_state: dict | None,
    state: dict[str, Any], *, rng: list[dict[str, Any]] | None = None, keep: int = 2,
    keep_steps: Collection[int | None] = (),
) -> Path:
    """Write ``root/step-{step:07d}`` atomically, then prune: keep the newest ``keep`` checkpoints
    (and those of ``keep_steps``, which something else still refers to).

    ``state`` holds the caller's fields (tokenizer_fingerprint, data position, train
    config, ...); format_version, step, model config, vocab_size and the RNG states
    (``rng``: one entry per rank; default this process's) are added here. One writer
    per root is assumed: leftover temporary directories and checkpoints of later
    steps are removed, since training resumes from the newest valid checkpoint, so
    later ones were invalid or belong to an abandoned run.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*.tmp"):  # left by a crash mid-save
        shutil.rmtree(leftover)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"  # hidden, and never matches the step-N pattern
    tmp.mkdir()
    save_safetensors(weights, tmp / WEIGHTS_FILE)
    if optimizer_state is not None:
        # Through a Python file: a full disk is then OSError "No space left on device", where torch's own
        # writer (given a path) says only "unexpected pos"; that writer, closing after the OSError, raises its
        # RuntimeError in its place, so the OSError is raised again.
        with open(tmp / OPTIMIZER_FILE, "wb") as f:
            try:
                torch.save(optimizer_state, f)
            except RuntimeError as err:
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from err
                raise
    full = {
        **state,
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": config.to_dict(),
        "vocab_size": config.vocab_size,
        "rng": rng if rng is not None else [rng_state()],
    }
    out = seal_checkpoint(tmp, final, full)
    later = [d for d in _step_dirs(root) if _step_of(d) > step]
    kept_or_older = [d for d in _step_dirs(root) if _step_of(d) <= step]
    for d in later + kept_or_older[keep:]:
        if _step_of(d) not in keep_steps:
            shutil.rmtree(d)
    return out


def prune_checkpoints(root: Path, keep_steps: Collection[int | None]) -> None:
    """Remove the checkpoints under root but those of ``keep_steps``."""
    for d in _step_dirs(root):
        if _step_of(d) not in keep_steps:
            shutil.rmtree(d)


def resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint a run resumes from: the newest under root that verifies, or None (a fresh start).

    A newer one that fails verification (a file missing, truncated or changed,
    state.json unreadable: ``CheckpointError``) is renamed to the hidden
    ``.step-N.damaged`` beside it, with a warning saying why: it is not tried again,
    not counted among the checkpoints ``write_checkpoint`` keeps, and stays there
    to be inspected until the stage publishes (which removes ``checkpoints/``).
    Checkpoints are only ever built in a temporary directory and renamed into
    place, so a damaged one is damage, not a crash mid-write. A checkpoint of
    another format version is refused (``CheckpointMismatchError``), never skipped.
    Only the main rank calls this; the others take its answer.
    """
    damaged = []
    for d in _step_dirs(root):
        try:
            verify_checkpoint(d)
        except CheckpointError as err:  # a CheckpointMismatchError is not one: it propagates
            aside = d.with_name(f".{d.name}{DAMAGED_SUFFIX}")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(d, aside)
            log.warning("checkpoint %s fails verification, so it is not resumed from (moved aside to %s): %s",
                        d, aside.name, err)
            damaged.append(d.name)
            continue
        if damaged:
            log.warning("resuming from %s, the newest checkpoint that verifies (skipped: %s)", d, ", ".join(damaged))
        return d
    if damaged:
        log.warning("no checkpoint under %s verifies (skipped: %s): training starts from scratch", root,
                    ", ".join(damaged))
    return None


def load_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: TrainOptimizer | None = None,
    *,
    restore_rng: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore weights into model (and optimizer state, this rank's RNG states); returns the state.

    The model must already have the checkpoint's architecture (see check_compatible)
    and sit on its device; plain, DDP and FSDP2 models all take the full tensors
    (a LoRA checkpoint's merged into a model without LoRA layers, see ``_load_weights``).
    RNG states come back only onto the same number of ranks; ``restore_rng`` reports
    through the returned state's ``rng_restored`` whether they did.
    """
    state = verify_checkpoint(ckpt_dir)
    _load_weights(model, ckpt_dir, state)
    if optimizer is not None:
        opt_file = Path(ckpt_dir) / OPTIMIZER_FILE
        if not opt_file.is_file():
            raise CheckpointError(f"{ckpt_dir} holds no optimizer state (an exported model?)")
        opt_state = torch.load(opt_file, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer_parts(optimizer), opt_state,
                                 options=StateDictOptions(full_state_dict=True))
    state["rng_restored"] = restore_rng and len(state.get("rng", [])) == world_size
    if state["rng_restored"]:
        set_rng_state(state["rng"][rank])
    return state


# ---------------------------------------------------------------- the training run's checkpoints


class Checkpointer:
    """A run's checkpoints: every ``interval`` steps, at the last step and at ``stop_after`` (and when the
    run stops early) into ``work_dir/checkpoints``; early stopping's best weights into ``work_dir/best``.

    ``state`` holds what every checkpoint records beside the data position
    (``position(step)``) and early stopping's record; ``best_state`` what a best
    checkpoint records beside its val loss; ``latest`` is the newest checkpoint so
    far. Writing is a collective under FSDP: every rank calls ``save``; only the
    main rank writes files.
    """

    def __init__(self, work_dir: Path, model: nn.Module, config: GPTConfig, optimizer: TrainOptimizer, *,
                 interval: int, max_steps: int, early: EarlyStopping, state: dict[str, Any],
                 best_state: dict[str, Any], position: Callable[[int], dict[str, Any]],
                 stop_after: int | None = None, dist_ctx: DistContext | None = None,
                 latest: Path | None = None) -> None:
        self.root, self.best_root = Path(work_dir) / CHECKPOINTS_DIR, Path(work_dir) / BEST_DIR
        self.model, self.config, self.optimizer = model, config, optimizer
        self.interval, self.max_steps, self.stop_after = interval, max_steps, stop_after
        self.early, self.state, self.best_state, self.position = early, state, best_state, position
        self.dist_ctx, self.latest = dist_ctx or DistContext(), latest

    def should_save(self, step: int, *, last: bool = False) -> bool:
        """``last``: the run ends at ``step`` for another reason (early stopping's stop is final)."""
        return step % self.interval == 0 or step == self.max_steps or step == self.stop_after or last

    def save(self, step: int) -> Path:
        weights, opt_state = capture(self.model, self.optimizer)  # a collective under FSDP: every rank takes part
        rngs = gather_objects(rng_state(), self.dist_ctx)
        path = step_dir(self.root, step)
        if self.dist_ctx.is_main:
            state = self.state | {"data": self.position(step), "early_stopping": self.early.state_dict()}
            path = write_checkpoint(self.root, step, self.config, weights, opt_state, state, rng=rngs)
        barrier(self.dist_ctx)  # no rank runs ahead of a checkpoint that may still fail
        self.early.mark_recorded()
        if self.dist_ctx.is_main and self.early.recorded_best is not None:  # other bests: out of any resume's reach
            prune_checkpoints(self.best_root, self.bests_in_reach())
        self.latest = path
        return path

    def bests_in_reach(self) -> list[int | None]:
        """The best steps a resume may return to: the newest record's, and those of the regular checkpoints
        kept (a resume falls back to an older one when the newest is damaged, ``resume_checkpoint``)."""
        steps = [self.early.recorded_best]
        for d in _step_dirs(self.root):
            try:
                steps.append((read_state(d).get("early_stopping") or {}).get("best_step"))
            except CheckpointError:
                continue  # unreadable: never resumed from
        return steps

    def save_best(self, step: int, val_loss: float) -> None:
        """Keep the weights of the best val loss so far (one checkpoint, no optimizer state)."""
        weights, _ = capture(self.model, None)
        if self.dist_ctx.is_main:
            write_checkpoint(self.best_root, step, self.config, weights, None, self.best_state | {"val_loss": val_loss},
                             keep=1, keep_steps=self.bests_in_reach())  # a resume may return to these
        barrier(self.dist_ctx)

    def forward(self) -> Path:
        """The checkpoint that goes forward: the newest, or with early stopping the best one."""
        if self.early.enabled and self.early.best_step is not None:
            return step_dir(self.best_root, self.early.best_step)
        if self.latest is None:  # cannot happen: the last step always checkpoints
            raise RuntimeError("training finished without a checkpoint")
        return self.latest
