"""What the training stages share: the tokenizer they train with, the shards they read, what they publish."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lmpipe.artifacts import BuildOutput, StageResult
from lmpipe.config.training import LoraConfig
from lmpipe.data.shards import TokenSplit
from lmpipe.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_fingerprint
from lmpipe.model.checkpoint import MODEL_DIR, WEIGHTS_FILE, export_model, read_state
from lmpipe.model.lora import write_peft_adapter
from lmpipe.training.checkpoint import BEST_DIR, CHECKPOINTS_DIR
from lmpipe.training.launch import SPEC_FILE, SUMMARY_FILE
from lmpipe.training.loop import TrainSummary

ADAPTER_DIR = "adapter"  # LoRA with save_adapter: the adapter weights alone (peft format)


# ---------------------------------------------------------------- stages


def tokenizer_info(tokenizer: StageResult) -> tuple[Path, str, int]:
    """(tokenizer.json path, its fingerprint, vocabulary size) of a tokenizer stage."""
    tok_path = tokenizer.path(TOKENIZER_FILE)
    return tok_path, tokenizer_fingerprint(tok_path), load_tokenizer(tok_path).get_vocab_size()


def open_splits(shards: StageResult, tok_fingerprint: str, field: str) -> tuple[TokenSplit, TokenSplit]:
    train_src, val_src = TokenSplit(Path(shards.out_dir), "train"), TokenSplit(Path(shards.out_dir), "val")
    if train_src.tokenizer_fingerprint != tok_fingerprint:
        raise ValueError(
            f"{field}: shards in {shards.out_dir} were encoded with tokenizer {train_src.tokenizer_fingerprint}, "
            f"the given tokenizer is {tok_fingerprint}; re-run the shard stage"
        )
    return train_src, val_src


def publish_model(tmp: Path, summary: TrainSummary) -> BuildOutput:
    """Leave model/ (the checkpoint that goes forward, without optimizer state) and metrics.jsonl; drop
    the history."""
    export_model(summary.checkpoint, tmp / MODEL_DIR)
    shutil.rmtree(tmp / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(tmp / BEST_DIR, ignore_errors=True)
    for name in (SPEC_FILE, SUMMARY_FILE):  # a torchrun run's hand-over files
        (tmp / name).unlink(missing_ok=True)
    return BuildOutput(
        metrics={
            "final_train_loss": summary.final_train_loss,
            "final_val_loss": summary.final_val_loss if summary.final_val_loss is not None else math.nan,
            "tokens_per_sec": summary.tokens_per_sec,
            "params": float(summary.params),
            "steps": float(summary.steps),
            "seconds": summary.seconds,
        },
        meta={
            "device": summary.device,
            "flops_per_token": summary.flops_per_token,
            "tokens_seen": summary.tokens_seen,
            "resumed_from_step": summary.resumed_from,
            "model_step": read_state(tmp / MODEL_DIR)["step"],
            **({"best_step": summary.best_step, "best_val_loss": summary.best_val_loss,
                "stopped_early": summary.stopped_early} if summary.best_step is not None else {}),
        },
    )


def lora_meta(ckpt: Path, adapter_dir: Path | None) -> dict[str, Any]:
    """What the adapters changed (and, with ``adapter_dir``, the adapter alone written there in peft's format)."""
    state = read_state(ckpt)
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    lora = LoraConfig.model_validate({k: v for k, v in state["lora"].items() if k not in ("targets", "scale")})
    if adapter_dir is not None:
        write_peft_adapter(weights, lora, state["lora"]["targets"], adapter_dir, state["model"].get("arch", "gpt2"))
    adapter = sum(v.numel() for k, v in weights.items() if ".lora_" in k)
    return {"lora_targets": len(state["lora"]["targets"]), "lora_params": adapter,
            "lora_params_share": adapter / sum(v.numel() for v in weights.values())}
