"""Supervised fine-tuning data: prompt/response pairs, with the loss only on the responses.

Input is JSONL, one example per line::

    {"prompt": "Q: Who wrote Hamlet?\\nA:", "response": " Shakespeare."}

Each example becomes ``prompt tokens + response tokens + <eot>``, and a parallel
mask marks which tokens the model is trained to predict: 0 on the prompt
(given, not learned), 1 on the response and the closing eot (so the model
learns where an answer ends). Examples are packed into one token stream, and
training sets the target of every mask-0 position to the ignore index.

    >>> tokens, mask = encode_examples([SFTExample("ab", "c")], tok, eot)
    >>> mask.tolist()          # with one token per character
    [0, 0, 1, 1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

VAL_EVERY = 10  # every 10th example is held out for validation


class SFTFormatError(ValueError):
    """A line of the SFT file is not a {"prompt": str, "response": str} object."""


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass
class SFTData:
    """Packed token and loss-mask streams of the train and val examples."""

    train_tokens: np.ndarray
    train_mask: np.ndarray
    val_tokens: np.ndarray
    val_mask: np.ndarray
    train_examples: int
    val_examples: int


def read_sft_jsonl(path: Path, *, field: str = "finetune.sft_path") -> list[SFTExample]:
    """Parse the file; errors name the file and the 1-based line number. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: SFT file {str(path)!r} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{field}: {path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SFTFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise SFTFormatError(f"{where}: expected an object with 'prompt' and 'response', got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if key not in obj:
                    raise SFTFormatError(f"{where}: missing key {key!r} (keys: {sorted(obj)})")
                if not isinstance(obj[key], str):
                    raise SFTFormatError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            examples.append(SFTExample(obj["prompt"], obj["response"]))
    if not examples:
        raise SFTFormatError(f"{field}: SFT file {str(path)!r} holds no examples")
    return examples


def encode_examples(examples: list[SFTExample], tok: Tokenizer, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack examples into (tokens, mask), both int64 of the same length; mask 1 = trained on."""
    # Literal "<|endoftext|>" in the text stays text, as in the shards: only the eot we
    # append marks an example's end.
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        prompts = tok.encode_batch([e.prompt for e in examples], add_special_tokens=False)
        responses = tok.encode_batch([e.response for e in examples], add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    tokens: list[int] = []
    mask: list[int] = []
    for p, r in zip(prompts, responses):
        tokens += p.ids + r.ids + [eot_id]
        mask += [0] * len(p.ids) + [1] * (len(r.ids) + 1)
    return np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.int64)


def split_indices(n: int) -> tuple[list[int], list[int]]:
    """(train, val) example indices: every VAL_EVERY-th example is val, and at least one (the last)."""
    if n < 2:
        raise ValueError(f"SFT needs at least 2 examples (one to train on, one to validate), got {n}")
    val = [i for i in range(n) if i % VAL_EVERY == VAL_EVERY - 1] or [n - 1]
    held = set(val)
    return [i for i in range(n) if i not in held], val


def build_sft_data(path: Path, tok: Tokenizer, eot_id: int, *, field: str = "finetune.sft_path") -> SFTData:
    """Read, split and encode an SFT file."""
    examples = read_sft_jsonl(path, field=field)
    try:
        train_idx, val_idx = split_indices(len(examples))
    except ValueError as err:
        raise SFTFormatError(f"{field}: {path}: {err}") from None
    train_tokens, train_mask = encode_examples([examples[i] for i in train_idx], tok, eot_id)
    val_tokens, val_mask = encode_examples([examples[i] for i in val_idx], tok, eot_id)
    return SFTData(train_tokens, train_mask, val_tokens, val_mask, len(train_idx), len(val_idx))
