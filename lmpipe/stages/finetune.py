"""Stage finetune: continue training the pretrained model (continued pretraining, chat SFT, LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpipe.artifacts import BuildOutput, StageResult
from lmpipe.config.training import FinetuneConfig, ModelConfig, SFTFinetuneConfig
from lmpipe.data.sft import build_sft_data, write_held_out
from lmpipe.data.shards import ArraySource
from lmpipe.data.tokenizer import META_FILE, load_tokenizer, meta_eot_id
from lmpipe.model.checkpoint import STATE_FILE, check_compatible, read_state
from lmpipe.stages.contract import run_stage
from lmpipe.stages.training import ADAPTER_DIR, lora_meta, open_splits, publish_model, tokenizer_info
from lmpipe.training.data import TrainData
from lmpipe.training.loop import SILENT, Reporters, train


def run_finetune(
    ft_cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    init: Path,
    shards: StageResult | None,
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    report: Reporters = SILENT,
    min_held_out: tuple[int, int] = (1, 1),
) -> StageResult:
    """Stage: continue training ``init``'s weights (fresh optimizer and schedule).

    mode "continue": on the fine-tuning corpus's shards. mode "sft": on
    ft_cfg.sft_path's examples in the chat template (``lmpipe.data.sft``), with the
    loss on the assistant's replies only; in the padded layout every training and
    validation window is exactly one example, in the packed layout one bin of whole
    examples that do not attend to each other (``doc_sep`` = end-of-text). ``min_held_out``: the
    (examples, tokens) the held-out SFT examples hold at least when the file has enough
    (``lmpipe.data.sft.held_out_split``: the champion gate's minimums).
    """

    def build(tmp: Path) -> BuildOutput:
        tok_path, tok_fp, vocab_size = tokenizer_info(tokenizer)
        init_dir = Path(init)
        if not (init_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"finetune.init_checkpoint: {str(init_dir)!r} is not a checkpoint directory "
                                    f"(no {STATE_FILE})")
        check_compatible(read_state(init_dir), model_cfg, vocab_size, tok_fp, field="finetune.init_checkpoint")
        meta: dict[str, Any] = {}
        if not isinstance(ft_cfg, SFTFinetuneConfig):
            if shards is None:
                raise ValueError("finetune.mode='continue' trains on the data.finetune shards, but none were given")
            data = TrainData(*open_splits(shards, tok_fp, "data.finetune"))
        else:
            tok = load_tokenizer(tok_path)
            eot = meta_eot_id(tok, tokenizer.path(META_FILE))
            sft = build_sft_data(Path(ft_cfg.sft_path), tok, eot, model_cfg.block_size, layout=ft_cfg.sft_layout,
                                 skip_long=ft_cfg.sft_skip_long, skip_bad=ft_cfg.sft_skip_bad,
                                 field="finetune.sft_path", min_held_out=min_held_out)
            data = TrainData(ArraySource(sft.train_tokens), ArraySource(sft.val_tokens),
                             ArraySource(sft.train_mask), ArraySource(sft.val_mask), aligned_val=True,
                             doc_sep=eot if ft_cfg.sft_layout == "packed" else None)
            meta = sft.meta() | write_held_out(sft, tmp, {  # what evaluation scores the models on
                "path": ft_cfg.sft_path, "layout": ft_cfg.sft_layout, "block_size": model_cfg.block_size,
                "skip_long": ft_cfg.sft_skip_long, "skip_bad": ft_cfg.sft_skip_bad,
                "min_held_out": list(min_held_out)})
        summary = train(model_cfg, ft_cfg, vocab_size, data, tmp, tokenizer_fingerprint=tok_fp,
                        init_from=init_dir, log_metrics=report.metrics, on_progress=report.progress)
        if ft_cfg.lora is not None:
            meta |= lora_meta(summary.checkpoint, tmp / ADAPTER_DIR if ft_cfg.lora.save_adapter else None)
        out = publish_model(tmp, summary)  # model/: the adapters merged into the base weights
        out.meta |= meta | {"init_checkpoint": str(init_dir)}
        return out

    return run_stage("finetune", fingerprint, out_dir, build, keep_partial=True)
