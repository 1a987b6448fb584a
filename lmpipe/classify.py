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
is skipped and counted instead (:class:`lmpipe.benchmarks.BadLineReport`). A
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

import csv
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from tokenizers import Tokenizer
from torch import nn

from lmpipe.benchmarks import BadLineReport, BenchmarkFormatError
from lmpipe.checkpoint import STATE_FILE, check_compatible, load_checkpoint, read_state
from lmpipe.config import ClassifyConfig, ModelConfig, TrainConfig
from lmpipe.jsonl import jsonl_records
from lmpipe.model import GPT, IGNORE_INDEX, GPTConfig
from lmpipe.sft import split_indices
from lmpipe.stage import BuildOutput, StageResult, markdown_cell, read_versioned_json, run_stage, write_json_atomic
from lmpipe.tokenizer import META_FILE, encode_ordinary, load_tokenizer, meta_eot_id, tokenizer_fingerprint
from lmpipe.train import TrainingDivergedError, tokenizer_info, autocast_for, lr_at, resolve_device

LogMetrics = Callable[[dict[str, float], int], None]
OnProgress = Callable[[int, int], None]

FORMAT_VERSION = 1  # of model/classifier.json
MODEL_DIR = "model"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
PATH_FIELD = "classify.path"
EVAL_BATCH_SIZE = 32  # evaluation's and predict's batches: the same padding, so the same logits
MAX_REPORTED = 5  # line numbers of skipped / truncated examples kept in the stage's meta


class ClassifyFormatError(BenchmarkFormatError):
    """A line of the classification file is malformed or has an unknown label.

    Carries ``path``, ``line`` (1-based; 0: the file as a whole), ``field`` and
    ``problem`` like the benchmark readers' error (whose ``BadLineReport`` counts
    skipped lines), and the message starts with the config field that named the file.
    """

    def __init__(self, path: Path, line: int, field: str | None, problem: str,
                 *, config_field: str = PATH_FIELD) -> None:
        super().__init__(path, line, field, problem)
        self.args = (f"{config_field}: {self.args[0]}",)


@dataclass(frozen=True)
class TextExample:
    """One labelled text and the 1-based line of the file it starts on."""

    text: str
    label: str
    line: int


@dataclass
class EncodedSet:
    """Examples ready for the model: token ids (extract token last), class indices, where they came from."""

    ids: list[list[int]]
    targets: list[int]
    examples: list[TextExample]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ClassifyData:
    """The train and val splits, the classes, and what was skipped or truncated on the way."""

    train: EncodedSet
    val: EncodedSet
    labels: list[str]
    bad: BadLineReport
    truncated_lines: list[int] = field(default_factory=list)
    skipped_long_lines: list[int] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "skipped_bad": self.bad.count,
            "skipped_bad_lines": [line for line, _ in self.bad.first],
            "skipped_bad_first": self.bad.first[0][1] if self.bad.first else None,
            "skipped_long": len(self.skipped_long_lines),
            "skipped_long_lines": self.skipped_long_lines[:MAX_REPORTED],
            "truncated": len(self.truncated_lines),
            "truncated_lines": self.truncated_lines[:MAX_REPORTED],
        }


# ---------------------------------------------------------------- readers


def _text_and_label(values: dict[str, Any], path: Path, line: int, text_field: str, label_field: str,
                    config_field: str) -> TextExample:
    """Check one record's two fields; raises ClassifyFormatError naming the field and the value."""
    def bad(name: str, problem: str) -> ClassifyFormatError:
        return ClassifyFormatError(path, line, name, problem, config_field=config_field)

    for name in (text_field, label_field):
        if name not in values:
            raise bad(name, f"missing (fields: {sorted(values)})")
    text, label = values[text_field], values[label_field]
    if not isinstance(text, str):
        raise bad(text_field, f"must be a string, got {type(text).__name__} {json.dumps(text)[:40]}")
    if not text.strip():
        raise bad(text_field, f"is empty ({text!r})")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise bad(label_field, f"must be a string or an integer, got {type(label).__name__} {json.dumps(label)[:40]}")
    if not label.strip():
        raise bad(label_field, f"is empty ({label!r})")
    return TextExample(text, label, line)


def _csv_records(path: Path, text_field: str, label_field: str,
                 config_field: str) -> Iterator[tuple[int, dict[str, Any] | ClassifyFormatError]]:
    """(first line, {column: value}) per CSV record, or (line, error) for a malformed one.

    The header row names the columns and must name both fields exactly once
    (raised: without it no record can be read). The reader recovers after a
    malformed record (csv starts afresh on the next line), so bad records can be skipped.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column's name
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ClassifyFormatError(path, line, None, f"not valid UTF-8 (byte {err.start} of the file)",
                                  config_field=config_field) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problem = f"not valid CSV ({err})"
            if header is None:
                raise ClassifyFormatError(path, start, None, problem, config_field=config_field) from None
            yield start, ClassifyFormatError(path, start, None, problem, config_field=config_field)
            continue
        if not row:  # a blank line
            continue
        if header is None:
            header = row
            for name in (text_field, label_field):
                if header.count(name) != 1:
                    problem = "is not a column of" if name not in header else "is twice in"
                    raise ClassifyFormatError(path, start, name, f"{problem} the header row {header}",
                                              config_field=config_field)
            continue
        if len(row) != len(header):
            yield start, ClassifyFormatError(
                path, start, None, f"has {len(row)} field(s), the header row has {len(header)} ({header})",
                config_field=config_field)
            continue
        yield start, dict(zip(header, row))
    if header is None:
        raise ClassifyFormatError(path, 0, None, "is empty: a CSV file needs a header row naming the fields",
                                  config_field=config_field)


def read_examples(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    skip_bad: bool = False,
    config_field: str = PATH_FIELD,
) -> tuple[list[TextExample], BadLineReport]:
    """Read a CSV or JSONL file (by its suffix) into labelled examples, in file order.

    With ``labels`` a label outside them is a bad line. A bad line raises
    ClassifyFormatError; with ``skip_bad`` it is counted in the report instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{config_field}: {str(path)!r} must end in .csv, .jsonl or .json (the format follows "
                         "the suffix)")
    if not path.is_file():
        raise FileNotFoundError(f"{config_field}: classification file {str(path)!r} does not exist")
    known = set(labels) if labels is not None else None
    examples: list[TextExample] = []
    report = BadLineReport()
    if suffix == ".csv":
        records: Iterator[tuple[int, Any]] = _csv_records(path, text_field, label_field, config_field)
    else:
        records = jsonl_records(path)
    for lineno, record in records:
        try:
            if isinstance(record, ClassifyFormatError):
                raise record
            if isinstance(record, str):
                raise ClassifyFormatError(path, lineno, None, record, config_field=config_field)
            example = _text_and_label(record, path, lineno, text_field, label_field, config_field)
            if known is not None and example.label not in known:
                raise ClassifyFormatError(path, lineno, label_field,
                                          f"unknown label {example.label!r} (classify.labels: {list(labels or [])})",
                                          config_field=config_field)
            examples.append(example)
        except ClassifyFormatError as err:
            if not skip_bad:
                raise err from None
            report.add(err)
    if not examples:
        detail = f"; {report.count} bad line(s) skipped, the first: {report.first[0][1]}" if report.count else ""
        raise ClassifyFormatError(path, 0, None, f"holds no examples{detail}", config_field=config_field)
    return examples, report


# ---------------------------------------------------------------- data of a run


def encode_texts(
    tok: Tokenizer, texts: Sequence[str], extract_id: int, block_size: int
) -> tuple[list[list[int]], list[bool]]:
    """Each text's ids plus the extract token, cut to its last block_size tokens; and whether it was cut.

    Literal special-token text inside a text stays text (as in the shards and SFT):
    only the appended id is the extract token.
    """
    ids = [[*e, extract_id] for e in encode_ordinary(tok, texts)]
    return [x[-block_size:] for x in ids], [len(x) > block_size for x in ids]


def build_classify_data(cfg: ClassifyConfig, tok: Tokenizer, extract_id: int, block_size: int) -> ClassifyData:
    """Read, split, resolve the classes, encode and length-check the examples of cfg.path."""
    path = Path(cfg.path)
    examples, report = read_examples(path, text_field=cfg.text_field, label_field=cfg.label_field,
                                     labels=cfg.labels, skip_bad=cfg.skip_bad)
    try:
        train_idx, val_idx = split_indices(len(examples), cfg.val_every, "classification")
    except ValueError as err:
        raise ClassifyFormatError(path, 0, None, str(err)) from None
    train_ex, val_ex = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    labels = list(cfg.labels) if cfg.labels is not None else sorted({e.label for e in train_ex})
    if len(labels) < 2:
        raise ClassifyFormatError(path, 0, cfg.label_field,
                                  f"the training split has the one label {labels}; a classifier needs at least 2")
    known_val: list[TextExample] = []
    for e in val_ex:  # only possible without cfg.labels: the reader checked them against the given ones
        if e.label in labels:
            known_val.append(e)
            continue
        err = ClassifyFormatError(path, e.line, cfg.label_field,
                                  f"label {e.label!r} does not occur in the training split (labels: {labels})")
        if not cfg.skip_bad:
            raise err
        report.add(err)
    val_ex = known_val
    if not val_ex:
        raise ClassifyFormatError(path, 0, None, "no validation example is left after skipping bad lines")

    index = {label: i for i, label in enumerate(labels)}
    truncated: list[int] = []
    skipped_long: list[int] = []

    def encode(split: list[TextExample]) -> EncodedSet:
        ids, cut = encode_texts(tok, [e.text for e in split], extract_id, block_size)
        kept = EncodedSet([], [], [])
        for e, x, was_cut in zip(split, ids, cut):
            if was_cut:
                (skipped_long if cfg.skip_long else truncated).append(e.line)
                if cfg.skip_long:
                    continue
            kept.ids.append(x)
            kept.targets.append(index[e.label])
            kept.examples.append(e)
        return kept

    train, val = encode(train_ex), encode(val_ex)
    for name, split in (("training", train), ("validation", val)):
        if not len(split):
            raise ClassifyFormatError(path, 0, None, f"the {name} split is empty after skipping "
                                                     f"{len(skipped_long)} text(s) longer than model.block_size="
                                                     f"{block_size} tokens (classify.skip_long)")
    return ClassifyData(train, val, labels, report, sorted(truncated), sorted(skipped_long))


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

    The body is a plain ``lmpipe.model.GPT`` (so pretrained checkpoints load into
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


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class ClassMetrics:
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]  # the classes in gold or predictions, sorted
    n: int


def classification_metrics(gold: Sequence[str], predicted: Sequence[str]) -> ClassMetrics:
    """Accuracy and macro-F1 (module docstring: classes of gold or predictions, F1 0 without a hit)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("no examples to score")
    g, p = np.asarray(gold, dtype=object), np.asarray(predicted, dtype=object)
    per_class: dict[str, float] = {}
    for label in sorted(set(gold) | set(predicted)):
        tp = int(np.sum((g == label) & (p == label)))
        fp = int(np.sum((g != label) & (p == label)))
        fn = int(np.sum((g == label) & (p != label)))
        per_class[label] = 2 * tp / (2 * tp + fp + fn)  # > 0 denominators: the label is in gold or predictions
    return ClassMetrics(float(np.mean(g == p)), sum(per_class.values()) / len(per_class), per_class, len(gold))


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


def evaluate(model: GPTClassifier, data: EncodedSet) -> tuple[float, ClassMetrics, list[str]]:
    """(mean cross-entropy, metrics, predicted labels) on a split."""
    logits = class_logits(model, data.ids)
    loss = F.cross_entropy(logits, torch.tensor(data.targets, dtype=torch.long)).item()
    predicted = [model.labels[i] for i in logits.argmax(dim=-1).tolist()]
    gold = [model.labels[t] for t in data.targets]
    return loss, classification_metrics(gold, predicted), predicted


# ---------------------------------------------------------------- training


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of example indices: one seeded permutation per epoch, concatenated, cut every batch_size."""
    epoch, buffer = 0, np.empty(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, np.random.default_rng([seed, epoch]).permutation(n)])
            epoch += 1
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


@dataclass
class FitResult:
    rows: list[dict[str, Any]]  # metrics.jsonl: one per step, val_* added at validation steps
    val_loss: float
    metrics: ClassMetrics
    predicted: list[str]  # of the val examples, in order
    seconds: float


def fit(
    model: GPTClassifier,
    data: ClassifyData,
    cfg: ClassifyConfig,
    *,
    metrics_path: Path | None = None,
    log_metrics: LogMetrics | None = None,
    on_progress: OnProgress | None = None,
) -> FitResult:
    """Train every weight for cfg.max_steps steps (AdamW, warmup then cosine decay, clipping); validate every
    cfg.eval_interval steps and after the last. The final weights are the model's.

    Seed the global RNG before building the model: the head's init and dropout
    draw from it. One row per step is appended to ``metrics_path``.
    """
    started = time.perf_counter()
    device = _model_device(model)
    autocast = autocast_for(device)
    optimizer = configure_optimizer(model, cfg, device.type)
    schedule = TrainConfig(max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                           warmup_steps=cfg.warmup_steps)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    order = batch_order(len(data.train), cfg.batch_size, cfg.seed)
    rows: list[dict[str, Any]] = []
    since_eval: list[float] = []
    val_loss, metrics, predicted = math.nan, None, []
    model.train()
    for step in range(cfg.max_steps):
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(order)
        idx, lengths = collate([data.train.ids[i] for i in batch], model.eot_id, device)
        y = torch.tensor([data.train.targets[i] for i in batch], dtype=torch.long, device=device)
        with autocast:
            logits, lm_loss = model(idx, lengths, lm_targets(idx, lengths) if cfg.lm_loss_weight > 0 else None)
        loss = F.cross_entropy(logits.float(), y)
        if lm_loss is not None:
            loss = loss + cfg.lm_loss_weight * lm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        loss_value, norm_value = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise TrainingDivergedError(
                f"classify step {step + 1}: loss {loss_value} / gradient norm {norm_value} is not finite at "
                f"learning rate {lr:g}; lower classify.learning_rate={cfg.learning_rate:g}")
        optimizer.step()
        done = step + 1
        row: dict[str, Any] = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value}
        since_eval.append(loss_value)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val_loss, metrics, predicted = evaluate(model, data.val)
            row |= {"val_loss": val_loss, "val_accuracy": metrics.accuracy, "val_macro_f1": metrics.macro_f1}
            if log_metrics is not None:
                log_metrics({"train/loss": sum(since_eval) / len(since_eval), "train/lr": lr, "val/loss": val_loss,
                             "val/accuracy": metrics.accuracy, "val/macro_f1": metrics.macro_f1}, done)
            since_eval.clear()
            if on_progress is not None:
                on_progress(done, cfg.max_steps)
        rows.append(row)
        if metrics_path is not None:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    assert metrics is not None  # the last step always validates
    return FitResult(rows, val_loss, metrics, predicted, time.perf_counter() - started)


# ---------------------------------------------------------------- saving and loading


def save_classifier(model: GPTClassifier, dest: Path, *, info: dict[str, Any]) -> None:
    """dest/classifier.safetensors (the tied embedding stored once) and dest/classifier.json (what loading needs)."""
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors_model(model, str(dest / WEIGHTS_FILE))
    write_json_atomic(dest / CONFIG_FILE, {
        "format_version": FORMAT_VERSION,
        "labels": list(model.labels),
        "eot_id": model.eot_id,
        "head_dropout": model.drop.p,
        "model": asdict(model.body.config),
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


# ---------------------------------------------------------------- the stage


def render_report(metrics: ClassMetrics, gold: Sequence[str], predicted: Sequence[str], *, train_examples: int,
                  path: str | Path) -> str:
    """The classify stage's report: accuracy, macro-F1, per-class F1 and the confusion matrix of the held-out
    examples (rows: the true label, columns: the predicted one), as markdown."""
    classes = list(dict.fromkeys([*metrics.per_class_f1, *gold, *predicted]))
    counts = Counter(zip(gold, predicted))
    lines = ["# Sequence classification", "",
             f"`{path}`: {len(gold)} held-out examples ({train_examples} trained on). "
             f"Accuracy **{metrics.accuracy:.4f}**, macro-F1 **{metrics.macro_f1:.4f}**.", "",
             "| class | F1 | support |", "|---|---:|---:|"]
    support = Counter(gold)
    lines += [f"| {markdown_cell(c)} | {metrics.per_class_f1.get(c, 0.0):.4f} | {support[c]} |" for c in classes]
    lines += ["", "Confusion matrix (rows: true label, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(markdown_cell(c) for c in classes) + " |",
              "|---|" + "---:|" * len(classes)]
    lines += [f"| {markdown_cell(t)} | " + " | ".join(str(counts[(t, p)]) for p in classes) + " |" for t in classes]
    return "\n".join(lines) + "\n"


def run_classify(
    cfg: ClassifyConfig,
    model_cfg: ModelConfig,
    init: Path,
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    log_metrics: LogMetrics | None = None,
    on_progress: OnProgress | None = None,
) -> StageResult:
    """Stage: fine-tune ``init``'s weights with a classification head on cfg.path.

    Publishes model/ (classifier.safetensors, classifier.json), metrics.jsonl
    (one row per step) and predictions.jsonl (the val examples: line, text, label,
    predicted); metrics accuracy and macro_f1 of the val split, the per-class F1
    and the skipped / truncated counts in meta. The data file is read and checked
    before the checkpoint is loaded. A run takes seconds, so it keeps no
    checkpoints: an interrupted run starts over.
    """

    def build(tmp: Path) -> BuildOutput:
        tok_path, tok_fp, vocab_size = tokenizer_info(tokenizer)
        tok = load_tokenizer(tok_path)
        extract = meta_eot_id(tok, tokenizer.path(META_FILE))
        data = build_classify_data(cfg, tok, extract, model_cfg.block_size)
        init_dir = Path(init)
        if not (init_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"classify.init_checkpoint: {str(init_dir)!r} is not a checkpoint directory "
                                    f"(no {STATE_FILE})")
        check_compatible(read_state(init_dir), model_cfg, vocab_size, tok_fp, field="classify.init_checkpoint")

        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = GPTClassifier(GPTConfig.from_config(model_cfg, vocab_size), data.labels, eot_id=extract,
                              head_dropout=cfg.head_dropout).to(device)
        load_checkpoint(init_dir, model.body, None, restore_rng=False)
        result = fit(model, data, cfg, metrics_path=tmp / METRICS_FILE, log_metrics=log_metrics,
                     on_progress=on_progress)

        save_classifier(model, tmp / MODEL_DIR, info={
            "text_field": cfg.text_field, "label_field": cfg.label_field, "tokenizer_fingerprint": tok_fp,
            "init_checkpoint": str(init_dir), "steps": cfg.max_steps})
        with open(tmp / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for example, predicted in zip(data.val.examples, result.predicted):
                f.write(json.dumps({"line": example.line, "text": example.text, "label": example.label,
                                    "predicted": predicted}) + "\n")
        markdown = render_report(result.metrics, [e.label for e in data.val.examples], result.predicted,
                                 train_examples=len(data.train), path=cfg.path)
        (tmp / REPORT_FILE).write_text(markdown, encoding="utf-8")
        return BuildOutput(
            metrics={
                "accuracy": result.metrics.accuracy,
                "macro_f1": result.metrics.macro_f1,
                "val_loss": result.val_loss,
                "final_train_loss": result.rows[-1]["loss"],
                "steps": float(cfg.max_steps),
                "seconds": result.seconds,
            },
            meta=data.meta() | {"per_class_f1": result.metrics.per_class_f1, "device": str(device),
                                "init_checkpoint": str(init_dir), "markdown": markdown},
        )

    return run_stage("classify", fingerprint, out_dir, build)
