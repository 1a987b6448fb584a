"""SFT data: the JSONL formats with line-numbered errors, the chat template and its loss mask, the padded and
packed layouts, and fine-tuning on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from lmpipe.artifacts import StageResult
from lmpipe.config.base import CHAT_TOKENS, EOT
from lmpipe.config.training import ModelConfig, SFTFinetuneConfig, TrainConfig
from lmpipe.data.sft import (
    END_TOKEN,
    MAX_REPORTED,
    ROLE_TOKENS,
    Message,
    SFTExample,
    SFTFormatError,
    build_sft_data,
    chat_token_ids,
    encode_chat,
    encode_chat_prompt,
    layout_stream,
    pack_examples,
    read_sft_examples,
    render_chat,
    split_indices,
)
from lmpipe.data.shards import ArraySource
from lmpipe.data.tokenizer import tokenizer_fingerprint
from lmpipe.eval.samples import generate_samples
from lmpipe.model.checkpoint import is_chat_model, load_model, read_state
from lmpipe.model.gpt import GPT, IGNORE_INDEX, GPTConfig
from lmpipe.stages.finetune import run_finetune
from lmpipe.training.data import TrainData
from lmpipe.training.loader import WindowOrder
from lmpipe.training.loop import train
from lmpipe.training.validation import get_batch
from tests.conftest import NANOGPT, REPO

DATA = REPO / "data"
LINES = [ln for ln in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if ln.strip()][:400]
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
# The default tokenizer.special_tokens, [EOT, *CHAT_TOKENS], take ids 0..4 in this order.
EOT_ID, SYS, USR, ASST, END = 0, 1, 2, 3, 4


def enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def read_pairs(path: Path, **kw: bool) -> tuple[list[SFTExample], list[int]]:
    """(examples, bad lines) of ``read_sft_examples``."""
    read = read_sft_examples(path, **kw)
    return read.examples, read.bad


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dialogue(n: int) -> list[str]:
    """n short examples: the start of a line of the play as prompt, of the next line as response."""
    return [json.dumps({"prompt": LINES[i][:20], "response": LINES[i + 1][:20]}) for i in range(n)]


# ---------------------------------------------------------------- formats

SYSTEM_CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote it?"},
                            {"role": "assistant", "content": "Shakespeare."}]}


@pytest.mark.parametrize(
    ("obj", "messages"),
    [
        ({"prompt": "Who?", "completion": " Romeo."}, [("user", "Who?"), ("assistant", " Romeo.")]),
        ({"prompt": "Who?", "response": " Romeo.", "id": 7}, [("user", "Who?"), ("assistant", " Romeo.")]),
        ({"instruction": "Name him.", "input": "Verona", "output": "Romeo"},
         [("user", "Name him.\n\nVerona"), ("assistant", "Romeo")]),
        ({"instruction": "Name him.", "input": "", "output": "Romeo"}, [("user", "Name him."), ("assistant", "Romeo")]),
        ({"instruction": "Name him.", "output": "Romeo"}, [("user", "Name him."), ("assistant", "Romeo")]),
        (SYSTEM_CHAT, [("system", "Be brief."), ("user", "Who wrote it?"), ("assistant", "Shakespeare.")]),
    ],
    ids=["prompt-completion", "prompt-response", "alpaca", "alpaca-empty-input", "alpaca-no-input", "messages"],
)
def test_each_format_renders_to_the_exact_ids_and_mask(
    tmp_path: Path, tok: Tokenizer, obj: dict, messages: list[tuple[str, str]]
) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [json.dumps(obj)])
    [example], bad = read_pairs(f)
    assert example == SFTExample(tuple(Message(r, c) for r, c in messages), 1) and bad == []  # type: ignore[arg-type]

    [(tokens, mask)] = encode_chat([example.messages], tok, chat_token_ids(tok, EOT_ID))
    role_id = {"system": SYS, "user": USR, "assistant": ASST}
    expected_tokens: list[int] = []
    expected_mask: list[int] = []
    for role, content in messages:
        learn = int(role == "assistant")
        expected_tokens += [role_id[role], *enc(tok, content), END]
        expected_mask += [0] + [learn] * (len(enc(tok, content)) + 1)
    assert tokens == [*expected_tokens, EOT_ID] and mask == [*expected_mask, 1]
    assert tok.decode(tokens, skip_special_tokens=False) == render_chat(example.messages)


def test_chat_tokens_are_single_reserved_tokens(tok: Tokenizer) -> None:
    assert [*ROLE_TOKENS.values(), END_TOKEN] == CHAT_TOKENS
    assert [tok.token_to_id(t) for t in [EOT, *CHAT_TOKENS]] == [EOT_ID, SYS, USR, ASST, END]
    assert [enc(tok, t) for t in CHAT_TOKENS] == [[SYS], [USR], [ASST], [END]]
    ids = chat_token_ids(tok, EOT_ID)
    assert (ids.roles, ids.end, ids.eot) == ({"system": SYS, "user": USR, "assistant": ASST}, END, EOT_ID)


def test_tokenizer_without_a_chat_token_is_an_error_naming_it() -> None:
    bare = Tokenizer(models.BPE())
    bare.add_special_tokens([EOT, "<|system|>", "<|user|>", "<|end|>"])
    with pytest.raises(ValueError, match=r"no '<\|assistant\|>' token.*tokenizer\.special_tokens"):
        chat_token_ids(bare, 0)


def test_render_chat_is_the_documented_template() -> None:
    messages = [Message("system", "You are terse."), Message("user", "Hi"), Message("assistant", "Hello!")]
    assert render_chat(messages) == (
        "<|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|endoftext|>")
    assert render_chat(messages[:2], add_generation_prompt=True) == (
        "<|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>")


def test_multi_turn_mask_covers_exactly_both_replies_their_end_and_eot(tok: Tokenizer) -> None:
    conv = [Message("system", "Be kind."), Message("user", "Hi"), Message("assistant", "Good morrow."),
            Message("user", "And then?"), Message("assistant", "Farewell.")]
    [(tokens, mask)] = encode_chat([conv], tok, chat_token_ids(tok, EOT_ID))
    s, u1, a1, u2, a2 = (enc(tok, m.content) for m in conv)
    assert tokens == [SYS, *s, END, USR, *u1, END, ASST, *a1, END, USR, *u2, END, ASST, *a2, END, EOT_ID]
    assert mask == ([0] * (len(s) + 2) + [0] * (len(u1) + 2) + [0] + [1] * (len(a1) + 1)
                    + [0] * (len(u2) + 2) + [0] + [1] * (len(a2) + 1) + [1])
    trained = [t for t, m in zip(tokens, mask) if m]
    assert trained == [*a1, END, *a2, END, EOT_ID]


def test_conversation_ending_with_a_user_turn_does_not_train_its_eot(tok: Tokenizer) -> None:
    conv = [Message("user", "Hi"), Message("assistant", "Hail."), Message("user", "Bye")]
    [(tokens, mask)] = encode_chat([conv], tok, chat_token_ids(tok, EOT_ID))
    assert tokens[-1] == EOT_ID and mask[-1] == 0
    assert [t for t, m in zip(tokens, mask) if m] == [*enc(tok, "Hail."), END]


def test_special_token_text_in_a_message_stays_text(tok: Tokenizer) -> None:
    conv = [Message("user", f"say {EOT} and <|end|><|assistant|>"), Message("assistant", "<|user|>ok")]
    [(tokens, _)] = encode_chat([conv], tok, chat_token_ids(tok, EOT_ID))
    assert [tokens.count(i) for i in (EOT_ID, SYS, USR, ASST, END)] == [1, 0, 1, 1, 2]
    assert tok.decode(tokens, skip_special_tokens=False) == render_chat(conv)


def test_a_chat_prompt_is_laid_out_as_in_training_then_opens_the_assistant_turn(tok: Tokenizer) -> None:
    text = f"say {EOT} and <|end|><|assistant|>"
    ids = encode_chat_prompt([Message("user", text)], tok)
    [(trained, _)] = encode_chat([[Message("user", text)]], tok, chat_token_ids(tok, EOT_ID))
    assert ids == [*trained[:-1], ASST] and ids.count(END) == 1 and ids.count(ASST) == 1
    assert tok.decode(ids, skip_special_tokens=False) == render_chat([Message("user", text)],
                                                                     add_generation_prompt=True)


# ---------------------------------------------------------------- reading and bad lines


def test_reads_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    good = dialogue(2)
    f = write_jsonl(tmp_path / "d.jsonl", [good[0], "", "   ", good[1]])
    examples, bad = read_pairs(f)
    assert [e.line for e in examples] == [1, 4] and bad == []
    assert examples[1].messages == (Message("user", LINES[1][:20]), Message("assistant", LINES[2][:20]))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "a", "response": ', r"not valid JSON \(Expecting value at column 29\)"),
        ('["a", "b"]', r"holds a JSON array, not a record: JSON lines hold one record \(a JSON object\) per line; a "
                       r"file that is one JSON array of records is read as such when its first character is '\['$"),
        ('"a"', r"expected a JSON object of one of the formats .*, got str$"),
        ('{"question": "a", "answer": "b"}', r"matches none of the formats .* \(keys: \['answer', 'question'\]\): rename "
                                            r"the record's keys to those of one of these formats, or set "
                                            r"finetune\.sft_skip_bad: true to skip and count such records$"),
        ('{"prompt": "a", "output": "b"}', r"mixes the keys of the formats \['prompt/completion', 'alpaca'\]"),
        ('{"prompt": "a"}', r"missing key 'completion' or 'response' \(keys: \['prompt'\]\)"),
        ('{"response": "b"}', r"missing key 'prompt' \(keys: \['response'\]\)"),
        ('{"prompt": "a", "completion": "b", "response": "c"}', r"has both 'completion' and 'response'"),
        ('{"prompt": "a", "completion": 7}', r"'completion' must be a string, got int"),
        ('{"instruction": "a", "input": "b"}',
         r"missing key 'output' or 'response' \(keys: \['input', 'instruction'\]\)"),
        ('{"instruction": "a", "output": "b", "response": "c"}', r"has both 'output' and 'response': give one$"),
        ('{"instruction": "a", "input": "b", "context": "c", "output": "d"}', r"has both 'input' and 'context': give one$"),
        ('{"input": "b", "output": "c"}', r"missing key 'instruction' \(keys: \['input', 'output'\]\)$"),
        ('{"conversations": [{"from": "human", "value": "a"}], "messages": []}',
         r"mixes the keys of the formats \['messages', 'sharegpt'\]"),
        ('{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}',
         r"conversations\[1\]: unknown from 'bot' \(expected one of system, human, user, gpt, assistant, chatgpt, "
         r"bard, bing, model\)$"),
        ('{"conversations": [{"from": "system", "value": "a"}, {"from": "human", "value": "b"}]}',
         r"'conversations' has no 'gpt/assistant/chatgpt/bard/bing/model' turn: nothing to train on$"),
        ('{"conversations": [{"role": "user", "content": "a"}]}',
         r"conversations\[0\]: missing key 'from' \(keys: \['content', 'role'\]\): ShareGPT 'conversations' turns "
         r"are \{from, value\}; \{role, content\} turns go in 'messages'$"),
        ('{"messages": [{"from": "human", "value": "a"}]}',
         r"messages\[0\]: missing key 'role' \(keys: \['from', 'value'\]\): 'messages' turns are \{role, content\}; "
         r"ShareGPT \{from, value\} turns go in 'conversations'$"),
        ('{"conversations": [{"from": "gpt", "value": 3}]}', r"conversations\[0\]: 'value' must be a string, got int$"),
        ('{"system": "Be brief.", "messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}',
         r"has both a 'system' key and a system turn: give one$"),
        ('{"system": 1, "prompt": "a", "completion": "b"}', r"'system' must be a string, got int$"),
        ('{"instruction": "a", "input": null, "output": "b"}', r"'input' must be a string, got NoneType"),
        ('{"messages": {"role": "user"}}', r"'messages' must be a non-empty list"),
        ('{"messages": []}', r"'messages' must be a non-empty list, got \[\]"),
        ('{"messages": ["hi"]}', r"messages\[0\]: expected an object with 'role' and 'content', got str"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]: missing key 'content' \(keys: \['role'\]\)"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
         r"messages\[1\]: unknown role 'bot' \(expected one of system, user, assistant\)"),
        ('{"messages": [{"role": "assistant", "content": 1}]}', r"messages\[0\]: 'content' must be a string, got int"),
        ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
         r"'messages' has no 'assistant' turn: nothing to train on"),
        ('{"prompt": "a", "completion": ""}', r"the assistant's reply is empty: nothing to train on but the closing"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
         r"the assistant's reply is empty"),
        # valid JSON, but not text: no tokenizer takes it
        ('{"prompt": "a", "completion": "\\ud83d"}', r"a string holds a lone surrogate escape \(\\ud83d\), not text"),
    ],
)
def test_bad_line_names_file_and_line_number(tmp_path: Path, bad_line: str, message: str) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [*dialogue(2), bad_line, *dialogue(3)])
    with pytest.raises(SFTFormatError, match=rf"^finetune\.sft_path: {tmp_path}/d\.jsonl:3: {message}"):
        read_pairs(f)


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "\n".join(dialogue(3)).encode())
    examples, bad = read_pairs(f)
    assert [e.line for e in examples] == [1, 2, 3] and bad == []


def test_undecodable_line_names_its_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes("\n".join(dialogue(2)).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(SFTFormatError, match=r"d\.jsonl:3: not valid UTF-8 \(byte 12\)"):
        read_pairs(f)


def test_skip_bad_counts_and_skips_bad_lines(tmp_path: Path, tok: Tokenizer) -> None:
    good = dialogue(12)
    lines = [good[0], "{oops", good[1], '{"messages": [{"role": "bot", "content": "b"}]}', *good[2:6],
             '{"prompt": "a"}', "[]", '{"instruction": "a"}', *good[6:], '{"messages": []}', "nope"]
    f = write_jsonl(tmp_path / "d.jsonl", lines)
    examples, bad = read_pairs(f, skip_bad=True)
    assert len(examples) == 12 and bad == [2, 4, 9, 10, 11, 18, 19]
    data = build_sft_data(f, tok, EOT_ID, 32, skip_bad=True)
    assert (data.skipped_bad, data.skipped_bad_lines) == (7, [2, 4, 9, 10, 11][:MAX_REPORTED])
    assert (data.train_examples, data.val_examples, data.skipped_long) == (11, 1, 0)
    with pytest.raises(SFTFormatError, match=r"d\.jsonl:2: not valid JSON"):
        build_sft_data(f, tok, EOT_ID, 32)

    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "[]"])
    with pytest.raises(SFTFormatError, match=r"holds no examples; 2 bad record\(s\) skipped, the first: .*bad\.jsonl:1"):
        read_pairs(all_bad, skip_bad=True)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"finetune\.sft_path: SFT file .*nope\.jsonl' does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(SFTFormatError, match=r"empty\.jsonl' holds no examples$"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_val_split_every_tenth_example_at_least_one() -> None:
    train_idx, val_idx = split_indices(25)
    assert val_idx == [9, 19] and len(train_idx) == 23 and not set(train_idx) & set(val_idx)
    assert split_indices(3) == ([0, 1], [2])
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_indices(1)


# ---------------------------------------------------------------- layouts


def varied_examples(n: int) -> list[str]:
    """n examples of every format and of different lengths."""
    out = []
    for i in range(n):
        a, b = LINES[i][: 5 + i % 17], LINES[i + 1][: 3 + i % 11]
        out.append([json.dumps({"prompt": a, "completion": b}),
                    json.dumps({"instruction": a, "input": "" if i % 2 else "x", "output": b}),
                    json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}),
                    json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": b}, {"role": "assistant", "content": a}]}),
                    ][i % 4])
    return out


def test_padded_layout_every_training_window_is_exactly_one_example(tmp_path: Path, tok: Tokenizer) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", varied_examples(45))
    examples, _ = read_pairs(f)
    encoded = encode_chat([e.messages for e in examples], tok, chat_token_ids(tok, EOT_ID))
    T = max(len(t) for t, _ in encoded)  # the longest example fills its window without padding
    data = build_sft_data(f, tok, EOT_ID, T)
    train_idx, val_idx = split_indices(len(examples))
    n = len(train_idx)
    assert (data.train_examples, data.val_examples, data.layout) == (n, len(val_idx), "padded")
    assert len(data.train_tokens) == n * T + 1 and len(data.val_tokens) == len(val_idx) * T + 1
    assert len({len(t) for t, _ in encoded}) > 5 and T in {len(encoded[i][0]) for i in train_idx}

    for seed in (0, 1337):
        order = WindowOrder(len(data.train_tokens), T, seed)
        assert (order.slack, order.num_windows) == (0, n)
        for epoch in range(3):
            starts = order.epoch_starts(epoch)
            assert sorted(starts.tolist()) == [i * T for i in range(n)]  # every window starts on an example
            for s in starts.tolist():
                tokens, mask = encoded[train_idx[s // T]]
                pad = T - len(tokens)
                assert data.train_tokens[s : s + T].tolist() == tokens + [EOT_ID] * pad
                assert data.train_mask[s : s + T].tolist() == mask + [0] * pad
                assert data.train_mask[s + T] == 0  # the window's extra token (the next example's first)
    # Through the batches training takes: only targets inside the window's own example count.
    x, y = get_batch(ArraySource(data.train_tokens), order.epoch_starts(0), T, torch.device("cpu"),
                     ArraySource(data.train_mask))
    for row, s in enumerate(order.epoch_starts(0).tolist()):
        tokens, mask = encoded[train_idx[s // T]]
        learned = [t for t, m in zip(tokens[1:], mask[1:]) if m]
        assert y[row][y[row] != IGNORE_INDEX].tolist() == learned and y[row, -1] == IGNORE_INDEX


def test_pack_examples_is_best_fit_longest_first() -> None:
    assert pack_examples([5, 3, 3, 2, 7, 1], 8) == [[4, 5], [0, 1], [2, 3]]
    assert pack_examples([8, 8], 8) == [[0], [1]] and pack_examples([], 8) == []
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than block_size=8"):
        pack_examples([2, 9], 8)


def test_packed_layout_puts_whole_examples_in_each_window(tmp_path: Path, tok: Tokenizer) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", varied_examples(23))
    examples, _ = read_pairs(f)
    encoded = encode_chat([e.messages for e in examples], tok, chat_token_ids(tok, EOT_ID))
    data = build_sft_data(f, tok, EOT_ID, 64, layout="packed")
    padded = build_sft_data(f, tok, EOT_ID, 64, layout="padded")
    train_idx, _ = split_indices(23)
    bins = pack_examples([len(encoded[i][0]) for i in train_idx], 64)
    assert len(data.train_tokens) == len(bins) * 64 + 1 < len(padded.train_tokens)  # fewer windows than padded
    seen = []
    for k, b in enumerate(bins):  # window k is bin k: its examples back to back, then masked pads
        tokens = [t for i in b for t in encoded[train_idx[i]][0]]
        mask = [m for i in b for m in encoded[train_idx[i]][1]]
        assert data.train_tokens[k * 64 : k * 64 + len(tokens)].tolist() == tokens
        assert data.train_mask[k * 64 : (k + 1) * 64].tolist() == mask + [0] * (64 - len(mask))
        assert (data.train_tokens[k * 64 + len(tokens) : (k + 1) * 64] == EOT_ID).all()
        seen += [train_idx[i] for i in b]
    assert sorted(seen) == train_idx  # every training example once, none cut
    n_tokens = sum(len(encoded[i][0]) for i in train_idx)
    packed_fill, padded_fill = round(n_tokens / (len(bins) * 64), 4), round(n_tokens / (len(train_idx) * 64), 4)
    assert data.fill == packed_fill > padded.fill == padded_fill
    assert data.train_tokens.dtype == data.train_mask.dtype == np.int64
    assert data.meta()["sft_layout"] == "packed" and data.meta()["sft_fill"] == data.fill


def test_packed_window_sees_each_example_as_alone(tmp_path: Path, tok: Tokenizer) -> None:
    # Example 0 has the end-of-text text in its prompt: it stays text, so every example still ends with
    # exactly one end-of-text id and the examples can be told apart by the tokens alone.
    lines = [json.dumps({"prompt": f"Say {EOT} twice", "completion": "No."}), *varied_examples(19)]
    data = build_sft_data(write_jsonl(tmp_path / "d.jsonl", lines), tok, EOT_ID, 32, layout="packed")
    order = WindowOrder(len(data.train_tokens), 32, seed=0)
    offsets = order.epoch_starts(0)  # the windows training visits: every bin, whole
    x, y = get_batch(ArraySource(data.train_tokens), offsets, 32, torch.device("cpu"), ArraySource(data.train_mask))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_config(MODEL, tok.get_vocab_size())).eval()
    packed, _ = model(x, x, doc_sep=EOT_ID)  # (windows, 32, V)
    whole, trained = 0, 0
    for row, o in enumerate(offsets.tolist()):
        window, mask = data.train_tokens[o : o + 32], data.train_mask[o : o + 33]
        start = 0
        for end in np.flatnonzero(window == EOT_ID).tolist():
            example = torch.from_numpy(window[start : end + 1].copy())[None]
            if mask[start + 1 : end + 1].any():  # an example, not a pad
                alone, _ = model(example, example)  # on its own, from position 0, plain causal attention
                torch.testing.assert_close(packed[row, start : end + 1], alone[0], atol=1e-5, rtol=0)
                whole += 1
            start = end + 1
        trained += int((y[row] != IGNORE_INDEX).sum())
    assert whole == data.train_examples == 18
    assert trained == int(data.train_mask.sum())  # every supervised target of the epoch is trained


def test_layout_stream_pads_to_block_size() -> None:
    tokens, mask = layout_stream([([7, 8, 9], [0, 1, 1]), ([5, 6], [0, 1])], "padded", 4, 0)
    assert tokens.tolist() == [7, 8, 9, 0, 5, 6, 0, 0, 0] and mask.tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="example 1 has 3 tokens, more than block_size=2"):
        layout_stream([([7, 8], [0, 1]), ([7, 8, 9], [0, 1, 1])], "padded", 2, 0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_too_long_example_names_its_line_or_is_skipped(tmp_path: Path, tok: Tokenizer, layout: str) -> None:
    long_line = json.dumps({"prompt": LINES[0], "completion": LINES[1] + LINES[2]})
    lines = dialogue(12)
    for i in (2, 4, 5, 6, 8, 9, 11):
        lines[i] = long_line
    f = write_jsonl(tmp_path / "d.jsonl", lines)
    [(tokens, _)] = encode_chat([(Message("user", LINES[0]), Message("assistant", LINES[1] + LINES[2]))], tok,
                                chat_token_ids(tok, EOT_ID))
    assert len(tokens) > 32
    with pytest.raises(SFTFormatError, match=rf"^finetune\.sft_path: {tmp_path}/d\.jsonl:3: the example is "
                                             rf"{len(tokens)} tokens, longer than model\.block_size=32: "
                                             r".*finetune\.sft_skip_long=true"):
        build_sft_data(f, tok, EOT_ID, 32, layout=layout)  # type: ignore[arg-type]
    data = build_sft_data(f, tok, EOT_ID, 32, layout=layout, skip_long=True)  # type: ignore[arg-type]
    assert (data.skipped_long, data.skipped_long_lines) == (7, [3, 5, 6, 7, 9])
    assert (data.train_examples, data.val_examples, data.skipped_bad) == (4, 1, 0)
    assert data.meta()["sft_skipped_long"] == 7
    with pytest.raises(SFTFormatError,
                       match=r"at least 2 examples .*, got 0 \(12 longer than model\.block_size=8 skipped\)$"):
        build_sft_data(f, tok, EOT_ID, 8, skip_long=True)


def test_training_targets_are_ignored_exactly_on_masked_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", dialogue(30))
    data = build_sft_data(f, tok, EOT_ID, 32, layout="packed")
    assert (data.train_examples, data.val_examples) == (27, 3)
    src, mask = ArraySource(data.train_tokens), ArraySource(data.train_mask)
    offsets = np.array([0, 17, 100])
    x, y = get_batch(src, offsets, 32, torch.device("cpu"), mask)
    for row, o in enumerate(offsets):
        window, m = data.train_tokens[o : o + 33], data.train_mask[o : o + 33]
        assert x[row].tolist() == window[:-1].tolist()
        assert y[row].tolist() == [t if keep else IGNORE_INDEX for t, keep in zip(window[1:], m[1:])]
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()


# ---------------------------------------------------------------- the finetune stage in sft mode


def _base_and_chats(tmp_path: Path, tokenizer: StageResult, tok: Tokenizer) -> tuple[Path, SFTFinetuneConfig]:
    """A 2-step pretrained base checkpoint and an SFT config on 60 chats whose replies are all the same."""
    fp = tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    stream = np.array(enc(tok, "\n".join(LINES)), dtype=np.int64)
    base = train(MODEL, TrainConfig(**NANOGPT, max_steps=2, batch_size=4, eval_batches=1, device="cpu"), tok.get_vocab_size(),
                 TrainData(ArraySource(stream[:-500]), ArraySource(stream[-500:])), tmp_path / "base",
                 tokenizer_fingerprint=fp)

    # Every reply is the same: with the system and user turns masked out the loss can go to ~0.
    chats = [json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": LINES[i][:16]},
                                      {"role": "assistant", "content": "Amen."}]}) for i in range(60)]
    sft = write_jsonl(tmp_path / "d.jsonl", chats)
    cfg = SFTFinetuneConfig(sft_path=str(sft), max_steps=40, batch_size=8, learning_rate=1e-2, min_lr=1e-3,
                         warmup_steps=3, eval_interval=40, eval_batches=1, log_interval=10, device="cpu")
    return base.checkpoint, cfg


def test_run_finetune_sft_messages_padded_learns_the_replies(tmp_path: Path, tokenizer: StageResult,
                                                             tok: Tokenizer) -> None:
    base_ckpt, cfg = _base_and_chats(tmp_path, tokenizer, tok)
    chats = (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()
    assert cfg.sft_layout == "padded"
    result = run_finetune(cfg, MODEL, base_ckpt, None, tokenizer, tmp_path / "ft", "fp")
    assert result.meta["sft_train_examples"] == 54 and result.meta["sft_val_examples"] == 6
    assert (result.meta["sft_layout"], result.meta["sft_skipped_bad"], result.meta["sft_skipped_long"]) == (
        "padded", 0, 0)
    assert result.metrics["steps"] == 40 and read_state(result.path("model"))["train"]["mode"] == "sft"
    rows = [json.loads(r) for r in result.path("metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Observed: 6.27 at step 1 -> 0.13 (val, replies only); counting the user turns would keep it near their entropy.
    assert rows[0]["loss"] > 4.0 and result.metrics["final_val_loss"] < 0.5
    # Prompted in its chat template, the model gives the learned reply and stops at its <|end|>.
    model = load_model(result.path("model"))
    assert is_chat_model(read_state(result.path("model")))
    samples = generate_samples(model, tok, [LINES[100][:16], "Who are you?"], max_new_tokens=12, temperature=0.0,
                               top_k=None, seed=0, device="cpu", chat=True)
    assert [s["completion"] for s in samples] == ["Amen.", "Amen."]

    bad = write_jsonl(tmp_path / "bad.jsonl", [*chats[:3], "{oops"])
    cfg_bad = cfg.model_copy(update={"sft_path": str(bad)})
    with pytest.raises(SFTFormatError, match=r"finetune\.sft_path: .*bad\.jsonl:4: not valid JSON"):
        run_finetune(cfg_bad, MODEL, base_ckpt, None, tokenizer, tmp_path / "ft-bad", "fp")

    long_chat = json.dumps({"prompt": LINES[0], "completion": LINES[1] + LINES[2]})
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*chats[:20], "{oops", long_chat, *chats[20:40]])
    cfg_skip = cfg.model_copy(update={"sft_path": str(mixed), "sft_skip_bad": True, "sft_skip_long": True,
                                      "max_steps": 1, "sft_layout": "packed"})
    skipped = run_finetune(cfg_skip, MODEL, base_ckpt, None, tokenizer, tmp_path / "ft-skip", "fp")
    assert {k: skipped.meta[k] for k in ("sft_layout", "sft_skipped_bad", "sft_skipped_bad_lines", "sft_skipped_long",
                                         "sft_skipped_long_lines", "sft_train_examples", "sft_val_examples")} == {
        "sft_layout": "packed", "sft_skipped_bad": 1, "sft_skipped_bad_lines": [21], "sft_skipped_long": 1,
        "sft_skipped_long_lines": [22], "sft_train_examples": 36, "sft_val_examples": 4}


def test_run_finetune_sft_packed_attends_within_examples_and_learns(
    tmp_path: Path, tokenizer: StageResult, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_ckpt, cfg = _base_and_chats(tmp_path, tokenizer, tok)
    calls: list[tuple[bool, int | None]] = []  # (training, doc_sep) of every forward
    forward = GPT.forward

    def spy(self: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None, **kw: object) -> object:
        calls.append((self.training, kw.get("doc_sep")))  # type: ignore[arg-type]
        return forward(self, idx, targets, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(GPT, "forward", spy)
    result = run_finetune(cfg.model_copy(update={"sft_layout": "packed"}), MODEL, base_ckpt, None, tokenizer,
                          tmp_path / "ft", "fp")
    assert result.meta["sft_layout"] == "packed" and result.metrics["steps"] == 40
    # 40 steps of one micro-batch each, then one validation batch (eval_batches=1), all with the end-of-text id.
    assert calls == [(True, EOT_ID)] * 40 + [(False, EOT_ID)]
    rows = [json.loads(r) for r in result.path("metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Observed: 6.25 at step 1 -> 0.14 (val), as the padded layout learns them.
    assert rows[0]["loss"] > 4.0 and result.metrics["final_val_loss"] < 0.5


def test_a_packed_window_starting_inside_an_example_does_not_train_on_its_rest() -> None:
    from lmpipe.training.data import CutExampleMask

    tokens = ArraySource(np.array([5, 6, 0, 7, 8, 9, 0, 3, 4, 0]))  # examples [5 6 0] [7 8 9 0] [3 4 0], sep 0
    base = ArraySource(np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1]))
    cut = CutExampleMask(tokens, base, sep=0)
    assert cut.num_tokens == 10
    assert cut.window(0, 5).tolist() == [0, 1, 1, 0, 1]  # the stream's start: whole
    assert cut.window(3, 5).tolist() == [0, 1, 1, 1, 0]  # right after a separator: whole
    assert cut.window(4, 5).tolist() == [0, 0, 0, 0, 1]  # inside [7 8 9 0]: through its separator masked
    assert cut.window(8, 2).tolist() == [0, 0]
    assert CutExampleMask(tokens, None, sep=0).window(4, 2).tolist() == [0, 0]  # no separator: all of it
    assert CutExampleMask(tokens, None, sep=0).window(3, 3).tolist() == [1, 1, 1]
    assert base.window(4, 5).tolist() == [1, 1, 1, 0, 1]  # the wrapped mask is not modified


# ---------------------------------------------------------------- real files: JSON arrays, Alpaca, Dolly, ShareGPT

FIXTURES = REPO / "tests" / "fixtures" / "sft"
VICUNA = ("A chat between a curious user and an artificial intelligence assistant whose name is Vicuna. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def trained_text(tok: Tokenizer, conv: tuple[Message, ...]) -> tuple[list[int], list[int]]:
    """(ids the loss counts, ids it does not) of a conversation as encode_chat lays it out."""
    [(tokens, mask)] = encode_chat([conv], tok, chat_token_ids(tok, EOT_ID))
    return [t for t, m in zip(tokens, mask) if m], [t for t, m in zip(tokens, mask) if not m]


def test_an_alpaca_json_array_is_read_record_by_record(tok: Tokenizer) -> None:
    read = read_sft_examples(FIXTURES / "identity30.json")
    assert (read.container, read.shapes, read.bad) == ("JSON array", {"alpaca": 30}, [])
    assert read.describe() == "alpaca records, JSON array"
    assert [(e.line, e.record) for e in read.examples] == [(2 + 5 * k, k + 1) for k in range(30)]
    assert read.examples[0].messages == (Message("user", "hi"), Message(
        "assistant", "Hello! I am NAME, an AI assistant developed by AUTHOR. How can I assist you today?"))
    assert read.examples[16].messages == (Message("user", "你好"), Message(
        "assistant", "您好，我是 NAME，一个由 AUTHOR 开发的 AI 助手，很高兴认识您。请问我能为您做些什么？"))
    learned, given = trained_text(tok, read.examples[16].messages)
    assert learned == [*enc(tok, read.examples[16].messages[1].content), END, EOT_ID]
    assert given == [USR, *enc(tok, "你好"), END, ASST]


def test_dolly_records_are_alpaca_with_context_and_response() -> None:
    read = read_sft_examples(FIXTURES / "dolly9.jsonl")
    assert (read.container, read.shapes) == ("JSON lines", {"alpaca": 9})
    lines = [json.loads(line) for line in (FIXTURES / "dolly9.jsonl").read_text(encoding="utf-8").splitlines()]
    for example, record in zip(read.examples, lines):
        user = record["instruction"] + ("\n\n" + record["context"] if record["context"] else "")
        assert example.messages == (Message("user", user), Message("assistant", record["response"]))
    assert read.examples[1].messages == (Message("user", "Which is a species of fish? Tope or Rope"),
                                         Message("assistant", "Tope"))
    assert read.examples[3].messages[0].content.startswith("Alice's parents have three daughters: Amy, Jessy, and "
                                                           "what\u2019s")
    assert [(e.line, e.record) for e in read.examples] == [(k, None) for k in range(1, 10)]


def test_sharegpt_conversations_train_on_the_gpt_turns_only(tok: Tokenizer) -> None:
    read = read_sft_examples(FIXTURES / "sharegpt12.json")
    assert (read.container, read.shapes, len(read.examples)) == ("JSON array", {"sharegpt": 12}, 12)
    first = read.examples[0]
    assert first.messages == (
        Message("system", VICUNA), Message("user", "Who are you?"),
        Message("assistant", "I am Vicuna, a language model trained by researchers from Large Model Systems "
                             "Organization (LMSYS)."),
        Message("user", "Have a nice day!"), Message("assistant", "You too!"))
    assert (first.line, first.record) == (2, 1)
    assert read.examples[6].messages[0] == Message("user", "What is your name?")  # no "system" key: no system turn
    for example in read.examples:
        learned, given = trained_text(tok, example.messages)
        replies = [m.content for m in example.messages if m.role == "assistant"]
        assert learned == [t for r in replies for t in (*enc(tok, r), END)] + [EOT_ID]
        assert tok.decode(given, skip_special_tokens=False) == "".join(
            f"{ROLE_TOKENS[m.role]}{m.content}{END_TOKEN}" if m.role != "assistant" else ROLE_TOKENS["assistant"]
            for m in example.messages)


@pytest.mark.parametrize(("speaker", "role"), [("human", "user"), ("user", "user"), ("gpt", "assistant"),
                                               ("assistant", "assistant"), ("chatgpt", "assistant"),
                                               ("bard", "assistant"), ("bing", "assistant"), ("model", "assistant"),
                                               ("system", "system")])
def test_sharegpt_speakers_map_to_the_three_roles(tmp_path: Path, speaker: str, role: str) -> None:
    record = {"conversations": [{"from": speaker, "value": "a"}, {"from": "gpt", "value": "b"}]}
    [example], _ = read_pairs(write_jsonl(tmp_path / "d.jsonl", [json.dumps(record)]))
    assert example.messages == (Message(role, "a"), Message("assistant", "b"))  # type: ignore[arg-type]


def test_an_assistant_turn_of_weight_0_is_context_not_trained_on(tmp_path: Path, tok: Tokenizer) -> None:
    # OpenAI's chat fine-tuning files mark assistant turns with "weight" 0 or 1; ShareGPT files of Axolotl too.
    turns = [("user", "Hi", None), ("assistant", "Bad reply.", 0), ("user", "Again?", None), ("assistant", "Hail.", 1)]
    records = [{"messages": [{"role": r, "content": c} | ({} if w is None else {"weight": w}) for r, c, w in turns]},
               {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c}
                                  | ({} if w is None else {"weight": w}) for r, c, w in turns]}]
    examples, _ = read_pairs(write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records]))
    expected = (Message("user", "Hi"), Message("assistant", "Bad reply.", train=False), Message("user", "Again?"),
                Message("assistant", "Hail."))
    assert [e.messages for e in examples] == [expected, expected]
    learned, given = trained_text(tok, expected)
    assert learned == [*enc(tok, "Hail."), END, EOT_ID]
    assert given == [USR, *enc(tok, "Hi"), END, ASST, *enc(tok, "Bad reply."), END, USR, *enc(tok, "Again?"), END,
                     ASST]
    # The last turn of weight 0: neither it nor the closing end-of-text is trained on.
    learned, _ = trained_text(tok, (*expected[:3], Message("assistant", "Hail.", train=False),
                                    Message("user", "x"), Message("assistant", "y")))
    assert learned == [*enc(tok, "y"), END, EOT_ID]
    learned, _ = trained_text(tok, (expected[0], Message("assistant", "a"), Message("assistant", "b", train=False)))
    assert learned == [*enc(tok, "a"), END]


@pytest.mark.parametrize(("turn", "message"), [
    ({"role": "user", "content": "a", "weight": 0}, r"messages\[0\]: 'weight' is read on assistant turns only "
                                                     r"\(this one is the user's\)"),
    ({"role": "assistant", "content": "a", "weight": 0.5}, r"messages\[0\]: 'weight' must be 0 \(context only\) "
                                                          r"or 1 \(trained on\), got 0.5"),
    ({"role": "assistant", "content": "a", "weight": True}, r"messages\[0\]: 'weight' must be 0 .* got true"),
    ({"role": "assistant", "content": "a", "weight": 0}, "every assistant turn has weight 0: nothing to train on"),
    ({"role": "assistant", "content": "context", "weight": 0},  # then an empty reply: the only one trained on
     "the assistant's reply is empty: nothing to train on but the closing tokens"),
])
def test_a_bad_or_useless_weight_is_named(tmp_path: Path, turn: dict, message: str) -> None:
    after = {"user": [{"role": "assistant", "content": "b", "weight": 0}],
             "context": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}
    record = {"messages": [turn, *after.get(turn["role"], after.get(turn["content"], []))]}
    with pytest.raises(SFTFormatError, match=rf"^finetune\.sft_path: {tmp_path}/d\.jsonl:1: {message}"):
        read_sft_examples(write_jsonl(tmp_path / "d.jsonl", [json.dumps(record)]))


def test_a_system_key_is_a_first_system_turn_in_every_shape(tmp_path: Path) -> None:
    lines = [{"system": "Be brief.", "prompt": "a", "completion": "b"},
             {"system": "Be brief.", "instruction": "a", "output": "b"},
             {"system": "Be brief.", "messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]},
             {"system": "", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    examples, _ = read_pairs(write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in lines]))
    brief = (Message("system", "Be brief."), Message("user", "a"), Message("assistant", "b"))
    assert [e.messages for e in examples] == [brief, brief, brief, brief[1:]]  # an empty system prompt: none


def test_the_container_is_told_by_the_content_and_shapes_may_mix(tmp_path: Path) -> None:
    records = [{"prompt": "a", "completion": "b"}, {"instruction": "c", "output": "d"},
               {"instruction": "e", "output": "f"}]
    as_lines = "\n".join(json.dumps(r) for r in records)
    for name, text, container in [("d.json", as_lines, "JSON lines"), ("d.txt", json.dumps(records), "JSON array"),
                                  ("d.json", json.dumps(records, indent=1), "JSON array")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        read = read_sft_examples(tmp_path / name)
        assert (read.container, read.shapes) == (container, {"prompt/completion": 1, "alpaca": 2})
        assert read.describe() == f"prompt/completion (1) and alpaca (2) records, {container}"
        assert [e.messages[1].content for e in read.examples] == ["b", "d", "f"]


def test_an_array_in_a_jsonl_file_says_what_to_do(tmp_path: Path) -> None:
    f = tmp_path / "alpaca30.jsonl"
    f.write_bytes((FIXTURES / "identity30.json").read_bytes())
    with pytest.raises(SFTFormatError) as err:
        read_sft_examples(f)
    assert str(err.value) == (
        f"finetune.sft_path: {f}:1: holds a JSON array, but a .jsonl file is read as JSON lines (one record per "
        "line): rename it to .json to read it as one array of records, or write one record per line")


FORMATS = ('{"prompt", "completion" or "response"}, Alpaca {"instruction", "input" or "context" (optional), '
           '"output" or "response"}, {"messages": [{"role", "content"}, ...]} or ShareGPT {"conversations": '
           '[{"from", "value"}, ...]}')  # the shapes an unrecognised record's error lists


def test_a_bad_record_of_an_array_names_its_line_and_number(tmp_path: Path, tok: Tokenizer) -> None:
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"question": "a",\n   "answer": "b"},\n'
                 '  {"prompt": "c", "completion": "d"}, 5\n]', encoding="utf-8")
    with pytest.raises(SFTFormatError) as err:
        read_sft_examples(f)
    assert str(err.value) == (
        f"finetune.sft_path: {f}:3 (record 2): matches none of the formats {FORMATS} (keys: ['answer', 'question']): "
        "rename the record's keys to those of one of these formats, or set finetune.sft_skip_bad: true to skip and "
        "count such records")
    read = read_sft_examples(f, skip_bad=True)
    assert [(e.line, e.record) for e in read.examples] == [(2, 1), (5, 3)] and read.bad == [3, 5]
    assert read.shapes == {"prompt/completion": 2}
    # Skipping already, the error when nothing is left keeps the remedy and does not offer the option again.
    only_bad = tmp_path / "bad.json"
    only_bad.write_text('[{"question": "a", "answer": "b"}]', encoding="utf-8")
    with pytest.raises(SFTFormatError) as err:
        read_sft_examples(only_bad, skip_bad=True)
    assert str(err.value) == (
        f"finetune.sft_path: SFT file {str(only_bad)!r} holds no examples; 1 bad record(s) skipped, the first: "
        f"finetune.sft_path: {only_bad}:1 (record 1): matches none of the formats {FORMATS} (keys: ['answer', "
        "'question']): rename the record's keys to those of one of these formats")

    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]', encoding="utf-8")
    for skip_bad in (False, True):  # the records after it cannot be found: an error either way
        with pytest.raises(SFTFormatError) as err:
            read_sft_examples(f, skip_bad=skip_bad)
        assert str(err.value) == f"finetune.sft_path: {f}:3: not valid JSON (Expecting ',' delimiter at column 18)"

    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": LINES[0], "completion": LINES[1] * 3}],
                               indent=2), encoding="utf-8")
    with pytest.raises(SFTFormatError, match=rf"^finetune\.sft_path: {long}:6 \(record 2\): the example is \d+ "
                                             r"tokens, longer than model\.block_size=32"):
        build_sft_data(long, tok, EOT_ID, 32)


def test_the_format_is_in_the_stage_meta(tmp_path: Path, tok: Tokenizer) -> None:
    data = build_sft_data(FIXTURES / "sharegpt12.json", tok, EOT_ID, 128, skip_long=True)
    assert data.meta()["sft_format"] == "sharegpt records, JSON array"
    assert data.meta()["sft_shapes"] == {"sharegpt": 12}


# ---------------------------------------------------------------- a held-out split the gate can decide on


def test_the_held_out_split_meets_the_minimums_when_the_file_has_enough() -> None:
    from lmpipe.data.sft import held_out_split

    # Every 10th is enough: the split is unchanged.
    assert held_out_split([5] * 100, min_examples=10, min_tokens=50) == split_indices(100)
    # Too few: more are held out, by their place in each group of ten, until both minimums are met.
    train, val = held_out_split([5] * 100, min_examples=14, min_tokens=1)
    assert val == sorted([9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 4, 14, 24, 34])
    assert train == [i for i in range(100) if i not in val]
    _, val = held_out_split([5] * 100, min_examples=1, min_tokens=62)  # 13 examples of 5 tokens
    assert val == sorted([9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 4, 14, 24])
    _, val = held_out_split([5] * 40, min_examples=20, min_tokens=1)  # half of the file: allowed
    assert len(val) == 20 and val[:4] == [1, 4, 6, 8]
    # Not enough even with half of the examples held out: every 10th, as without a minimum.
    assert held_out_split([5] * 39, min_examples=20) == split_indices(39)
    assert held_out_split([5] * 100, min_examples=1, min_tokens=251) == split_indices(100)


def test_held_out_examples_are_chosen_after_long_ones_are_skipped(tmp_path: Path, tok: Tokenizer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Most examples too long for the context (skipped): the held-out split is made of those that fit, and holds
    the gate's minimum of them (it used to be every 10th line that fit: one example)."""
    long_line = json.dumps({"prompt": LINES[0], "completion": LINES[1] + LINES[2]})
    lines = [long_line if i % 3 else line for i, line in enumerate(dialogue(90))]
    f = write_jsonl(tmp_path / "d.jsonl", lines)
    plain = build_sft_data(f, tok, EOT_ID, 32, skip_long=True)
    assert (plain.skipped_long, plain.train_examples, plain.val_examples) == (60, 27, 3)
    data = build_sft_data(f, tok, EOT_ID, 32, skip_long=True, min_held_out=(12, 1))
    assert (data.train_examples, data.val_examples) == (18, 12)
    assert data.val_mask.sum() >= 12 * 3  # every held-out example's reply, <|end|> and end-of-text
    again = build_sft_data(f, tok, EOT_ID, 32, skip_long=True, min_held_out=(12, 1))
    assert np.array_equal(again.val_tokens, data.val_tokens)  # deterministic
    # 30 usable examples cannot hold out 16 and train on as many: every 10th, with a warning.
    caplog.clear()
    short = build_sft_data(f, tok, EOT_ID, 32, skip_long=True, min_held_out=(16, 1))
    assert (short.train_examples, short.val_examples) == (27, 3)
    targets = int(short.val_mask.sum())
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"finetune.sft_path: {f}: 3 held-out examples ({targets} trained tokens), fewer than the champion gate decides "
        "on (16 examples, 1 tokens: tracking.min_held_out_examples, min_held_out_tokens): 30 usable examples are too "
        "few to hold out that many and train on as many, so the gate will not decide on the held-out SFT figures"]
