"""Config of evaluation (held-out data, benchmarks, samples) and of tracking (MLflow, registry, champion)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmpipe.config.base import Section


class BenchmarkConfig(Section):
    """A multiple-choice benchmark scored by log-likelihood (acc and acc_norm, as lm-evaluation-harness)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the report and the metric keys.")
    kind: Literal["hellaswag", "arc", "piqa"] = Field(description="The JSONL shape (the dataset's own fields).")
    path: str | None = Field(None, description="Local JSONL file (path, hub or both are needed): scored when hub "
                                               "is unset, and the fallback when the Hub cannot be reached.")
    hub: str | None = Field(None, description="Hugging Face dataset id (e.g. 'Rowan/hellaswag', 'allenai/ai2_arc', "
                                              "'baber/piqa'), downloaded when online into a JSONL cache.")
    hub_config: str | None = Field(None, description="The dataset's configuration, e.g. 'ARC-Challenge'.")
    split: str | None = Field(None, description="Hub split; None: the one lm-evaluation-harness scores "
                                                "(hellaswag and piqa: validation, arc: test).")
    revision: str | None = Field(None, description="Hub revision; a commit sha pins the data (recommended: a "
                                                   "branch moves, and its download is refreshed on every run).")
    limit: int | None = Field(None, ge=1, description="Score only the first N examples.")
    skip_bad: bool = Field(False, description="Skip and count malformed lines instead of failing on the first.")

    @model_validator(mode="after")
    def _a_source(self) -> BenchmarkConfig:
        # Either source alone is enough; both: the Hub when reachable, the file otherwise.
        if self.path is None and self.hub is None:
            raise ValueError(f"benchmark {self.name!r} needs a source: set path (a local JSONL file), "
                             "hub (a Hugging Face dataset id), or both")
        if self.hub is None and (self.hub_config or self.split or self.revision):
            raise ValueError(f"benchmark {self.name!r}: hub_config, split and revision apply to hub, which is unset")
        return self


class EvalConfig(Section):
    """The evaluate stage: held-out loss of the base and fine-tuned models on every corpus, the benchmarks, and
    sample generations."""

    eval_tokens: int = Field(32_768, ge=1, description="Held-out tokens scored per model and corpus (at most the "
                                                       "validation split).")
    batch_size: int = Field(32, ge=1, description="Sequences of model.block_size tokens per forward pass when "
                                                  "scoring.")
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "The history of"],
                               description="Prompts each model continues; the samples are in the report.")
    max_new_tokens: int = Field(48, ge=0, description="Tokens generated per prompt.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0: greedy (the most likely token).")
    top_k: int | None = Field(40, ge=1, description="Sample from the k most likely tokens; None: from all.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                                                                   "whose probabilities add up to top_p.")
    seed: int = Field(1234, description="Seed of the sampling.")
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=lambda: [BenchmarkConfig(name="shakespeare_cloze", kind="hellaswag",
                                                 path="data/benchmarks/shakespeare-cloze.jsonl")],
        description="Multiple-choice benchmarks every model is scored on (the demo: next lines of the Tiny "
                    "Shakespeare speeches its fine-tuning corpus leaves unread, data/README.md).")

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, v: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.name for b in v]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")
        return v


class TrackingConfig(Section):
    """MLflow: where runs are recorded, the registered model, and the champion gate that decides which version
    the champion alias points at."""

    uri: str | None = Field(None, description="MLflow tracking URI (a server's `http://host:5000` or a database "
                                              "URI); None: `sqlite:///<workdir>/mlflow.db`.")
    experiment: str = Field("lmpipe", min_length=1, description="MLflow experiment the runs are recorded in.")
    registered_model: str = Field("lmpipe-gpt", min_length=1, description="Registered model each run adds a "
                                                                          "version of.")
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                       description="Registry alias moved to each new version ('latest' is reserved by "
                                   "MLflow); not champion_alias.")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                                description="Alias the promotion gate moves to a new version that beats the "
                                            "current champion on promote_metric.")
    promote_metric: str | None = Field(
        None,
        description="Evaluation metric of the fine-tuned model the gate compares (`finetuned.<corpus>.loss`, "
                    "`.perplexity` or `.bits_per_byte`, `finetuned.<benchmark>.acc` or `.acc_norm` or, with "
                    "finetune.mode=sft, `finetuned.sft/val.loss`, `.perplexity` or `.bits_per_byte`: its held-out "
                    "SFT examples, the assistant replies only). None: bits per byte (tokenizer-independent) on the "
                    "fine-tuning corpus, or with finetune.mode=sft on the held-out SFT replies "
                    "(finetuned.sft/val.bits_per_byte): the task SFT trains for, where data.finetune is a corpus SFT "
                    "never trains on.",
    )
    promote_mode: Literal["min", "max"] = Field("min", description="'min': lower is better (loss, bits per "
                                                                    "byte); 'max': higher is better (accuracy).")
    min_held_out_examples: int = Field(
        30, ge=1,
        description="The gate decides only on a figure scored on at least this many held-out examples (a "
                    "benchmark's items, held-out SFT examples); otherwise the version is registered but not "
                    "decided on, and the champion stays. With finetune.mode=sft the held-out split holds out at "
                    "least this many when the file has twice as many usable examples.")
    min_held_out_tokens: int = Field(
        1000, ge=1,
        description="The gate decides only on a held-out loss, perplexity or bits-per-byte figure scored on at "
                    "least this many tokens (of a corpus's validation split: at most eval.eval_tokens; of the "
                    "held-out SFT examples: their trained reply tokens).")

    @model_validator(mode="after")
    def _two_aliases(self) -> TrackingConfig:
        # alias moves to every new version; one name for both would hand the champion alias past the gate.
        if self.alias == self.champion_alias:
            raise ValueError(f"alias and champion_alias must differ (both {self.alias!r}): alias moves to every "
                             "new version, champion_alias only to one that beats the champion")
        return self
