"""What every config section shares: strict sections, the error type, reserved token names."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EOT = "<|endoftext|>"
# Byte-level BPE starts from every byte value, so a vocabulary holds these 256 tokens plus the special tokens.
BYTE_ALPHABET = 256
# Seeds feed numpy's and rensa's generators, which take unsigned 64-bit integers.
SEED_MAX = 2**64 - 1


# The demo reads Tiny Shakespeare up to here (max_bytes); its benchmark is made from the rest:
# lmpipe make-cloze data/tinyshakespeare.txt --max-bytes 990909 --out data/benchmarks/shakespeare-cloze.jsonl
DEMO_HELD_OUT_AT = 990_909


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""


def schema_only(**keywords: Any) -> Any:
    """``Annotated`` metadata: JSON-schema keywords (the Prefect form checks them as the user types) for a rule
    that a validator of the section enforces with its own message, e.g.
    ``Annotated[str, schema_only(pattern="^[0-9a-f]{64}$")] | None``."""
    return Field(json_schema_extra=keywords)


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Reserved for chat formats and fine-tuning (issue: SFT chat templates build on these).
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Where the evaluate stage files its score of the fine-tuning run's held-out SFT examples (finetune.mode=sft), in
# place of a corpus name: metrics finetuned.sft/val.loss|perplexity|bits_per_byte|tokens|examples, and a column
# group of the report's held-out table. Corpus and benchmark names match [A-Za-z0-9_.-]+, so with its "/" it can
# be neither (MLflow allows "/" in metric and tag names).
SFT_HELD_OUT = "sft/val"
