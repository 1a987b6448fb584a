"""The whole pipeline's configuration: one typed model, one section per stage.

A config is loaded from a YAML preset with dotted command-line overrides::

    >>> cfg = load_config("configs/demo.yaml", ["pretrain.max_steps=200"])
    >>> cfg.pretrain.max_steps
    200

Every value is validated when the model is built, so a bad value fails before
any work starts, with an error that names the dotted field and the value.
The defaults of ``PipelineConfig()`` *are* the demo: WikiText-2 pretraining and
Tiny Shakespeare fine-tuning from the corpora bundled in ``data/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

EOT = "<|endoftext|>"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """One input of a corpus."""

    uri: str = Field(description="Local path, file:// or http(s):// URL, or 'hf:<dataset id>'.")
    sha256: str | None = Field(None, description="Expected sha256 of a downloaded file.")
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' infers it from the extension."
    )
    text_column: str = Field("text", description="Column holding the text (jsonl, parquet, hf).")
    hf_config: str | None = Field(None, description="Configuration name of a Hub dataset.")
    hf_split: str = Field("train", description="Split of a Hub dataset.")
    doc_boundary: Literal["file", "line", "blank_line", "wikitext_title"] = Field(
        "file", description="How plain text is cut into documents."
    )

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if not self.uri.strip():
            raise ValueError("uri is empty")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
            self.__dict__["sha256"] = digest
        return self


class CorpusConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in paths and metrics.")
    sources: list[SourceConfig] = Field(min_length=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of documents held out.")


class CleanConfig(Section):
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = Field(True, description="Drop control characters other than \\n and \\t.")
    normalize_whitespace: bool = Field(
        True, description="Strip trailing spaces, collapse runs of blank lines, trim the document."
    )
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this (after cleaning).")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this.")
    dedup: bool = Field(True, description="Drop exact duplicate documents (first one kept).")


class ShardConfig(Section):
    shard_tokens: int = Field(100_000_000, ge=1024, description="Tokens per shard file.")
    encode_batch_size: int = Field(256, ge=1, description="Documents per tokenizer batch.")


class DataConfig(Section):
    pretrain: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(
            name="wikitext2",
            sources=[
                SourceConfig(uri="data/wikitext2-valid.txt", doc_boundary="wikitext_title",
                             sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
                SourceConfig(uri="data/wikitext2-test.txt", doc_boundary="wikitext_title",
                             sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
            ],
        )
    )
    finetune: CorpusConfig | None = Field(
        default_factory=lambda: CorpusConfig(
            name="tinyshakespeare",
            sources=[
                SourceConfig(uri="data/tinyshakespeare.txt", doc_boundary="blank_line",
                             sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
            ],
        )
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    download_retries: int = Field(3, ge=0, description="Retries of a download that failed transiently.")
    download_retry_delay_s: float = Field(
        2.0, ge=0.0, description="First retry delay; each next one is 5x longer (with jitter)."
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        if self.finetune is not None and self.finetune.name == self.pretrain.name:
            raise ValueError(f"finetune.name {self.finetune.name!r} is also pretrain.name: corpora need distinct names")
        return self


class TokenizerConfig(Section):
    # special_tokens comes first so vocab_size's check can see it.
    special_tokens: list[str] = Field(default_factory=lambda: [EOT], min_length=1)
    eot_token: str = EOT
    vocab_size: int = Field(4096, ge=1, le=2**32 - 1)
    min_frequency: int = Field(2, ge=1)

    @field_validator("special_tokens")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or any(not t for t in v):
            raise ValueError(f"special tokens must be unique and non-empty, got {v}")
        return v

    @field_validator("eot_token")
    @classmethod
    def _eot_known(cls, v: str, info: ValidationInfo) -> str:
        specials = info.data.get("special_tokens")
        if specials is not None and v not in specials:
            raise ValueError(f"eot_token {v!r} must be one of special_tokens {specials}")
        return v

    @field_validator("vocab_size")
    @classmethod
    def _room_for_bytes(cls, v: int, info: ValidationInfo) -> int:
        n_special = len(info.data.get("special_tokens") or [])
        floor = 256 + n_special
        if v < floor:
            raise ValueError(
                f"{v} is too small: the byte alphabet (256) plus {n_special} special token(s) "
                f"needs at least {floor}"
            )
        return v


class ModelConfig(Section):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)  # before n_embd, whose check reads it
    n_embd: int = Field(128, ge=1)
    block_size: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True

    @field_validator("n_embd")
    @classmethod
    def _divisible(cls, v: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")
        if n_head and v % n_head:
            raise ValueError(f"{v} must be divisible by n_head={n_head}")
        return v


class TrainConfig(Section):
    max_steps: int = Field(600, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)
    min_lr: float = Field(2e-4, ge=0.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.95, gt=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 disables clipping.")
    eval_interval: int = Field(100, ge=1, description="Steps between validation losses.")
    eval_batches: int = Field(8, ge=1)
    log_interval: int = Field(10, ge=1, description="Steps between metric flushes.")
    checkpoint_interval: int = Field(200, ge=1)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None keeps torch's default.")
    peak_flops: float | None = Field(
        None, gt=0.0, description="Device peak FLOP/s for MFU; None: known GPUs' dense bf16 peak, else no MFU."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        return self


class FinetuneConfig(TrainConfig):
    max_steps: int = Field(200, ge=1)
    learning_rate: float = Field(6e-4, gt=0.0)
    min_lr: float = Field(6e-5, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    mode: Literal["continue", "sft"] = Field(
        "continue", description="'continue': train on data.finetune; 'sft': prompt/response JSONL."
    )
    sft_path: str | None = Field(None, description="JSONL with 'prompt' and 'response' per line (mode sft).")
    init_checkpoint: str | None = Field(
        None, description="Checkpoint directory to start from; default: this pipeline's pretrained model."
    )

    @model_validator(mode="after")
    def _check_mode(self) -> FinetuneConfig:
        if self.mode == "sft" and not self.sft_path:
            raise ValueError("mode='sft' needs sft_path")
        return self


class EvalConfig(Section):
    eval_tokens: int = Field(32_768, ge=1, description="Held-out tokens scored per model and corpus.")
    batch_size: int = Field(32, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "The history of"])
    max_new_tokens: int = Field(48, ge=0)
    temperature: float = Field(0.8, gt=0.0)
    top_k: int | None = Field(40, ge=1)
    seed: int = 1234


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workdir>/mlflow.db.")
    experiment: str = "lmpipe"
    registered_model: str = "lmpipe-gpt"
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                       description="Registry alias moved to each new version ('latest' is reserved by MLflow).")


class PipelineConfig(Section):
    """Everything one pipeline run needs. The defaults are the demo."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str = Field(".lmpipe", description="Where artifacts, the MLflow store and checkpoints live.")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.finetune.mode == "continue" and self.data.finetune is None:
            raise ValueError("finetune.mode='continue' needs a data.finetune corpus")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        shown = "" if e["type"] in ("missing",) else f" (got {e['input']!r})"
        if isinstance(e.get("input"), dict):
            shown = ""
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig, raising ConfigError that names each bad field."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (so 3, 1e-3, true, [a, b])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML: {err}") from None
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if isinstance(child, list) and keys[i + 1].isdigit():
            raise ConfigError(f"override {dotted}: list items cannot be overridden one by one; set {'.'.join(keys[: i + 1])} whole")
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML preset (or the defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
        source = str(p)
    # Start from the resolved preset so overrides can reach into default sections.
    data = build_config(data, source).model_dump(mode="json")
    for override in overrides:
        apply_override(data, override)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_config(data, source)
