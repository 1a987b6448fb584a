"""Supervised fine-tuning data: chat-formatted examples, with the loss only on the assistant's replies.

Formats. Input is JSON lines (one record per line) or one JSON array of records
(told apart by the file's first character, ``[`` for an array; a ``.jsonl`` file
holding an array is an error that says what to do). Each record is in one of these
shapes, told apart by its keys (other keys, such as an "id", are ignored; a file
may mix shapes, and the stage reports how many records of each it read)::

    {"prompt": "Who wrote Hamlet?", "completion": "Shakespeare."}          # or "response"
    {"instruction": "Name the author.", "input": "Hamlet", "output": "Shakespeare."}   # Alpaca; input optional
    {"instruction": "...", "context": "...", "response": "..."}               # the same, as Dolly names them
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Who wrote Hamlet?"},
                  {"role": "assistant", "content": "Shakespeare."}]}
    {"conversations": [{"from": "human", "value": "Who wrote Hamlet?"},    # ShareGPT
                       {"from": "gpt", "value": "Shakespeare."}]}

A prompt/completion pair is one user turn and one assistant turn; an Alpaca
example is a user turn of the instruction (plus "\\n\\n" and the input when the
input is not empty) and an assistant turn of the output. A messages or ShareGPT
example needs at least one assistant turn; ShareGPT's speakers are mapped to the
three roles (``SHAREGPT_ROLES``: human/user, gpt/assistant/chatgpt/bard/bing/model,
system). Any record may carry a "system" string, which becomes a first system turn.

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
Every ``VAL_EVERY``-th example is held out for validation, or more when those are
too few for the champion gate to decide on (``held_out_split``).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from tokenizers import Tokenizer

from lmpipe.config.base import CHAT_TOKENS, EOT
from lmpipe.data.jsonl import JSONArrayError, json_array_records, jsonl_records, starts_with_array
from lmpipe.data.tokenizer import encode_ordinary

log = logging.getLogger(__name__)

VAL_EVERY = 10  # every 10th example is held out for validation (or more: held_out_split)
MAX_REPORTED = 5  # line numbers of skipped examples kept for the stage's meta

Role = Literal["system", "user", "assistant"]
Layout = Literal["padded", "packed"]
ROLE_TOKENS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
# The record shapes and the keys that tell each apart ("response" is a reply in two shapes, so it tells none);
# a record with keys of two shapes is ambiguous.
_SHAPE_KEYS: dict[str, frozenset[str]] = {
    "prompt/completion": frozenset({"prompt", "completion"}),
    "alpaca": frozenset({"instruction", "input", "output", "context"}),
    "messages": frozenset({"messages"}),
    "sharegpt": frozenset({"conversations"}),
}
# ShareGPT's speaker names ("from"), as the ShareGPT dumps, FastChat, Axolotl and LLaMA-Factory write them.
SHAREGPT_ROLES: dict[str, str] = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
                                  "bing": "assistant", "model": "assistant"}
_FORMATS_HELP = ('{"prompt", "completion" or "response"}, Alpaca {"instruction", "input" or "context" (optional), '
                 '"output" or "response"}, {"messages": [{"role", "content"}, ...]} or ShareGPT {"conversations": '
                 '[{"from", "value"}, ...]}')


SKIP_BAD_OPTION = "finetune.sft_skip_bad"  # the config option behind read_sft_examples' skip_bad


class SFTFormatError(ValueError):
    """A line of the SFT file is not an example of a known format, or its example does not fit the context."""


class _LineError(Exception):
    """Raised by the per-line parser; the reader adds the field, file and line, and for an error with a ``remedy``
    (what to change in the record) that remedy and the option that skips such records."""

    def __init__(self, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.remedy = remedy


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    train: bool = True  # an assistant turn's tokens are trained on; false: context only (a turn's "weight": 0)


@dataclass(frozen=True)
class SFTExample:
    """One conversation, the 1-based line of the file it came from and, in a JSON array, its 1-based record
    number (for error messages)."""

    messages: tuple[Message, ...]
    line: int
    record: int | None = None

    def where(self, path: Path) -> str:
        return f"{path}:{self.line}" + (f" (record {self.record})" if self.record else "")


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
    format: str = ""  # the file's format in words (SFTFile.describe)
    shapes: dict[str, int] = dataclasses.field(default_factory=dict)  # records read of each shape

    def meta(self) -> dict[str, Any]:
        """The stage-meta entries: the file's format, example counts, layout and skipped lines."""
        return {
            "sft_format": self.format,
            "sft_shapes": self.shapes,
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


def _one_of(obj: dict[str, Any], keys: tuple[str, str], required: bool) -> str | None:
    """The one of two alternative keys the record has (None: neither, when not ``required``)."""
    present = [k for k in keys if k in obj]
    if len(present) == 2:
        raise _LineError(f"has both {keys[0]!r} and {keys[1]!r}: give one")
    if not present and required:
        raise _LineError(f"missing key {keys[0]!r} or {keys[1]!r} (keys: {sorted(obj)})")
    return present[0] if present else None


def record_shape(obj: dict[str, Any]) -> str:
    """The shape of one record (a key of ``_SHAPE_KEYS``), from its keys; raises _LineError if none or two match."""
    shapes = [name for name, keys in _SHAPE_KEYS.items() if keys & obj.keys()]
    if not shapes and "response" in obj:  # {"response": ...} alone: a prompt/response pair without its prompt
        shapes = ["prompt/completion"]
    if not shapes:
        raise _LineError(f"matches none of the formats {_FORMATS_HELP} (keys: {sorted(obj)})",
                         remedy="rename the record's keys to those of one of these formats")
    if len(shapes) > 1:
        raise _LineError(f"mixes the keys of the formats {shapes} (keys: {sorted(obj)})")
    return shapes[0]


def parse_example(obj: Any) -> tuple[Message, ...]:
    """One decoded record -> its conversation; raises _LineError naming the problem."""
    messages = _conversation(obj)
    if not any(m.train for m in messages if m.role == "assistant"):
        raise _LineError("every assistant turn has weight 0: nothing to train on")
    if not any(m.content for m in messages if m.role == "assistant" and m.train):
        raise _LineError("the assistant's reply is empty: nothing to train on but the closing tokens")
    return messages


def _conversation(obj: Any) -> tuple[Message, ...]:
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object of one of the formats {_FORMATS_HELP}, got {type(obj).__name__}")
    shape = record_shape(obj)
    turns: tuple[Message, ...]
    if shape == "prompt/completion":
        reply = _one_of(obj, ("completion", "response"), required=True)
        assert reply is not None
        _require(obj, "prompt")
        turns = (Message("user", _string(obj, "prompt")), Message("assistant", _string(obj, reply)))
    elif shape == "alpaca":
        _require(obj, "instruction")
        reply = _one_of(obj, ("output", "response"), required=True)
        assert reply is not None
        extra_key = _one_of(obj, ("input", "context"), required=False)
        user = _string(obj, "instruction")
        extra = _string(obj, extra_key) if extra_key else ""
        if extra:
            user += "\n\n" + extra
        turns = (Message("user", user), Message("assistant", _string(obj, reply)))
    elif shape == "messages":
        turns = _turns(obj, "messages", ("role", "content"), {r: r for r in ROLE_TOKENS}, "role/content")
    else:
        turns = _turns(obj, "conversations", ("from", "value"), SHAREGPT_ROLES, "from/value")
    system = _string(obj, "system") if "system" in obj else ""
    if system:  # a system prompt beside the turns (LLaMA-Factory, FastChat): the first turn
        if turns[0].role == "system":
            raise _LineError("has both a 'system' key and a system turn: give one")
        turns = (Message("system", system), *turns)
    return turns


def _turns(obj: dict[str, Any], key: str, fields: tuple[str, str], roles: dict[str, str],
           other: str) -> tuple[Message, ...]:
    """The turns of a ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) list; ``roles``
    maps the record's role names to ours."""
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise _LineError(f"{key!r} must be a non-empty list, got {json.dumps(turns)[:40]}")
    who, what = fields
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]: "
        if not isinstance(turn, dict):
            raise _LineError(f"{where}expected an object with {who!r} and {what!r}, got {type(turn).__name__}")
        for field in fields:
            if field not in turn:
                hint = ""
                if key == "conversations" and {"role", "content"} <= turn.keys():
                    hint = ": ShareGPT 'conversations' turns are {from, value}; {role, content} turns go in 'messages'"
                elif key == "messages" and {"from", "value"} <= turn.keys():
                    hint = ": 'messages' turns are {role, content}; ShareGPT {from, value} turns go in 'conversations'"
                raise _LineError(f"{where}missing key {field!r} (keys: {sorted(turn)}){hint}")
        role = _string(turn, who, where)
        if role not in roles:
            raise _LineError(f"{where}unknown {who} {role!r} (expected one of {', '.join(roles)})")
        messages.append(Message(cast(Role, roles[role]), _string(turn, what, where),
                                train=_weight(turn, roles[role], where)))
    if not any(m.role == "assistant" for m in messages):
        names = "/".join(name for name, role in roles.items() if role == "assistant")
        raise _LineError(f"{key!r} has no {names!r} turn: nothing to train on")
    return tuple(messages)


def _weight(turn: dict[str, Any], role: str, where: str) -> bool:
    """A turn's ``weight`` (OpenAI's chat fine-tuning files, Axolotl): 1 (the default) trains on an assistant
    turn, 0 keeps it as context only; no other value, and only on assistant turns."""
    if "weight" not in turn:
        return True
    weight = turn["weight"]
    if role != "assistant":
        raise _LineError(f"{where}'weight' is read on assistant turns only (this one is the {role}'s)")
    if type(weight) is not int or weight not in (0, 1):
        raise _LineError(f"{where}'weight' must be 0 (context only) or 1 (trained on), got {json.dumps(weight)}")
    return weight == 1


@dataclass
class SFTFile:
    """What :func:`read_sft_examples` read: the examples, the skipped bad records' lines, the container (JSON
    lines or one JSON array) and how many records of each shape it holds (a file may mix shapes)."""

    examples: list[SFTExample]
    bad: list[int]
    container: str
    shapes: dict[str, int]

    def describe(self) -> str:
        """The file's format in words: ``alpaca records in a JSON array``, ``JSON lines of messages (3) and
        prompt/completion (2) records``."""
        if len(self.shapes) == 1:
            return f"{next(iter(self.shapes))} records, {self.container}"
        mixed = " and ".join(f"{shape} ({n})" for shape, n in self.shapes.items())
        return f"{mixed} records, {self.container}"


def read_sft_examples(path: Path, *, skip_bad: bool = False, field: str = "finetune.sft_path") -> SFTFile:
    """Parse an SFT file: JSON lines (one record per line; blank lines are skipped) or, when its first character
    is ``[``, one JSON array of records, read as a stream (``lmpipe.data.jsonl.json_array_records``).

    The container is told by the content, not the name (a ``.json`` file of JSON lines
    is read as JSON lines, as ``datasets`` does), except that a ``.jsonl`` file holding
    an array is an error that says what to do. Each record's shape is told
    by its keys (``_SHAPE_KEYS``), so a file may mix shapes; ``SFTFile.shapes`` counts them. A bad record
    (not UTF-8, not JSON, no known shape, a field missing or of the wrong type, an
    unknown role, no assistant turn) raises SFTFormatError naming the field, the file,
    the 1-based line (and in an array, the record's number); with ``skip_bad`` it is
    skipped and its line returned instead. An array whose text is not valid JSON is an
    error even with ``skip_bad``: the records after the error cannot be found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: SFT file {str(path)!r} does not exist")
    is_array = starts_with_array(path)
    if is_array and path.suffix.lower() == ".jsonl":
        raise SFTFormatError(f"{field}: {path}:1: holds a JSON array, but a .jsonl file is read as JSON lines (one "
                             "record per line): rename it to .json to read it as one array of records, or write "
                             "one record per line")
    expected = f"a JSON object of one of the formats {_FORMATS_HELP}"
    records: Iterator[tuple[int, int | None, dict[str, Any] | str]] = (
        json_array_records(path, expected) if is_array else
        ((line, None, r) for line, r in jsonl_records(path, expected, array_hint=(
            "holds a JSON array, not a record: JSON lines hold one record (a JSON object) per line; a file that "
            "is one JSON array of records is read as such when its first character is '['"))))
    read = SFTFile([], [], "JSON array" if is_array else "JSON lines", {})
    first_error = ""
    try:
        for line, number, record in records:
            at = f"{path}:{line}" + (f" (record {number})" if number else "")
            try:
                if isinstance(record, str):
                    raise _LineError(record)
                read.examples.append(SFTExample(parse_example(record), line, number))
                shape = record_shape(record)
                read.shapes[shape] = read.shapes.get(shape, 0) + 1
            except _LineError as err:
                message = f"{field}: {at}: {err}" + (f": {err.remedy}" if err.remedy else "")
                if not skip_bad:
                    skip = f", or set {SKIP_BAD_OPTION}: true to skip and count such records" if err.remedy else ""
                    raise SFTFormatError(message + skip) from None
                read.bad.append(line)
                first_error = first_error or message
    except JSONArrayError as err:
        raise SFTFormatError(f"{field}: {path}:{err.line}: {err.problem}") from None
    if not read.examples:
        detail = f"; {len(read.bad)} bad record(s) skipped, the first: {first_error}" if read.bad else ""
        raise SFTFormatError(f"{field}: SFT file {str(path)!r} holds no examples{detail}")
    return read


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
            learn = int(m.role == "assistant" and m.train)
            tokens += [ids.roles[m.role], *body, ids.end]
            mask += [0] + [learn] * (len(body) + 1)
        tokens.append(ids.eot)
        mask.append(int(conv[-1].role == "assistant" and conv[-1].train))
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


# Which examples are held out beyond every VAL_EVERY-th when that is too few to decide on: by their place in each
# group of ten (spread over the file), then in file order.
_HELD_OUT_ORDER = (9, 4, 6, 1, 8, 3, 7, 2, 5, 0)


def held_out_split(targets: Sequence[int], *, min_examples: int = 1,
                   min_tokens: int = 1) -> tuple[list[int], list[int]]:
    """(train, val) indices of examples with ``targets[i]`` trained tokens each: every VAL_EVERY-th example
    (``split_indices``), or more when those are fewer than ``min_examples`` examples or ``min_tokens`` targets.

    The champion gate refuses to decide on fewer (``tracking.min_held_out_examples`` and
    ``min_held_out_tokens``), so the split holds out enough whenever the file has enough
    examples: more examples are added in a fixed order (``_HELD_OUT_ORDER``), until both
    minimums are met, as long as at least as many are trained on as are held out. When
    even half of the examples are not enough, the split stays every VAL_EVERY-th (more
    held out would cost training data without letting the gate decide). Deterministic:
    the same examples give the same split.
    """
    train, val = split_indices(len(targets))
    chosen, tokens = list(val), sum(targets[i] for i in val)
    if len(chosen) >= min_examples and tokens >= min_tokens:
        return train, val
    held = set(val)
    rank = {residue: k for k, residue in enumerate(_HELD_OUT_ORDER)}
    for i in sorted((i for i in range(len(targets)) if i not in held), key=lambda i: (rank[i % VAL_EVERY], i)):
        if len(chosen) >= len(targets) // 2 or (len(chosen) >= min_examples and tokens >= min_tokens):
            break
        chosen.append(i)
        tokens += targets[i]
    if len(chosen) < min_examples or tokens < min_tokens:
        return train, val
    held = set(chosen)
    return [i for i in range(len(targets)) if i not in held], sorted(held)


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
    min_held_out: tuple[int, int] = (1, 1),
) -> SFTData:
    """Read, encode, check the length of, split and lay out an SFT file.

    An example longer than ``block_size`` tokens raises SFTFormatError naming its
    line, unless ``skip_long`` (then it is counted in SFTData.skipped_long).
    ``min_held_out``: the (examples, trained tokens) the champion gate decides on at
    least (``held_out_split``), chosen among the examples that fit the context.
    """
    ids = chat_token_ids(tok, eot_id)
    read = read_sft_examples(path, skip_bad=skip_bad, field=field)
    encoded = encode_chat([e.messages for e in read.examples], tok, ids)
    kept: list[tuple[list[int], list[int]]] = []
    long_lines: list[int] = []
    for example, (tokens, mask) in zip(read.examples, encoded):
        if len(tokens) <= block_size:
            kept.append((tokens, mask))
            continue
        if not skip_long:
            raise SFTFormatError(
                f"{field}: {example.where(path)}: the example is {len(tokens)} tokens, longer than "
                f"model.block_size={block_size}: shorten it, raise model.block_size, or set "
                "finetune.sft_skip_long=true to skip such examples"
            )
        long_lines.append(example.line)
    targets = [sum(mask) for _, mask in kept]
    try:
        train_idx, val_idx = held_out_split(targets, min_examples=min_held_out[0], min_tokens=min_held_out[1])
    except ValueError as err:
        skipped = f" ({len(long_lines)} longer than model.block_size={block_size} skipped)" if long_lines else ""
        raise SFTFormatError(f"{field}: {path}: {err}{skipped}") from None
    val_targets = sum(targets[i] for i in val_idx)
    log.info("%s: %s read as %s: %d examples, %d held out (%d trained tokens)", field, path, read.describe(),
             len(kept), len(val_idx), val_targets)
    if len(val_idx) < min_held_out[0] or val_targets < min_held_out[1]:
        log.warning("%s: %s: %d held-out examples (%d trained tokens), fewer than the champion gate decides on "
                    "(%d examples, %d tokens: tracking.min_held_out_examples, min_held_out_tokens): %d usable "
                    "examples are too few to hold out that many and train on as many, so the gate will not decide "
                    "on the held-out SFT figures", field, path, len(val_idx), val_targets, *min_held_out, len(kept))
    train_tokens, train_mask = layout_stream([kept[i] for i in train_idx], layout, block_size, eot_id)
    val_tokens, val_mask = layout_stream([kept[i] for i in val_idx], layout, block_size, eot_id)
    fill = sum(len(kept[i][0]) for i in train_idx) / (len(train_tokens) - 1)  # the stream is n * block_size + 1
    return SFTData(train_tokens, train_mask, val_tokens, val_mask, len(train_idx), len(val_idx), layout,
                   len(read.bad), read.bad[:MAX_REPORTED], len(long_lines), long_lines[:MAX_REPORTED],
                   round(fill, 4), read.describe(), read.shapes)


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
