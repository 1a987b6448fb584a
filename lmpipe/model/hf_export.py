"""Hand-off: an lmpipe checkpoint and its tokenizer as a Hugging Face transformers model directory.

Our GPT is GPT-2's architecture, so the export is ``GPT2LMHeadModel`` and every
tool that reads the transformers format can use the model as it is:
``AutoModelForCausalLM`` / ``AutoTokenizer``, lm-evaluation-harness
(``--model hf``), serving engines. Three differences are bridged here:

- GELU: ours is the exact erf form (``nn.GELU()``); GPT-2's default is the tanh
  approximation ("gelu_new"), so the config says ``activation_function="gelu"``.
- Weights: HF GPT-2 multiplies with ``Conv1D``, whose weight is (in, out); our
  ``nn.Linear`` weights are (out, in) and are transposed.
- Biases: a model trained with ``bias=False`` has none, GPT-2 always has them;
  zeros compute the same function.

A ``model.arch: qwen3`` model is exported as ``Qwen3ForCausalLM``: its blocks are
named as transformers names them, so only the containers are renamed
(``lmpipe.model.gpt.transformers_name``), and its rotary embeddings, RMSNorms
and attention are computed as transformers computes them.

Logits of the export equal ours (tests/unit/model/test_export.py checks <= 1e-4 in fp32, and
identical greedy generations). The destination appears complete or not at all:
it is built in a hidden sibling directory and renamed into place, its modes those
the umask gives (as if written with plain ``open`` and ``mkdir``).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lmpipe.artifacts import follow_umask
from lmpipe.data.sft import hf_chat_template
from lmpipe.data.tokenizer import (
    META_FILE,
    TOKENIZER_FILE,
    TokenizerMismatchError,
    read_tokenizer_meta,
    tokenizer_fingerprint,
)
from lmpipe.model.checkpoint import is_chat_model, load_model, read_state
from lmpipe.model.gpt import GPT, LN_EPS, transformers_name

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TIED_HEAD = "lm_head.weight"  # stored once, as transformer.wte.weight (tie_word_embeddings)


def gpt2_config(model: GPT, eot_id: int) -> GPT2Config:
    """The GPT2Config that computes what ``model`` computes (no dropout: the export is for inference)."""
    c = model.config
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,  # lmpipe.model.gpt.MLP's hidden width
        activation_function="gelu",  # exact erf GELU, as nn.GELU(); not GPT-2's tanh "gelu_new"
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=LN_EPS,
        scale_attn_weights=True,  # 1/sqrt(head size), as scaled_dot_product_attention
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        bos_token_id=eot_id,  # documents are separated (and generation is started) by the EOT token
        eos_token_id=eot_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def gpt2_state_dict(model: GPT, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layouts; ``expected`` maps every GPT-2 key to its shape.

    The names already match (nanoGPT copied GPT-2's); Conv1D weights are
    transposed (out, in) -> (in, out), missing biases become zeros and the tied
    head is left to the model's weight tying.
    """
    ours = model.state_dict()
    ours.pop(_TIED_HEAD)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key in ours:
            w = ours.pop(key)
            sd[key] = w.t().contiguous() if key.endswith(_CONV1D) else w  # (in, out) for Conv1D
        elif key.endswith(".bias") and not model.config.bias:
            sd[key] = torch.zeros(shape, dtype=model.transformer.wte.weight.dtype)
        else:
            raise KeyError(f"GPT-2 weight {key!r} has no counterpart in the lmpipe model")
        if sd[key].shape != shape:
            raise ValueError(f"{key}: lmpipe weight has shape {tuple(sd[key].shape)}, GPT-2 expects {tuple(shape)}")
    if ours:
        raise KeyError(f"lmpipe weights with no GPT-2 counterpart: {sorted(ours)}")
    return sd


def to_gpt2(model: GPT, eot_id: int) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel holding ``model``'s weights (the same tensors where no transpose was needed)."""
    config = gpt2_config(model, eot_id)
    with torch.device("meta"):  # no memory and no random init for weights that are replaced at once
        hf = GPT2LMHeadModel(config)
    expected = {k: v.shape for k, v in hf.state_dict().items() if k != _TIED_HEAD}
    hf.load_state_dict(gpt2_state_dict(model, expected), strict=False, assign=True)
    hf.tie_weights()  # lm_head.weight is wte's tensor again after assign=True replaced the latter
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("the exported GPT-2's output head is not tied to its token embedding")
    hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    return hf.eval()


def qwen3_config(model: GPT, eot_id: int) -> Qwen3Config:
    """The Qwen3Config that computes what a ``model.arch: qwen3`` model computes (no dropout: for inference)."""
    c = model.config
    assert c.intermediate_size is not None and c.n_kv_head is not None  # always set for qwen3 (GPTConfig)
    return Qwen3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_size,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_bias=c.bias,
        attention_dropout=0.0,
        use_sliding_window=False,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        architectures=["Qwen3ForCausalLM"],
    )


def to_qwen3(model: GPT, eot_id: int) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM holding ``model``'s weights (the same tensors: the layouts agree, only names differ)."""
    config = qwen3_config(model, eot_id)
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(config)
    ours = model.state_dict()
    if model.tied:
        ours.pop(_TIED_HEAD)
    sd = {transformers_name(k, "qwen3"): v for k, v in ours.items()}
    expected = {k: v.shape for k, v in hf.state_dict().items() if not (model.tied and k == _TIED_HEAD)}
    if sd.keys() != expected.keys():
        raise KeyError(f"Qwen3 weights without an lmpipe counterpart: {sorted(expected.keys() - sd.keys())}; "
                       f"lmpipe weights without a Qwen3 one: {sorted(sd.keys() - expected.keys())}")
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise ValueError(f"{key}: lmpipe weight has shape {tuple(sd[key].shape)}, Qwen3 expects {tuple(shape)}")
    hf.load_state_dict(sd, strict=False, assign=True)
    with torch.device("cpu"):  # the rotary frequencies are buffers of no checkpoint: computed afresh, off meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
    if model.tied:
        hf.tie_weights()
        if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("the exported Qwen3's output head is not tied to its token embedding")
    hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    return hf.eval()


def to_transformers(model: GPT, eot_id: int) -> PreTrainedModel:
    """The transformers model of ``model``'s arch holding its weights: GPT2LMHeadModel or Qwen3ForCausalLM."""
    return to_qwen3(model, eot_id) if model.config.arch == "qwen3" else to_gpt2(model, eot_id)


_HF_CLASS = {"gpt2": "`GPT2LMHeadModel` (exact-erf GELU, tied embeddings)",
             "qwen3": "`Qwen3ForCausalLM` (rotary positions, RMSNorm, QK-norm, SwiGLU)"}


def _model_card(ckpt_dir: Path, state: dict[str, Any], tok_fp: str, block_size: int) -> str:
    """README.md: what the directory holds, where it came from, and how to load and evaluate it."""
    m = state["model"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# {ckpt_dir.name} (lmpipe export)

A GPT language model trained with lmpipe, exported to the Hugging Face transformers format as
{_HF_CLASS[m.get('arch', 'gpt2')]}: {m['n_layer']} layers, {m['n_head']} heads,
width {m['n_embd']}, context {block_size} tokens, vocabulary {state['vocab_size']}.

- lmpipe checkpoint: `{ckpt_dir.name}`, step {state.get('step')}
- tokenizer fingerprint (sha256 of the lmpipe tokenizer.json): `{tok_fp}`

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("<this directory>", local_files_only=True)
model = AutoModelForCausalLM.from_pretrained("<this directory>", local_files_only=True)
ids = tok("To be, or not to be", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=20, do_sample=False)
print(tok.decode(out[0]))
```

Evaluate with lm-evaluation-harness:

```
lm_eval --model hf --model_args pretrained=<this directory> --tasks hellaswag
```

Inputs longer than {block_size} tokens must be truncated: the model was trained on no positions beyond.
"""


# What an export folder holds (transformers writes the chat template to its own file in newer versions).
EXPORT_FILES = frozenset({"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})
CARD_MARK = "(lmpipe export)"  # in the model card's title


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds an lmpipe export and nothing else (so replacing it loses nothing)."""
    card = folder / "README.md"
    return ({p.name for p in folder.iterdir()} <= EXPORT_FILES and card.is_file()
            and CARD_MARK in card.read_text(encoding="utf-8", errors="replace")[:1000])


def check_export_dest(dest: Path, sources: tuple[Path, ...], overwrite: bool) -> None:
    """Refuse a destination whose replacement would destroy something: a file, a folder holding the model
    being exported, or (unless ``overwrite``) a non-empty folder that is not an earlier export."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"export destination {dest} is a file, not a folder")
    for src in sources:
        if src == dest or dest in src.parents:
            raise ValueError(f"export destination {dest} holds {src}, which the export reads; choose another folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite and not is_export(dest):
        raise FileExistsError(f"export destination {dest} is not empty and is not an earlier lmpipe export; "
                              "choose a new folder, or replace it with --force (overwrite=True)")


@contextmanager
def _bars_only_on_a_terminal() -> Iterator[None]:
    """transformers' progress bars ("Writing model shards") off for the block unless stderr is a terminal: in a
    log file or a captured output they are noise."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def export_hf(checkpoint_dir: Path, tokenizer_dir: Path, dest: Path, *, overwrite: bool = False) -> Path:
    """Write ``dest``: config.json, generation_config.json, model.safetensors, tokenizer files, README.md.

    ``checkpoint_dir`` is one lmpipe checkpoint (model.safetensors + state.json),
    ``tokenizer_dir`` the tokenizer stage's directory (tokenizer.json +
    tokenizer_meta.json); the tokenizer must be the one the model was trained
    with. Everything is checked before anything is written. An earlier export at
    ``dest`` (or, with ``overwrite``, any folder) is replaced only once the new
    export is complete; any other non-empty ``dest`` is refused. Returns ``dest``.
    """
    checkpoint_dir, tokenizer_dir = Path(checkpoint_dir).resolve(), Path(tokenizer_dir).resolve()
    dest = Path(dest).resolve()
    check_export_dest(dest, (checkpoint_dir, tokenizer_dir), overwrite)
    state = read_state(checkpoint_dir)
    tok_path = tokenizer_dir / TOKENIZER_FILE
    tok_fp = tokenizer_fingerprint(tok_path)
    meta = read_tokenizer_meta(tokenizer_dir / META_FILE)
    if state.get("tokenizer_fingerprint") != tok_fp:
        raise TokenizerMismatchError(
            f"{state['state_file']} was trained with tokenizer {state.get('tokenizer_fingerprint')!r}, "
            f"but {tok_path} has sha256 {tok_fp}; export with the tokenizer the model was trained with"
        )
    model = load_model(checkpoint_dir)  # verifies every file's sha256
    eot, eot_id = meta["eot_token"], meta["eot_id"]
    # The reserved chat tokens (<|system|>, <|user|>, ...): never split, skipped by decode(skip_special_tokens=True).
    extra = [t["token"] for t in meta["special_tokens"] if t["token"] != eot]

    dest.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden sibling: nothing of the user's can be in it, and a crash leaves only it behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with _bars_only_on_a_terminal():
            to_transformers(model, eot_id).save_pretrained(tmp)
        if model.config.arch == "qwen3":
            # transformers 5 writes rope_theta inside rope_parameters only; readers on transformers 4 (lm-eval,
            # serving engines pinned to it) read the top-level key and would take their default instead.
            hf_config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            hf_config["rope_theta"] = model.config.rope_theta
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tok_path),
            bos_token=eot,
            eos_token=eot,
            unk_token=None,  # byte-level BPE encodes any text; there is no unknown token
            pad_token=eot,  # batched inputs need one; padded positions are masked out, so its id is irrelevant
            extra_special_tokens=extra,
            model_max_length=model.config.block_size,
        )
        if is_chat_model(state):  # apply_chat_template (and serving engines) prompt it as its SFT did
            tokenizer.chat_template = hf_chat_template()
        tokenizer.save_pretrained(tmp)
        card = _model_card(checkpoint_dir, state, tok_fp, model.config.block_size)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        follow_umask(tmp)  # the folder (mkdtemp: 0700) and the weights (safetensors: 0600) are the user's to share
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():  # moved aside, not deleted, until the new export is in place
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        dest.rename(old / dest.name)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
    return dest
