"""LoRA adapters for the GPT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A targeted ``nn.Linear`` of weight W (out, in) is frozen and learns a low-rank
update instead: ``y = x W^T + b + scale * dropout(x) A^T B^T`` with A (r, in),
B (out, r) and ``scale = alpha / r``. A starts Kaiming-uniform and B at zero, so
training starts from the base model exactly; only A and B (r * (in + out) values
per layer) get gradients and optimizer state.

Why a module of our own rather than ``peft``: peft can inject its layers into
any ``nn.Module``, but merging and unloading go through its ``PeftModel``
wrapper, which renames every parameter (``base_model.model....``). Our
checkpoints, the in-place ``torch.compile`` and FSDP's per-block wrapping all
key on the plain model's parameter names. The layer here keeps the base
weights at ``<module>.base.weight`` and merging is a pure function of a state
dict (``merge_state``), so a LoRA checkpoint becomes a plain GPT checkpoint
without building a model. What we take from peft is its on-disk format:
``write_peft_adapter`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` under the names of the transformers export
(``lmpipe.model.hf_export``), so ``peft.PeftModel.from_pretrained`` puts our adapter on
the exported base model.

Targets. ``target_modules`` holds module names matched as peft does: a name
matches a module whose qualified name equals it or ends with ``.`` + name
(``c_attn`` matches every layer's ``transformer.h.<i>.attn.c_attn``);
``all-linear`` (the default) is every linear layer but the output head, which
is not adapted (tied to the token embedding unless Qwen3's
``tie_embeddings`` is false). Qwen3's layers are
named as in transformers (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lmpipe.artifacts import save_safetensors
from lmpipe.config.training import LoraConfig, ModelConfig

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HEAD = "lm_head"  # the output head: never a target
_PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) plus a trainable low-rank update (``lora_A``, ``lora_B``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        # As peft and the paper: A random, B zero, so the adapted layer starts equal to the base one.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's linear layers that may be adapted (all but the output head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != _HEAD]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(names: Iterable[str], targets: list[str], field: str = "finetune.lora.target_modules") -> list[str]:
    """The qualified names ``targets`` select among ``names``; every target must select at least one."""
    names = list(names)
    if ALL_LINEAR in targets:
        return names
    for t in targets:
        if t == _HEAD or t.endswith("." + _HEAD):
            raise ValueError(f"{field}: {t!r} is the output head, which LoRA does not adapt here; the linear "
                             "layers inside the blocks take the adapters")
        if not any(_matches(n, t) for n in names):
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"{field}: {t!r} matches no linear layer of the model; its linear layers are "
                             f"{', '.join(short)} (e.g. {names[0]}), or use {ALL_LINEAR!r}")
    return [n for n in names if any(_matches(n, t) for t in targets)]


def check_targets(model_cfg: ModelConfig, cfg: LoraConfig, field: str = "finetune.lora.target_modules") -> list[str]:
    """Resolve the targets on the configured architecture, built on the meta device (no memory, no time)."""
    from lmpipe.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_config(model_cfg, vocab_size=8))
    return resolve_targets(linear_names(model), cfg.target_modules, field)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the targeted linear layers in place and freeze everything else; returns the adapted names.

    Call after the base weights are loaded and before the optimizer is built.
    The new A matrices are drawn from torch's global RNG (seeded by the caller).
    """
    targets = resolve_targets(linear_names(model), cfg.target_modules)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), cfg.r, cfg.alpha, cfg.dropout))
    return targets


def trainable_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; the tied embedding is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_lora_state(weights: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".lora_A.weight") for k in weights)


def merge_state(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as the plain GPT's: ``W + scale * B @ A`` at each adapted layer.

    Pure tensor arithmetic in float32 (then the base weight's dtype): merging needs
    no model and gives the weights a plain ``GPT`` loads.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base.weight"):
            prefix = key[: -len(".base.weight")]
            a, b = weights[f"{prefix}.lora_A.weight"].float(), weights[f"{prefix}.lora_B.weight"].float()
            out[f"{prefix}.weight"] = (value.float() + scale * (b @ a)).to(value.dtype).contiguous()
        elif key.endswith(".base.bias"):
            out[key[: -len(".base.bias")] + ".bias"] = value
        else:
            out[key] = value
    return out


def adapter_state(weights: dict[str, torch.Tensor], arch: str = "gpt2") -> dict[str, torch.Tensor]:
    """Only the adapter matrices, under peft's names for the transformers export of ``arch``
    (``base_model.model.<module>.lora_A.weight``)."""
    from lmpipe.model.gpt import transformers_name

    return {_PEFT_PREFIX + transformers_name(k, arch): v.contiguous()
            for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k}


def write_peft_adapter(weights: dict[str, torch.Tensor], cfg: LoraConfig, targets: list[str], dest: Path,
                       arch: str = "gpt2") -> Path:
    """Write ``dest`` as a peft adapter directory (atomically: a temporary directory renamed at the end).

    The transformers export's GPT-2 layers are ``Conv1D`` (weights stored (in, out)),
    hence ``fan_in_fan_out``; Qwen3's are ``nn.Linear`` as ours. The adapter matrices
    themselves have the same shapes either way. ``target_modules`` lists the adapted
    layers' full names in the export of ``arch`` (GPT-2's are ours), so peft adapts
    exactly those layers.
    """
    import shutil

    from lmpipe.model.gpt import transformers_name

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(adapter_state(weights, arch), tmp / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [transformers_name(t, arch) for t in targets],
        "fan_in_fan_out": arch == "gpt2",
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
