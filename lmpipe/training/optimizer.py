"""The language-model trainings' optimizer: AdamW for every weight, or Muon for the hidden matrices and AdamW for
the rest (``optimizer`` in the pretrain and finetune sections).

Muon (Keller Jordan 2024; PyTorch's ``torch.optim.Muon``) orthogonalizes each
update of a weight matrix with a few Newton-Schulz iterations, which suits the
matrices that map hidden states to hidden states: the projections of attention
and the MLP inside the transformer blocks. The token and position embeddings are
lookups (a row per token, not a linear map), the output head is tied to the
token embedding, and norms and biases are vectors, so they keep AdamW, as in the
speed runs and Moonshot's Muon.

Both optimizers follow one schedule: a group's learning rate is the schedule's
times its ``lr_scale`` (Muon's groups: ``muon.lr / learning_rate``), so Muon
warms up and decays exactly as AdamW does, between its own peak and
``muon.lr x min_lr / learning_rate``. ``Optimizers`` steps the two as one, and
the checkpoint keeps their state in one file keyed by parameter name, as
``torch.distributed.checkpoint.state_dict`` merges several optimizers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmpipe.config.training import Training
from lmpipe.model.gpt import GPT
from lmpipe.model.lora import LoraLinear

LR_SCALE = "lr_scale"  # a param group's learning rate over the schedule's (absent: 1)


class Optimizers:
    """Several optimizers over disjoint parameters, stepped as one (what ``TrainStep`` and the checkpoint use)."""

    def __init__(self, *parts: torch.optim.Optimizer) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


TrainOptimizer = torch.optim.Optimizer | Optimizers


def optimizer_parts(optimizer: TrainOptimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside: what ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` take."""
    return list(optimizer.parts) if isinstance(optimizer, Optimizers) else [optimizer]


def hidden_matrices(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) of the trained linear layers inside the transformer blocks: Muon's parameters.

    Never a LoRA layer's: its base weight is frozen, and its adapters are low-rank
    factors whose product is the update, not hidden matrices (the config refuses
    Muon with LoRA).
    """
    adapters = {id(m) for lora in model.modules() if isinstance(lora, LoraLinear) for m in lora.modules()}
    for name, module in model.transformer.h.named_modules(prefix="transformer.h"):
        if isinstance(module, nn.Linear) and module.weight.requires_grad and id(module) not in adapters:
            yield f"{name}.weight", module.weight


def _adamw_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Matrices and embeddings decayed, biases and norm gains not; empty groups left out."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: GPT, cfg: Training, device_type: str) -> TrainOptimizer:
    """The optimizer ``cfg.optimizer`` names over ``model``'s trainable parameters, at the peak learning rates
    (``TrainStep`` sets each step's).

    'adamw': the model's own AdamW (``GPT.configure_optimizer``: fused on CUDA).
    'muon': ``torch.optim.Muon`` over ``hidden_matrices`` and that AdamW over the rest.
    """
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, betas, device_type)
    m = cfg.muon
    hidden = [p for _, p in hidden_matrices(model)]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    muon = torch.optim.Muon([{"params": hidden, LR_SCALE: m.lr / cfg.learning_rate}], lr=m.lr,
                            weight_decay=m.weight_decay, momentum=m.momentum, nesterov=m.nesterov,
                            ns_steps=m.ns_steps, adjust_lr_fn=m.adjust_lr_fn)
    adamw = torch.optim.AdamW(_adamw_groups(rest, cfg.weight_decay), lr=cfg.learning_rate, betas=betas,
                              fused=device_type == "cuda" or None)
    return Optimizers(muon, adamw)
