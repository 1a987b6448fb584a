"""bench/gpu_check.py's smoke, export and ddp parts, run on the CPU with the tiny preset: the code a GPU will run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import gpu_check
from bench.gpu_check import run_part
from bench.gpu_parts import STAGES_FILE
from tests.conftest import REPO


def test_smoke_export_and_ddp_parts_on_cpu(tmp_path: Path) -> None:
    args = argparse.Namespace(**(vars(gpu_check.parse_args(["--workdir", str(tmp_path)]))
                                 | {"smoke_config": REPO / "configs" / "tiny.yaml"}))
    [smoke] = run_part(args, "smoke", ["--device", "cpu"], "smoke", 600)
    assert smoke["ok"] is True, smoke
    assert (smoke["figure"], smoke["device"], smoke["pretrain_mfu"]) == ("smoke", "cpu", None)
    assert (smoke["micro_batch"], smoke["grad_accum_steps"]) == (8, 1)  # tiny's batch_size, no accumulation
    assert math.isfinite(smoke["pretrain_final_val_loss"]) and smoke["pretrain_tokens_per_sec"] > 0
    stages = {s["label"] for s in json.loads((tmp_path / STAGES_FILE).read_text(encoding="utf-8"))}
    assert {"pretrain", "finetune", "train_tokenizer", "shard/wikitext2"} <= stages

    [export] = run_part(args, "export", ["--device", "cpu"], "export", 300)
    assert export["ok"] is True, export
    assert (export["class"], export["max_abs_diff_cuda_vs_cpu"]) == ("GPT2LMHeadModel", 0.0)  # CPU both times here
    assert export["max_abs_diff_vs_lmpipe_cuda"] <= 1e-4 and export["tokens"] == 2 * 32

    [ddp] = run_part(args, "ddp", ["--device", "cpu"], "ddp", 300)
    assert ddp["ok"] is True, ddp
    assert (ddp["processes"], ddp["steps"], ddp["device"], ddp["mfu"]) == (2, 10, "cpu", None)
