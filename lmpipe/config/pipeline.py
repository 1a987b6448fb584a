"""The whole pipeline's configuration: one typed model, one section per stage. The defaults are the demo."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from lmpipe.config.base import SFT_HELD_OUT, Section
from lmpipe.config.continual import ContinualConfig
from lmpipe.config.data import DataConfig, TokenizerConfig
from lmpipe.config.evaluation import EvalConfig, TrackingConfig
from lmpipe.config.training import (
    ClassifyConfig,
    ContinueFinetuneConfig,
    FinetuneSection,
    ModelSection,
    Qwen3ModelConfig,
    SFTFinetuneConfig,
    TrainConfig,
    Training,
)


def _any_of_modes(schema: dict[str, Any]) -> None:
    """A section's variants (fine-tune modes, model archs) as ``anyOf`` in the JSON schema (the Prefect UI's
    parameter form): its form offers a choice of definitions for ``anyOf`` and picks the one the value fits;
    ``mode`` / ``arch`` makes them exclusive anyway."""
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


class PipelineConfig(Section):
    """Everything one pipeline run needs. The defaults are the demo."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Name of this configuration, recorded "
                                                                        "on the MLflow runs (letters, digits, "
                                                                        "`_`, `.`, `-`).")
    workdir: str = Field(".lmpipe", min_length=1, description="Where stage outputs, checkpoints and the default "
                                                              "MLflow store live (relative to the working "
                                                              "directory).")
    lease_stale_s: float = Field(
        120.0, gt=0,
        description="A run building a stage holds a lease on it (a file next to its output) and refreshes it "
                    "every min(10, this/4) s; another run waits for it, and takes it over when the holder's "
                    "process is gone (on this host) or its heartbeat has stood still this long (any host). Raise it "
                    "on a shared filesystem whose writes can stall.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpora, cleaning, shards, download retries.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The byte-level BPE tokenizer.")
    model: ModelSection = Field(
        default_factory=Qwen3ModelConfig, json_schema_extra=_any_of_modes,
        description="The model's size and shape; `arch` picks the variant: 'qwen3' (the default) or 'gpt2'.")
    pretrain: TrainConfig = Field(default_factory=TrainConfig, description="Pretraining on data.pretrain.")
    finetune: FinetuneSection = Field(
        default_factory=ContinueFinetuneConfig, json_schema_extra=_any_of_modes,
        description="Fine-tuning of the pretrained model; `mode` picks the variant: 'continue' (on data.finetune) "
                    "or 'sft' (chat examples).")
    classify: ClassifyConfig | None = Field(None, description="A sequence classifier fine-tuned from the "
                                                               "pretrained model; None: no classify stage.")
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig,
        description="What the lmpipe-continual flow trains when new documents reach data.pretrain's files; "
                    "unused by lmpipe-pipeline.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation, benchmarks, samples.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow runs, the registry and "
                                                                                 "the champion gate.")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if isinstance(self.finetune, ContinueFinetuneConfig) and self.data.finetune is None:
            raise ValueError("finetune.mode='continue' needs a data.finetune corpus")
        for name in ("pretrain", "finetune", "continual"):
            check_batch(getattr(self, name), self.model.block_size, name)
        metric = self.tracking.promote_metric
        if metric is not None and metric not in self.promotable_metrics():
            raise ValueError(f"tracking.promote_metric={metric!r} is not a metric the evaluation reports; "
                             f"choose one of {sorted(self.promotable_metrics())}")
        self._check_gate_can_decide()
        return self

    def _check_gate_can_decide(self) -> None:
        """A corpus figure is scored on at most eval.eval_tokens, a benchmark's on at most its limit: below the
        gate's minimums it could never decide (an SFT file's held-out amount is known only once it is read)."""
        metric, track = self.champion_metric(), self.tracking
        stem, _, stat = metric.rpartition(".")
        name = stem.removeprefix("finetuned.")
        if stat in ("loss", "perplexity", "bits_per_byte") and name != SFT_HELD_OUT \
                and self.eval.eval_tokens < track.min_held_out_tokens:
            raise ValueError(f"eval.eval_tokens={self.eval.eval_tokens} is fewer than tracking.min_held_out_tokens="
                             f"{track.min_held_out_tokens}: the champion gate could never decide on {metric}; raise "
                             "eval.eval_tokens or lower tracking.min_held_out_tokens")
        for i, bench in enumerate(self.eval.benchmarks):
            if bench.name == name and bench.limit is not None and bench.limit < track.min_held_out_examples:
                raise ValueError(f"eval.benchmarks.{i}.limit={bench.limit} is fewer than tracking."
                                 f"min_held_out_examples={track.min_held_out_examples}: the champion gate could "
                                 f"never decide on {metric}; raise the limit or lower "
                                 "tracking.min_held_out_examples")

    def champion_metric(self) -> str:
        """The metric the promotion gate compares: tracking.promote_metric or its default (bits per byte on
        the held-out SFT examples with finetune.mode=sft, else on the fine-tuning corpus)."""
        if self.tracking.promote_metric:
            return self.tracking.promote_metric
        if isinstance(self.finetune, SFTFinetuneConfig):
            return f"finetuned.{SFT_HELD_OUT}.bits_per_byte"
        return f"finetuned.{(self.data.finetune or self.data.pretrain).name}.bits_per_byte"

    def sft_min_held_out(self) -> tuple[int, int] | None:
        """With finetune.mode=sft, the (examples, tokens) the held-out SFT examples hold at least when the file
        has enough (the champion gate's minimums); None in mode continue, whose fine-tuning they do not change."""
        if not isinstance(self.finetune, SFTFinetuneConfig):
            return None
        return self.tracking.min_held_out_examples, self.tracking.min_held_out_tokens

    def promotable_metrics(self) -> set[str]:
        """The fine-tuned model's evaluation metrics, by name (what tracking.promote_metric may be)."""
        corpora = [c.name for c in (self.data.pretrain, self.data.finetune) if c is not None]
        if isinstance(self.finetune, SFTFinetuneConfig):  # the evaluate stage also scores the held-out SFT examples
            corpora.append(SFT_HELD_OUT)
        held_out = {f"finetuned.{c}.{m}" for c in corpora for m in ("loss", "perplexity", "bits_per_byte")}
        return held_out | {f"finetuned.{b.name}.{m}" for b in self.eval.benchmarks for m in ("acc", "acc_norm")}


def check_batch(cfg: Training, block_size: int, section: str) -> None:
    """batch_tokens must split into whole micro-batches of every process; names the fields otherwise."""
    if cfg.batch_tokens is None:
        return
    procs = cfg.processes
    if cfg.batch_tokens % block_size:
        raise ValueError(f"{section}.batch_tokens={cfg.batch_tokens} is not a multiple of "
                         f"model.block_size={block_size}")
    sequences = cfg.batch_tokens // block_size
    micro = 1 if cfg.batch_size == "auto" else cfg.batch_size
    if sequences % (micro * procs):
        raise ValueError(
            f"{section}.batch_tokens={cfg.batch_tokens} is {sequences} sequences of model.block_size={block_size}, "
            f"which does not split into whole micro-batches of {section}.batch_size={cfg.batch_size} on "
            + (f"{section}.distributed.nproc_per_node={procs} processes" if isinstance(cfg, TrainConfig)
               else "its one process")
        )
