"""Training: the one loop (``run_loop``) and the language-model run built on it (``train``).

The loop is nanoGPT's, made exact and fast: AdamW with linear warmup and cosine
decay, gradient accumulation to a global batch, clipping, periodic validation and
checkpoints; bf16 autocast, TF32, flash attention and ``torch.compile`` on CUDA; a
loader thread that prepares the next micro-batches while the current step runs;
one device sync per optimizer step; and DDP or FSDP2 when torchrun starts it
(``lmpipe.training.distributed``). Its parts keep their own state: the optimizer
step (``step.TrainStep``), metric logging (``metrics.MetricLogger``), validation
(``validation.Validator``), checkpoints (``checkpoint.Checkpointer``) and early
stopping (``early_stopping.EarlyStopping``). Pretraining and fine-tuning (continue,
SFT, LoRA) run through ``train``; the sequence classifier puts its own batches,
objective and scoring into the same loop (``lmpipe.training.classifier``).

Exact resume. The data order is a pure function of (seed, epoch)
(``lmpipe.training.loader.WindowOrder``) and the sequences of optimizer step ``s`` are the
``s``-th global batch of that order, so the data position *is* the step number.
A run resumed from the checkpoint of step ``k`` (weights, optimizer moments, every
rank's RNG states) takes the very same steps ``k+1..N`` as a run that never
stopped: on CPU the losses are bitwise equal, across epoch boundaries too, which
``tests/unit/training/test_train.py`` asserts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmpipe.config.pipeline import check_batch
from lmpipe.config.training import ModelConfig, Training
from lmpipe.model.checkpoint import latest_checkpoint
from lmpipe.training.checkpoint import Checkpointer
from lmpipe.training.data import TrainData
from lmpipe.training.device import peak_flops
from lmpipe.training.distributed import DistContext
from lmpipe.training.early_stopping import EarlyStopping
from lmpipe.training.loader import BatchLoader, WindowOrder, data_position
from lmpipe.training.metrics import METRICS_FILE, MetricLogger
from lmpipe.training.schedule import Schedule
from lmpipe.training.setup import Run, prepare
from lmpipe.training.step import TrainingDivergedError, TrainStep
from lmpipe.training.validation import Validator, evaluate_loss, row_values

LogMetrics = Callable[[dict[str, float], int], None]
OnProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Reporters:
    """Where a training stage reports while it runs: its metrics (the stage's MLflow run), its progress
    (done, total) and, under torchrun, its processes' output lines. Nothing by default."""

    metrics: LogMetrics | None = None
    progress: OnProgress | None = None
    lines: Callable[[str], None] = print


SILENT = Reporters()  # a stage called without a tracker or a UI (tests, scripts)
SINGLE = DistContext()


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


# ---------------------------------------------------------------- the loop


@dataclass
class Loop:
    """What the loop drives. Only the main rank calls the callbacks; ``checkpointer`` None keeps no
    checkpoints (the classifier: a run takes seconds)."""

    step: TrainStep
    metrics: MetricLogger
    validator: Validator
    max_steps: int
    label: str  # the progress bar's
    checkpointer: Checkpointer | None = None
    early: EarlyStopping = field(default_factory=EarlyStopping)
    start: int = 0
    stop_after: int | None = None  # checkpoint at this step and return, as if interrupted there
    log_metrics: LogMetrics | None = None
    on_progress: OnProgress | None = None
    main: bool = True
    show_bar: bool = True


def run_loop(loop: Loop) -> tuple[int, float | None]:
    """Steps start..max_steps; returns (steps done, the last val loss: None when stop_after cut it short)."""
    m, early, ckpt = loop.metrics, loop.early, loop.checkpointer
    val_loss: float | None = None
    bar = tqdm(total=loop.max_steps, initial=loop.start, desc=loop.label, unit="step", file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True,
               disable=not loop.show_bar or not sys.stderr.isatty())  # a bar only on a terminal, not in a log file
    try:
        for step in range(loop.start, loop.max_steps if not early.stopped else loop.start):
            t0 = time.perf_counter()
            try:
                loss, grad_norm, lr = loop.step(step)
            except TrainingDivergedError:
                m.flush()
                raise
            done = step + 1
            m.record(done, lr, loss, grad_norm, time.perf_counter() - t0)
            bar.update(1)
            is_last = done == loop.max_steps
            logged: dict[str, float] = {}
            if loop.validator.should_validate(done):
                logged = loop.validator()
                val_loss = logged["val/loss"]
                if loop.validator.in_rows:
                    m.add_to_row(done, row_values(logged))
                if early.update(done, val_loss) and ckpt is not None:
                    ckpt.save_best(done, val_loss)
                if early.stopped:  # the stop is final: a resume must not train on
                    logged["train/stopped_early"] = 1.0
            is_log = done % m.log_interval == 0 or is_last
            is_ckpt = ckpt is not None and ckpt.should_save(done, last=early.stopped)
            if is_log or is_ckpt:
                m.flush(durable=is_ckpt)  # metrics.jsonl reaches `done`, on disk, before a checkpoint of `done` exists
            if is_log:
                logged = m.interval(done, lr, loop.max_steps) | logged
                postfix = {"loss": f"{logged['train/loss']:.3f}"}
                if "train/tokens_per_sec" in logged:
                    postfix["tok_s"] = f"{logged['train/tokens_per_sec']:,.0f}"
                bar.set_postfix(postfix, refresh=False)
            if is_ckpt and ckpt is not None:  # before the callbacks: a failing tracker must not cost the checkpoint
                ckpt.save(done)
            if loop.main and logged and loop.log_metrics is not None:
                loop.log_metrics(logged, done)
            if loop.main and is_log and loop.on_progress is not None:
                loop.on_progress(done, loop.max_steps)
            if early.stopped:
                return done, val_loss
            if done == loop.stop_after and not is_last:
                return done, None
    finally:
        bar.close()
    if val_loss is None:  # resumed from the final checkpoint: nothing left to train
        val_loss = loop.validator()["val/loss"]
    return (loop.start if early.stopped else loop.max_steps), val_loss


# ---------------------------------------------------------------- a language-model run


def train(
    model_cfg: ModelConfig,
    cfg: Training,
    vocab_size: int,
    data: TrainData,
    work_dir: Path,
    *,
    tokenizer_fingerprint: str,
    init_from: Path | None = None,
    log_metrics: LogMetrics | None = None,
    on_progress: OnProgress | None = None,
    stop_after: int | None = None,
    dist_ctx: DistContext = SINGLE,
) -> TrainSummary:
    """Train a GPT on ``data`` (``TrainData``) for cfg.max_steps steps; checkpoints and metrics.jsonl go to work_dir.

    Resumes from the newest valid checkpoint in ``work_dir/checkpoints`` when there
    is one; otherwise starts from ``init_from``'s weights (a fine-tuning start, fresh
    optimizer) or from a seeded random init (``lmpipe.training.setup``).
    ``stop_after=k`` checkpoints at step k and returns, as if interrupted there.
    ``dist_ctx``: this process's place in a torchrun job (``lmpipe.training.distributed``);
    only rank 0 writes files and calls the callbacks.
    """
    started = time.perf_counter()
    section = cfg.SECTION  # for messages
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    T, main = model_cfg.block_size, dist_ctx.is_main
    check_batch(cfg, T, section)
    data = data.checked(T)
    order = WindowOrder(data.train.num_tokens, T, cfg.seed)
    run = prepare(model_cfg, cfg, vocab_size, work_dir, fingerprint=tokenizer_fingerprint, init_from=init_from,
                  dist_ctx=dist_ctx, doc_sep=data.doc_sep)
    sps, micro = run.sequences_per_step, run.micro
    metrics = MetricLogger(work_dir / METRICS_FILE, write=main, log_interval=cfg.log_interval, start=run.start,
                           tokens_per_step=sps * T, flops_per_token=run.raw.flops_per_token(),
                           peak_flops=cfg.peak_flops or peak_flops(run.device), world_size=dist_ctx.world_size,
                           echo=section if dist_ctx.active and main else None)
    about: dict[str, Any] = {"tokenizer_fingerprint": tokenizer_fingerprint, "train": cfg.model_dump(mode="json")}
    checkpointer = Checkpointer(
        work_dir, run.model, run.raw.config, run.optimizer, interval=cfg.checkpoint_interval,
        max_steps=cfg.max_steps, early=run.early, stop_after=stop_after, dist_ctx=dist_ctx, latest=run.last_ckpt,
        state=about | {"train": about["train"] | {"sequences_per_step": sps}, "micro_batch": micro,
                       "grad_accum_steps": run.accum, "world_size": dist_ctx.world_size} | run.lora_state,
        best_state=about | run.lora_state, position=partial(data_position, order, sps))
    val_loss = partial(evaluate_loss, run.model, data.val, data.val_offsets(T, cfg.eval_batches * micro), micro, T,
                       run.device, run.autocast, data.val_mask, data.doc_sep)
    loader = BatchLoader(data.train, order, T, micro_batch=micro, accum_steps=run.accum, device=run.device,
                         start_step=run.start, rank=dist_ctx.rank, world_size=dist_ctx.world_size,
                         mask=data.train_mask)
    step = TrainStep(
        run.model, run.optimizer, Schedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps),
        loader.next, accum=run.accum, grad_clip=cfg.grad_clip, autocast=run.autocast, dist_ctx=dist_ctx,
        per_token=data.masked, forward_kwargs={"doc_sep": data.doc_sep},
        advice=lambda: (f"The last good checkpoint is {latest_checkpoint(checkpointer.root)}. Lower "
                        f"{section}.learning_rate={cfg.learning_rate:g} or set {section}.grad_clip "
                        f"(now {cfg.grad_clip:g})."))
    run.model.train()
    with loader:
        steps, last_val = run_loop(Loop(
            step, metrics, Validator(lambda: {"val/loss": val_loss()}, cfg.eval_interval, cfg.max_steps),
            cfg.max_steps, section, checkpointer=checkpointer, early=run.early, start=run.start,
            stop_after=stop_after, log_metrics=log_metrics, on_progress=on_progress, main=main,
            show_bar=not dist_ctx.active))  # torchrun workers print plain lines instead
    return _summary(run, metrics, checkpointer, steps, last_val, started)


def _summary(run: Run, metrics: MetricLogger, checkpointer: Checkpointer, steps: int, val_loss: float | None,
             started: float) -> TrainSummary:
    early, tokens_per_step = run.early, metrics.tokens_per_step or 0
    if early.enabled and early.best_step is not None:
        val_loss = early.best_val_loss  # the validation loss of the model that goes forward, not of the last step
    return TrainSummary(
        steps=steps,
        final_train_loss=metrics.final_train_loss(),
        final_val_loss=val_loss,
        tokens_seen=steps * tokens_per_step,
        tokens_per_sec=((steps - run.start) * tokens_per_step / metrics.train_seconds
                        if metrics.train_seconds > 0 else 0.0),
        seconds=time.perf_counter() - started,
        params=run.raw.num_params(),
        flops_per_token=run.raw.flops_per_token(),
        device=str(run.device),
        checkpoint=checkpointer.forward(),
        resumed_from=run.start,
        best_step=early.best_step,
        best_val_loss=early.best_val_loss,
        stopped_early=early.stopped,
    )


def summary_json(summary: TrainSummary) -> dict[str, Any]:
    """A TrainSummary as JSON values (what a torchrun worker hands back to the launcher)."""
    return asdict(summary) | {"checkpoint": str(summary.checkpoint)}
