"""Benchmark: the training loop against a bare one on the same model and batches, in one process.

    python -m bench.train [--config configs/demo.yaml] [--steps 20] [--warmup 5] [--compile auto|on|off|both]
                          [--repeats 3] [override ...]

Overrides are dotted like the CLI's (``pretrain.batch_size=8``). Both loops train
the preset's model (its ``tokenizer.vocab_size``, so the compute is the real
model's) on the bytes of ``data/*.txt`` as token ids (all < 256), on one device:

* ``full``: ``lmpipe.training.loop.train()`` with the preset's pretrain settings, stopped
  after ``warmup + steps + 1`` optimizer steps. The timed window runs from the
  progress callback of step ``warmup`` to that of step ``warmup + steps`` (each
  read after a device sync), so it holds steps ``warmup+1 .. warmup+steps`` with
  everything the loop does around them: the loader thread, a metric flush every
  ``log_interval`` steps (the preset's, lowered to a divisor of warm-up and steps
  so the callbacks fall on the window's ends), the non-finite check of every step
  and at least one checkpoint (the preset's interval if one of its checkpoints
  falls in the window, else one at the window's last step: more often than a real
  run, so the ratio is a lower bound). The final step, evaluation and checkpoint
  come after the window.
* ``bare``: the same model (same seed), optimizer, learning rates, autocast and
  compile choice, micro-batch and accumulation, on the same micro-batches built in
  device memory before timing; only forward, backward, clipping, the optimizer
  step and zero_grad. Warm-up steps untimed, one device sync at the window's end.

The two take turns ``--repeats`` times; each row gives the medians. ratio = bare
time / full time: 1 means the loop costs nothing beyond the math (the aim is >= 0.95).
loss diff = |full - bare| of the mean training loss over the window's last log
interval: 0 on CPU, where both compute bit for bit the same steps. On CUDA the
table adds the GPU's name and the most memory the full loop allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmpipe.config.loading import load_config
from lmpipe.config.training import ModelConfig, TrainConfig
from lmpipe.data.shards import ArraySource, TokenSource
from lmpipe.model.device import autocast_for, resolve_device
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.training.data import TrainData
from lmpipe.training.device import find_micro_batch, peak_flops
from lmpipe.training.loader import WindowOrder, sequence_range
from lmpipe.training.loop import train
from lmpipe.training.optimizer import LR_SCALE, build_optimizer
from lmpipe.training.schedule import lr_at
from lmpipe.training.validation import get_batch

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["preset", "device", "compile", "micro x accum", "tokens/step", "full ms/step", "bare ms/step",
           "full tokens/s", "bare tokens/s", "MFU", "ratio", "loss diff"]
CUDA_COLUMNS = ["peak GiB"]

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # inputs and targets, int64 (micro, T) on the device


@dataclass
class Measurement:
    seconds: float  # the timed window
    loss: float  # mean training loss of the window's last log interval
    startup: float = 0.0  # full loop: from calling train() to the window's start (set-up, compile, warm-up steps)


@dataclass
class Schedule:
    """Steps and intervals both loops share; the window is steps warmup+1 .. warmup+steps (1-based)."""

    warmup: int
    steps: int
    log_interval: int
    checkpoint_interval: int

    @property
    def max_steps(self) -> int:
        return self.warmup + self.steps + 1  # the last step's evaluation and checkpoint fall after the window

    @property
    def flushes(self) -> int:
        return self.steps // self.log_interval

    @property
    def checkpoints(self) -> int:
        c, w = self.checkpoint_interval, self.warmup
        return (w + self.steps) // c - w // c


@dataclass
class Row:
    preset: str
    device: str
    compile: bool
    micro: int
    accum: int
    tokens_per_step: int
    full: list[Measurement]
    bare: list[Measurement]
    flops_per_token: int
    peak: float | None  # FLOP/s of the device, None when unknown
    peak_bytes: int | None  # CUDA: the most the full runs allocated beyond the pre-built batches

    def seconds(self, runs: list[Measurement]) -> float:
        return statistics.median(m.seconds for m in runs)

    def cells(self, steps: int) -> list[str]:
        full_s, bare_s = self.seconds(self.full), self.seconds(self.bare)
        full_tok_s = self.tokens_per_step * steps / full_s
        mfu = "-" if self.peak is None else f"{self.flops_per_token * full_tok_s / self.peak:.1%}"
        loss_diff = max(abs(f.loss - b.loss) for f, b in zip(self.full, self.bare))
        cells = [self.preset, self.device, "on" if self.compile else "off", f"{self.micro} x {self.accum}",
                 f"{self.tokens_per_step:,}", f"{1e3 * full_s / steps:.1f}", f"{1e3 * bare_s / steps:.1f}",
                 f"{full_tok_s:,.0f}", f"{self.tokens_per_step * steps / bare_s:,.0f}", mfu,
                 f"{bare_s / full_s:.3f}", f"{loss_diff:.2g}"]
        if self.peak_bytes is not None:
            cells.append(f"{self.peak_bytes / 2**30:.2f}")
        return cells


def corpus_tokens(data: Path = REPO / "data") -> np.ndarray:
    """The bytes of every data/*.txt file, concatenated, as int64 token ids (< 256)."""
    raw = b"".join(p.read_bytes() for p in sorted(data.glob("*.txt")))
    if not raw:
        raise FileNotFoundError(f"no text in {data}/*.txt")
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)


def make_schedule(cfg: TrainConfig, warmup: int, steps: int) -> Schedule:
    """The preset's log interval, lowered to divide warmup and steps; a checkpoint inside the window."""
    common = math.gcd(warmup, steps)
    log_interval = max(d for d in range(1, min(common, cfg.log_interval) + 1) if common % d == 0)
    c = cfg.checkpoint_interval
    checkpoint_interval = c if (warmup + steps) // c > warmup // c else warmup + steps
    return Schedule(warmup, steps, log_interval, checkpoint_interval)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release(device: torch.device) -> None:
    """Free the last run's memory (and its compiled graphs) before the next run starts."""
    gc.collect()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def full_run(model_cfg: ModelConfig, cfg: TrainConfig, vocab_size: int, train_src: TokenSource,
             val_src: TokenSource, work_dir: Path, sched: Schedule, device: torch.device) -> Measurement:
    """train() as the pipeline runs it, timed between its progress callbacks at the window's ends."""
    first, last = sched.warmup, sched.warmup + sched.steps
    marks: dict[int, float] = {}
    window_loss: list[float] = []

    def on_progress(done: int, _total: int) -> None:
        if done in (first, last):
            sync(device)
            marks[done] = time.perf_counter()

    def log_metrics(logged: dict[str, float], done: int) -> None:
        if done == last:
            window_loss.append(logged["train/loss"])

    started = time.perf_counter()
    train(model_cfg, cfg, vocab_size, TrainData(train_src, val_src), work_dir, tokenizer_fingerprint="bench",
          log_metrics=log_metrics, on_progress=on_progress)
    return Measurement(marks[last] - marks[first], window_loss[0], marks[first] - started)


def prebuilt_batches(src: ArraySource, order: WindowOrder, block_size: int, micro: int, accum: int,
                     n_steps: int, device: torch.device) -> list[list[MicroBatch]]:
    """Each step's micro-batches, in device memory: the very windows train()'s loader hands out."""
    def batch(step: int, m: int) -> MicroBatch:
        first = sequence_range(step, m, micro_batch=micro, accum_steps=accum, rank=0, world_size=1)
        return get_batch(src, order.starts(first, micro), block_size, device)

    return [[batch(s, m) for m in range(accum)] for s in range(n_steps)]


def bare_run(model_cfg: ModelConfig, cfg: TrainConfig, vocab_size: int, batches: list[list[MicroBatch]],
             sched: Schedule, device: torch.device) -> Measurement:
    """The training math alone: forward, backward, clip, step, zero_grad; one sync at the window's end."""
    torch.manual_seed(cfg.seed)  # train()'s initial weights
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train() sets it
    autocast = autocast_for(device, cfg.precision)
    model = GPT(GPTConfig.from_config(model_cfg, vocab_size)).to(device)
    if cfg.compile:
        model.compile()
    optimizer = build_optimizer(model, cfg, device.type)
    torch.manual_seed(cfg.seed)  # train()'s dropout masks
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    accum = len(batches[0])
    losses: list[torch.Tensor] = []  # per step, left on the device until the window is over
    model.train()
    started = 0.0
    for step, micro_batches in enumerate(batches):
        if step == sched.warmup:
            sync(device)
            started = time.perf_counter()
        lr = lr_at(step, max_lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get(LR_SCALE, 1.0)
        loss_sum: torch.Tensor | None = None
        for x, y in micro_batches:
            with autocast:
                _, loss = model(x, y)
            loss = loss / accum
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert loss_sum is not None
        losses.append(loss_sum)
    sync(device)
    seconds = time.perf_counter() - started
    tail = torch.stack(losses[-sched.log_interval :]).tolist()  # summed as train() sums its interval
    return Measurement(seconds, sum(tail) / len(tail))


@contextlib.contextmanager
def compile_caches_in(root: Path) -> Iterator[None]:
    """Point torch.compile's on-disk caches (inductor, Triton) into root unless the caller chose a place."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    unset = [n for n in names if n not in os.environ]
    for n in unset:
        os.environ[n] = str(root / n.lower())
    try:
        yield
    finally:
        for n in unset:
            os.environ.pop(n, None)


def format_table(header: list[str], rows: list[list[str]], left: int = 3) -> str:
    """Columns as wide as their longest cell: names (the first ``left`` columns) left-aligned, figures
    right-aligned for comparing."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join(" ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="preset (default demo)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the window (default 5)")
    parser.add_argument("--compile", choices=["auto", "on", "off", "both"], default="auto",
                        help="torch.compile; auto: the preset's pretrain.compile, else on for CUDA only")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, taking turns (default 3)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. pretrain.batch_size=8")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    model_cfg, vocab_size = config.model, config.tokenizer.vocab_size
    preset = config.pretrain
    device = resolve_device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pretrain.device=cuda but CUDA is not available here: add pretrain.device=cpu")
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    T = model_cfg.block_size
    sched = make_schedule(preset, args.warmup, args.steps)
    compiles = {"on": [True], "off": [False], "both": [True, False],
                "auto": [preset.compile if preset.compile is not None else device.type == "cuda"]}[args.compile]
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    load_before = os.getloadavg()[0]

    # One process does the whole global batch: per_rank = sequences_per_step; the micro-batch is found once,
    # so both loops (and every repeat) split it alike.
    single = preset.model_copy(update={"distributed": preset.distributed.model_copy(update={"nproc_per_node": 1})})
    sequences = single.sequences_per_step(T)
    torch.manual_seed(preset.seed)
    probe = GPT(GPTConfig.from_config(model_cfg, vocab_size)).to(device)
    flops_per_token, params = probe.flops_per_token(), probe.num_params(non_embedding=False)
    micro = (find_micro_batch(probe, sequences, device, autocast_for(device, preset.precision))
             if preset.batch_size == "auto" else preset.batch_size)
    del probe
    accum = sequences // micro
    tokens_per_step = micro * accum * T

    text = corpus_tokens()
    need = sched.max_steps * tokens_per_step + 1  # no step wraps around into a second epoch
    train_tokens = np.tile(text, -(-need // len(text))) if len(text) < need else text
    train_src, val_src = ArraySource(train_tokens), ArraySource(text)
    order = WindowOrder(train_src.num_tokens, T, preset.seed)
    batches = prebuilt_batches(train_src, order, T, micro, accum, sched.max_steps - 1, device)
    peak = preset.peak_flops or peak_flops(device)

    rows = []
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-train-") as tmp_str, compile_caches_in(Path(tmp_str)):
        for compile_on in compiles:
            cfg = single.model_copy(update={
                "max_steps": sched.max_steps, "batch_size": micro, "compile": compile_on,
                "log_interval": sched.log_interval, "checkpoint_interval": sched.checkpoint_interval,
                "eval_interval": sched.max_steps, "eval_batches": 1,
            })
            row = Row(config.name, device_name, compile_on, micro, accum, tokens_per_step, [], [],
                      flops_per_token, peak, 0 if device.type == "cuda" else None)
            for attempt in range(args.repeats):
                release(device)
                resident = torch.cuda.memory_allocated(device) if row.peak_bytes is not None else 0  # the batches
                work_dir = Path(tmp_str) / f"{'on' if compile_on else 'off'}-{attempt}"
                row.full.append(full_run(model_cfg, cfg, vocab_size, train_src, val_src, work_dir, sched, device))
                if row.peak_bytes is not None:
                    row.peak_bytes = max(row.peak_bytes, torch.cuda.max_memory_allocated(device) - resident)
                release(device)
                row.bare.append(bare_run(model_cfg, cfg, vocab_size, batches, sched, device))
            rows.append(row)
    del batches
    release(device)

    s = sched
    print(f"preset {config.name}: GPT {model_cfg.n_layer} layers x {model_cfg.n_embd} wide, {model_cfg.n_head} heads, "
          f"context {T}, vocab {vocab_size}, {params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
          f"data: {len(text) / 1e6:.2f}M bytes of data/*.txt as tokens")
    print(f"window: steps {s.warmup + 1}..{s.warmup + s.steps} of {s.max_steps} ({s.warmup} warm-up steps before, "
          f"the last step, evaluation and checkpoint after); median of {args.repeats} runs of each loop, taking turns")
    print(f"full window: loader thread, {s.flushes} metric flushes (log_interval {s.log_interval}, preset "
          f"{preset.log_interval}), {s.checkpoints} checkpoint(s) (checkpoint_interval {s.checkpoint_interval}, "
          f"preset {preset.checkpoint_interval}); bare: micro-batches pre-built in device memory, no loader, "
          f"no logging, no checkpoint")
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    header = COLUMNS + (CUDA_COLUMNS if device.type == "cuda" else [])
    print(format_table(header, [r.cells(s.steps) for r in rows]))
    print("ratio = bare time / full time (1: no overhead; aim >= 0.95); MFU of the full loop"
          + ("" if peak is not None else " needs pretrain.peak_flops on this device")
          + "; loss diff: mean loss of the last log interval, full vs bare"
          + ("; peak GiB: CUDA memory the full loop allocated at most" if device.type == "cuda" else ""))
    return rows


if __name__ == "__main__":
    main()
