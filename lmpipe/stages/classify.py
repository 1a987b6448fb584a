"""Stage classify: a GPT-1 style sequence classifier fine-tuned from the pretrained model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmpipe.artifacts import BuildOutput, StageResult
from lmpipe.config.training import ClassifyConfig, ModelConfig
from lmpipe.data.labelled import EncodedSet, build_classify_data
from lmpipe.data.tokenizer import META_FILE, load_tokenizer, meta_eot_id
from lmpipe.eval.classification import ClassMetrics, evaluate, render_report
from lmpipe.model.checkpoint import STATE_FILE, check_compatible, read_state
from lmpipe.model.classifier import GPTClassifier, save_classifier
from lmpipe.model.device import resolve_device
from lmpipe.model.gpt import GPTConfig
from lmpipe.stages.contract import run_stage
from lmpipe.stages.training import MODEL_DIR, tokenizer_info
from lmpipe.training.checkpoint import load_checkpoint
from lmpipe.training.classifier import fit_classifier
from lmpipe.training.loop import SILENT, Reporters

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"


class ValScores:
    """The training loop's validation hook: scores the val split, and keeps the latest scores and predictions."""

    def __init__(self, model: GPTClassifier, val: EncodedSet) -> None:
        self.model, self.val = model, val
        self.loss = float("nan")
        self.metrics: ClassMetrics | None = None
        self.predicted: list[str] = []

    def __call__(self) -> dict[str, float]:
        self.loss, self.metrics, self.predicted = evaluate(self.model, self.val)
        return {"val/loss": self.loss, "val/accuracy": self.metrics.accuracy, "val/macro_f1": self.metrics.macro_f1}


def run_classify(
    cfg: ClassifyConfig,
    model_cfg: ModelConfig,
    init: Path,
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    report: Reporters = SILENT,
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
        scores = ValScores(model, data.val)
        metrics, seconds = fit_classifier(model, data.train, cfg, scores, metrics_path=tmp / METRICS_FILE,
                                          log_metrics=report.metrics, on_progress=report.progress)
        assert scores.metrics is not None  # the last step always validates
        result = scores.metrics

        save_classifier(model, tmp / MODEL_DIR, info={
            "text_field": cfg.text_field, "label_field": cfg.label_field, "tokenizer_fingerprint": tok_fp,
            "init_checkpoint": str(init_dir), "steps": cfg.max_steps})
        with open(tmp / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for example, predicted in zip(data.val.examples, scores.predicted, strict=True):
                f.write(json.dumps({"line": example.line, "text": example.text, "label": example.label,
                                    "predicted": predicted}) + "\n")
        markdown = render_report(result, [e.label for e in data.val.examples], scores.predicted,
                                 train_examples=len(data.train), path=cfg.path)
        (tmp / REPORT_FILE).write_text(markdown, encoding="utf-8")
        return BuildOutput(
            metrics={
                "accuracy": result.accuracy,
                "macro_f1": result.macro_f1,
                "val_loss": scores.loss,
                "final_train_loss": metrics.rows[-1]["loss"],
                "steps": float(cfg.max_steps),
                "seconds": seconds,
            },
            meta=data.meta() | {"per_class_f1": result.per_class_f1, "device": str(device),
                                "init_checkpoint": str(init_dir), "markdown": markdown},
        )

    return run_stage("classify", fingerprint, out_dir, build)
