"""Golden loss curves: tiny CPU runs whose every per-step loss must stay what it was, bit for bit.

A change to the training code that is meant to keep its behaviour (a refactor, a
faster loader, a new part of the loop) must not move a single loss: the curves
below are compared with ``==`` on the floats. The runs are CPU-only, single-threaded
(``threads=1``: a thread count can change the order of float sums), on real
corpora from ``data/``: pretraining on WikiText-2's validation text as bytes
(dropout and gradient accumulation on, so the RNG and the micro-batch sums are
covered), and packed SFT (loss masks, per-token weighting, the block-diagonal
mask) with this suite's BPE tokenizer, for each ``model.arch``.

Another CPU family or torch version may round differently (other kernels); the
files are from the locked requirements on an x86-64 CPU.

After a deliberate change of what training computes, regenerate the files and
review their diff (and say why in the commit message):

    LMPIPE_REGEN_GOLDEN=1 python -m pytest -q tests/unit/training/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lmpipe.config.base import EOT
from lmpipe.config.training import ModelConfig, Qwen3ModelConfig, SFTFinetuneConfig, TrainConfig
from lmpipe.data.sft import build_sft_data
from lmpipe.data.shards import ArraySource
from lmpipe.training.data import TrainData
from lmpipe.training.loop import train
from tests.conftest import REPO

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("LMPIPE_REGEN_GOLDEN") == "1"
DATA = REPO / "data"


@pytest.fixture(autouse=True)
def _restore_threads():
    """``threads=1`` sets torch's global thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _curve(work: Path, summary: object) -> dict[str, object]:
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "final_val_loss": summary.final_val_loss}  # type: ignore[attr-defined]


def _compare(name: str, curve: dict[str, object]) -> None:
    path = GOLDEN / f"{name}.json"
    if REGENERATE:
        path.write_text(json.dumps(curve, indent=1) + "\n", encoding="utf-8")
    assert curve == json.loads(path.read_text(encoding="utf-8")), f"{path.name}: the curve moved (see the docstring)"


def test_tiny_pretraining_run_reproduces_its_golden_losses(tmp_path: Path) -> None:
    tokens = np.frombuffer((DATA / "wikitext2-valid.txt").read_bytes(), dtype=np.uint8).astype(np.int64)
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)
    cfg = TrainConfig(optimizer="adamw", max_steps=30, batch_size=4, grad_accum_steps=2, learning_rate=3e-3,
                      min_lr=3e-4, warmup_steps=5, eval_interval=10, eval_batches=2, log_interval=5, checkpoint_interval=15,
                      device="cpu", threads=1)
    data = TrainData(ArraySource(tokens[:-30_000]), ArraySource(tokens[-30_000:]))
    summary = train(model, cfg, 256, data, tmp_path, tokenizer_fingerprint="bytes")
    curve = _curve(tmp_path, summary)
    assert len(curve["losses"]) == 30  # type: ignore[arg-type]
    _compare("tiny_pretrain", curve)


@pytest.mark.parametrize(("name", "model"), [
    ("tiny_sft_packed", ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)),
    # Qwen3's block: rotary positions restarting per example, grouped-query attention, its own output head.
    ("tiny_qwen3_sft_packed", Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, n_kv_head=1,
                                               tie_embeddings=False)),
], ids=["gpt2", "qwen3"])
def test_tiny_packed_sft_run_reproduces_its_golden_losses(tmp_path: Path, tok: Tokenizer, name: str,
                                                          model: ModelConfig) -> None:
    lines = [ln for ln in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": lines[i][:24], "response": lines[i + 1][:24]}) + "\n"
                                for i in range(150)), encoding="utf-8")
    eot = tok.token_to_id(EOT)
    sft = build_sft_data(sft_file, tok, eot, model.block_size, layout="packed")
    cfg = SFTFinetuneConfig(sft_path=str(sft_file), sft_layout="packed", max_steps=12, batch_size=4,
                         grad_accum_steps=2, learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=6,
                         eval_batches=1, log_interval=3, checkpoint_interval=100, device="cpu", threads=1)
    data = TrainData(ArraySource(sft.train_tokens), ArraySource(sft.val_tokens), ArraySource(sft.train_mask),
                     ArraySource(sft.val_mask), doc_sep=eot, aligned_val=True)
    summary = train(model, cfg, tok.get_vocab_size(), data, tmp_path / "run", tokenizer_fingerprint="fixture")
    curve = _curve(tmp_path / "run", summary)
    assert len(curve["losses"]) == 12  # type: ignore[arg-type]
    _compare(name, curve)
