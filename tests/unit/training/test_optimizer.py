"""The optimizer choice: which parameters Muon takes, one schedule for both optimizers, checkpoints and exact
resume with Muon's state, and the settings the config refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.config.base import ConfigError
from lmpipe.config.loading import load_config
from lmpipe.config.training import ContinueFinetuneConfig, LoraConfig, ModelConfig, TrainConfig
from lmpipe.model.checkpoint import CheckpointMismatchError
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.lora import apply_lora
from lmpipe.training.optimizer import LR_SCALE, Optimizers, build_optimizer, hidden_matrices
from lmpipe.training.schedule import Schedule
from lmpipe.training.step import TrainStep
from tests.unit.training.test_train import DROPOUT_MODEL, MODEL, config, losses, metrics_text, run

MUON = {"optimizer": "muon", "muon": {"lr": 0.03, "momentum": 0.9, "nesterov": False, "ns_steps": 4,
                                      "adjust_lr_fn": "original", "weight_decay": 0.05}}
BLOCK = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]


def gpt(model: ModelConfig = MODEL) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_config(model, 256))


def names(model: GPT, params: list[torch.Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = gpt()
    opt = build_optimizer(model, config(**MUON), "cpu")
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and type(adamw) is torch.optim.AdamW
    [hidden] = muon.param_groups
    assert names(model, hidden["params"]) == [f"transformer.h.{i}.{n}" for i in range(2) for n in BLOCK]
    assert [n for n, _ in hidden_matrices(model)] == names(model, hidden["params"])
    assert {k: hidden[k] for k in ("lr", "momentum", "nesterov", "ns_steps", "adjust_lr_fn", "weight_decay")} == {
        "lr": 0.03, "momentum": 0.9, "nesterov": False, "ns_steps": 4, "adjust_lr_fn": "original",
        "weight_decay": 0.05}
    assert hidden[LR_SCALE] == pytest.approx(0.03 / 3e-3)
    decay, no_decay = adamw.param_groups
    # The token embedding is the output head too (tied): it is listed once, under its embedding name.
    assert names(model, decay["params"]) == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names(model, no_decay["params"]) == [
        n for n, p in model.named_parameters() if p.dim() == 1]
    assert len(no_decay["params"]) == 2 * 8 + 2  # per block: 2 norms x (gain, bias), 4 linear biases; ln_f
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["lr"], decay["betas"]) == (0.1, 0.0, 3e-3,
                                                                                            (0.9, 0.95))
    assert LR_SCALE not in decay and not adamw.defaults["fused"]
    # Every trained parameter exactly once.
    assert len(hidden["params"]) + len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_without_biases_the_adamw_side_holds_embeddings_and_norm_gains() -> None:
    model = gpt(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, bias=False))
    opt = build_optimizer(model, config(optimizer="muon"), "cpu")
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.parts
    assert names(model, muon.param_groups[0]["params"]) == [f"transformer.h.0.{n}" for n in BLOCK]
    assert [names(model, g["params"]) for g in adamw.param_groups] == [
        ["transformer.wte.weight", "transformer.wpe.weight"],
        ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight"]]


def test_adamw_is_unchanged_and_muon_the_pretraining_default() -> None:
    model = gpt()
    opt = build_optimizer(model, config(), "cpu")  # the tests' config() pins AdamW, nanoGPT's
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    assert all(LR_SCALE not in g for g in opt.param_groups)
    default = build_optimizer(model, TrainConfig(), "cpu")
    assert type(default) is Optimizers and [type(p) for p in default.parts] == [torch.optim.Muon, torch.optim.AdamW]
    assert [g["lr"] for g in default.param_groups] == [0.02, 6e-3, 6e-3]  # Muon's; AdamW's decayed and not


def test_one_schedule_drives_both_optimizers() -> None:
    model = gpt()
    cfg = config(**MUON)  # learning_rate 3e-3, min_lr 3e-4, warmup 2, 12 steps
    opt = build_optimizer(model, cfg, "cpu")
    schedule = Schedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    step = TrainStep(model, opt, schedule, lambda: (x, x))
    for s in (0, 5, 11):
        _, _, lr = step(s)
        assert lr == schedule.lr(s)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 10, lr, lr])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * schedule.lr(11) / 3e-3)


def test_muon_trains_and_resume_is_exact(tmp_path: Path) -> None:
    cfg = config(grad_accum_steps=2, **MUON)
    full = run(tmp_path / "full", cfg, DROPOUT_MODEL)
    adamw = run(tmp_path / "adamw", config(grad_accum_steps=2), DROPOUT_MODEL)
    assert losses(tmp_path / "full")[0] == losses(tmp_path / "adamw")[0]  # same init and batch; then they part
    assert losses(tmp_path / "full")[1:] != losses(tmp_path / "adamw")[1:]
    assert full.final_val_loss != adamw.final_val_loss

    work = tmp_path / "resumed"
    first = run(work, cfg, DROPOUT_MODEL, stop_after=5)
    assert first.steps == 5
    opt_state = torch.load(work / "checkpoints" / "step-0000005" / "optimizer.pt", weights_only=True)
    hidden = [f"transformer.h.{i}.{n}" for i in range(2) for n in BLOCK]
    assert sorted(k for k, v in opt_state["state"].items() if "momentum_buffer" in v) == sorted(hidden)
    assert all("exp_avg" in v for k, v in opt_state["state"].items() if k not in hidden)
    assert [g["params"] == hidden for g in opt_state["param_groups"]] == [True, False, False]
    last = run(work, cfg, DROPOUT_MODEL)
    assert last.resumed_from == 5
    assert metrics_text(work) == metrics_text(tmp_path / "full")  # bitwise equal losses
    assert last.final_val_loss == full.final_val_loss
    w_full, w_res = load_file(full.checkpoint / "model.safetensors"), load_file(last.checkpoint / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert json.loads((last.checkpoint / "state.json").read_text())["train"]["optimizer"] == "muon"


def test_resuming_with_another_optimizer_is_refused(tmp_path: Path) -> None:
    run(tmp_path, config(), stop_after=2)
    with pytest.raises(CheckpointMismatchError, match=r"train\.optimizer: checkpoint has 'adamw', config has 'muon'"):
        run(tmp_path, config(optimizer="muon"))


def test_muon_with_lora_is_refused_naming_the_fields() -> None:
    with pytest.raises(ValueError, match="optimizer 'muon' does not train LoRA adapters.*set optimizer=adamw or "
                                         "lora=null"):
        ContinueFinetuneConfig(optimizer="muon", lora=LoraConfig())
    assert ContinueFinetuneConfig(optimizer="muon").muon.lr == 0.02  # full fine-tuning may use it
    # Were it built, no LoRA parameter would be Muon's: the base weights are frozen, the adapters low-rank factors.
    model = gpt()
    apply_lora(model, LoraConfig(target_modules=["c_attn"]))
    assert list(hidden_matrices(model)) == []


@pytest.mark.parametrize(("override", "message"), [
    ("pretrain.optimizer=sgd", "pretrain.optimizer: Input should be 'adamw' or 'muon' (got 'sgd')"),
    ("finetune.muon.adjust_lr_fn=keller", "finetune.muon.adjust_lr_fn: Input should be 'original' or "
                                          "'match_rms_adamw' (got 'keller')"),
    ("pretrain.muon.lr=0", "pretrain.muon.lr: Input should be greater than 0 (got 0)"),
    ("pretrain.muon.momentum=1", "pretrain.muon.momentum: Input should be less than 1 (got 1)"),
    ("pretrain.muon.ns_steps=100", "pretrain.muon.ns_steps: Input should be less than or equal to 99 (got 100)"),
    ("pretrain.muon.weight_decay=-0.1", "pretrain.muon.weight_decay: Input should be greater than or equal to 0 (got -0.1)"),
    ("pretrain.muon.beta=0.9", "pretrain.muon.beta: unknown field (got 0.9)"),
])
def test_bad_muon_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_demo_settings_of_muon() -> None:
    cfg = load_config(None, ["pretrain.optimizer=muon"]).pretrain
    assert (cfg.optimizer, cfg.muon.model_dump()) == ("muon", {
        "lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw",
        "weight_decay": 0.1})
