"""Supervised fine-tuning data: chat-formatted examples, with the loss only on the assistant's replies.

Formats. Input is JSONL, one example per line, in any of these shapes (told
apart per line by their keys; other keys, such as an "id", are ignored)::

    {"prompt": "Who wrote Hamlet?", "completion": "Shakespeare."}
    {"prompt": "Who wrote Hamlet?", "response": "Shakespeare."}
    {"instruction": "Name the author.", "input": "Hamlet", "output": "Shakespeare."}   # Alpaca; input optional
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Who wrote Hamlet?"},
                  {"role": "assistant", "content": "Shakespeare."}]}

A prompt/completion (or prompt/response) pair is one user turn and one
assistant turn; an Alpaca example is a user turn of the instruction (plus
"\\n\\n" and the input when the input is not empty) and an assistant turn of the
output. A messages example needs at least one assistant turn.

Chat template. Built on the tokenizer's reserved special tokens
(``lmpipe.config.CHAT_TOKENS`` and the end-of-text token), each turn is
``<|role|>`` + content + ``<|end|>`` and the end-of-text token closes the
conversation::

    <|system|>Be brief.<|end|><|user|>Who wrote Hamlet?<|end|><|assistant|>Shakespeare.<|end|><|endoftext|>

The special tokens are encoded as their ids, the contents as text (a literal
"<|end|>" inside a message stays text, so data cannot forge a turn boundary).
``render_chat`` gives the same conversation as a string, for inspection and
for prompting the fine-tuned model.

Loss mask. 1 exactly on the assistant contents, each assistant turn's
``<|end|>`` (the model learns where a reply ends) and the closing end-of-text
when the conversation ends with an assistant turn; 0 on system and user turns
and on every role token (given, not learned). Training sets the target of
every mask-0 position to the ignore index.

Layout. Training cuts the stream into windows of ``block_size + 1`` tokens at
stride ``block_size`` (``lmpipe.training.loader.WindowOrder``). "padded": every example
is padded with end-of-text tokens (mask 0) to exactly ``block_size`` tokens and
one more pad token ends the stream, so the stream is ``n * block_size + 1``
tokens, the loader's epoch shift is 0 and every window is one example plus the
first token of the next (a masked target): no example attends to another.
"packed": several examples share a window, so far fewer windows are needed when
examples are much shorter than the context. They are bin-packed (best fit,
longest first) into bins of at most ``block_size`` tokens, and each bin is then
laid out like a padded example: windows are whole bins, so no example is ever
cut by a window's edge and every target of every example is trained each epoch.
Training and validation pass the end-of-text id as ``doc_sep`` to ``GPT.forward``:
every example ends with exactly one end-of-text (the template's), so the
examples are recovered from the tokens alone and each position attends only
within its own example, with position embeddings restarting at 0 where the
example starts: an example is seen exactly as alone, as at inference. Targets
never cross examples: the target of an end-of-text is the next example's first
token, a role token (mask 0), or a pad. ``SFTData.fill`` is the share of window
tokens that are example tokens (1.0 would be no padding at all).
In both layouts an example longer than ``block_size`` is
an error (or skipped and counted), since its reply would lose the start of its
context.
Every ``VAL_EVERY``-th example is held out for validation.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from tokenizers import Tokenizer

from lmpipe.config.base import CHAT_TOKENS, EOT
from lmpipe.data.jsonl import jsonl_records
from lmpipe.data.tokenizer import encode_ordinary

VAL_EVERY = 10  # every 10th example is held out for validation
MAX_REPORTED = 5  # line numbers of skipped examples kept for the stage's meta

Role = Literal["system", "user", "assistant"]
Layout = Literal["padded", "packed"]
ROLE_TOKENS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
# The keys that identify each format; a line with keys of two formats is ambiguous.
_FORMAT_KEYS: dict[str, frozenset[str]] = {
    "prompt/completion": frozenset({"prompt", "completion", "response"}),
    "alpaca": frozenset({"instruction", "input", "output"}),
    "messages": frozenset({"messages"}),
}
_FORMATS_HELP = ('{"prompt", "completion"}, {"prompt", "response"}, {"instruction", "input"?, "output"} '
                 'or {"messages": [{"role", "content"}, ...]}')


class SFTFormatError(ValueError):
    """A line of the SFT file is not an example of a known format, or its example does not fit the context."""


class _LineError(Exception):
    """Raised by the per-line parser; the reader adds the field, file and line."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class SFTExample:
    """One conversation and the 1-based line of the file it came from (for error messages)."""

    messages: tuple[Message, ...]
    line: int


@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the template's special tokens in one tokenizer."""

    roles: dict[str, int]
    end: int
    eot: int


@dataclass
class SFTData:
    """Token and loss-mask streams of the train and val examples, and what was skipped."""

    train_tokens: np.ndarray
    train_mask: np.ndarray
    val_tokens: np.ndarray
    val_mask: np.ndarray
    train_examples: int
    val_examples: int
    layout: Layout = "padded"
    skipped_bad: int = 0
    skipped_bad_lines: list[int] = dataclasses.field(default_factory=list)  # the first MAX_REPORTED
    skipped_long: int = 0
    skipped_long_lines: list[int] = dataclasses.field(default_factory=list)  # the first MAX_REPORTED
    fill: float = 1.0  # share of the training windows' tokens that are example tokens (the rest is padding)

    def meta(self) -> dict[str, Any]:
        """The stage-meta entries: example counts, layout and skipped lines."""
        return {
            "sft_train_examples": self.train_examples,
            "sft_val_examples": self.val_examples,
            "sft_layout": self.layout,
            "sft_fill": self.fill,
            "sft_skipped_bad": self.skipped_bad,
            "sft_skipped_bad_lines": self.skipped_bad_lines,
            "sft_skipped_long": self.skipped_long,
            "sft_skipped_long_lines": self.skipped_long_lines,
        }


# -- formats -------------------------------------------------------------------


def _string(obj: dict[str, Any], key: str, where: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _LineError(f"{where}{key!r} must be a string, got {type(value).__name__}")
    return value


def _require(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key not in obj:
            raise _LineError(f"missing key {key!r} (keys: {sorted(obj)})")


def parse_example(obj: Any) -> tuple[Message, ...]:
    """One decoded JSON line -> its conversation; raises _LineError naming the problem."""
    messages = _conversation(obj)
    if not any(m.content for m in messages if m.role == "assistant"):
        raise _LineError("the assistant's reply is empty: nothing to train on but the closing tokens")
    return messages


def _conversation(obj: Any) -> tuple[Message, ...]:
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object of one of the formats {_FORMATS_HELP}, got {type(obj).__name__}")
    formats = [name for name, keys in _FORMAT_KEYS.items() if keys & obj.keys()]
    if not formats:
        raise _LineError(f"matches none of the formats {_FORMATS_HELP} (keys: {sorted(obj)})")
    if len(formats) > 1:
        raise _LineError(f"mixes the keys of the formats {formats} (keys: {sorted(obj)})")
    if formats[0] == "prompt/completion":
        if "completion" in obj and "response" in obj:
            raise _LineError("has both 'completion' and 'response': give one")
        reply = "completion" if "completion" in obj else "response"
        if reply not in obj:
            raise _LineError(f"missing key 'completion' or 'response' (keys: {sorted(obj)})")
        _require(obj, "prompt")
        return Message("user", _string(obj, "prompt")), Message("assistant", _string(obj, reply))
    if formats[0] == "alpaca":
        _require(obj, "instruction", "output")
        user = _string(obj, "instruction")
        extra = _string(obj, "input") if "input" in obj else ""
        if extra:
            user += "\n\n" + extra
        return Message("user", user), Message("assistant", _string(obj, "output"))
    turns = obj["messages"]
    if not isinstance(turns, list) or not turns:
        raise _LineError(f"'messages' must be a non-empty list, got {json.dumps(turns)[:40]}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]: "
        if not isinstance(turn, dict):
            raise _LineError(f"{where}expected an object with 'role' and 'content', got {type(turn).__name__}")
        for key in ("role", "content"):
            if key not in turn:
                raise _LineError(f"{where}missing key {key!r} (keys: {sorted(turn)})")
        role = _string(turn, "role", where)
        if role not in ROLE_TOKENS:
            raise _LineError(f"{where}unknown role {role!r} (expected one of {', '.join(ROLE_TOKENS)})")
        messages.append(Message(cast(Role, role), _string(turn, "content", where)))
    if not any(m.role == "assistant" for m in messages):
        raise _LineError("'messages' has no 'assistant' turn: nothing to train on")
    return tuple(messages)


def read_sft_jsonl(
    path: Path, *, skip_bad: bool = False, field: str = "finetune.sft_path"
) -> tuple[list[SFTExample], list[int]]:
    """Parse the file into (examples, line numbers of the skipped bad lines); blank lines are skipped.

    A bad line (not UTF-8, not JSON, no known format, a field missing or of the
    wrong type, an unknown role, no assistant turn) raises SFTFormatError naming
    the field, the file and the 1-based line; with ``skip_bad`` it is skipped
    and its line number returned instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: SFT file {str(path)!r} does not exist")
    examples: list[SFTExample] = []
    bad: list[int] = []
    first_error = ""
    for lineno, record in jsonl_records(path, f"a JSON object of one of the formats {_FORMATS_HELP}"):
        try:
            if isinstance(record, str):
                raise _LineError(record)
            examples.append(SFTExample(parse_example(record), lineno))
        except _LineError as err:
            message = f"{field}: {path}:{lineno}: {err}"
            if not skip_bad:
                raise SFTFormatError(message) from None
            bad.append(lineno)
            first_error = first_error or message
    if not examples:
        detail = f"; {len(bad)} bad line(s) skipped, the first: {first_error}" if bad else ""
        raise SFTFormatError(f"{field}: SFT file {str(path)!r} holds no examples{detail}")
    return examples, bad


# -- template ------------------------------------------------------------------


def render_chat(messages: Sequence[Message], *, eot: str = EOT, add_generation_prompt: bool = False) -> str:
    """The conversation as text in the chat template (what ``encode_chat`` encodes, as a string).

    ``add_generation_prompt``: end with an open ``<|assistant|>`` turn instead of
    the end-of-text token, the prompt that makes the fine-tuned model reply.
    """
    text = "".join(f"{ROLE_TOKENS[m.role]}{m.content}{END_TOKEN}" for m in messages)
    return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else eot)


def hf_chat_template() -> str:
    """:func:`render_chat` as a Jinja chat template (``chat_template`` in transformers' tokenizer_config.json):
    ``tokenizer.apply_chat_template`` then renders a conversation exactly as our SFT did, ``eos_token``
    being the end-of-text token and ``add_generation_prompt`` opening the assistant turn.

    One difference remains, in transformers rather than the template: a Hugging Face tokenizer encodes
    special-token text typed inside a message ("<|end|>") as that special token, where
    :func:`encode_chat` (and our serving) keeps it as text. Ids are equal for every message without such
    text."""
    roles = json.dumps(ROLE_TOKENS)
    return (
        f"{{% set roles = {roles} %}}"
        "{% for message in messages %}"
        "{% if message['role'] not in roles %}"
        "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
        "{% endif %}"
        f"{{{{ roles[message['role']] + message['content'] + '{END_TOKEN}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ROLE_TOKENS['assistant']}' }}}}"
        "{% else %}{{ eos_token }}{% endif %}"
    )


def chat_token_ids(tok: Tokenizer, eot_id: int) -> ChatTokenIds:
    """The template's token ids; fails clearly when the tokenizer was trained without one of them."""
    ids: dict[str, int] = {}
    for token in [*ROLE_TOKENS.values(), END_TOKEN]:
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(
                f"the tokenizer has no {token!r} token, which the SFT chat template needs: keep "
                f"{CHAT_TOKENS} in tokenizer.special_tokens and retrain the tokenizer"
            )
        ids[token] = i
    return ChatTokenIds({role: ids[t] for role, t in ROLE_TOKENS.items()}, ids[END_TOKEN], eot_id)


def encode_chat(
    conversations: Sequence[Sequence[Message]], tok: Tokenizer, ids: ChatTokenIds
) -> list[tuple[list[int], list[int]]]:
    """Each conversation -> (token ids, loss mask) of the same length; mask 1 = trained on."""
    contents = [m.content for conv in conversations for m in conv]
    # Literal special-token text in a message stays text (as in the shards): only the
    # template's ids mark turns and the conversation's end.
    encoded = iter(encode_ordinary(tok, contents))
    out = []
    for conv in conversations:
        tokens: list[int] = []
        mask: list[int] = []
        for m in conv:
            body = next(encoded)
            learn = int(m.role == "assistant")
            tokens += [ids.roles[m.role], *body, ids.end]
            mask += [0] + [learn] * (len(body) + 1)
        tokens.append(ids.eot)
        mask.append(int(conv[-1].role == "assistant"))
        out.append((tokens, mask))
    return out


def encode_chat_prompt(messages: Sequence[Message], tok: Tokenizer) -> list[int]:
    """The ids a chat model is prompted with: the conversation as ``encode_chat`` lays it out in training
    (literal special-token text in a message stays text), then the open ``<|assistant|>`` turn."""
    ids = chat_token_ids(tok, eot_id=-1)  # the conversation's closing end-of-text is dropped: its id is unused
    [(tokens, _)] = encode_chat([messages], tok, ids)
    return [*tokens[:-1], ids.roles["assistant"]]


def layout_stream(
    encoded: Sequence[tuple[list[int], list[int]]], layout: Layout, block_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lay encoded examples out as one (tokens, mask) stream, int64, for training's windows (module docstring).

    "padded": example i is tokens [i*block_size, (i+1)*block_size), pad_id / mask 0
    after its own tokens, and one pad token ends the stream. "packed": the same, with
    bin i of ``pack_examples`` (its examples back to back) in place of example i.
    """
    if layout == "packed":  # each bin of whole examples becomes one padded "example"
        encoded = [([t for i in b for t in encoded[i][0]], [m for i in b for m in encoded[i][1]])
                   for b in pack_examples([len(tokens) for tokens, _ in encoded], block_size)]
    elif layout != "padded":
        raise ValueError(f"finetune.sft_layout must be 'padded' or 'packed', got {layout!r}")
    tokens = np.full(len(encoded) * block_size + 1, pad_id, dtype=np.int64)  # (n*T + 1,)
    mask = np.zeros_like(tokens)
    for i, (ex_tokens, ex_mask) in enumerate(encoded):
        if len(ex_tokens) > block_size:
            raise ValueError(f"example {i} has {len(ex_tokens)} tokens, more than block_size={block_size}")
        start = i * block_size
        tokens[start : start + len(ex_tokens)] = ex_tokens
        mask[start : start + len(ex_mask)] = ex_mask
    return tokens, mask


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples of each bin: best fit decreasing, bins of at most ``capacity`` tokens.

    Longest first (ties by index), each into the fullest bin it still fits, else a
    new bin; deterministic. Bins come in the order they were opened, their examples
    in the order they were placed.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the first that fits is the fullest
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than block_size={capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            left, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            left = free - n
        if left > 0:
            bisect.insort(room, (left, b))
    return bins


# -- the data of a fine-tuning run ---------------------------------------------


def split_indices(n: int, every: int = VAL_EVERY, what: str = "SFT") -> tuple[list[int], list[int]]:
    """(train, val) example indices: every ``every``-th example is val, and at least one (the last).

    The held-out split of SFT and of classification data (``what`` names it in the error)."""
    if n < 2:
        raise ValueError(f"{what} needs at least 2 examples (one to train on, one to validate), got {n}")
    val = [i for i in range(n) if i % every == every - 1] or [n - 1]
    held = set(val)
    return [i for i in range(n) if i not in held], val


def build_sft_data(
    path: Path,
    tok: Tokenizer,
    eot_id: int,
    block_size: int,
    *,
    layout: Layout = "padded",
    skip_long: bool = False,
    skip_bad: bool = False,
    field: str = "finetune.sft_path",
) -> SFTData:
    """Read, encode, check the length of, split and lay out an SFT file.

    An example longer than ``block_size`` tokens raises SFTFormatError naming its
    line, unless ``skip_long`` (then it is counted in SFTData.skipped_long).
    """
    ids = chat_token_ids(tok, eot_id)
    examples, bad = read_sft_jsonl(path, skip_bad=skip_bad, field=field)
    encoded = encode_chat([e.messages for e in examples], tok, ids)
    kept: list[tuple[list[int], list[int]]] = []
    long_lines: list[int] = []
    for example, (tokens, mask) in zip(examples, encoded):
        if len(tokens) <= block_size:
            kept.append((tokens, mask))
            continue
        if not skip_long:
            raise SFTFormatError(
                f"{field}: {path}:{example.line}: the example is {len(tokens)} tokens, longer than "
                f"model.block_size={block_size}: shorten it, raise model.block_size, or set "
                "finetune.sft_skip_long=true to skip such examples"
            )
        long_lines.append(example.line)
    try:
        train_idx, val_idx = split_indices(len(kept))
    except ValueError as err:
        skipped = f" ({len(long_lines)} longer than model.block_size={block_size} skipped)" if long_lines else ""
        raise SFTFormatError(f"{field}: {path}: {err}{skipped}") from None
    train_tokens, train_mask = layout_stream([kept[i] for i in train_idx], layout, block_size, eot_id)
    val_tokens, val_mask = layout_stream([kept[i] for i in val_idx], layout, block_size, eot_id)
    fill = sum(len(kept[i][0]) for i in train_idx) / (len(train_tokens) - 1)  # the stream is n * block_size + 1
    return SFTData(train_tokens, train_mask, val_tokens, val_mask, len(train_idx), len(val_idx), layout,
                   len(bad), bad[:MAX_REPORTED], len(long_lines), long_lines[:MAX_REPORTED], round(fill, 4))


# -- the held-out examples, handed from fine-tuning to evaluation ----------------

HELD_OUT_FILE = "sft_val.npz"  # in the finetune stage's output directory (mode sft)
HELD_OUT_META = "sft_held_out"  # the finetune stage's meta entry naming it


@dataclass(frozen=True)
class HeldOutSFT:
    """The val examples fine-tuning validated on, as it laid them out, and where they came from."""

    data: SFTData  # its train streams are empty: only the val ones are handed over
    source: dict[str, Any]  # path, layout, block_size, skip_long, skip_bad: how they were built

    @property
    def block_size(self) -> int:
        return int(self.source["block_size"])


def write_held_out(data: SFTData, out_dir: Path, source: dict[str, Any]) -> dict[str, str]:
    """Save ``data``'s val streams and counts, and the settings they were built with (``source``), to
    ``out_dir / HELD_OUT_FILE``; returns the stage-meta entry that names the file."""
    counts = dataclasses.asdict(data)
    for name in ("train_tokens", "train_mask", "val_tokens", "val_mask"):
        del counts[name]
    info = json.dumps({"source": source, "counts": counts}, sort_keys=True)
    with open(out_dir / HELD_OUT_FILE, "wb") as f:  # a file object: np.savez does not add a suffix
        np.savez(f, val_tokens=data.val_tokens, val_mask=data.val_mask, info=np.array(info))
    return {HELD_OUT_META: HELD_OUT_FILE}


def read_held_out(path: Path) -> HeldOutSFT:
    """What :func:`write_held_out` saved, with the same val streams, counts and meta."""
    with np.load(path, allow_pickle=False) as f:
        info = json.loads(str(f["info"]))
        empty = np.zeros(0, dtype=np.int64)
        data = SFTData(empty, empty, f["val_tokens"], f["val_mask"], **info["counts"])
    return HeldOutSFT(data, info["source"])
