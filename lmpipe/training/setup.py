"""Setting a language-model run up: the device, the model (LoRA, compile, DDP / FSDP), its optimizer and
micro-batch, and where it starts: a resume, ``init_from``'s weights or a seeded random init."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmpipe.config.effects import trajectory as steps_taken
from lmpipe.config.training import ModelConfig, Training
from lmpipe.model.checkpoint import check_compatible, read_state
from lmpipe.model.device import autocast_for, resolve_device
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.lora import apply_lora
from lmpipe.training.checkpoint import CHECKPOINTS_DIR, load_checkpoint, resume_checkpoint
from lmpipe.training.device import find_micro_batch
from lmpipe.training.distributed import DistContext, gather_objects, init_process_group, wrap_model
from lmpipe.training.early_stopping import EarlyStopping
from lmpipe.training.optimizer import TrainOptimizer, build_optimizer


def trajectory(cfg: Training, sequences_per_step: int) -> dict[str, Any]:
    """The settings that decide which steps are taken: they must match a checkpoint to resume from it."""
    return steps_taken(cfg) | {"sequences_per_step": sequences_per_step}  # the global batch, however split


@dataclass
class Run:
    """A run ready to train: its model (``raw``, and ``model`` as DDP / FSDP wrap it), optimizer, batch split
    and starting point."""

    device: torch.device
    autocast: contextlib.AbstractContextManager
    raw: GPT
    model: nn.Module
    optimizer: TrainOptimizer
    micro: int  # sequences per micro-batch per rank
    accum: int  # micro-batches per optimizer step per rank
    sequences_per_step: int  # the global batch
    start: int  # optimizer steps already done (a resume)
    early: EarlyStopping
    lora_state: dict[str, Any]  # what a LoRA run's checkpoints record of its adapters
    last_ckpt: Path | None  # the checkpoint resumed from


def init_device(cfg: Training, dist_ctx: DistContext) -> torch.device:
    """The device (joining the process group under torchrun), threads, and every RNG seeded with cfg.seed."""
    device = resolve_device(cfg.device)
    if dist_ctx.active:
        device = init_process_group(dist_ctx, device)
    elif device.type == "cuda":  # make it current: RNG states and the loader thread follow the current device
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    return device


def prepare(model_cfg: ModelConfig, cfg: Training, vocab_size: int, work_dir: Path, *, fingerprint: str,
            init_from: Path | None, dist_ctx: DistContext, doc_sep: int | None) -> Run:
    """Resume from the newest valid checkpoint in ``work_dir/checkpoints`` when there is one (newer damaged
    ones are set aside, ``resume_checkpoint``); otherwise start from ``init_from``'s weights (a fine-tuning
    start, fresh optimizer) or from a seeded random init."""
    device = init_device(cfg, dist_ctx)
    autocast = autocast_for(device, cfg.precision, field=f"{cfg.SECTION}.precision")  # before any work
    # The main rank picks it (setting damaged ones aside), the others take its answer.
    found = resume_checkpoint(work_dir / CHECKPOINTS_DIR) if dist_ctx.is_main else None
    last_ckpt: Path | None = gather_objects(found, dist_ctx)[0]
    sequences_per_step = cfg.sequences_per_step(model_cfg.block_size)
    resumed_micro = None
    if last_ckpt is not None:
        resume_state = read_state(last_ckpt)
        check_compatible(resume_state, model_cfg, vocab_size, fingerprint, field=f"resume from {work_dir}",
                         train_cfg=trajectory(cfg, sequences_per_step))
        resumed_micro = resume_state.get("micro_batch")

    def check_init() -> None:
        assert init_from is not None
        check_compatible(read_state(init_from), model_cfg, vocab_size, fingerprint, field="init_from")

    raw = GPT(GPTConfig.from_config(model_cfg, vocab_size)).to(device)
    lora_cfg = getattr(cfg, "lora", None)
    lora_state: dict[str, Any] = {}
    if lora_cfg is not None:  # the base weights first, then the adapters on them (a resume overwrites both)
        if last_ckpt is None and init_from is not None:
            check_init()
            load_checkpoint(init_from, raw, None, restore_rng=False)
        targets = apply_lora(raw, lora_cfg)
        lora_state = {"lora": lora_cfg.model_dump(mode="json") | {"targets": targets,
                                                                   "scale": lora_cfg.alpha / lora_cfg.r}}
    per_rank = sequences_per_step // dist_ctx.world_size
    if cfg.batch_size != "auto":
        micro = cfg.batch_size
    elif resumed_micro and per_rank % resumed_micro == 0:
        micro = resumed_micro  # the resumed run's split: the same float sums, val windows
    else:
        micro = find_micro_batch(raw, per_rank, device, autocast, doc_sep=doc_sep)
        micro = min(gather_objects(micro, dist_ctx))  # every rank must take the same micro-batch
    model = _compile_and_wrap(raw, cfg, dist_ctx, device)
    optimizer = build_optimizer(raw, cfg, device.type)

    start, early_state = 0, None
    if last_ckpt is not None:
        state = load_checkpoint(last_ckpt, model, optimizer, rank=dist_ctx.rank, world_size=dist_ctx.world_size)
        start, early_state = state["step"], state.get("early_stopping")
        if not state["rng_restored"]:  # resumed on another number of processes: reseed deterministically
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist_ctx.rank, start]).generate_state(1)[0]))
    else:
        if init_from is not None and lora_cfg is None:
            check_init()
            load_checkpoint(init_from, model, None, restore_rng=False)
        torch.manual_seed(cfg.seed + dist_ctx.rank)  # dropout masks differ between ranks
    # Early stopping's record; a resumed run continues it (and a run that stopped early stays stopped).
    early = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.eval_interval, early_state)
    return Run(device, autocast, raw, model, optimizer, micro, per_rank // micro, sequences_per_step, start, early,
               lora_state, last_ckpt)


def _compile_and_wrap(raw: GPT, cfg: Training, dist_ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP / FSDP2 around the model under torchrun; torch.compile where cfg.compile says (None: on CUDA)."""
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fsdp = dist_ctx.strategy == "fsdp" and dist_ctx.active
    if use_compile and fsdp:
        for block in raw.transformer.h:  # per block, before sharding: FSDP's hooks stay outside the graphs
            block.compile()
    model = wrap_model(raw, dist_ctx, device)
    if use_compile and not fsdp:
        raw.compile()  # in place: state_dict keys stay those of the plain model
    return model
