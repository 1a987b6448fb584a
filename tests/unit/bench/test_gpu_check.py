"""bench/gpu_check.py where no GPU is: presets, recipes, MFU arithmetic, the no-CUDA exit, the parts' plumbing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from bench import gpu_check
from bench.gpu_check import EXIT_NO_CUDA, EXIT_PRESET, NO_CUDA, Recipe, main, recipes, run_part
from bench.gpu_parts import attention_ops
from lmpipe.config.loading import load_config
from lmpipe.model.device import autocast_for
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.training.device import mfu, peak_flops_of
from tests.conftest import REPO


def test_without_cuda_it_checks_the_presets_then_exits_3(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == EXIT_NO_CUDA
    out, err = capsys.readouterr()
    assert err == (f"gpu-check: no CUDA device: torch {torch.__version__} (CUDA "
                   f"{torch.version.cuda or 'none: a CPU-only build'}) sees none (torch.cuda.is_available() is "
                   f"False), so nothing was measured; the presets are valid (gpu-smoke.yaml, gpt2-124m.yaml)\n")
    assert NO_CUDA.startswith("gpu-check: no CUDA device: ")
    [line] = out.splitlines()
    figure = json.loads(line)
    assert figure["figure"] == "presets" and figure["ok"] is True
    assert figure["gpu-smoke"] == {"name": "gpu-smoke", "model": "6x384, 6 heads, context 512", "vocab": 8192,
                                   "batch_tokens": 65536, "batch_size": "auto", "max_steps": 100, "compile": None,
                                   "precision": "auto"}
    assert figure["gpt2-124m"]["model"] == "12x768, 12 heads, context 1024"
    assert figure["gpt2-124m"]["batch_tokens"] == 524288 and figure["recipes"] == [r.label for r in recipes()]


@pytest.mark.parametrize(("yaml", "message"), [
    ("pretrain:\n  max_steps: 0\n", "gpu-check: invalid preset: invalid configuration ({path}):\n"
                                    "  pretrain.max_steps: Input should be greater than or equal to 1 (got 0)\n"),
    ("finetune:\n  device: cpu\n", "gpu-check: invalid preset: {path}: finetune.device='cpu': the GPU check "
                                   "trains on CUDA\n"),
])
def test_an_invalid_preset_exits_2_naming_the_field(tmp_path: Path, capsys, yaml: str, message: str) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml, encoding="utf-8")
    assert main(["--gpt2-config", str(path)]) == EXIT_PRESET
    out, err = capsys.readouterr()
    assert out == "" and err == message.format(path=path)


def test_recipes_are_every_arch_and_optimizer_the_config_offers() -> None:
    class Model(BaseModel):
        arch: Literal["gpt2", "qwen3"] = "qwen3"

    class Muon(BaseModel):
        name: Literal["adamw", "muon"] = "adamw"

    class Train(BaseModel):
        optimizer: Muon = Muon()

    assert recipes(Model, Train) == [
        Recipe(("model.arch=qwen3", "pretrain.optimizer.name=adamw"), "arch=qwen3,optimizer.name=adamw"),
        Recipe(("model.arch=qwen3", "pretrain.optimizer.name=muon"), "arch=qwen3,optimizer.name=muon"),
        Recipe(("model.arch=gpt2", "pretrain.optimizer.name=adamw"), "arch=gpt2,optimizer.name=adamw"),
        Recipe(("model.arch=gpt2", "pretrain.optimizer.name=muon"), "arch=gpt2,optimizer.name=muon"),
    ]  # the defaults first

    class Plain(BaseModel):
        lr: float = 1.0

    assert recipes(Plain, Plain) == [Recipe((), "arch=gpt2,optimizer=adamw")]  # before the settings existed
    # Today's: each arch is a section class of its own (one arch value each), so they come from MODEL_ARCHS;
    # the default recipe first. Each is a valid gpt2-124m config.
    assert [r.label for r in recipes()] == ["arch=qwen3,optimizer=muon", "arch=qwen3,optimizer=adamw",
                                            "arch=gpt2,optimizer=muon", "arch=gpt2,optimizer=adamw"]
    for recipe in recipes():
        load_config(REPO / "configs" / "gpt2-124m.yaml", list(recipe.overrides))


def test_mfu_of_gpt2_124m_against_each_gpus_peak() -> None:
    config = load_config(REPO / "configs" / "gpt2-124m.yaml")
    with torch.device("meta"):
        model = GPT(GPTConfig.from_config(config.model, config.tokenizer.vocab_size))
    # 6N (N: every parameter but the position embeddings) + 12*L*H*Q*T
    assert model.num_params() == 123_689_472
    assert model.flops_per_token() == 6 * 123_689_472 + 12 * 12 * 12 * 64 * 1024 == 855_383_040
    assert mfu(855_383_040, 500_000, 989e12) == pytest.approx(0.43244845, rel=1e-7)
    assert mfu(855_383_040, 1_000_000, 989e12, devices=2) == pytest.approx(0.43244845, rel=1e-7)
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA L4": None}
    assert {n: peak_flops_of(n) for n in names} == names


def test_attention_ops_names_the_kernel_the_forward_took() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (2, 16))
    assert attention_ops(model, x, autocast_for(torch.device("cpu"))) == ["flash_cpu"]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert attention_ops(model, x, autocast_for(torch.device("cpu"))) == ["math"]
    assert all(p.grad is None for p in model.parameters())


def _args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    args = gpu_check.parse_args(["--workdir", str(tmp_path)])
    return argparse.Namespace(**(vars(args) | kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the paths part passes where CUDA is")
def test_a_part_that_fails_is_a_figure_with_its_error(tmp_path: Path) -> None:
    # On this machine the paths part fails (no CUDA); its error comes back as a figure, its output in the log.
    [figure] = run_part(_args(tmp_path), "paths", ["--device", "cuda:0"], "paths", 120)
    assert figure["figure"] == "paths" and figure["ok"] is False
    assert figure["error"].startswith(("AssertionError: ", "AttributeError: ", "RuntimeError: "))
    assert "Traceback" in (tmp_path / "paths.log").read_text(encoding="utf-8")


def test_a_part_that_runs_too_long_is_ended(tmp_path: Path) -> None:
    [figure] = run_part(_args(tmp_path), "smoke", [], "smoke", 1)
    assert figure == {"figure": "smoke", "ok": False, "error": "timed out after 1 s",
                      "log": str(tmp_path / "smoke.log")}


def test_the_gpt2_part_measures_in_train(tmp_path: Path) -> None:
    figures = run_part(_args(tmp_path, gpt2_config=REPO / "configs" / "tiny.yaml"), "gpt2",
                       ["--device", "cpu", "--label", "arch=gpt2,optimizer=adamw", "--compile", "off"], "gpt2-run",
                       300)
    [figure] = figures
    assert figure["ok"] is True and figure["figure"] == "gpt2" and figure["recipe"] == "arch=gpt2,optimizer=adamw"
    assert (figure["device"], figure["compile"], figure["mfu"], figure["peak_gib"]) == ("cpu", False, None, None)
    assert (figure["tokens_per_step"], figure["micro_batch"], figure["grad_accum_steps"], figure["steps"]) == (
        256, 8, 1, "4..8")
    assert figure["tokens_per_sec"] > 0 and figure["flops_per_token"] == 275_712
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-run.log"]  # the checkpoints are gone
