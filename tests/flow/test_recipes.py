"""The default recipe (Qwen3 blocks + Muon, the demo's since bench/recipe.py measured it) through the whole flow.

configs/tiny.yaml pins GPT-2 + AdamW, whose exact numbers the other tests know; here its pins are lifted, so
the tiny pipeline trains what a bare config trains, and the model it registers is checked end to end.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from lmpipe.config.pipeline import PipelineConfig
from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.model.checkpoint import load_model, read_state
from lmpipe.model.hf_export import export_hf
from tests.conftest import DATA, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

DEFAULTS = PipelineConfig()


@pytest.fixture(scope="module")
def default_recipe_run(tmp_path_factory):
    from flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("default-recipe")
    cfg = tiny_config(workdir, f"model.arch={DEFAULTS.model.arch}", f"pretrain.optimizer={DEFAULTS.pretrain.optimizer}",
                      f"pretrain.learning_rate={DEFAULTS.pretrain.learning_rate}")
    return cfg, pipeline(config=cfg)


def _out_dir(summary: dict, label: str) -> Path:
    return Path(next(s["out_dir"] for s in summary["stages"] if s["label"] == label))


def test_the_default_recipe_is_qwen3_with_muon_and_tiny_pins_gpt2_with_adamw() -> None:
    assert (DEFAULTS.model.arch, DEFAULTS.pretrain.optimizer, DEFAULTS.pretrain.learning_rate) == ("qwen3", "muon", 6e-3)
    assert DEFAULTS.finetune.optimizer == "adamw"  # fine-tuning keeps AdamW (Muon there is unmeasured)
    tiny = tiny_config(Path("unused"))
    assert (tiny.model.arch, tiny.pretrain.optimizer, tiny.pretrain.learning_rate) == ("gpt2", "adamw", 2e-3)


def test_every_stage_runs_trains_qwen3_with_muon_and_is_tracked(default_recipe_run) -> None:
    cfg, summary = default_recipe_run
    assert {s["status"] for s in summary["stages"]} == {"ran"}
    parent = MlflowClient(tracking_uri=summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert {k: parent.data.params[k] for k in ("model.arch", "pretrain.optimizer", "pretrain.muon.lr")} == {
        "model.arch": "qwen3", "pretrain.optimizer": "muon", "pretrain.muon.lr": "0.02"}
    for stage in ("pretrain", "finetune"):
        state = read_state(_out_dir(summary, stage) / "model")
        assert state["model"]["arch"] == "qwen3" and state["model"]["intermediate_size"] == 128, stage  # 8/3 x 32, up to 64s
    evaluation = summary["metrics"]["evaluate"]
    # Each model is best on the corpus it was trained on last: both trainings learned.
    assert evaluation["finetuned.tinyshakespeare.loss"] < evaluation["base.tinyshakespeare.loss"]
    assert evaluation["base.wikitext2.loss"] < evaluation["finetuned.wikitext2.loss"]


def test_the_registered_qwen3_model_serves_and_exports_to_transformers(default_recipe_run, tmp_path) -> None:
    cfg, summary = default_recipe_run
    mlflow.set_tracking_uri(summary["tracking_uri"])
    served = mlflow.pyfunc.load_model("models:/lmpipe-gpt@candidate")
    out = served.predict(["ROMEO:"], params={"max_new_tokens": 5, "seed": 3})  # the completions
    assert len(out) == 1 and out[0].strip() and out == served.predict(["ROMEO:"], params={"max_new_tokens": 5, "seed": 3})

    ckpt, tok_dir = _out_dir(summary, "finetune") / "model", _out_dir(summary, "train_tokenizer")
    hf = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tok_dir, tmp_path / "hf"), local_files_only=True)
    assert isinstance(hf, Qwen3ForCausalLM)
    model, tok = load_model(ckpt), load_tokenizer(tok_dir / "tokenizer.json")
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000]
    ids = torch.tensor([tok.encode(text).ids[: cfg.model.block_size]])
    with torch.no_grad():
        ours, _ = model(ids, targets=ids)
        theirs = hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        prompt = ids[:, :8]
        greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16)
        assert torch.equal(model.generate(prompt, 16, temperature=0.0), greedy)
