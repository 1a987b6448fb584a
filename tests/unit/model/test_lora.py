"""LoRA: the adapted layer, target resolution and its errors, merging, fine-tuning with frozen base weights
(reproducible, resumable), and the adapter in peft's format loading onto the transformers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from lmpipe.artifacts import StageResult
from lmpipe.config.training import LoraConfig, ModelConfig, Qwen3ModelConfig, SFTFinetuneConfig, TrainConfig
from lmpipe.data.shards import ArraySource
from lmpipe.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmpipe.model.checkpoint import CheckpointError, export_model, load_model, read_state
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.hf_export import export_hf
from lmpipe.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraLinear,
    apply_lora,
    check_targets,
    linear_names,
    merge_state,
    resolve_targets,
    trainable_params,
)
from lmpipe.stages.finetune import run_finetune
from lmpipe.stages.preflight import check_inputs
from lmpipe.training.checkpoint import load_checkpoint
from lmpipe.training.data import TrainData
from lmpipe.training.loop import train
from lmpipe.training.metrics import METRICS_FILE
from tests.conftest import NANOGPT, tiny_config
from tests.unit.data.test_sft import LINES, MODEL, write_jsonl

GPT_CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _perturbed_lora_model(cfg: LoraConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPT_CFG)
    apply_lora(model, cfg)
    with torch.no_grad():  # B starts at zero: make the update non-zero
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.1)
    return model.eval()


# ---------------------------------------------------------------- the layer and its targets


def test_adapted_model_starts_equal_to_the_base_and_trains_only_the_adapters() -> None:
    torch.manual_seed(0)
    model = GPT(GPT_CFG).eval()
    x = torch.randint(0, 64, (2, 16))
    before, _ = model(x, x)
    targets = apply_lora(model, LoraConfig(r=4, target_modules=["c_attn"]))
    after, _ = model(x, x)
    assert targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{m}.weight" for i in (0, 1) for m in "AB"}
    # 2 layers x r * (in + out) = 2 * 4 * (32 + 96)
    assert trainable_params(model)[0] == 1024


def test_merged_state_gives_the_adapted_models_logits() -> None:
    cfg = LoraConfig(r=4, alpha=8, target_modules=["all-linear"])
    model = _perturbed_lora_model(cfg)
    x = torch.randint(0, 64, (2, 16))
    want, _ = model(x, x)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    plain = GPT(GPT_CFG).eval()
    merged = merge_state(weights, cfg.alpha / cfg.r)
    plain.load_state_dict(merged | {"lm_head.weight": merged["transformer.wte.weight"]}, strict=True)
    got, _ = plain(x, x)
    assert (got - want).abs().max().item() < 1e-5
    assert not any(".lora_" in k or ".base." in k for k in merged)


@pytest.mark.parametrize(
    ("targets", "want"),
    [
        (["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        (["attn.c_proj"], ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
        (["transformer.h.1.mlp.c_fc"], ["transformer.h.1.mlp.c_fc"]),
        (["c_proj"], ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj",
                      "transformer.h.1.mlp.c_proj"]),
    ],
)
def test_targets_match_names_and_suffixes(targets: list[str], want: list[str]) -> None:
    assert resolve_targets(linear_names(GPT(GPT_CFG)), targets) == want


def test_all_linear_is_every_linear_layer_but_the_tied_head() -> None:
    names = resolve_targets(linear_names(GPT(GPT_CFG)), ["all-linear"])
    assert len(names) == 8 and "lm_head" not in names


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("q_proj", "finetune.lora.target_modules: 'q_proj' matches no linear layer of the model; its linear layers "
                   "are c_attn, c_fc, c_proj (e.g. transformer.h.0.attn.c_attn), or use 'all-linear'"),
        ("attn", "finetune.lora.target_modules: 'attn' matches no linear layer"),  # a block, not a linear layer
        ("lm_head", "finetune.lora.target_modules: 'lm_head' is the output head, which LoRA does not adapt here; "
                    "the linear layers inside the blocks take the adapters"),
    ],
)
def test_unknown_target_is_named(target: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_targets(ModelConfig(n_layer=2), LoraConfig(target_modules=["c_attn", target]))
    assert str(err.value).startswith(message)


QWEN3 = Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, n_kv_head=1, tie_embeddings=False)
QWEN3_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def test_qwen3_targets_are_transformers_layer_names() -> None:
    assert check_targets(QWEN3, LoraConfig(target_modules=["q_proj", "self_attn.v_proj", "down_proj"])) == [
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    # The default, all-linear: every projection of every block; not the (here untied) output head.
    assert check_targets(QWEN3, LoraConfig()) == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in QWEN3_LINEAR]
    with pytest.raises(ValueError) as err:
        check_targets(QWEN3, LoraConfig(target_modules=["c_attn"]))
    assert str(err.value) == (
        "finetune.lora.target_modules: 'c_attn' matches no linear layer of the model; its linear layers are "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (e.g. transformer.h.0.self_attn.q_proj), "
        "or use 'all-linear'")
    # The untied head is refused too, with the same words (the old ones called every head tied).
    with pytest.raises(ValueError, match=r"^finetune.lora.target_modules: 'lm_head' is the output head, which LoRA "
                                         r"does not adapt here; the linear layers inside the blocks take the adapters$"):
        check_targets(QWEN3, LoraConfig(target_modules=["lm_head"]))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"alpha": 0}, "alpha"), ({"target_modules": []},
                                                                               "target_modules")],
)
def test_bad_lora_settings_are_rejected(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LoraConfig(**overrides)


def test_preflight_names_a_missing_target_before_any_stage(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "finetune.lora.target_modules=[c_attn,q_proj]")
    with pytest.raises(ValueError, match=r"finetune\.lora\.target_modules: 'q_proj' matches no linear layer"):
        check_inputs(config)
    assert not (tmp_path / "stages").exists()


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tokenizer: StageResult) -> tuple[Path, ArraySource, ArraySource]:
    """(pretrained checkpoint, train tokens, val tokens) of the test model on Tiny Shakespeare lines."""
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    stream = np.array(tok.encode("\n".join(LINES), add_special_tokens=False).ids, dtype=np.int64)
    train_src, val_src = ArraySource(stream[:-500]), ArraySource(stream[-500:])
    summary = train(MODEL, TrainConfig(**NANOGPT, max_steps=3, batch_size=4, eval_batches=1, device="cpu"),
                    tok.get_vocab_size(), TrainData(train_src, val_src), tmp_path_factory.mktemp("lora-base"),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.path("tokenizer.json")))
    return summary.checkpoint, train_src, val_src


LORA_FT = SFTFinetuneConfig(sft_path="unused", max_steps=12, batch_size=8, learning_rate=1e-2, min_lr=1e-3,
                         warmup_steps=2, eval_interval=12, eval_batches=1, log_interval=4, checkpoint_interval=4,
                         device="cpu", lora=LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]


def test_lora_finetune_changes_only_the_targets_and_is_reproducible_and_resumable(
        tmp_path: Path, tokenizer: StageResult, base: tuple[Path, ArraySource, ArraySource]) -> None:
    ckpt, train_src, val_src = base
    fp = tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    vocab = load_tokenizer(tokenizer.path("tokenizer.json")).get_vocab_size()

    def run(name: str, stop_after: int | None = None):
        return train(MODEL, LORA_FT, vocab, TrainData(train_src, val_src), tmp_path / name, tokenizer_fingerprint=fp,
                     init_from=ckpt, stop_after=stop_after)

    full = run("a")
    again = run("b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 12
    assert full.final_val_loss == again.final_val_loss
    run("c", stop_after=5)  # interrupted after step 5 (checkpoint), then resumed from it
    resumed = run("c")
    assert resumed.resumed_from == 5 and _losses(tmp_path / "c") == _losses(tmp_path / "a")
    assert _losses(tmp_path / "a")[-1] < _losses(tmp_path / "a")[0]

    # The checkpoint holds the frozen base and the adapters; its state names the LoRA settings.
    state = read_state(full.checkpoint)
    assert state["lora"]["targets"] == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    trained = load_file(str(full.checkpoint / "model.safetensors"))
    pre = load_file(str(ckpt / "model.safetensors"))
    for key, value in pre.items():  # every base weight, adapted layer or not, is bit-for-bit the pretrained one
        stored = trained.get(key) if key in trained else trained[key.replace(".weight", ".base.weight")
                                                                 .replace(".bias", ".base.bias")]
        assert torch.equal(stored, value), key


def test_an_intermediate_lora_checkpoint_loads_as_the_merged_plain_model(
        tmp_path: Path, tokenizer: StageResult, base: tuple[Path, ArraySource, ArraySource]) -> None:
    ckpt, train_src, val_src = base
    vocab = load_tokenizer(tokenizer.path("tokenizer.json")).get_vocab_size()
    summary = train(MODEL, LORA_FT, vocab, TrainData(train_src, val_src), tmp_path / "run",
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.path("tokenizer.json")), init_from=ckpt,
                    stop_after=4)
    step = summary.checkpoint
    assert step == tmp_path / "run" / "checkpoints" / "step-0000004"
    assert "lora" in read_state(step) and any(".lora_A." in k for k in load_file(str(step / "model.safetensors")))

    # The LoRA model as the run holds it in memory: adapters on the base, the step's weights loaded.
    in_memory = GPT(GPTConfig.from_config(MODEL, vocab))
    apply_lora(in_memory, LORA_FT.lora)
    load_checkpoint(step, in_memory, None, restore_rng=False)
    loaded = load_model(step)  # what `lmpipe generate/evaluate --checkpoint <step dir>` build
    assert set(loaded.state_dict()) == set(GPT(loaded.config).state_dict())  # a plain GPT
    exported = load_model(export_model(step, tmp_path / "exported"))
    x = torch.randint(0, vocab, (2, MODEL.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = in_memory.eval()(x, x)
        got, _ = loaded(x, x)
        merged, _ = exported(x, x)
        before, _ = load_model(ckpt)(x, x)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(got, merged)  # one merge (lora.merge_state) for both readers
    assert (want - before).abs().max().item() > 1e-3  # the adapters trained: the merge is not a no-op

    # Adapters whose state names no scale cannot be merged: said, naming the state file.
    state_file = step / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    del state["lora"]
    state_file.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{state_file}: model.safetensors holds LoRA adapters but the state names no 'lora' entry with their "
            "'scale', so they cannot be merged")):
        load_model(step)


def test_run_finetune_publishes_merged_weights_and_a_peft_adapter(
        tmp_path: Path, tokenizer: StageResult, base: tuple[Path, ArraySource, ArraySource],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = base[0]
    chats = [json.dumps({"prompt": LINES[i][:16], "response": "Amen."}) for i in range(40)]
    cfg = LORA_FT.model_copy(update={"sft_path": str(write_jsonl(tmp_path / "d.jsonl", chats)),
                                     "lora": LORA_FT.lora.model_copy(update={"save_adapter": True})})
    result = run_finetune(cfg, MODEL, ckpt, None, tokenizer, tmp_path / "ft", "fp")
    # 2 layers x r=4 x ((32 + 96) for c_attn + (32 + 128) for c_fc)
    assert result.meta["lora_params"] == 2 * 4 * (128 + 160) and result.meta["lora_targets"] == 4
    model_dir, adapter_dir = result.path("model"), result.path("adapter")
    assert sorted(p.name for p in adapter_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert read_state(model_dir)["lora"]["merged"] is True
    ours = load_model(model_dir)  # a plain GPT: the merged weights
    assert set(ours.state_dict()) == set(GPT(ours.config).state_dict())

    _assert_the_adapter_on_the_base_export_gives_the_merged_logits(ours, ckpt, tokenizer, adapter_dir, tmp_path)


def test_a_qwen3_lora_adapter_loads_onto_its_transformers_export(
        tmp_path: Path, tokenizer: StageResult, monkeypatch: pytest.MonkeyPatch) -> None:
    """A qwen3 model (untied head, grouped-query attention): LoRA fine-tuning publishes merged weights and a peft
    adapter under Qwen3's layer names that peft puts on the export of the base, giving the merged model's logits."""

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    stream = np.array(tok.encode("\n".join(LINES), add_special_tokens=False).ids, dtype=np.int64)
    ckpt = train(QWEN3, TrainConfig(**NANOGPT, max_steps=3, batch_size=4, eval_batches=1, device="cpu"), tok.get_vocab_size(),
                 TrainData(ArraySource(stream[:-500]), ArraySource(stream[-500:])), tmp_path / "base",
                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.path("tokenizer.json"))).checkpoint
    chats = [json.dumps({"prompt": LINES[i][:16], "response": "Amen."}) for i in range(40)]
    cfg = LORA_FT.model_copy(update={"sft_path": str(write_jsonl(tmp_path / "d.jsonl", chats)), "lora": LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], save_adapter=True)})
    result = run_finetune(cfg, QWEN3, ckpt, None, tokenizer, tmp_path / "ft", "fp")
    # 2 layers x r=4 x ((32 + 32) q_proj + (32 + 16) v_proj + (32 + 32) o_proj + (128 + 32) down_proj)
    assert result.meta["lora_params"] == 2 * 4 * (64 + 48 + 64 + 160) and result.meta["lora_targets"] == 8
    adapter = json.loads((result.path("adapter") / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    assert adapter["fan_in_fan_out"] is False and adapter["target_modules"][:2] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    ours = load_model(result.path("model"))  # a plain qwen3 GPT: the merged weights, its own head
    assert ours.config.arch == "qwen3" and not ours.tied

    _assert_the_adapter_on_the_base_export_gives_the_merged_logits(ours, ckpt, tokenizer, result.path("adapter"),
                                                                   tmp_path)


def _assert_the_adapter_on_the_base_export_gives_the_merged_logits(ours: GPT, ckpt: Path, tokenizer: StageResult,
                                                                   adapter_dir: Path, tmp_path: Path) -> None:
    """peft puts the adapter on the transformers export of the base checkpoint: its logits are the merged
    model's (``ours``), which the adapters did change."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_hf = export_hf(ckpt, Path(tokenizer.out_dir), tmp_path / "hf-base")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf, local_files_only=True),
                                   str(adapter_dir)).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size))
    with torch.no_grad():
        want, _ = ours(x, x)
        got = hf(input_ids=x).logits
        before, _ = load_model(ckpt)(x, x)
    assert (got - want).abs().max().item() < 1e-4
    assert (want - before).abs().max().item() > 0.1  # the adapters did change the model
