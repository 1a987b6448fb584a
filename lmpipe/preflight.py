"""Checks that run before any stage: cheap, no network, and each error names its config field."""

from __future__ import annotations

from pathlib import Path

from lmpipe.checkpoint import ARCH_FIELDS, CheckpointMismatchError, read_state
from lmpipe.config import PipelineConfig
from lmpipe.download import check_sources


def check_inputs(config: PipelineConfig, *, training: bool = True) -> None:
    """Fail now, not an hour in: missing sources, SFT files and fine-tuning checkpoints."""
    check_sources(config.data.pretrain, "data.pretrain")
    if config.data.finetune is not None:
        check_sources(config.data.finetune, "data.finetune")
    if not training:
        return
    ft = config.finetune
    if ft.mode == "sft" and not Path(ft.sft_path).is_file():
        raise FileNotFoundError(f"finetune.sft_path: file {ft.sft_path!r} does not exist")
    if ft.init_checkpoint:
        check_init_checkpoint(config)


def check_init_checkpoint(config: PipelineConfig) -> None:
    """The fine-tuning checkpoint must exist and have this config's model architecture.

    The vocabulary and tokenizer fingerprint are checked again when fine-tuning
    starts, once the tokenizer exists.
    """
    path = Path(config.finetune.init_checkpoint)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"finetune.init_checkpoint: {str(path)!r} is not a checkpoint directory "
                                "(no state.json)")
    saved = read_state(path).get("model") or {}
    diffs = [f"model.{k}: checkpoint has {saved.get(k)!r}, config has {getattr(config.model, k)!r}"
             for k in ARCH_FIELDS if saved.get(k) != getattr(config.model, k)]
    if diffs:
        raise CheckpointMismatchError(
            f"finetune.init_checkpoint {str(path)!r} does not match the model config:\n  " + "\n  ".join(diffs))
