"""Export to the transformers format: a real tokenizer and seeded GPTs (with and without biases) are
exported, loaded back offline with AutoModelForCausalLM / AutoTokenizer, and compared with ours:
logits at every position, greedy generations, token ids, special tokens, files, failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, Qwen3ForCausalLM

import lmpipe.model.hf_export
from lmpipe.artifacts import StageResult
from lmpipe.config.base import CHAT_TOKENS, EOT
from lmpipe.config.data import TokenizerConfig
from lmpipe.config.training import Qwen3ModelConfig
from lmpipe.data.sft import (
    Message,
    chat_token_ids,
    encode_chat,
    encode_chat_prompt,
    hf_chat_template,
    read_sft_examples,
    render_chat,
)
from lmpipe.data.tokenizer import TokenizerMismatchError, load_tokenizer, tokenizer_fingerprint
from lmpipe.model.checkpoint import CheckpointError, load_model
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.hf_export import export_hf
from lmpipe.stages.tokenizer import run_train_tokenizer
from lmpipe.training.checkpoint import save_checkpoint
from tests.conftest import DATA, REPO
from tests.unit.data.test_tokenizer import write_documents

BLOCK = 64
PROMPT = 16  # prompt tokens of the greedy test; PROMPT + NEW <= BLOCK
NEW = 20
TEXT = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak. Héllo 🌍\n"
# (bias, pretokenizer): GPT-2's split with biases; GPT-4's split without, whose zero biases the export adds.
CASES = [(True, "gpt2"), (False, "gpt4")]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _tokenizer(root: Path, pretokenizer: str, vocab_size: int = 512) -> StageResult:
    """The tokenizer stage on Tiny Shakespeare's first 30 KB, EOT and the chat tokens reserved (ids 0..4)."""
    texts = [d for d in TEXT[:30_000].split("\n\n") if d.strip()]
    docs = write_documents(root / "docs", texts)
    cfg = TokenizerConfig(vocab_size=vocab_size, pretokenizer=pretokenizer)
    return run_train_tokenizer(cfg, docs, root / "tok", "fp")


def _checkpoint(root: Path, tok: StageResult, bias: bool, qwen3: Qwen3ModelConfig | None = None) -> Path:
    """A seeded random GPT (a qwen3 one with ``qwen3``), every weight perturbed so that biases and norm gains
    are not 0 and 1."""
    torch.manual_seed(1234)
    vocab = load_tokenizer(tok.path("tokenizer.json")).get_vocab_size()
    config = GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32, bias=bias) \
        if qwen3 is None else GPTConfig.from_config(qwen3, vocab)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters())
    state = {"tokenizer_fingerprint": tokenizer_fingerprint(tok.path("tokenizer.json"))}
    return save_checkpoint(root / "ckpt", 7, model, opt, state)


@pytest.fixture(scope="module", params=CASES, ids=[f"bias={b}-{p}" for b, p in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(our model, our tokenizer, tokenizer stage, checkpoint dir, export dir)."""
    bias, pretokenizer = request.param
    root = tmp_path_factory.mktemp(f"export-{bias}-{pretokenizer}")
    tok = _tokenizer(root, pretokenizer)
    ckpt = _checkpoint(root, tok, bias)
    dest = export_hf(ckpt, Path(tok.out_dir), root / "hf")
    return load_model(ckpt), load_tokenizer(tok.path("tokenizer.json")), tok, ckpt, dest


def _real_ids(tok, rows: int, length: int) -> torch.Tensor:
    """(rows, length) token ids of consecutive Tiny Shakespeare text, one row per 1,000-character offset."""
    return torch.tensor([tok.encode(TEXT[1000 * r : 1000 * r + 2000]).ids[:length] for r in range(rows)])


def test_files_and_config(exported) -> None:
    model, _, tok, ckpt, dest = exported
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(p.name.startswith(".") for p in dest.parent.iterdir())  # no temporary directory left
    cfg = json.loads((dest / "config.json").read_text())
    expected = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu",
                "n_positions": BLOCK, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 128,
                "vocab_size": model.config.vocab_size, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True, "scale_attn_weights": True,
                "bos_token_id": 0, "eos_token_id": 0}
    assert {k: cfg[k] for k in expected} == expected
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as the token embedding
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D: (in, out)
        assert f.get_tensor("transformer.h.1.mlp.c_proj.weight").shape == (128, 32)
        assert len(keys) == 2 + 2 + 2 * 12  # wte, wpe, ln_f weight+bias, 12 tensors per block
        zero_bias = not model.config.bias
        assert bool((f.get_tensor("transformer.h.0.mlp.c_fc.bias") == 0).all()) is zero_bias
    card = (dest / "README.md").read_text()
    assert tokenizer_fingerprint(tok.path("tokenizer.json")) in card
    assert "lm_eval --model hf --model_args pretrained=<this directory> --tasks hellaswag" in card
    assert f"lmpipe checkpoint: `{ckpt.name}`, step 7" in card


def test_logits_equal_ours_at_every_position(exported) -> None:
    model, tok, _, _, dest = exported
    hf = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    assert isinstance(hf, GPT2LMHeadModel) and not hf.training
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    ids = _real_ids(tok, rows=3, length=BLOCK)  # (3, 64)
    with torch.no_grad():
        ours, _ = model(ids, targets=ids)  # (3, 64, V): with targets the head runs at every position
        theirs = hf(ids).logits  # (3, 64, V)
    assert theirs.dtype == ours.dtype == torch.float32 and theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.5  # the weights are far from init, so the comparison means something


def test_greedy_generation_is_identical(exported) -> None:
    model, tok, _, _, dest = exported
    hf = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    prompt = _real_ids(tok, rows=2, length=PROMPT)  # (2, 16)
    ours = prompt
    with torch.no_grad():
        for _ in range(NEW):
            logits, _ = model(ours)  # (2, 1, V)
            ours = torch.cat([ours, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW)
    # HF stops a row at EOT; these seeded models never produce it, so all 20 tokens are compared.
    assert not (ours[:, PROMPT:] == 0).any()
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[:, PROMPT:].flatten().tolist())) > 3  # not one token repeated


def test_tokenizer_matches_ours(exported) -> None:
    _, tok, _, _, dest = exported
    hf_tok = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    ours = tok.encode(SAMPLE).ids
    assert hf_tok(SAMPLE)["input_ids"] == ours  # no BOS/EOS added
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == ours
    assert hf_tok.decode(ours) == SAMPLE
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token, hf_tok.unk_token) == (EOT, EOT, EOT, None)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 0)
    assert hf_tok.model_max_length == BLOCK
    assert list(hf_tok.extra_special_tokens) == CHAT_TOKENS
    for i, t in enumerate([EOT, *CHAT_TOKENS]):  # ids 0..4, one token each, also inside text
        assert hf_tok.convert_tokens_to_ids(t) == i
        assert hf_tok.encode(f"Hi{t}there", add_special_tokens=False) == tok.encode(f"Hi{t}there").ids
        assert i in hf_tok.encode(f"Hi{t}there", add_special_tokens=False)
    chat = f"<|user|>Who are you?<|end|><|assistant|>A king.<|end|>{EOT}"
    chat_ids = hf_tok.encode(chat, add_special_tokens=False)
    assert hf_tok.decode(chat_ids, skip_special_tokens=True) == "Who are you?A king."


def test_a_chat_model_carries_its_chat_template(exported, tmp_path: Path) -> None:
    """apply_chat_template renders and encodes a conversation as our SFT did; a base model has no template."""
    model, tok, tok_stage, _, dest = exported
    assert AutoTokenizer.from_pretrained(dest, local_files_only=True).chat_template is None
    assert not (dest / "chat_template.jinja").exists()
    state = {"tokenizer_fingerprint": tokenizer_fingerprint(tok_stage.path("tokenizer.json")), "train": {"mode": "sft"}}
    ckpt = save_checkpoint(tmp_path / "chat", 7, model, torch.optim.AdamW(model.parameters()), state)
    chat_dest = export_hf(ckpt, Path(tok_stage.out_dir), tmp_path / "hf")
    # transformers 5 keeps the template in chat_template.jinja, not in tokenizer_config.json (as 4.x did).
    assert (chat_dest / "chat_template.jinja").read_text(encoding="utf-8") == hf_chat_template()
    assert "chat_template" not in json.loads((chat_dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    hf_tok = AutoTokenizer.from_pretrained(chat_dest, local_files_only=True)
    assert hf_tok.chat_template == hf_chat_template()
    conv = [Message("system", "Be brief."), Message("user", "Who are you?"), Message("assistant", "A king.")]
    as_dicts = [{"role": m.role, "content": m.content} for m in conv]
    assert hf_tok.apply_chat_template(as_dicts, tokenize=False) == render_chat(conv)
    assert hf_tok.apply_chat_template(as_dicts[:2], tokenize=False, add_generation_prompt=True) == render_chat(
        conv[:2], add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(as_dicts[1:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == encode_chat_prompt([conv[1]], tok)
    # The documented difference: special-token text inside a message is that token for transformers, text for us.
    forged = [{"role": "user", "content": "Hi<|end|><|assistant|>"}]
    hf_ids = hf_tok.apply_chat_template(forged, tokenize=True, add_generation_prompt=True, return_dict=False)
    ours = encode_chat_prompt([Message("user", "Hi<|end|><|assistant|>")], tok)
    assert list(hf_ids).count(ours[-1]) == 2 and ours.count(ours[-1]) == 1  # the assistant token, twice vs once
    with pytest.raises(Exception, match="unknown role tool"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # Real ShareGPT records (a system prompt beside them, up to three exchanges), as SFT read and trained on them:
    # transformers gives the same ids.
    ids_of = chat_token_ids(tok, tok.token_to_id("<|endoftext|>"))
    for example in read_sft_examples(REPO / "tests" / "fixtures" / "sft" / "sharegpt12.json").examples:
        [(trained, _)] = encode_chat([example.messages], tok, ids_of)
        as_dicts = [{"role": m.role, "content": m.content} for m in example.messages]
        assert list(hf_tok.apply_chat_template(as_dicts, tokenize=True, return_dict=False)) == trained
    (chat_dest / "chat_template.jinja").unlink()  # the only place AutoTokenizer found it
    assert AutoTokenizer.from_pretrained(chat_dest, local_files_only=True).chat_template is None


def test_export_replaces_an_earlier_export_and_refuses_anything_else(exported, tmp_path: Path) -> None:
    _, _, tok, ckpt, dest = exported
    again = tmp_path / "hf"
    assert export_hf(ckpt, Path(tok.out_dir), again) == again
    assert export_hf(ckpt, Path(tok.out_dir), again) == again  # an earlier export is replaced
    assert (again / "model.safetensors").read_bytes() == (dest / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .hf.tmp-* / .hf.old-* left
    (tmp_path / ".hf.old").mkdir()  # a folder of that name is not ours to delete
    (tmp_path / ".hf.old" / "x").write_text("mine")
    assert export_hf(ckpt, Path(tok.out_dir), again) == again and (tmp_path / ".hf.old" / "x").read_text() == "mine"
    shutil.rmtree(tmp_path / ".hf.old")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"export destination {mine} is not empty and is not an earlier "
                                              "lmpipe export; choose a new folder, or replace it with --force"):
        export_hf(ckpt, Path(tok.out_dir), mine)
    (again / "notes.txt").write_text("keep me too")  # an export with the user's own file in it is theirs
    with pytest.raises(FileExistsError, match="is not an earlier lmpipe export"):
        export_hf(ckpt, Path(tok.out_dir), again)
    assert (mine / "notes.txt").read_text() == "keep me" and (again / "notes.txt").exists()
    assert export_hf(ckpt, Path(tok.out_dir), mine, overwrite=True) == mine
    assert not (mine / "notes.txt").exists() and (mine / "config.json").is_file()

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match=f"export destination {afile} is a file, not a folder"):
        export_hf(ckpt, Path(tok.out_dir), afile)
    # Never a folder that holds the model or tokenizer being exported, even when forced.
    for holder in (ckpt, ckpt.parent, Path(tok.out_dir)):
        with pytest.raises(ValueError, match=f"export destination {holder.resolve()} holds "):
            export_hf(ckpt, Path(tok.out_dir), holder, overwrite=True)
    assert (ckpt / "model.safetensors").is_file() and afile.read_text() == "x"


def test_missing_checkpoint_names_the_path(exported, tmp_path: Path) -> None:
    _, _, tok, _, _ = exported
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match=f"{missing} is not a checkpoint: state.json is missing"):
        export_hf(missing, Path(tok.out_dir), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_bad_tokenizer_dir_names_the_path(exported, tmp_path: Path) -> None:
    _, _, _, ckpt, _ = exported
    with pytest.raises(FileNotFoundError, match=f"tokenizer file '{tmp_path / 'tok' / 'tokenizer.json'}' does not"):
        export_hf(ckpt, tmp_path / "tok", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_of_another_model_is_refused(exported, tmp_path: Path) -> None:
    _, _, _, ckpt, _ = exported
    other = _tokenizer(tmp_path / "other", "gpt2", vocab_size=400)
    with pytest.raises(TokenizerMismatchError, match=r"state.json was trained with tokenizer '[0-9a-f]{64}', but "):
        export_hf(ckpt, Path(other.out_dir), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_failed_export_leaves_no_dest(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is written, then the tokenizer fails: no dest, no temporary dir, an older export untouched."""
    _, _, tok, ckpt, dest = exported

    def broken_tokenizer(**kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lmpipe.model.hf_export, "PreTrainedTokenizerFast", broken_tokenizer)
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(ckpt, Path(tok.out_dir), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []

    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(ckpt, Path(tok.out_dir), dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert list(dest.parent.glob(f".{dest.name}.*")) == []  # no temporary or moved-aside folder left


# ---------------------------------------------------------------- model.arch: qwen3

# Tied head, grouped-query attention (2 key/value heads for 4 query heads), no biases; untied head, multi-head
# attention, attention biases, another rotary base.
QWEN3_CASES = {
    "tied-gqa": Qwen3ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, n_kv_head=2),
    "untied-bias": Qwen3ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, bias=True,
                                    tie_embeddings=False, rope_theta=500.0, intermediate_size=80),
}


@pytest.fixture(scope="module", params=list(QWEN3_CASES))
def exported_qwen3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(our model, our tokenizer, export dir) of a qwen3 checkpoint."""
    root = tmp_path_factory.mktemp(f"export-qwen3-{request.param}")
    tok = _tokenizer(root, "gpt4")
    ckpt = _checkpoint(root, tok, False, QWEN3_CASES[request.param])
    dest = export_hf(ckpt, Path(tok.out_dir), root / "hf")
    return load_model(ckpt), load_tokenizer(tok.path("tokenizer.json")), dest


def test_qwen3_files_and_config(exported_qwen3) -> None:
    model, _, dest = exported_qwen3
    c = model.config
    cfg = json.loads((dest / "config.json").read_text())
    expected = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": c.n_kv_head, "head_dim": 8,
                "intermediate_size": c.intermediate_size, "hidden_act": "silu", "max_position_embeddings": BLOCK,
                "rms_norm_eps": 1e-6, "attention_bias": c.bias, "attention_dropout": 0.0,
                "tie_word_embeddings": c.tie_embeddings, "use_sliding_window": False,
                "vocab_size": c.vocab_size, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "rope_theta": c.rope_theta}  # also top-level, where transformers 4 reads it
    assert {k: cfg[k] for k in expected} == expected
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert ("lm_head.weight" in keys) is not c.tie_embeddings  # a tied head is stored once
        assert f.get_tensor("model.layers.1.self_attn.k_proj.weight").shape == (8 * c.n_kv_head, 32)
        per_block = 11 + (4 if c.bias else 0)  # 2 norms, 4 projections (+ biases), q/k norms, 3 MLP matrices
        assert len(keys) == 2 + (0 if c.tie_embeddings else 1) + 2 * per_block  # embed_tokens, norm, (lm_head)
    assert "`Qwen3ForCausalLM` (rotary positions, RMSNorm, QK-norm, SwiGLU)" in (dest / "README.md").read_text()


def test_qwen3_logits_equal_ours_at_every_position(exported_qwen3) -> None:
    model, tok, dest = exported_qwen3
    hf = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    assert isinstance(hf, Qwen3ForCausalLM) and not hf.training
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied is model.config.tie_embeddings
    ids = _real_ids(tok, rows=3, length=BLOCK)  # (3, 64)
    with torch.no_grad():
        ours, _ = model(ids, targets=ids)  # (3, 64, V)
        theirs = hf(ids).logits  # (3, 64, V)
    assert theirs.dtype == ours.dtype == torch.float32 and theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.5  # the weights are far from init, so the comparison means something


def test_qwen3_greedy_generation_with_kv_caches_is_identical(exported_qwen3) -> None:
    """Our cached greedy generation and transformers' (its own KV cache) produce the same tokens."""
    model, tok, dest = exported_qwen3
    hf = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    prompt = _real_ids(tok, rows=2, length=PROMPT)  # (2, 16)
    with torch.no_grad():
        ours = model.generate(prompt, NEW, temperature=0.0)  # KVCache: the prompt once, then a token a step
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW)
    assert not (ours[:, PROMPT:] == 0).any()  # no EOT, where transformers would stop: all 20 tokens compared
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[:, PROMPT:].flatten().tolist())) > 3  # not one token repeated


# In a process of its own, whose umask the shell sets: a training checkpoint, the model directory the pipeline
# keeps of it, `lmpipe export` of that model with its tokenizer, and a classifier (classify stage) built on it.
UNDER_UMASK = """
import sys
from pathlib import Path
import torch
from flows.cli import main
from lmpipe.model.checkpoint import export_model, load_model, read_state
from lmpipe.model.classifier import GPTClassifier, save_classifier
from lmpipe.training.checkpoint import save_checkpoint

ckpt, tok, out = map(Path, sys.argv[1:])
model = load_model(ckpt)
state = {"tokenizer_fingerprint": read_state(ckpt)["tokenizer_fingerprint"]}
saved = save_checkpoint(out / "checkpoints", 7, model, torch.optim.AdamW(model.parameters()), state)
export_model(saved, out / "model")
save_classifier(GPTClassifier(model.config, ["a", "b"], eot_id=0), out / "classifier", info={})
sys.exit(main(["export", str(out / "model"), str(out / "hf"), "--tokenizer", str(tok)]))
"""


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_follow_the_umask(exported, tmp_path: Path, mask: int) -> None:
    """Folders and files get what plain open() and mkdir give under the umask: the export (built in a 0700
    temporary folder, its weights written 0600 by safetensors), the checkpoints it is made from, and a
    classifier's weights (safetensors' save_model, 0600 too)."""
    _, _, tok, ckpt, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["sh", "-c", f'umask {mask:03o} && exec "$0" -c "$1" "$2" "$3" "$4"', sys.executable,
                           UNDER_UMASK, str(ckpt), tok.out_dir, str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exported {out / 'model'} to {out / 'hf'}\n")
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in sorted(out.rglob("*"))}
    folder, file = 0o777 & ~mask, 0o666 & ~mask
    assert modes == {
        "checkpoints": folder, "checkpoints/step-0000007": folder,
        **{f"checkpoints/step-0000007/{f}": file for f in ("model.safetensors", "optimizer.pt", "state.json")},
        "model": folder, "model/model.safetensors": file, "model/state.json": file,
        "classifier": folder, "classifier/classifier.safetensors": file, "classifier/classifier.json": file,
        "hf": folder, **{f"hf/{f}": file for f in ("README.md", "config.json", "generation_config.json",
                                                   "model.safetensors", "tokenizer.json", "tokenizer_config.json")},
    }
