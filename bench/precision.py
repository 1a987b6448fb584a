"""Benchmark: training speed by precision, torch.compile and thread count, in the pipeline's own loop, one process.

    python -m bench.precision [--config configs/demo.yaml] [--variants fp32,bf16,fp32+compile,bf16+compile]
                              [--threads 2] [--steps 20] [--warmup 5] [--repeats 1] [--shards DIR] [--full]
                              [override ...]

Each variant is ``lmpipe.training.loop.train()`` with the preset's pretrain
settings and its ``precision`` / ``compile`` (overrides are dotted like the CLI's:
``model.n_layer=6``), timed as ``bench.train`` times its full loop: steps
``warmup+1 .. warmup+steps`` between two progress callbacks, with the loader
thread, metric flushes and a checkpoint inside the window. Every variant trains
the same initial weights on the same batches; they take turns ``--repeats``
times (medians). ``start-up s`` is from calling ``train()`` to the window's start:
set-up, compilation and the warm-up steps, what a short run pays on top.

Data: ``--shards DIR``, a pretraining shard stage's directory (``lmpipe data``
builds the demo's under ``.lmpipe/shard/``), its train and val splits; otherwise
the bytes of ``data/*.txt`` as token ids, the last 5% held out for validation.

``--full`` then trains each variant for the preset's ``max_steps`` with its own
intervals (the demo: 600 steps, validation every 100) and reports the final
validation loss against the first variant's: bf16 must stay within 0.02 of fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.train import REPO, Measurement, compile_caches_in, corpus_tokens, format_table, full_run, make_schedule
from bench.train import release as release_device
from lmpipe.config.loading import load_config
from lmpipe.config.training import TrainConfig
from lmpipe.data.shards import ArraySource, TokenSource, TokenSplit
from lmpipe.model.device import cpu_bf16_support, resolve_device
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.training.data import TrainData
from lmpipe.training.loop import train

PRECISIONS = ("auto", "fp32", "bf16")
VAL_SHARE = 0.05  # of data/*.txt held out for validation when no shards are given
COLUMNS = ["threads", "precision", "compile", "ms/step", "tokens/s", "speed-up", "start-up s", "window loss"]
FULL_COLUMNS = ["val loss", "val diff", "full s", "full tokens/s"]


@dataclass(frozen=True)
class Variant:
    precision: str
    compile: bool

    @classmethod
    def parse(cls, text: str) -> Variant:
        """'bf16' or 'bf16+compile' (any precision of ``PRECISIONS``)."""
        precision, plus, rest = text.partition("+")
        if precision not in PRECISIONS or (plus and rest != "compile"):
            raise ValueError(f"variant {text!r}: expected <precision>[+compile], precision one of "
                             f"{', '.join(PRECISIONS)}")
        return cls(precision, bool(plus))

    def __str__(self) -> str:
        return self.precision + ("+compile" if self.compile else "")


@dataclass
class Row:
    threads: int
    variant: Variant
    tokens_per_step: int
    runs: list[Measurement] = field(default_factory=list)
    val_loss: float | None = None  # --full
    full_seconds: float | None = None
    full_tokens_per_sec: float | None = None

    def tokens_per_sec(self, steps: int) -> float:
        return self.tokens_per_step * steps / statistics.median(m.seconds for m in self.runs)

    def cells(self, steps: int, base: Row, base_full: Row | None) -> list[str]:
        cells = [str(self.threads), self.variant.precision, "on" if self.variant.compile else "off",
                 f"{1e3 * statistics.median(m.seconds for m in self.runs) / steps:.1f}",
                 f"{self.tokens_per_sec(steps):,.0f}",
                 f"{self.tokens_per_sec(steps) / base.tokens_per_sec(steps):.2f}x",
                 f"{statistics.median(m.startup for m in self.runs):.1f}",
                 f"{statistics.median(m.loss for m in self.runs):.4f}"]
        if self.val_loss is not None and base_full is not None and base_full.val_loss is not None:
            assert self.full_seconds is not None and self.full_tokens_per_sec is not None
            cells += [f"{self.val_loss:.4f}", f"{self.val_loss - base_full.val_loss:+.4f}", f"{self.full_seconds:.1f}",
                      f"{self.full_tokens_per_sec:,.0f}"]
        elif base_full is not None:
            cells += ["-"] * len(FULL_COLUMNS)
        return cells


def splits(shards: Path | None) -> tuple[TokenSource, TokenSource, int | None, str]:
    """(train, val, the shards' vocabulary size or None, a description)."""
    if shards is not None:
        train_src, val_src = TokenSplit(shards, "train"), TokenSplit(shards, "val")
        return train_src, val_src, train_src.vocab_size, f"shards {shards} ({train_src.num_tokens:,} train tokens)"
    text = corpus_tokens()
    cut = int(len(text) * (1 - VAL_SHARE))
    return (ArraySource(text[:cut]), ArraySource(text[cut:]), None,
            f"bytes of data/*.txt as tokens ({cut:,} train, {len(text) - cut:,} val)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="preset (default demo)")
    parser.add_argument("--variants", default="fp32,bf16,fp32+compile,bf16+compile",
                        help="comma-separated <precision>[+compile]; the first is the baseline of speed-up and "
                             "val diff (default %(default)s)")
    parser.add_argument("--threads", default=None,
                        help=f"comma-separated torch thread counts (default: torch's, {torch.get_num_threads()} here)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the window (default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, taking turns (default 1)")
    parser.add_argument("--shards", type=Path, help="a pretraining shard stage's directory to train on")
    parser.add_argument("--full", action="store_true", help="also train each variant for the preset's max_steps "
                                                            "and compare final validation losses")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.n_layer=6")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        args.variants = [Variant.parse(v) for v in args.variants.split(",")]
        args.threads = ([torch.get_num_threads()] if args.threads is None
                        else [int(t) for t in args.threads.split(",")])
    except ValueError as err:
        parser.error(str(err))
    if min(args.threads) < 1:
        parser.error(f"--threads {args.threads}: each must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    model_cfg, preset = config.model, config.pretrain
    train_src, val_src, shard_vocab, data_text = splits(args.shards)
    vocab_size = shard_vocab or config.tokenizer.vocab_size
    device = resolve_device(preset.device)
    T = model_cfg.block_size
    single: TrainConfig = preset.model_copy(
        update={"distributed": preset.distributed.model_copy(update={"nproc_per_node": 1})})
    if single.batch_size == "auto":
        raise SystemExit("bench.precision needs a fixed pretrain.batch_size (the variants must split alike)")
    sched = make_schedule(single, args.warmup, args.steps)
    tokens_per_step = single.sequences_per_step(T) * T
    probe = GPT(GPTConfig.from_config(model_cfg, vocab_size))
    params, flops = probe.num_params(), probe.flops_per_token()
    del probe
    threads_before, load_before = torch.get_num_threads(), os.getloadavg()[0]

    rows = [Row(t, v, tokens_per_step) for t in args.threads for v in args.variants]
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-precision-") as tmp_str, compile_caches_in(Path(tmp_str)):
        tmp = Path(tmp_str)
        for attempt in range(args.repeats):
            for i, row in enumerate(rows):
                cfg = single.model_copy(update={
                    "max_steps": sched.max_steps, "threads": row.threads, "precision": row.variant.precision,
                    "compile": row.variant.compile, "log_interval": sched.log_interval,
                    "checkpoint_interval": sched.checkpoint_interval, "eval_interval": sched.max_steps,
                    "eval_batches": 1})
                release_device(device)
                row.runs.append(full_run(model_cfg, cfg, vocab_size, train_src, val_src, tmp / f"w{i}-{attempt}",
                                         sched, device))
        if args.full:
            for i, row in enumerate(rows[: len(args.variants)]):  # the first thread count only
                cfg = single.model_copy(update={"threads": row.threads, "precision": row.variant.precision,
                                                "compile": row.variant.compile})
                release_device(device)
                summary = train(model_cfg, cfg, vocab_size, TrainData(train_src, val_src), tmp / f"full{i}",
                                tokenizer_fingerprint="bench")
                row.val_loss, row.full_seconds = summary.final_val_loss, summary.seconds
                row.full_tokens_per_sec = summary.tokens_per_sec
    torch.set_num_threads(threads_before)
    release_device(device)

    cpu = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 matmuls: {cpu_bf16_support()}, "
           f"{os.cpu_count()} logical CPUs" if device.type == "cpu" else torch.cuda.get_device_name(device)
           if device.type == "cuda" else device.type)
    print(f"preset {config.name} on {device.type} ({cpu}); torch {torch.__version__}")
    print(f"GPT {model_cfg.n_layer} layers x {model_cfg.n_embd} wide, {model_cfg.n_head} heads, context {T}, vocab "
          f"{vocab_size}, {params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token; {tokens_per_step:,} tokens "
          f"per step ({single.batch_size} x {single.sequences_per_step(T) // single.batch_size}); data: {data_text}")
    print(f"window: steps {sched.warmup + 1}..{sched.warmup + sched.steps} of train() (loader thread, metric "
          f"flushes, {sched.checkpoints} checkpoint(s)); median of {args.repeats} run(s) per variant, taking turns"
          + (f"; full runs: {preset.max_steps} steps" if args.full else ""))
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    base_full = rows[0] if args.full else None
    table = [r.cells(sched.steps, next(b for b in rows if b.threads == r.threads), base_full) for r in rows]
    print(format_table(COLUMNS + (FULL_COLUMNS if args.full else []), table))
    print(f"speed-up: tokens/s against {args.variants[0]} at the same thread count"
          + (f"; val diff: final validation loss minus {args.variants[0]}'s" if args.full else ""))
    return rows


if __name__ == "__main__":
    main()
