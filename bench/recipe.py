"""Benchmark: time to quality of each training recipe on the preset's pretraining data, side by side, in one run.

    python -m bench.recipe [--config configs/demo.yaml] [--steps 600] [--eval-interval 25] [--eval-batches 8]
                           [--recipes adamw,muon] [--recipe NAME="OVERRIDE ..."] [--shards DIR] [override ...]

A recipe is a set of config overrides. The built-in ones are every combination
of the choices in ``AXES`` (architecture x optimizer x precision); the first choice of every
axis is nanoGPT's recipe (GPT-2 blocks, AdamW, fp32), the baseline. ``--recipe`` adds one of your own (a name,
``=``, its overrides separated by spaces), e.g. for a learning-rate sweep:

    python -m bench.recipe --recipes adamw --recipe "muon-lr0.01=pretrain.optimizer=muon pretrain.muon.lr=0.01"

Each recipe pretrains the preset's model with ``lmpipe.training.loop.train()``
(the pipeline's own loop, one process) on the preset's pretraining corpus, built
here through download, tokenizer, encode_chunk and shard (the clean stage is
skipped: it changes the size by a few percent; ``--shards DIR`` trains on an
existing shard stage's directory instead), with the same seed, batches and
schedule (``--steps``, default the preset's ``pretrain.max_steps``), validating
every ``--eval-interval`` steps on the same windows of the validation split.
Without ``--steps``, a recipe may set its own ``pretrain.max_steps`` (a shorter
schedule is part of a recipe: its learning rate decays over its own steps).

Printed, one row per recipe: tokens/s of the training steps; the validation loss
at a third, two thirds and all of the steps, and its bits per byte at the end
(loss / ln 2 x the split's tokens / its bytes); and the time to quality: the
step and the training seconds (validation and checkpoints excluded) at which
the validation loss first reaches the baseline's final one, interpolated
linearly between validations, and that time over the baseline's. A second table
gives every validation loss. Timings are wall-clock on a shared machine: the
1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.train import compile_caches_in, format_table
from bench.verify import demo_shards
from lmpipe.config.loading import load_config
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.data.shards import TokenSplit, read_manifest
from lmpipe.model.device import resolve_device
from lmpipe.training.data import TrainData
from lmpipe.training.loop import train

REPO = Path(__file__).resolve().parents[1]

# Each axis of a recipe: its choices, by name, with the overrides that select each, whatever the preset's
# defaults; the first choices are nanoGPT's recipe (the demo's before qwen3 + Muon won here), the baseline.
# Another axis (or choice) is one line here. Each optimizer brings the AdamW peak it was measured best with:
# 2e-3 alone, 6e-3 beside Muon (for the embeddings, head and norms only).
AXES: dict[str, dict[str, list[str]]] = {
    "arch": {"gpt2": ["model.arch=gpt2"], "qwen3": ["model.arch=qwen3"]},
    "optimizer": {"adamw": ["pretrain.optimizer=adamw", "pretrain.learning_rate=0.002"],
                  "muon": ["pretrain.optimizer=muon", "pretrain.learning_rate=0.006"]},
    "precision": {"fp32": ["pretrain.precision=fp32"], "bf16": ["pretrain.precision=bf16"]},
}
TARGET_COLUMNS = ["step to target", "s to target", "time vs baseline"]


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...]


def builtin_recipes(axes: dict[str, dict[str, list[str]]] = AXES) -> list[Recipe]:
    """Every combination of the axes' choices, the baseline (every axis's first choice) first."""
    return [Recipe("+".join(name for name, _ in combo), tuple(o for _, overrides in combo for o in overrides))
            for combo in itertools.product(*(choices.items() for choices in axes.values()))]


def parse_recipe(text: str) -> Recipe:
    """``NAME=OVERRIDE OVERRIDE ...`` (the overrides dotted like the CLI's)."""
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip() or not overrides.strip():
        raise ValueError(f"--recipe {text!r}: expected NAME=OVERRIDE [OVERRIDE ...], e.g. "
                         "'muon-lr0.01=pretrain.optimizer=muon pretrain.muon.lr=0.01'")
    return Recipe(name.strip(), tuple(shlex.split(overrides)))


@dataclass
class Curve:
    """One recipe's run: validation losses and cumulative training seconds at each validation step."""

    recipe: Recipe
    val: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # training steps only, from step 1 to this one
    tokens_per_step: int = 0

    @property
    def steps(self) -> int:
        return max(self.val)

    @property
    def tokens_per_sec(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds[self.steps]

    def reach(self, target: float) -> tuple[float, float] | None:
        """(step, seconds) at which the validation loss first reaches ``target``, linear between validations;
        None when it never does."""
        prev_step, prev_loss, prev_s = 0, math.inf, 0.0
        for step in sorted(self.val):
            loss, s = self.val[step], self.seconds[step]
            if loss <= target:
                if math.isinf(prev_loss):
                    return float(step), s
                f = (prev_loss - target) / (prev_loss - loss)
                return prev_step + f * (step - prev_step), prev_s + f * (s - prev_s)
            prev_step, prev_loss, prev_s = step, loss, s
        return None


def run_recipe(config: PipelineConfig, recipe: Recipe, shard_dir: Path, work_dir: Path) -> Curve:
    """Pretrain with the recipe; record each validation's loss and the training seconds up to it."""
    model_cfg, cfg = config.model, config.pretrain
    tokens_per_step = cfg.sequences_per_step(model_cfg.block_size) * model_cfg.block_size
    curve = Curve(recipe, tokens_per_step=tokens_per_step)
    elapsed = 0.0

    def log_metrics(logged: dict[str, float], done: int) -> None:
        nonlocal elapsed
        # The log interval is the validation interval (or the rest of the run): its tokens/s cover its steps only.
        interval = done - max(curve.seconds, default=0)
        elapsed += interval * tokens_per_step / logged["train/tokens_per_sec"]
        curve.seconds[done] = elapsed
        if "val/loss" in logged:
            curve.val[done] = logged["val/loss"]

    manifest = read_manifest(shard_dir)
    train(model_cfg, cfg, config.tokenizer.vocab_size,
          TrainData(TokenSplit(shard_dir, "train"), TokenSplit(shard_dir, "val")), work_dir,
          tokenizer_fingerprint=manifest["tokenizer_fingerprint"], log_metrics=log_metrics)
    return curve


def recipe_config(args: argparse.Namespace, recipe: Recipe) -> PipelineConfig:
    """The preset with the command line's overrides, then the recipe's, then the benchmark's cadence."""
    config = load_config(args.config, [*args.overrides, *recipe.overrides])
    p = config.pretrain
    steps = args.steps or p.max_steps
    p = p.model_copy(update={
        "max_steps": steps, "eval_interval": args.eval_interval, "log_interval": args.eval_interval,
        "eval_batches": args.eval_batches or p.eval_batches, "checkpoint_interval": steps,
        "early_stopping_patience": None, "distributed": p.distributed.model_copy(update={"nproc_per_node": 1}),
    })
    return config.model_copy(update={"pretrain": p})


def report(curves: list[Curve], bytes_per_token: float) -> tuple[list[str], list[list[str]]]:
    """The recipe table: the first curve is the baseline. Validation losses at the validations nearest a third
    and two thirds of the steps and at the last."""
    base = curves[0]
    steps = base.steps
    marks = sorted({_nearest(base, steps / 3), _nearest(base, 2 * steps / 3), steps})
    target = base.val[steps]
    base_reach = base.reach(target)
    assert base_reach is not None  # its own final loss
    header = ["recipe", "tokens/s", *(f"val@{s}" for s in marks), f"bits/byte@{steps}", *TARGET_COLUMNS]
    rows = []
    for c in curves:
        reached = c.reach(target)
        bpb = c.val[c.steps] / math.log(2) / bytes_per_token
        vals = [f"{c.val[s]:.4f}" if s in c.val else "-" for s in marks]  # "-": past a shorter schedule's end
        rows.append([c.recipe.name, f"{c.tokens_per_sec:,.0f}", *vals,
                     f"{bpb:.4f}" + ("" if c.steps == steps else f" ({c.steps} steps)"),
                     "-" if reached is None else f"{reached[0]:.0f}",
                     "-" if reached is None else f"{reached[1]:.1f}",
                     "-" if reached is None else f"{reached[1] / base_reach[1]:.2f}x"])
    return header, rows


def _nearest(curve: Curve, step: float) -> int:
    return min(curve.val, key=lambda s: (abs(s - step), s))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="preset (default demo)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: pretrain.max_steps)")
    parser.add_argument("--eval-interval", type=int, default=25, help="steps between validations (default 25)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="micro-batches per validation (default: pretrain.eval_batches)")
    parser.add_argument("--recipes", default=None,
                        help="built-in recipes to run, comma-separated (default all: "
                             f"{', '.join(r.name for r in builtin_recipes())}); the baseline always runs")
    parser.add_argument("--recipe", action="append", default=[], type=parse_recipe, metavar="NAME=OVERRIDES",
                        help="another recipe: a name, '=', its overrides separated by spaces (repeatable)")
    parser.add_argument("--shards", type=Path, default=None, help="an existing shard stage directory to train on")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every recipe, e.g. "
                                                     "pretrain.device=cpu")
    args = parser.parse_args(argv)
    for name in ("steps", "eval_interval", "eval_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    builtin = builtin_recipes()
    names = [r.name for r in builtin]
    chosen = names if args.recipes is None else [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; the built-in recipes are {', '.join(names)}")
    args.run = [builtin[0]] + [r for r in builtin[1:] if r.name in chosen] + args.recipe
    taken = [r.name for r in args.run]
    if len(set(taken)) != len(taken):
        parser.error(f"two recipes share a name: {', '.join(taken)}")
    return args


def main(argv: list[str] | None = None) -> list[Curve]:
    args = parse_args(argv)
    configs = [recipe_config(args, r) for r in args.run]  # every recipe's config checked before any training
    for r, c in zip(args.run[1:], configs[1:]):
        if (c.data.pretrain, c.tokenizer) != (configs[0].data.pretrain, configs[0].tokenizer):
            raise SystemExit(f"recipe {r.name} changes data.pretrain or tokenizer: every recipe trains on the "
                             "baseline's data")
    steps = configs[0].pretrain.max_steps
    if args.eval_interval > steps:
        raise SystemExit(f"--eval-interval {args.eval_interval} exceeds the {steps} steps: no validation to compare")
    load_before = os.getloadavg()[0]
    curves = []
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-recipe-") as tmp_str, compile_caches_in(Path(tmp_str)):
        root = Path(tmp_str)
        shard_dir = args.shards if args.shards is not None else demo_shards(configs[0], root / "data")
        val = read_manifest(shard_dir)["splits"]["val"]
        bytes_per_token = val["bytes"] / val["tokens"]
        for i, (recipe, config) in enumerate(zip(args.run, configs)):
            curves.append(run_recipe(config, recipe, shard_dir, root / f"run-{i}"))

    base_cfg = configs[0]
    m, p = base_cfg.model, base_cfg.pretrain
    print(f"preset {base_cfg.name}: GPT {m.n_layer} layers x {m.n_embd} wide, context {m.block_size}, vocab "
          f"{base_cfg.tokenizer.vocab_size}; {steps} steps of {p.sequences_per_step(m.block_size)} sequences, "
          f"lr {p.learning_rate:g} -> {p.min_lr:g} (warmup {p.warmup_steps}); validation every "
          f"{args.eval_interval} steps on {p.eval_batches} micro-batches; device {resolve_device(p.device)}")
    print(f"data: {shard_dir if args.shards is not None else 'the preset pretraining corpus, built here'}; "
          f"validation split {val['tokens']:,} tokens, {val['bytes']:,} bytes")
    for r in args.run:
        print(f"  {r.name}: {' '.join(r.overrides) or '(the preset)'}")
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    header, rows = report(curves, bytes_per_token)
    print(format_table(header, rows, left=1))
    print(f"target: {curves[0].recipe.name}'s validation loss at step {steps}, {curves[0].val[steps]:.4f}; "
          "s to target: training seconds (validation and checkpoints excluded) until a recipe first reaches it")
    print()
    every = sorted({s for c in curves for s in c.val})
    print(format_table(["step"] + [c.recipe.name for c in curves],
                       [[str(s)] + [f"{c.val[s]:.4f}" if s in c.val else "-" for c in curves] for s in every], left=1))
    return curves


if __name__ == "__main__":
    main()
