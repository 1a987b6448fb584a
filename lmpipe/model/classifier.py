"""Sequence classification fine-tuning, GPT-1 style: the last token's hidden state into a linear head.

Radford et al. (2018), section 3.2: each text is followed by an "extract" token,
the transformer's final hidden state at that token goes through a linear layer
to the classes, and the whole model is fine-tuned with cross-entropy (optionally
plus the language-modelling loss on the texts, weight ``lm_loss_weight``). Here
the extract token is the tokenizer's end-of-text token, which the pretrained
model has seen at every document's end; with causal attention it is the one
position that has seen the whole text.

Input. A CSV file with a header row (``.csv``; read with the csv module, quoted
fields may span lines) or JSONL, one object a line (``.jsonl``, ``.json``),
with a text and a label field (``classify.text_field``, ``classify.label_field``;
other fields are ignored). Labels are strings; in JSON an integer label is read
as its decimal string, so ``1`` and ``"1"`` are one class. Blank lines are
skipped. A bad line (not UTF-8 in JSONL, not JSON, not an object, a CSV row
with another number of fields than the header, a field missing, of the wrong
type or empty, a label outside ``classify.labels``) raises
:class:`ClassifyFormatError`, naming the config field, the file, the 1-based
line (a CSV record's first line), the field and the value; with ``skip_bad`` it
is skipped and counted instead (:class:`lmpipe.data.jsonl.BadLineReport`). A
CSV header without the two fields, or a CSV file that is not UTF-8, is an
error either way: no line of such a file can be read.

Split and labels. Every ``val_every``-th example in file order is held out
(at least one, the last). Without ``classify.labels`` the classes are the
sorted labels of the training split, and a held-out example whose label never
occurs in training is a bad line (it could never be predicted right).

Length. A text and its extract token longer than ``model.block_size`` tokens
keeps its *last* ``block_size`` tokens: the classifying token must stay, and it
sees only what fits the context before it. Such texts are counted
(``truncated``); with ``skip_long`` they are skipped and counted instead.

Batches. Rows are padded on the right (with the end-of-text id) to the
longest in the batch; causal attention keeps padding from reaching any real
position, and the head reads each row at its own last real token. Training
batches follow a seeded permutation per epoch; on CPU a run is bitwise
reproducible. Evaluation and :func:`predict` use the same fixed batches of
``EVAL_BATCH_SIZE`` texts in the given order, so the published predictions are
exactly what the loaded classifier predicts.

Metrics. Accuracy, and macro-F1: the mean over classes of
``2 TP / (2 TP + FP + FN)``, over the classes that occur in the gold labels or
in the predictions (as scikit-learn's default ``labels``); a class predicted
but never right has F1 0 (scikit-learn's ``zero_division=0``), and a class
absent from both is left out of the mean rather than counted as 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from tokenizers import Tokenizer
from torch import nn

from lmpipe.artifacts import follow_umask, read_versioned_json, write_json_atomic
from lmpipe.config.training import ClassifyConfig
from lmpipe.data.labelled import encode_texts
from lmpipe.data.tokenizer import tokenizer_fingerprint
from lmpipe.model.device import autocast_for
from lmpipe.model.gpt import GPT, IGNORE_INDEX, GPTConfig

FORMAT_VERSION = 1  # of model/classifier.json
MODEL_DIR = "model"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
EVAL_BATCH_SIZE = 32  # evaluation's and predict's batches: the same padding, so the same logits


def collate(
    ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: idx (B, T) and lengths (B,) (the last real token is at lengths - 1)."""
    T = max(len(x) for x in ids)
    idx = torch.full((len(ids), T), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    return idx.to(device), lengths.to(device)


def lm_targets(idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, T) for the auxiliary LM loss: IGNORE_INDEX from each row's last real token on."""
    y = torch.full_like(idx, IGNORE_INDEX)
    y[:, :-1] = idx[:, 1:]
    positions = torch.arange(idx.size(1), device=idx.device)[None, :]  # (1, T)
    return y.masked_fill(positions >= (lengths[:, None] - 1), IGNORE_INDEX)


# ---------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """A GPT body and a linear head on the final hidden state (after ln_f) at each row's last real token.

    The body is a plain ``lmpipe.model.gpt.GPT`` (so pretrained checkpoints load into
    it unchanged); a forward hook on its final LayerNorm hands over the hidden
    states, so the body's own forward (and its checks) run as they are. ``labels``
    and ``eot_id`` (the extract token) travel with the model for ``predict``.
    """

    def __init__(self, config: GPTConfig, labels: Sequence[str], *, eot_id: int, head_dropout: float = 0.0) -> None:
        super().__init__()
        self.body = GPT(config)
        self.drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(config.n_embd, len(labels))
        torch.nn.init.normal_(self.head.weight, mean=0.0, std=0.02)  # GPT-1's init of the added layer
        torch.nn.init.zeros_(self.head.bias)
        self.labels = tuple(labels)
        self.eot_id = eot_id
        self._capturing = False  # only this module's forward keeps the hidden states, not a direct body call
        self._hidden: torch.Tensor | None = None
        self.body.transformer.ln_f.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._capturing:
            self._hidden = output

    def forward(
        self, idx: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T), lengths (B,) -> class logits (B, K) and, with LM targets (B, T), the body's LM loss."""
        self._capturing = True
        try:
            _, lm_loss = self.body(idx, targets)
        finally:
            self._capturing = False
        hidden, self._hidden = self._hidden, None  # (B, T, C); dropped here so no graph outlives the call
        assert hidden is not None
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        return self.head(self.drop(last)), lm_loss


def configure_optimizer(model: GPTClassifier, cfg: ClassifyConfig, device_type: str) -> torch.optim.AdamW:
    """The body's AdamW groups (matrices decayed, biases and gains not), plus the head's weight and bias."""
    # PyTorch's default betas: a short fine-tuning run does not need pretraining's lower beta2.
    opt = model.body.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (0.9, 0.999), device_type)
    opt.add_param_group({"params": [model.head.weight], "weight_decay": cfg.weight_decay})
    opt.add_param_group({"params": [model.head.bias], "weight_decay": 0.0})
    return opt


# ---------------------------------------------------------------- evaluation and prediction


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def class_logits(model: GPTClassifier, ids: Sequence[Sequence[int]], batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits (N, K) in fp32 on the CPU, in eval mode, in fixed batches of batch_size rows in the given order."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        idx, lengths = collate(ids[i : i + batch_size], model.eot_id, device)
        with autocast_for(device):
            logits, _ = model(idx, lengths)
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def predict(
    model: GPTClassifier, tok: Tokenizer, texts: Sequence[str], *, batch_size: int = EVAL_BATCH_SIZE
) -> list[str]:
    """The predicted label of each text (long texts keep their last block_size tokens, as in training)."""
    if not texts:
        return []
    ids, _ = encode_texts(tok, texts, model.eot_id, model.body.config.block_size)
    return [model.labels[i] for i in class_logits(model, ids, batch_size).argmax(dim=-1).tolist()]


# ---------------------------------------------------------------- saving and loading


def save_classifier(model: GPTClassifier, dest: Path, *, info: dict[str, Any]) -> None:
    """dest/classifier.safetensors (the tied embedding stored once) and dest/classifier.json (what loading needs)."""
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors_model(model, str(dest / WEIGHTS_FILE))
    follow_umask(dest / WEIGHTS_FILE)  # safetensors writes 0600 whatever the umask
    write_json_atomic(dest / CONFIG_FILE, {
        "format_version": FORMAT_VERSION,
        "labels": list(model.labels),
        "eot_id": model.eot_id,
        "head_dropout": model.drop.p,
        "model": model.body.config.to_dict(),
        **info,
    })


def load_classifier(
    path: str | Path, device: torch.device | str = "cpu", *, tokenizer_path: str | Path | None = None
) -> tuple[GPTClassifier, list[str]]:
    """A published classifier (a classify stage's model/ directory) in eval mode, and its labels.

    With ``tokenizer_path`` the tokenizer is checked against the one it was trained with.
    """
    path = Path(path)
    info = read_versioned_json(path / CONFIG_FILE, FORMAT_VERSION, "classifier config", "re-run the classify stage")
    if tokenizer_path is not None:
        fp = tokenizer_fingerprint(tokenizer_path)
        if fp != info.get("tokenizer_fingerprint"):
            raise ValueError(f"{path}: the classifier was trained with tokenizer {info.get('tokenizer_fingerprint')}, "
                             f"{str(tokenizer_path)!r} is {fp}")
    model = GPTClassifier(GPTConfig(**info["model"]), info["labels"], eot_id=info["eot_id"],
                          head_dropout=info["head_dropout"])
    missing, unexpected = load_safetensors_model(model, str(path / WEIGHTS_FILE), strict=True)
    assert not missing and not unexpected
    return model.to(device).eval(), list(info["labels"])
