"""Scoring a classifier: accuracy, macro-F1, per-class F1, the confusion matrix and the report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.data.labelled import EncodedSet
from lmpipe.eval.report import markdown_cell
from lmpipe.model.classifier import GPTClassifier, class_logits

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


def evaluate(model: GPTClassifier, data: EncodedSet) -> tuple[float, ClassMetrics, list[str]]:
    """(mean cross-entropy, metrics, predicted labels) on a split."""
    logits = class_logits(model, data.ids)
    loss = F.cross_entropy(logits, torch.tensor(data.targets, dtype=torch.long)).item()
    predicted = [model.labels[i] for i in logits.argmax(dim=-1).tolist()]
    gold = [model.labels[t] for t in data.targets]
    return loss, classification_metrics(gold, predicted), predicted


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
