"""bench/recipe.py: the recipes it builds, the time-to-target arithmetic, and a tiny run end to end."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from bench.recipe import Curve, Recipe, builtin_recipes, main, parse_args, parse_recipe, report
from tests.conftest import REPO


def test_recipes_are_every_combination_of_the_axes_baseline_first() -> None:
    built_in = builtin_recipes()  # architecture x optimizer x precision
    assert [r.name for r in built_in] == [f"{a}+{o}+{p}" for a in ("gpt2", "qwen3") for o in ("adamw", "muon")
                                          for p in ("fp32", "bf16")]
    # nanoGPT's recipe, the baseline, and the demo's default in bf16: each whatever the preset's defaults
    assert built_in[0] == Recipe("gpt2+adamw+fp32", ("model.arch=gpt2", "pretrain.optimizer=adamw",
                                                     "pretrain.learning_rate=0.002", "pretrain.precision=fp32"))
    assert built_in[-1] == Recipe("qwen3+muon+bf16", ("model.arch=qwen3", "pretrain.optimizer=muon",
                                                      "pretrain.learning_rate=0.006", "pretrain.precision=bf16"))
    axes = {"arch": {"gpt2": [], "qwen3": ["model.arch=qwen3"]},
            "optimizer": {"adamw": [], "muon": ["pretrain.optimizer=muon"]}}
    assert builtin_recipes(axes) == [
        Recipe("gpt2+adamw", ()), Recipe("gpt2+muon", ("pretrain.optimizer=muon",)),
        Recipe("qwen3+adamw", ("model.arch=qwen3",)),
        Recipe("qwen3+muon", ("model.arch=qwen3", "pretrain.optimizer=muon"))]


def test_a_recipe_of_ones_own_and_the_choice_of_built_in_ones() -> None:
    assert parse_recipe("lr1=pretrain.optimizer=muon pretrain.muon.lr=0.01") == Recipe(
        "lr1", ("pretrain.optimizer=muon", "pretrain.muon.lr=0.01"))
    with pytest.raises(ValueError, match="expected NAME=OVERRIDE"):
        parse_recipe("pretrain.optimizer")
    args = parse_args(["--recipes", "gpt2+muon+fp32", "--recipe", "x=pretrain.muon.lr=0.05"])
    assert [r.name for r in args.run] == ["gpt2+adamw+fp32", "gpt2+muon+fp32", "x"]  # the baseline runs first
    with pytest.raises(SystemExit):
        parse_args(["--recipes", "sgd"])
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "gpt2+adamw+fp32=pretrain.optimizer=muon"])  # a name taken by a built-in recipe


def test_the_target_is_reached_between_validations_linearly() -> None:
    c = Curve(Recipe("r", ()), val={10: 5.0, 20: 4.0, 30: 3.5}, seconds={10: 1.0, 20: 3.0, 30: 4.0},
              tokens_per_step=100)
    assert c.reach(4.5) == (15.0, 2.0)  # halfway from step 10 (5.0) to step 20 (4.0)
    assert c.reach(5.5) == (10.0, 1.0)  # already at the first validation
    assert c.reach(3.5) == (30.0, 4.0)
    assert c.reach(3.4) is None
    assert c.tokens_per_sec == 30 * 100 / 4.0


def test_a_recipe_with_its_own_shorter_schedule_is_compared_at_its_last_step() -> None:
    base = Curve(Recipe("base", ()), val={2: 6.0, 4: 5.0, 6: 4.0}, seconds={2: 2.0, 4: 4.0, 6: 6.0},
                 tokens_per_step=10)
    short = Curve(Recipe("short", ("pretrain.max_steps=4",)), val={2: 5.5, 4: 3.0}, seconds={2: 1.0, 4: 2.0},
                  tokens_per_step=10)
    header, rows = report([base, short], bytes_per_token=1 / math.log(2))  # bits per byte = the loss
    assert header[:6] == ["recipe", "tokens/s", "val@2", "val@4", "val@6", "bits/byte@6"]
    assert rows[1] == ["short", "20", "5.5000", "3.0000", "-", "3.0000 (4 steps)", "3", "1.6", "0.27x"]  # 4.0 at step 3.2


def test_bench_recipe_tiny(tmp_path: Path, monkeypatch, capsys) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.chdir(REPO)  # the preset's corpus paths are relative to the repository
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    curves = main(["--config", str(REPO / "configs" / "tiny.yaml"), "--steps", "6", "--eval-interval", "3", "--recipes", "gpt2+muon+fp32",
                   "--recipe", "muon-lr0.05=pretrain.optimizer=muon pretrain.muon.lr=0.05", "pretrain.device=cpu"])

    assert [c.recipe.name for c in curves] == ["gpt2+adamw+fp32", "gpt2+muon+fp32", "muon-lr0.05"]
    assert all(sorted(c.val) == sorted(c.seconds) == [3, 6] for c in curves)
    assert curves[0].val != curves[1].val != curves[2].val  # the optimizers and learning rates differ
    assert curves[0].reach(curves[0].val[6]) == (6.0, curves[0].seconds[6])
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("recipe "))
    assert out[header].split() == ["recipe", "tokens/s", "val@3", "val@6", "bits/byte@6", "step", "to", "target",
                                   "s", "to", "target", "time", "vs", "baseline"]
    rows = [line.split() for line in out[header + 1 : header + 4]]
    assert [r[0] for r in rows] == ["gpt2+adamw+fp32", "gpt2+muon+fp32", "muon-lr0.05"]
    assert rows[0][3] == f"{curves[0].val[6]:.4f}" and rows[0][5:] == ["6", f"{curves[0].seconds[6]:.1f}", "1.00x"]
    bits = float(rows[1][4])
    assert bits == pytest.approx(curves[1].val[6] / math.log(2) / float(_bytes_per_token(out)), abs=1e-4)
    steps_table = out[out.index("", header) + 1 :]
    assert steps_table[0].split() == ["step", "gpt2+adamw+fp32", "gpt2+muon+fp32", "muon-lr0.05"]
    assert [line.split()[0] for line in steps_table[1:]] == ["3", "6"]
    assert list(tmp.iterdir()) == []  # the data and the runs went into a temporary directory, now gone


def _bytes_per_token(out: list[str]) -> float:
    line = next(line for line in out if "validation split" in line)
    tokens, byte_count = (int(w.replace(",", "")) for w in line.split("validation split ")[1].split()[::2][:2])
    return byte_count / tokens
