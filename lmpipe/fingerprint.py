"""Stage fingerprints: one hash links the Prefect cache key, the MLflow tag and the files on disk.

A fingerprint covers the stage's config section, its upstream fingerprints and
its code version (a hash of the source of the modules the stage runs), so a
change to any of them re-runs the stage and everything downstream, and nothing
else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from typing import Any

from pydantic import BaseModel

# Which library modules decide each stage's output. Editing one re-runs that stage.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "download": ("lmpipe.download", "lmpipe.docset"),
    "clean_chunk": ("lmpipe.clean", "lmpipe.filters", "lmpipe.dedup", "lmpipe.docset"),
    "clean": ("lmpipe.clean", "lmpipe.dedup", "lmpipe.docset"),
    "train_tokenizer": ("lmpipe.tokenizer", "lmpipe.docset"),
    "encode_chunk": ("lmpipe.shards", "lmpipe.tokenizer", "lmpipe.docset"),
    "shard": ("lmpipe.shards", "lmpipe.tokenizer"),
    "pretrain": ("lmpipe.model", "lmpipe.train", "lmpipe.checkpoint", "lmpipe.shards", "lmpipe.loader"),
    "finetune": ("lmpipe.model", "lmpipe.train", "lmpipe.checkpoint", "lmpipe.shards", "lmpipe.sft", "lmpipe.lora",
                 "lmpipe.tokenizer", "lmpipe.loader"),
    # lmpipe.lora: checkpoint loading merges a LoRA step's adapters (classify.init_checkpoint may be one).
    "classify": ("lmpipe.model", "lmpipe.classify", "lmpipe.train", "lmpipe.checkpoint", "lmpipe.tokenizer",
                 "lmpipe.sft", "lmpipe.benchmarks", "lmpipe.lora"),
    "evaluate": ("lmpipe.model", "lmpipe.evaluate", "lmpipe.checkpoint", "lmpipe.shards", "lmpipe.tokenizer",
                 "lmpipe.benchmarks", "lmpipe.sft", "lmpipe.lora", "lmpipe.loader"),
    "register": ("lmpipe.tracking",),
}
# Every stage publishes through lmpipe.stage, so its code is part of every stage's version.
COMMON_MODULES = ("lmpipe.stage",)

FINGERPRINT_CHARS = 16


@cache
def code_version(stage: str) -> str:
    """sha256 over the source files of the stage's modules (short)."""
    h = hashlib.sha256()
    for name in (*STAGE_MODULES[stage], *COMMON_MODULES):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"stage {stage!r}: module {name} not found")
        with open(spec.origin, "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:FINGERPRINT_CHARS]


def _plain(obj: Any) -> Any:
    """json.dumps fallback: config sections become their JSON form, wherever they are nested."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def stage_fingerprint(stage: str, config: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    """Deterministic hash of (stage, config, upstream fingerprints, code version)."""
    payload = json.dumps(
        {"stage": stage, "config": config, "upstream": list(upstream), "code": code_version(stage)},
        sort_keys=True,
        separators=(",", ":"),
        default=_plain,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_CHARS]
