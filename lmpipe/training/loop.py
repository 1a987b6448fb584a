"""Training: the loop (``train``) and the pretrain / finetune stages built on it.

The loop is nanoGPT's, made exact and fast: AdamW with linear warmup and cosine
decay, gradient accumulation to a global batch, clipping, periodic validation and
checkpoints; bf16 autocast, TF32, flash attention and ``torch.compile`` on CUDA; a
loader thread that prepares the next micro-batches while the current step runs;
one device sync per optimizer step; and DDP or FSDP2 when torchrun starts it
(``lmpipe.training.distributed``).

Exact resume. The data order is a pure function of (seed, epoch)
(``lmpipe.training.loader.WindowOrder``) and the sequences of optimizer step ``s`` are the
``s``-th global batch of that order, so the data position *is* the step number.
A run resumed from the checkpoint of step ``k`` (weights, optimizer moments, every
rank's RNG states) takes the very same steps ``k+1..N`` as a run that never
stopped: on CPU the losses are bitwise equal, across epoch boundaries too, which
``tests/unit/training/test_train.py`` asserts.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmpipe.config.effects import trajectory
from lmpipe.config.pipeline import check_batch
from lmpipe.config.training import FinetuneConfig, ModelConfig, TrainConfig
from lmpipe.data.shards import TokenSource
from lmpipe.model.checkpoint import check_compatible, latest_checkpoint, read_state, step_dir
from lmpipe.model.device import autocast_for, resolve_device
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.lora import apply_lora
from lmpipe.training.checkpoint import capture, load_checkpoint, prune_checkpoints, rng_state, write_checkpoint
from lmpipe.training.device import find_micro_batch, peak_flops
from lmpipe.training.distributed import DistContext, barrier, gather_objects, init_process_group, wrap_model
from lmpipe.training.loader import BatchLoader, WindowOrder, position_state
from lmpipe.training.schedule import lr_at
from lmpipe.training.step import TrainingDivergedError, _step
from lmpipe.training.validation import check_split_lengths, eval_offsets, evaluate_loss

LogMetrics = Callable[[dict[str, float], int], None]
OnProgress = Callable[[int, int], None]

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # early stopping: the checkpoint of the lowest val loss so far (weights only)
SINGLE = DistContext()


class CutExampleMask:
    """Loss mask of packed examples: a window that starts inside an example does not train on its rest.

    A guard for streams whose windows can cut examples: SFT's packed layout puts
    whole examples in every window (``lmpipe.data.sft.pack_examples``), where it masks nothing.

    With a block-diagonal mask (``doc_sep``) the rest of an example cut by the
    window's start would be seen without its beginning (an SFT reply without its
    prompt) at positions from 0; its targets are masked here, through the first
    ``sep`` of the window. A window starting at the stream's start or right after a
    ``sep`` is whole. Wraps the given mask (None: every target counts otherwise).
    """

    def __init__(self, tokens: TokenSource, mask: TokenSource | None, sep: int) -> None:
        self.tokens, self.mask, self.sep = tokens, mask, sep
        self.num_tokens = tokens.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        m = (self.mask.window(start, length) if self.mask is not None
             else np.ones(length, dtype=np.int64)).copy()
        if start > 0 and self.tokens.window(start - 1, 1)[0] != self.sep:
            ends = np.flatnonzero(self.tokens.window(start, length) == self.sep)
            m[: ends[0] + 1 if len(ends) else length] = 0
        return m


@dataclass
class TrainSummary:
    steps: int  # optimizer steps done, including those before a resume
    final_train_loss: float  # mean loss of the last log_interval steps (one step is noisy)
    final_val_loss: float | None  # of the model that goes forward (the best, with early stopping); None when
    # stop_after returned before any validation
    tokens_seen: int
    tokens_per_sec: float  # of this call's training steps (evaluation and checkpoints excluded)
    seconds: float  # wall time of this call
    params: int
    flops_per_token: int
    device: str
    checkpoint: Path  # what goes forward: the last checkpoint, or with early stopping the best one
    resumed_from: int  # step this call started from (0: a fresh start)
    best_step: int | None = None  # early stopping: the step of the lowest val loss
    best_val_loss: float | None = None
    stopped_early: bool = False


def _trajectory(cfg: TrainConfig, sequences_per_step: int) -> dict[str, Any]:
    """The settings that decide which steps are taken: they must match a checkpoint to resume from it."""
    return trajectory(cfg) | {"sequences_per_step": sequences_per_step}  # the global batch, however split


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_metrics(path: Path, through_step: int) -> list[dict[str, Any]]:
    """Keep the rows of steps <= through_step: after a resume the file equals an uninterrupted run's."""
    rows = [r for r in _read_metrics(path) if r["step"] <= through_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


# ---------------------------------------------------------------- the loop


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    vocab_size: int,
    train_src: TokenSource,
    val_src: TokenSource,
    work_dir: Path,
    *,
    tokenizer_fingerprint: str,
    init_from: Path | None = None,
    log_metrics: LogMetrics | None = None,
    on_progress: OnProgress | None = None,
    stop_after: int | None = None,
    target_mask_src: tuple[TokenSource, TokenSource] | None = None,
    dist_ctx: DistContext = SINGLE,
    aligned_val: bool = False,
    doc_sep: int | None = None,
) -> TrainSummary:
    """Train a GPT on train_src for cfg.max_steps steps; checkpoints and metrics.jsonl go to work_dir.

    Resumes from the newest valid checkpoint in ``work_dir/checkpoints`` when there
    is one; otherwise starts from ``init_from``'s weights (a fine-tuning start, fresh
    optimizer) or from a seeded random init. ``target_mask_src`` = (train, val) loss
    masks parallel to the sources: targets whose mask is 0 do not count (SFT prompts).
    ``stop_after=k`` checkpoints at step k and returns, as if interrupted there.
    ``dist_ctx``: this process's place in a torchrun job (``lmpipe.training.distributed``);
    only rank 0 writes files and calls the callbacks. ``aligned_val``: validation
    windows start at multiples of block_size (SFT: one example, or one bin of packed examples, each).
    ``doc_sep``: the token that ends every packed example (SFT's packed layout, the
    end-of-text id); training and validation windows then attend only within each
    example, with positions restarting at its start (``GPT.forward``). SFT's packed
    windows hold whole examples (``lmpipe.data.sft.pack_examples``); for a stream laid out
    otherwise, the loss masks skip the remainder of an example a window starts inside
    (``CutExampleMask``, which masks nothing in whole-example windows).
    """
    started = time.perf_counter()
    section = "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"  # for error messages
    main = dist_ctx.is_main
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    T = model_cfg.block_size
    check_batch(cfg, T, section)
    check_split_lengths(T, train_src, val_src)
    train_mask, val_mask = target_mask_src or (None, None)
    for name, src, mask in (("train", train_src, train_mask), ("val", val_src, val_mask)):
        if mask is not None and mask.num_tokens != src.num_tokens:
            raise ValueError(f"{name} loss mask has {mask.num_tokens} entries for {src.num_tokens} tokens")
    if doc_sep is not None:
        train_mask, val_mask = (CutExampleMask(src, mask, doc_sep)
                                for src, mask in ((train_src, train_mask), (val_src, val_mask)))
    order = WindowOrder(train_src.num_tokens, T, cfg.seed)

    device = resolve_device(cfg.device)
    if dist_ctx.active:
        device = init_process_group(dist_ctx, device, cfg.distributed.backend)
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
    autocast = autocast_for(device)

    ckpt_root = work_dir / CHECKPOINTS_DIR
    metrics_path = work_dir / METRICS_FILE
    last_ckpt = latest_checkpoint(ckpt_root)
    sequences_per_step = cfg.sequences_per_step(T)
    per_rank = sequences_per_step // dist_ctx.world_size
    trajectory = _trajectory(cfg, sequences_per_step)
    resumed_micro = None
    if last_ckpt is not None:
        resume_state = read_state(last_ckpt)
        check_compatible(resume_state, model_cfg, vocab_size, tokenizer_fingerprint,
                         field=f"resume from {work_dir}", train_cfg=trajectory)
        resumed_micro = resume_state.get("micro_batch")

    raw = GPT(GPTConfig.from_config(model_cfg, vocab_size)).to(device)
    lora_cfg = getattr(cfg, "lora", None)
    lora_state: dict[str, Any] = {}
    if lora_cfg is not None:  # the base weights first, then the adapters on them (a resume overwrites both)
        if last_ckpt is None and init_from is not None:
            check_compatible(read_state(init_from), model_cfg, vocab_size, tokenizer_fingerprint, field="init_from")
            load_checkpoint(init_from, raw, None, restore_rng=False)
        targets = apply_lora(raw, lora_cfg)
        lora_state = {"lora": lora_cfg.model_dump(mode="json") | {"targets": targets,
                                                                   "scale": lora_cfg.alpha / lora_cfg.r}}
    if cfg.batch_size != "auto":
        micro = cfg.batch_size
    elif resumed_micro and per_rank % resumed_micro == 0:
        micro = resumed_micro  # the resumed run's split: the same float sums, val windows
    else:
        micro = find_micro_batch(raw, per_rank, device, autocast, doc_sep=doc_sep)
        micro = min(gather_objects(micro, dist_ctx))  # every rank must take the same micro-batch
    accum = per_rank // micro
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile and dist_ctx.strategy == "fsdp" and dist_ctx.active:
        for block in raw.transformer.h:  # per block, before sharding: FSDP's hooks stay outside the graphs
            block.compile()
    model = wrap_model(raw, dist_ctx, device)
    if use_compile and not (dist_ctx.strategy == "fsdp" and dist_ctx.active):
        raw.compile()  # in place: state_dict keys stay those of the plain model
    optimizer = raw.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)

    start = 0
    # Early stopping's record; a resumed run continues it (and a run that stopped early stays stopped).
    best: dict[str, Any] = {"best_val_loss": None, "best_step": None, "stopped": False}
    if last_ckpt is not None:
        state = load_checkpoint(last_ckpt, model, optimizer, rank=dist_ctx.rank, world_size=dist_ctx.world_size)
        start = state["step"]
        best = state.get("early_stopping", best)
        if not state["rng_restored"]:  # resumed on another number of processes: reseed deterministically
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist_ctx.rank, start]).generate_state(1)[0]))
    else:
        if init_from is not None and lora_cfg is None:
            check_compatible(read_state(init_from), model_cfg, vocab_size, tokenizer_fingerprint, field="init_from")
            load_checkpoint(init_from, model, None, restore_rng=False)
        torch.manual_seed(cfg.seed + dist_ctx.rank)  # dropout masks differ between ranks
    rows = _truncate_metrics(metrics_path, start) if main else []
    # The best step the newest regular checkpoint records: its best/ checkpoint must outlive newer bests,
    # since a resume replays from there and (on a GPU, not bit for bit) may not find the newer best again.
    recorded_best: list[int | None] = [best["best_step"]]

    params, flops_per_token = raw.num_params(), raw.flops_per_token()
    peak = cfg.peak_flops or peak_flops(device)
    tokens_per_step = sequences_per_step * T
    val_offsets = eval_offsets(val_src.num_tokens, T, cfg.eval_batches * micro)
    if aligned_val:
        val_offsets = np.unique(val_offsets // T * T)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, never clip

    def save(step: int) -> Path:
        weights, opt_state = capture(model, optimizer)  # a collective under FSDP: every rank takes part
        rngs = gather_objects(rng_state(), dist_ctx)
        path = step_dir(ckpt_root, step)
        if main:
            state = {
                "tokenizer_fingerprint": tokenizer_fingerprint,
                "data": {"seed": cfg.seed, "next_step": step, "tokens_seen": step * tokens_per_step}
                        | position_state(order, step, sequences_per_step),
                "train": cfg.model_dump(mode="json") | {"sequences_per_step": sequences_per_step},
                "micro_batch": micro, "grad_accum_steps": accum, "world_size": dist_ctx.world_size,
                "early_stopping": dict(best),
            } | lora_state
            path = write_checkpoint(ckpt_root, step, raw.config, weights, opt_state, state, rng=rngs)
        barrier(dist_ctx)  # no rank runs ahead of a checkpoint that may still fail
        recorded_best[0] = best["best_step"]
        if main and recorded_best[0] is not None:  # older bests are now out of any resume's reach
            prune_checkpoints(work_dir / BEST_DIR, recorded_best)
        return path

    def save_best(step: int, val: float) -> None:
        """Keep the weights of the best val loss so far (one checkpoint, no optimizer state)."""
        weights, _ = capture(model, None)
        if main:
            write_checkpoint(work_dir / BEST_DIR, step, raw.config, weights, None,
                             {"tokenizer_fingerprint": tokenizer_fingerprint, "val_loss": val,
                              "train": cfg.model_dump(mode="json")} | lora_state, keep=1,
                             keep_steps=recorded_best)  # a resume from the newest checkpoint returns to it
        barrier(dist_ctx)

    def finish(steps: int, val: float | None) -> TrainSummary:
        forward = last_ckpt
        if cfg.early_stopping_patience is not None and best["best_step"] is not None:
            forward = step_dir(work_dir / BEST_DIR, best["best_step"])
            val = best["best_val_loss"]  # the validation loss of the model that goes forward, not of the last step
        assert forward is not None
        return _summary(cfg, rows, steps, val, tokens_per_step, train_seconds, started, params, flops_per_token,
                        device, forward, start, best)

    # Per-step values stay on the device until a flush: reading them is a GPU sync.
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad_norm)
    # Since the last log_metrics call; after a resume mid-interval, the interval's earlier steps.
    interval_losses = [r["loss"] for r in rows if r["step"] > start - start % cfg.log_interval]
    last_grad_norm = rows[-1].get("grad_norm", math.nan) if rows else math.nan

    def flush() -> None:
        """Write pending steps to metrics.jsonl (one device sync for all of them)."""
        nonlocal last_grad_norm
        if not pending:
            return
        values = torch.stack([torch.stack([p[2].float(), p[3].float()]) for p in pending]).tolist()  # (n, 2)
        last_grad_norm = values[-1][1]
        new_rows = [{"step": s, "loss": loss, "lr": lr, "grad_norm": norm}
                    for (s, lr, _, _), (loss, norm) in zip(pending, values)]
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new_rows)
        rows.extend(new_rows)
        interval_losses.extend(row["loss"] for row in new_rows)
        pending.clear()

    loader = BatchLoader(train_src, order, T, micro_batch=micro, accum_steps=accum, device=device,
                         start_step=start, rank=dist_ctx.rank, world_size=dist_ctx.world_size, mask=train_mask)
    model.train()
    train_seconds = 0.0  # time in steps only, for tokens/s
    interval_seconds, interval_tokens = 0.0, 0
    val_loss: float | None = None
    bar = tqdm(total=cfg.max_steps, initial=start, desc=section, unit="step", file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True, disable=dist_ctx.active)  # torchrun workers print plain lines instead
    try:
        for step in range(start, cfg.max_steps if not best["stopped"] else start):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            loss, grad_norm = _step(model, optimizer, lr, loader, accum, max_norm, autocast, dist_ctx, doc_sep,
                                    per_token=train_mask is not None)
            # The one sync per optimizer step (never per micro step): the update must be
            # skipped, not undone, when the loss or gradients are not finite.
            if not torch.isfinite(loss + grad_norm).item():
                flush()
                raise TrainingDivergedError(
                    f"step {step + 1}: loss {loss.item()} / gradient norm {grad_norm.item()} is not finite at "
                    f"learning rate {lr:g}; the update was skipped and training stopped. The last good checkpoint "
                    f"is {latest_checkpoint(ckpt_root)}. Lower {section}.learning_rate={cfg.learning_rate:g} "
                    f"or set {section}.grad_clip (now {cfg.grad_clip:g})."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            pending.append((done, lr, loss, grad_norm))
            bar.update(1)
            dt = time.perf_counter() - t0
            train_seconds += dt
            interval_seconds += dt
            interval_tokens += tokens_per_step

            is_last = done == cfg.max_steps
            is_log = done % cfg.log_interval == 0 or is_last
            is_ckpt = done % cfg.checkpoint_interval == 0 or is_last or done == stop_after
            logged: dict[str, float] = {}
            if is_log or is_ckpt:
                flush()  # metrics.jsonl must reach `done` before a checkpoint of `done` exists
            if is_log:
                tok_s = interval_tokens / max(interval_seconds, 1e-9)
                logged |= {
                    "train/loss": sum(interval_losses) / len(interval_losses),
                    "train/lr": lr,
                    "train/grad_norm": last_grad_norm,
                    "train/tokens_per_sec": tok_s,
                }
                if peak is not None:
                    logged["train/mfu"] = flops_per_token * tok_s / (peak * dist_ctx.world_size)
                bar.set_postfix(loss=f"{logged['train/loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if dist_ctx.active and main:
                    print(f"{section} step {done}/{cfg.max_steps} loss {logged['train/loss']:.4f} "
                          f"tokens/s {tok_s:,.0f}", flush=True)
                interval_losses.clear()
                interval_seconds, interval_tokens = 0.0, 0
            if done % cfg.eval_interval == 0 or is_last:
                val_loss = evaluate_loss(model, val_src, val_offsets, micro, T, device, autocast, val_mask, doc_sep)
                logged["val/loss"] = val_loss
                if cfg.early_stopping_patience is not None:
                    if best["best_val_loss"] is None or val_loss < best["best_val_loss"] - cfg.early_stopping_min_delta:
                        best.update(best_val_loss=val_loss, best_step=done)
                        save_best(done, val_loss)
                    elif (done - best["best_step"]) // cfg.eval_interval >= cfg.early_stopping_patience:
                        best["stopped"] = True
                        is_ckpt = True  # the stop is final: a resume must not train on
                        logged["train/stopped_early"] = 1.0
            if is_ckpt:  # before the callbacks: a failing tracker must not cost the checkpoint
                last_ckpt = save(done)
            if main and logged and log_metrics is not None:
                log_metrics(logged, done)
            if main and is_log and on_progress is not None:
                on_progress(done, cfg.max_steps)
            if best["stopped"]:
                return finish(done, val_loss)
            if done == stop_after and not is_last:
                return finish(done, None)
    finally:
        loader.close()
        bar.close()

    if last_ckpt is None:  # cannot happen: the last step always checkpoints
        raise RuntimeError("training finished without a checkpoint")
    if val_loss is None:  # resumed from the final checkpoint: nothing left to train
        val_loss = evaluate_loss(model, val_src, val_offsets, micro, T, device, autocast, val_mask, doc_sep)
    return finish(start if best["stopped"] else cfg.max_steps, val_loss)


def _summary(cfg: TrainConfig, rows: list[dict[str, Any]], steps: int, val_loss: float | None,
             tokens_per_step: int, train_seconds: float, started: float, params: int,
             flops_per_token: int, device: torch.device, ckpt: Path, start: int,
             best: dict[str, Any]) -> TrainSummary:
    tail = [r["loss"] for r in rows[-cfg.log_interval :]] or [math.nan]  # nan: metrics.jsonl was removed
    return TrainSummary(
        steps=steps,
        final_train_loss=sum(tail) / len(tail),
        final_val_loss=val_loss,
        tokens_seen=steps * tokens_per_step,
        tokens_per_sec=(steps - start) * tokens_per_step / train_seconds if train_seconds > 0 else 0.0,
        seconds=time.perf_counter() - started,
        params=params,
        flops_per_token=flops_per_token,
        device=str(device),
        checkpoint=ckpt,
        resumed_from=start,
        best_step=best["best_step"],
        best_val_loss=best["best_val_loss"],
        stopped_early=best["stopped"],
    )


def summary_json(summary: TrainSummary) -> dict[str, Any]:
    """A TrainSummary as JSON values (what a torchrun worker hands back to the launcher)."""
    return asdict(summary) | {"checkpoint": str(summary.checkpoint)}
