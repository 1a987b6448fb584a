"""Training checkpoints: one directory per step, written atomically, verified on load.

Layout of ``<root>/step-0000200/``::

    model.safetensors   weights (a tied output head is stored once, as the token embedding)
    optimizer.pt        optimizer state (AdamW's; with optimizer muon, Muon's too) keyed by parameter name,
                        read back with torch.load(weights_only=True)
    state.json          written LAST: format version, step, model config, vocab size,
                        tokenizer fingerprint, data position, every rank's RNG states, sha256 of the files

Weights and optimizer state are the full, unsharded tensors whatever trained them
(one process, DDP or FSDP2: ``capture`` gathers them through torch's distributed
state-dict API), so a checkpoint resumes on any number of processes.

A checkpoint is built in a hidden temporary directory and renamed into place, and
``latest_checkpoint`` trusts a directory only if its state.json parses and every
file matches its recorded hash, so a crash mid-write is never resumed from.
An exported model (``export_model``) is the same layout without optimizer.pt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)

from lmpipe.artifacts import fsync_path, save_safetensors, sha256_file, write_json_atomic
from lmpipe.config.training import ModelConfig
from lmpipe.model.gpt import ARCH_FIELDS, GPT, GPTConfig
from lmpipe.model.lora import LoraLinear, is_lora_state, merge_state

FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name, RNG states per rank
STATE_FILE = "state.json"
MODEL_DIR = "model"  # in a training stage's output: the checkpoint that goes forward, without optimizer state
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
# The output head is the token embedding (weight tying; a qwen3 model may have its own);
# safetensors refuses shared tensors, and storing the matrix once is what we want anyway.
TIED_KEY, _TIED_TO = "lm_head.weight", "transformer.wte.weight"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupted."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured model, tokenizer or format."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def export_model(ckpt_dir: Path, dest: Path) -> Path:
    """Copy a checkpoint without its optimizer state: what inference and fine-tuning need.

    A LoRA checkpoint (``lmpipe.model.lora``) is exported with its adapters merged into the
    base weights, so every reader of a model directory sees a plain GPT.
    """
    state = read_state(ckpt_dir)
    state.pop("state_file")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    for d in (tmp, dest):
        if d.exists():
            shutil.rmtree(d)
    tmp.mkdir(parents=True)
    if "lora" in state:  # a LoRA run's checkpoint: the exported model is the plain GPT with the updates merged
        weights = merge_state(load_file(str(Path(ckpt_dir) / WEIGHTS_FILE)), state["lora"]["scale"])
        save_safetensors(weights, tmp / WEIGHTS_FILE)
        state["lora"] = state["lora"] | {"merged": True}
    else:
        shutil.copyfile(Path(ckpt_dir) / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
    # No RNG states: they are training state, and Python's and NumPy's also move with other code in the process.
    return seal_checkpoint(tmp, dest, {k: v for k, v in state.items() if k not in ("files", "rng")})


# ---------------------------------------------------------------- reading


def _step_of(d: Path) -> int:
    return int(d.name.split("-")[1])


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under root, newest step first (temporary dirs excluded)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=_step_of, reverse=True)


def seal_checkpoint(tmp: Path, final: Path, state: dict[str, Any]) -> Path:
    """Hash (and fsync) the files in tmp, write state.json last, rename tmp to final."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in files:
        fsync_path(p)
    state = {**state, "files": {p.name: sha256_file(p) for p in files}}
    write_json_atomic(tmp / STATE_FILE, state)
    fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. a run resumed at its last step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)  # make the rename itself durable
    return final


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed state.json, plus ``state_file`` (its path, for error messages; not stored)."""
    f = Path(ckpt_dir) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: {STATE_FILE} is missing")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{f} is not valid JSON: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f} must hold a JSON object")
    state["state_file"] = str(f)
    return state


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """read_state, then check the format version (CheckpointMismatchError) and every file's sha256 (CheckpointError)."""
    state = read_state(ckpt_dir)
    if state.get("format_version") != FORMAT_VERSION:  # complete, but not ours to read: refused, never skipped
        raise CheckpointMismatchError(
            f"{state['state_file']}: format_version is {state.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; resume or fine-tune with the lmpipe version that wrote it, or start afresh"
        )
    files = state.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{state['state_file']}: no file hashes recorded for {WEIGHTS_FILE}")
    for name, digest in files.items():
        p = Path(ckpt_dir) / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p} does not match the sha256 recorded in {STATE_FILE} (corrupted?)")
    return state


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete, uncorrupted checkpoint under root, or None."""
    for d in _step_dirs(root):
        try:
            verify_checkpoint(d)
        except CheckpointError:
            continue
        return d
    return None


def architecture_diffs(state: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """'model.<field>: checkpoint has X, config has Y' for every architecture field that differs.

    Compared as the model is built (``GPTConfig.from_config``: qwen3's n_kv_head and intermediate_size
    resolved), over the config's arch's fields; a checkpoint without ``arch`` is a GPT-2 (as they all were).
    """
    saved = {"arch": "gpt2"} | (state.get("model") or {})
    wanted = GPTConfig.from_config(model_cfg, vocab_size=0).to_dict() | {"arch": model_cfg.arch}
    # Another arch: the arch, and the fields both have (the others would only repeat that the arch differs).
    names = ["arch", *(n for n in ARCH_FIELDS[model_cfg.arch] if n in ARCH_FIELDS.get(saved["arch"], ()))]
    return [f"model.{name}: checkpoint has {saved.get(name)!r}, config has {wanted[name]!r}"
            for name in names if saved.get(name) != wanted[name]]


def check_compatible(
    state: dict[str, Any],
    model_cfg: ModelConfig,
    vocab_size: int,
    tokenizer_fingerprint: str,
    *,
    field: str,
    train_cfg: dict[str, Any] | None = None,
) -> None:
    """Raise CheckpointMismatchError listing every field where the checkpoint differs from the config.

    ``field`` names the config entry that pointed at the checkpoint. ``train_cfg``
    (optional) are training settings that must also match, e.g. on resume.
    """
    where = state.get("state_file", "<state>")
    diffs: list[str] = []
    if state.get("format_version") != FORMAT_VERSION:
        diffs.append(f"format_version: checkpoint has {state.get('format_version')!r}, "
                     f"this code reads {FORMAT_VERSION}")
    diffs += architecture_diffs(state, model_cfg)
    if state.get("vocab_size") != vocab_size:
        diffs.append(f"vocab_size: checkpoint has {state.get('vocab_size')!r}, tokenizer has {vocab_size!r}")
    if state.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        diffs.append(
            f"tokenizer_fingerprint: checkpoint has {state.get('tokenizer_fingerprint')!r}, "
            f"tokenizer has {tokenizer_fingerprint!r}"
        )
    for name, value in (train_cfg or {}).items():
        saved = (state.get("train") or {}).get(name)
        if saved != value:
            diffs.append(f"train.{name}: checkpoint has {saved!r}, config has {value!r}")
    if diffs:
        raise CheckpointMismatchError(
            f"{field}: checkpoint {where} does not match the configuration:\n  " + "\n  ".join(diffs)
        )


def _load_weights(model: nn.Module, ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Full weights into a plain, DDP or FSDP2 model (each rank reads the file and keeps its shard).

    A LoRA run's own checkpoints (``checkpoints/step-*``, ``best/``) hold the frozen
    base weights and the unmerged adapters. A model with LoRA layers (resuming that
    run) takes them as they are; a plain GPT (inference, evaluation, a fine-tune
    started from such a step) takes them merged with the scale the run recorded,
    exactly as ``export_model`` would have written them.
    """
    sd = load_file(str(Path(ckpt_dir) / WEIGHTS_FILE), device="cpu")
    if is_lora_state(sd) and not any(isinstance(m, LoraLinear) for m in model.modules()):
        lora = state.get("lora")
        if not isinstance(lora, dict) or "scale" not in lora:
            raise CheckpointError(f"{state.get('state_file', ckpt_dir)}: {WEIGHTS_FILE} holds LoRA adapters but "
                                  "the state names no 'lora' entry with their 'scale', so they cannot be merged")
        sd = merge_state(sd, float(lora["scale"]))
    if TIED_KEY not in sd:  # stored once: the head is the token embedding
        sd[TIED_KEY] = sd[_TIED_TO]
    set_model_state_dict(model, cast(dict[str, Any], sd), options=StateDictOptions(full_state_dict=True, strict=True))


def load_model(ckpt_dir: Path, device: torch.device | str = "cpu") -> GPT:
    """Build the GPT a checkpoint describes and load its weights; returned in eval mode.

    Always a plain GPT: a LoRA checkpoint comes back with its adapters merged (``_load_weights``).
    """
    state = verify_checkpoint(ckpt_dir)
    model = GPT(GPTConfig(**state["model"]))
    _load_weights(model, ckpt_dir, state)
    return model.to(device).eval()


def is_chat_model(state: dict[str, Any]) -> bool:
    """Was the checkpoint (its state.json) fine-tuned on chat SFT data? Then it is prompted in the chat template."""
    return state.get("train", {}).get("mode") == "sft"
