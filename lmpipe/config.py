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


# The demo reads Tiny Shakespeare up to here (max_bytes); its benchmark is made from the rest:
# lmpipe make-cloze data/tinyshakespeare.txt --max-bytes 990909 --out data/benchmarks/shakespeare-cloze.jsonl
DEMO_HELD_OUT_AT = 990_909


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """One input of a corpus: a file, a glob of files, a URL or a Hub dataset, read as a stream."""

    uri: str = Field(description="Local path or glob, file://, http(s)://, an fsspec URL (s3://, gs://, hf://) "
                                 "or 'hf:<dataset id>' (streamed from the Hub).")
    sha256: str | None = Field(None, description="Expected sha256 of a single file's raw bytes.")
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' infers it from the extension (.txt, .jsonl, .json, .parquet)."
    )
    compression: Literal["auto", "none", "gzip", "zstd"] = Field(
        "auto", description="'auto' infers it from the extension (.gz, .zst)."
    )
    text_column: str = Field("text", description="Field holding the text (jsonl, parquet, hf).")
    id_column: str | None = Field(None, description="Field holding a document id; None numbers documents.")
    hf_config: str | None = Field(None, description="Configuration name of a Hub dataset.")
    hf_split: str = Field("train", description="Split of a Hub dataset.")
    hf_revision: str | None = Field(None, description="Commit or tag of a Hub dataset; pin it for reproducibility.")
    doc_boundary: Literal["file", "line", "blank_line", "wikitext_title"] = Field(
        "file", description="How plain text is cut into documents."
    )
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents (the first ones).")
    max_bytes: int | None = Field(None, ge=1, description="Stop after documents totalling this many UTF-8 bytes.")

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


class GopherQualityConfig(Section):
    """Gopher quality rules (Rae et al. 2021, appendix A); defaults are the published thresholds."""

    enabled: bool = False
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0.0)
    max_mean_word_length: float = Field(10.0, gt=0.0)
    max_symbol_word_ratio: float = Field(0.1, ge=0.0, description="'#' and ellipses per word.")
    max_bullet_lines_ratio: float = Field(0.9, ge=0.0, le=1.0, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of lines ending with an ellipsis.")
    min_alpha_words_ratio: float = Field(0.8, ge=0.0, le=1.0, description="Share of words with a letter.")
    min_stop_words: int = Field(2, ge=0, description="Distinct stop words a document must contain.")
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])


class GopherRepetitionConfig(Section):
    """Gopher repetition rules (Rae et al. 2021, table A1); defaults are the published thresholds."""

    enabled: bool = False
    max_dup_line_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of lines that repeat an earlier one.")
    max_dup_para_ratio: float = Field(0.3, ge=0.0, le=1.0)
    max_dup_line_char_ratio: float = Field(0.2, ge=0.0, le=1.0, description="Characters in duplicated lines.")
    max_dup_para_char_ratio: float = Field(0.2, ge=0.0, le=1.0)
    max_top_ngram_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters in the most frequent n-gram.")
    max_dup_ngram_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of characters in n-grams that occur more than once.")


class C4Config(Section):
    """C4 rules (Raffel et al. 2020): line-level removal, then document-level drops."""

    enabled: bool = False
    min_words_per_line: int = Field(3, ge=0, description="Lines with fewer words are removed.")
    terminal_punctuation: bool = Field(True, description="Remove lines not ending in . ! ? or a quote.")
    max_word_length: int = Field(1000, ge=1, description="Remove lines with a longer word.")
    javascript: bool = Field(True, description="Remove lines mentioning 'javascript'.")
    policy: bool = Field(True, description="Remove lines mentioning cookie/terms-of-use/privacy policies.")
    citations: bool = Field(True, description="Strip Wikipedia-style [1], [citation needed] markers.")
    min_sentences: int = Field(5, ge=0, description="Drop documents with fewer sentences after line removal.")
    lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    curly_bracket: bool = Field(True, description="Drop documents containing '{' (code, templates).")


class LanguageConfig(Section):
    """Language identification with py3langid (its model ships inside the package)."""

    enabled: bool = False
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep.")
    min_score: float = Field(0.65, ge=0.0, le=1.0, description="Keep a document if its top language is listed "
                                                                 "and scores at least this.")


class MinHashConfig(Section):
    """Near-duplicate removal: MinHash signatures over word n-grams, LSH bands, then a Jaccard check."""

    enabled: bool = False
    ngram: int = Field(5, ge=1, description="Shingle size in words.")
    permutations: int = Field(112, ge=2, description="Hash functions per signature.")
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Estimated Jaccard similarity counted as duplicate.")
    seed: int = 1


class PIIConfig(Section):
    """Masking of personal data with fixed placeholders."""

    enabled: bool = False
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    email_replacement: str = "<EMAIL>"
    ip_replacement: str = "<IP_ADDRESS>"
    phone_replacement: str = "<PHONE_NUMBER>"


class CleanConfig(Section):
    """Cleaning steps, each switchable. Transforms run first, then filters, then de-duplication.

    The web-text filters (language, Gopher, C4, MinHash) are off by default: they are tuned for
    crawled web pages and would drop most of a play's short speeches. configs/fineweb.yaml turns
    them on.
    """

    fix_text: bool = Field(False, description="Repair mojibake and broken Unicode with ftfy.")
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = Field(True, description="Drop control characters other than \\n and \\t.")
    gutenberg_boilerplate: bool = Field(False, description="Cut Project Gutenberg headers and licence footers.")
    normalize_whitespace: bool = Field(
        True, description="Strip trailing spaces, collapse runs of blank lines, trim the document."
    )
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this (after cleaning).")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this.")
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    dedup: bool = Field(True, description="Drop exact duplicate documents (first one kept).")
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    report_samples: int = Field(5, ge=0, description="Removed documents kept as examples per step in the report.")


class CorpusConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in paths and metrics.")
    sources: list[SourceConfig] = Field(min_length=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of documents held out.")
    clean: CleanConfig | None = Field(None, description="This corpus's cleaning; None uses data.clean.")


class ShardConfig(Section):
    shard_tokens: int = Field(100_000_000, ge=1024, description="Tokens per shard file.")
    encode_batch_size: int = Field(256, ge=1, description="Documents per tokenizer batch.")


class RunnerConfig(Section):
    """Where the per-chunk data tasks run. Output is byte-identical whichever runner is used."""

    kind: Literal["threads", "processes", "dask"] = Field(
        "threads", description="Prefect task runner for chunk tasks: threads or processes on this machine, "
                               "or a Dask cluster (prefect-dask).")
    workers: int | None = Field(None, ge=1, description="Parallel chunk tasks; None: one per CPU core.")
    address: str | None = Field(None, description="Dask scheduler address (tcp://host:8786); None starts a "
                                                  "local cluster of `workers` processes.")


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
                # The last ~10% of the speeches are never read: the held-out cloze benchmark comes from them.
                SourceConfig(uri="data/tinyshakespeare.txt", doc_boundary="blank_line", max_bytes=DEMO_HELD_OUT_AT,
                             sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
            ],
        )
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    chunk_bytes: int = Field(64 * 2**20, ge=1024, description="Documents are processed in chunks of about this "
                                                             "many UTF-8 bytes, one Prefect task per chunk.")
    strict: bool = Field(False, description="Fail on the first bad record (invalid UTF-8, bad JSON, missing "
                                            "field, truncated file) instead of counting and skipping it.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    download_retries: int = Field(3, ge=0, description="Retries of a download that failed transiently.")
    download_retry_delay_s: float = Field(
        2.0, ge=0.0, description="First retry delay; each next one is 5x longer (with jitter)."
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        if self.finetune is not None and self.finetune.name == self.pretrain.name:
            raise ValueError(f"finetune.name {self.finetune.name!r} is also pretrain.name: corpora need distinct names")
        return self


# Reserved for chat formats and fine-tuning (issue: SFT chat templates build on these).
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Where the evaluate stage files its score of the fine-tuning run's held-out SFT examples (finetune.mode=sft), in
# place of a corpus name: metrics finetuned.sft/val.loss|perplexity|bits_per_byte|tokens|examples, and a column
# group of the report's held-out table. Corpus and benchmark names match [A-Za-z0-9_.-]+, so with its "/" it can
# be neither (MLflow allows "/" in metric and tag names).
SFT_HELD_OUT = "sft/val"


class TokenizerConfig(Section):
    # special_tokens comes first so vocab_size's check can see it.
    special_tokens: list[str] = Field(default_factory=lambda: [EOT, *CHAT_TOKENS], min_length=1,
                                      description="Reserved tokens, ids 0..k-1 in this order.")
    eot_token: str = EOT
    vocab_size: int = Field(4096, ge=1, le=2**32 - 1)
    min_frequency: int = Field(2, ge=1)
    pretokenizer: Literal["gpt2", "gpt4"] = Field(
        "gpt2", description="Split pattern before BPE: GPT-2's, or GPT-4's (cl100k: digits in groups of 1-3, "
                            "case-insensitive contractions).")
    sample_bytes: int | None = Field(
        None, ge=1, description="Train on a deterministic sample of about this many bytes of the cleaned "
                                "corpus; None trains on all of it.")

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


class DistributedConfig(Section):
    """More than one process: ``torchrun`` on this node, one process per GPU (or CPU process with gloo)."""

    nproc_per_node: int = Field(1, ge=1, description="Training processes; > 1 launches torchrun (DDP or FSDP).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="'ddp': a full replica per process; 'fsdp': FSDP2 fully_shard, for models whose "
                           "training state does not fit one GPU (their fp32 weights must)."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="'auto': nccl on CUDA, gloo on CPU.")


class TrainConfig(Section):
    max_steps: int = Field(600, ge=1, description="Optimizer steps.")
    batch_size: int | Literal["auto"] = Field(
        16, description="Sequences per micro-batch per process; 'auto' (needs batch_tokens): the largest "
                        "that fits the device."
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step (ignored when "
                                                       "batch_tokens is set).")
    batch_tokens: int | None = Field(
        None, ge=1, description="Global batch in tokens per optimizer step; gradient accumulation steps are "
                                "derived: batch_tokens / (batch_size x block_size x processes), which must be whole."
    )
    compile: bool | None = Field(None, description="torch.compile the model; None: on for CUDA, off elsewhere.")
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
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better val loss; the best "
                                "checkpoint, not the last, becomes the stage's model. None: train max_steps."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="Improvement a val loss needs to count.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        if self.batch_size == "auto" and self.batch_tokens is None:
            raise ValueError("batch_size='auto' needs batch_tokens (the global batch the micro-batches add up to)")
        return self

    def sequences_per_step(self, block_size: int) -> int:
        """Global batch in sequences: what one optimizer step trains on, however it is split."""
        if self.batch_tokens is not None:
            return self.batch_tokens // block_size
        assert isinstance(self.batch_size, int)
        return self.batch_size * self.grad_accum_steps * self.distributed.nproc_per_node


class LoraConfig(Section):
    """LoRA adapters (lmpipe.lora): the base weights stay frozen, low-rank updates of the targeted layers learn."""

    r: int = Field(8, ge=1, description="Rank of each update.")
    alpha: float = Field(16.0, gt=0.0, description="The update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"], min_length=1,
        description="Linear layers to adapt, by name or name suffix (c_attn, c_proj, c_fc, attn.c_proj, "
                    "transformer.h.0.mlp.c_fc) or 'all-linear'.")
    save_adapter: bool = Field(False, description="Also publish adapter/: only the adapter weights, in peft's "
                                                  "format for the transformers export. The merged weights are "
                                                  "always published (model/), for evaluation and serving.")


class FinetuneConfig(TrainConfig):
    max_steps: int = Field(200, ge=1)
    learning_rate: float = Field(6e-4, gt=0.0)
    min_lr: float = Field(6e-5, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    mode: Literal["continue", "sft"] = Field(
        "continue", description="'continue': train on data.finetune; 'sft': the chat examples of sft_path."
    )
    sft_path: str | None = Field(
        None, description="JSONL of SFT examples (mode sft), one per line in any of the shapes {prompt, completion}, "
                          "{prompt, response}, Alpaca {instruction, input (optional), output} or {messages: [{role: "
                          "system|user|assistant, content}, ...]}; rendered with the chat template on the "
                          "tokenizer's reserved tokens, the loss only on the assistant's replies.")
    sft_layout: Literal["padded", "packed"] = Field(
        "padded", description="'padded': each example fills one model.block_size window (end-of-text padding, no "
                              "loss), so no example attends to another; 'packed': examples back to back, cheaper "
                              "for examples much shorter than the context; a window may span several examples, "
                              "but each attends only within itself (block-diagonal causal mask split at the "
                              "end-of-text tokens) with positions restarting at its start, as at inference.")
    sft_skip_long: bool = Field(False, description="Skip and count SFT examples longer than model.block_size tokens "
                                                   "instead of failing on the first.")
    sft_skip_bad: bool = Field(False, description="Skip and count malformed SFT lines instead of failing on the "
                                                  "first.")
    init_checkpoint: str | None = Field(
        None, description="Checkpoint directory to start from; default: this pipeline's pretrained model."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every weight; None: full "
                                                      "fine-tuning.")

    @model_validator(mode="after")
    def _check_mode(self) -> FinetuneConfig:
        if self.mode == "sft" and not self.sft_path:
            raise ValueError("mode='sft' needs sft_path")
        return self


class ClassifyConfig(Section):
    """Sequence classification fine-tuning, GPT-1 style (lmpipe.classify): the hidden state of the last token
    (an end-of-text "extract" token appended to each text) goes through a linear head."""

    path: str = Field(description="Labelled examples: a CSV file with a header row (.csv) or JSONL, one object a "
                                  "line (.jsonl or .json); the format follows the suffix.")
    text_field: str = Field("text", min_length=1, description="Column / key holding the text.")
    label_field: str = Field("label", min_length=1, description="Column / key holding the label (a string; JSON "
                                                                "integers are read as their decimal string).")
    labels: list[str] | None = Field(
        None, description="The classes, in the head's output order. None: the sorted set of labels of the "
                          "training split. Given: a line with another label is an error (or skipped with skip_bad). "
                          "Integers are taken as their decimal string, as in the data.")
    val_every: int = Field(5, ge=2, description="Every val_every-th example (in file order) is held out for "
                                                "validation, at least one.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per step.")
    learning_rate: float = Field(5e-4, gt=0.0)
    min_lr: float = Field(5e-5, ge=0.0, description="Where the cosine decay ends, at max_steps.")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decay of matrices (not of biases and gains).")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 disables clipping.")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the pooled hidden state (GPT-1: 0.1).")
    lm_loss_weight: float = Field(0.0, ge=0.0, description="GPT-1's auxiliary language-modelling loss on the texts, "
                                                           "added with this weight; 0 trains the classifier alone.")
    eval_interval: int = Field(50, ge=1, description="Steps between validations (and after the last step).")
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    skip_bad: bool = Field(False, description="Skip and count malformed lines (and labels outside `labels`) "
                                              "instead of failing on the first.")
    skip_long: bool = Field(False, description="Skip and count texts longer than model.block_size tokens (with "
                                               "the extract token); default: keep their LAST tokens (the ones "
                                               "the classifying token sees) and count them as truncated.")
    init_checkpoint: str | None = Field(
        None, description="Checkpoint directory of the body to start from; default: this pipeline's pretrained "
                          "model (GPT-1: pretrain, then fine-tune on the task).")

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels(cls, v: Any) -> Any:
        """`labels: [0, 1]` in YAML means the labels a JSON file writes as 0 and 1 (read as "0" and "1")."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> ClassifyConfig:
        if Path(self.path).suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise ValueError(f"path {self.path!r} must end in .csv, .jsonl or .json (the format follows the suffix)")
        if self.text_field == self.label_field:
            raise ValueError(f"text_field and label_field are both {self.text_field!r}")
        if self.labels is not None:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(self.labels):
                raise ValueError(f"labels must be at least 2 distinct non-empty strings, got {self.labels}")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        return self


class BenchmarkConfig(Section):
    """A multiple-choice benchmark scored by log-likelihood (acc and acc_norm, as lm-evaluation-harness)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the report and the metric keys.")
    kind: Literal["hellaswag", "arc", "piqa"] = Field(description="The JSONL shape (the dataset's own fields).")
    path: str | None = Field(None, description="Local JSONL file: scored when hub is unset, and the fallback when "
                                               "the Hub cannot be reached.")
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
    eval_tokens: int = Field(32_768, ge=1, description="Held-out tokens scored per model and corpus.")
    batch_size: int = Field(32, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "The history of"])
    max_new_tokens: int = Field(48, ge=0)
    temperature: float = Field(0.8, ge=0.0, description="0: greedy (the most likely token).")
    top_k: int | None = Field(40, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                                                                   "whose probabilities add up to top_p.")
    seed: int = 1234
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
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workdir>/mlflow.db.")
    experiment: str = "lmpipe"
    registered_model: str = "lmpipe-gpt"
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                       description="Registry alias moved to each new version ('latest' is reserved by MLflow).")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                                description="Alias the promotion gate moves to a new version that beats the "
                                            "current champion on promote_metric.")
    promote_metric: str | None = Field(
        None,
        description="Evaluation metric of the fine-tuned model the gate compares (finetuned.<corpus>.loss|"
                    "perplexity|bits_per_byte, finetuned.<benchmark>.acc|acc_norm or, with finetune.mode=sft, "
                    "finetuned.sft/val.loss|perplexity|bits_per_byte: its held-out SFT examples, the assistant "
                    "replies only). None: bits per byte (tokenizer-independent) on the fine-tuning corpus, or with "
                    "finetune.mode=sft on the held-out SFT replies (finetuned.sft/val.bits_per_byte): the task SFT "
                    "trains for, where data.finetune is a corpus SFT never trains on.",
    )
    promote_mode: Literal["min", "max"] = Field("min", description="'min': lower is better (loss, bits per "
                                                                    "byte); 'max': higher is better (accuracy).")

    @model_validator(mode="after")
    def _two_aliases(self) -> TrackingConfig:
        # alias moves to every new version; one name for both would hand the champion alias past the gate.
        if self.alias == self.champion_alias:
            raise ValueError(f"alias and champion_alias must differ (both {self.alias!r}): alias moves to every "
                             "new version, champion_alias only to one that beats the champion")
        return self


class PipelineConfig(Section):
    """Everything one pipeline run needs. The defaults are the demo."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str = Field(".lmpipe", description="Where artifacts, the MLflow store and checkpoints live.")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    classify: ClassifyConfig | None = Field(None, description="A sequence classifier fine-tuned from the "
                                                               "pretrained model; None: no classify stage.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.finetune.mode == "continue" and self.data.finetune is None:
            raise ValueError("finetune.mode='continue' needs a data.finetune corpus")
        for name in ("pretrain", "finetune"):
            check_batch(getattr(self, name), self.model.block_size, name)
        metric = self.tracking.promote_metric
        if metric is not None and metric not in self.promotable_metrics():
            raise ValueError(f"tracking.promote_metric={metric!r} is not a metric the evaluation reports; "
                             f"choose one of {sorted(self.promotable_metrics())}")
        if self.finetune.distributed.nproc_per_node != 1:
            raise ValueError(f"finetune.distributed.nproc_per_node={self.finetune.distributed.nproc_per_node}: "
                             "only pretraining launches torchrun; fine-tuning runs in one process")
        return self

    def champion_metric(self) -> str:
        """The metric the promotion gate compares: tracking.promote_metric or its default (bits per byte on
        the held-out SFT examples with finetune.mode=sft, else on the fine-tuning corpus)."""
        if self.tracking.promote_metric:
            return self.tracking.promote_metric
        if self.finetune.mode == "sft":
            return f"finetuned.{SFT_HELD_OUT}.bits_per_byte"
        return f"finetuned.{(self.data.finetune or self.data.pretrain).name}.bits_per_byte"

    def promotable_metrics(self) -> set[str]:
        """The fine-tuned model's evaluation metrics, by name (what tracking.promote_metric may be)."""
        corpora = [c.name for c in (self.data.pretrain, self.data.finetune) if c is not None]
        if self.finetune.mode == "sft":  # the evaluate stage also scores the held-out SFT examples
            corpora.append(SFT_HELD_OUT)
        held_out = {f"finetuned.{c}.{m}" for c in corpora for m in ("loss", "perplexity", "bits_per_byte")}
        return held_out | {f"finetuned.{b.name}.{m}" for b in self.eval.benchmarks for m in ("acc", "acc_norm")}


def check_batch(cfg: TrainConfig, block_size: int, section: str) -> None:
    """batch_tokens must split into whole micro-batches of every process; names the fields otherwise."""
    if cfg.batch_tokens is None:
        return
    procs = cfg.distributed.nproc_per_node
    if cfg.batch_tokens % block_size:
        raise ValueError(f"{section}.batch_tokens={cfg.batch_tokens} is not a multiple of "
                         f"model.block_size={block_size}")
    sequences = cfg.batch_tokens // block_size
    micro = 1 if cfg.batch_size == "auto" else cfg.batch_size
    if sequences % (micro * procs):
        raise ValueError(
            f"{section}.batch_tokens={cfg.batch_tokens} is {sequences} sequences of model.block_size={block_size}, "
            f"which does not split into whole micro-batches of {section}.batch_size={cfg.batch_size} on "
            f"{section}.distributed.nproc_per_node={procs} processes"
        )


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
