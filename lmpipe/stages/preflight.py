"""Checks that run before any stage: cheap, no network, and each error names its config field."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lmpipe.artifacts import StageResult
from lmpipe.config.base import CHAT_TOKENS
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import SFTFinetuneConfig
from lmpipe.data.labelled import build_classify_data, read_examples
from lmpipe.data.sft import build_sft_data, read_sft_examples
from lmpipe.data.shards import read_manifest
from lmpipe.data.sources import check_sources
from lmpipe.data.tokenizer import META_FILE, TOKENIZER_FILE, load_tokenizer, meta_eot_id
from lmpipe.eval.benchmark_files import load_benchmark
from lmpipe.eval.multiple_choice import check_benchmarks_fit
from lmpipe.model.checkpoint import STATE_FILE, CheckpointMismatchError, architecture_diffs, read_state
from lmpipe.model.lora import check_targets


def check_inputs(config: PipelineConfig, *, training: bool = True) -> None:
    """Fail now, not an hour in: missing sources, SFT files and fine-tuning checkpoints."""
    check_sources(config.data.pretrain, "data.pretrain")
    if config.data.finetune is not None:
        check_sources(config.data.finetune, "data.finetune")
    if not training:
        return
    for i, bench in enumerate(config.eval.benchmarks):
        if bench.path is None:  # Hub only: fetched and checked by resolve_benchmarks, right after these checks
            continue
        if not Path(bench.path).is_file():  # a local file, or the fallback of a Hub benchmark
            raise FileNotFoundError(f"eval.benchmarks.{i}.path: file {bench.path!r} does not exist")
        load_benchmark(Path(bench.path), bench.kind, limit=bench.limit, skip_bad=bench.skip_bad)  # format errors now
    ft = config.finetune
    if isinstance(ft, SFTFinetuneConfig):
        missing = [t for t in CHAT_TOKENS if t not in config.tokenizer.special_tokens]
        if missing:
            raise ValueError(f"tokenizer.special_tokens={config.tokenizer.special_tokens} lacks {missing}, which "
                             f"finetune.mode='sft' renders its chat template with: keep all of {CHAT_TOKENS}")
        if not Path(ft.sft_path).is_file():
            raise FileNotFoundError(f"finetune.sft_path: file {ft.sft_path!r} does not exist")
        read_sft_examples(Path(ft.sft_path), skip_bad=ft.sft_skip_bad)  # format errors now; lengths need the tokenizer
    check_init_checkpoint(config)
    if ft.lora is not None:
        check_targets(config.model, ft.lora)  # a target no layer has: named now
    if config.classify is not None:
        clf = config.classify
        # format errors and unknown labels now; lengths need the tokenizer
        read_examples(clf.path, text_field=clf.text_field, label_field=clf.label_field, labels=clf.labels,
                      skip_bad=clf.skip_bad)
        if clf.init_checkpoint and not (Path(clf.init_checkpoint) / STATE_FILE).is_file():
            raise FileNotFoundError(f"classify.init_checkpoint: {clf.init_checkpoint!r} is not a checkpoint directory "
                                    f"(no {STATE_FILE})")


def check_context_fits(config: PipelineConfig, corpora: dict[str, StageResult], tokenizer: StageResult,
                       benchmark_files: Mapping[str, Path]) -> None:
    """Checked once the tokenizer and shards exist, before any training, so that neither fine-tuning nor
    evaluation can fail on them after pretraining has run: every corpus's splits hold more than one context
    window, every benchmark choice fits the context (``lmpipe.eval.multiple_choice.check_benchmarks_fit``), and the
    SFT and classification files are prepared as their stages will prepare them (lengths, splits, labels)."""
    tok = load_tokenizer(tokenizer.path(TOKENIZER_FILE))
    check_benchmarks_fit(config.eval.benchmarks, benchmark_files, tok, config.model.block_size)
    eot = meta_eot_id(tok, tokenizer.path(META_FILE))
    ft = config.finetune
    if isinstance(ft, SFTFinetuneConfig):
        build_sft_data(Path(ft.sft_path), tok, eot, config.model.block_size, layout=ft.sft_layout,
                       skip_long=ft.sft_skip_long, skip_bad=ft.sft_skip_bad, field="finetune.sft_path",
                       min_held_out=config.sft_min_held_out() or (1, 1))
    if config.classify is not None:
        build_classify_data(config.classify, tok, eot, config.model.block_size)
    need = config.model.block_size + 1
    for name, shards in corpora.items():
        for split, info in read_manifest(shards.out_dir)["splits"].items():
            if info["tokens"] < need:
                raise ValueError(
                    f"model.block_size={config.model.block_size} is longer than the {split} split of corpus "
                    f"{name!r} ({info['tokens']} tokens); lower model.block_size or give the split more text"
                )


def check_init_checkpoint(config: PipelineConfig) -> None:
    """The fine-tuning checkpoint, when one is configured, must exist and have this config's model architecture.

    The vocabulary and tokenizer fingerprint are checked again when fine-tuning
    starts, once the tokenizer exists.
    """
    if config.finetune.init_checkpoint is None:
        return
    path = Path(config.finetune.init_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"finetune.init_checkpoint: {str(path)!r} is not a checkpoint directory "
                                f"(no {STATE_FILE})")
    diffs = architecture_diffs(read_state(path), config.model)
    if diffs:
        raise CheckpointMismatchError(
            f"finetune.init_checkpoint {str(path)!r} does not match the model config:\n  " + "\n  ".join(diffs))
