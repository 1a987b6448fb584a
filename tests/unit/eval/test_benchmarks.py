"""Multiple-choice benchmarks: the three readers, their errors, and log-likelihood scoring.

Scoring is checked against a plain reference: one full forward pass per
(example, choice), log_softmax over every position, the continuation's
log-probabilities summed by hand.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmpipe.config.base import EOT
from lmpipe.data.jsonl import BenchmarkFormatError
from lmpipe.data.tokenizer import eot_id, load_tokenizer
from lmpipe.eval.benchmark_files import MCExample, hellaswag_preprocess, load_benchmark
from lmpipe.eval.multiple_choice import encode_continuations, score_mc
from lmpipe.model.gpt import GPT, GPTConfig
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "mc"


# -- readers -------------------------------------------------------------------


def test_hellaswag_reader_applies_the_harness_prompt_and_preprocess() -> None:
    examples, bad = load_benchmark(FIXTURES / "hellaswag.jsonl", "hellaswag")
    assert bad.count == 0 and bad.first == []
    assert [e.context for e in examples] == [
        "Roof shingle removal: A man is sitting on a roof. He",
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
        "Home and Garden: How to grow basil indoors. Choose a sunny window.",
        "The chef cracks two eggs into a bowl. She",
        "Playing congas: A DJ stands behind a table of drums. The dj",  # str.capitalize, as the harness
        "Sharpening knives: A man holds a knife against a whetstone. He",
    ]
    assert [e.label for e in examples] == [3, 3, 0, 0, 1, 0]
    assert examples[0].choices == [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ]
    assert examples[2].choices == [
        "Basil needs six hours of light a day. Turn the pot every few days so the plant grows evenly.",
        " Water it with salt water every morning.",  # stripped before "[step]" went: its space stays
        "Plant the basil in a glass of milk.",
        "Keep the pot in a dark cupboard until it flowers.",
    ]
    assert examples[3].choices == [
        "whisks them with a fork until smooth.",
        "throws the bowl out of the window.",
        "paints the eggs blue and green.",
    ]


def test_hellaswag_preprocess_step_by_step() -> None:
    assert hellaswag_preprocess("  a [title] b [header] c  ") == "a. b c"
    # One pass of "  " -> " ": a triple space (left by a removed tag) becomes a double, as in the harness.
    assert hellaswag_preprocess("x [step]  y") == "x  y"


def test_arc_reader_maps_letter_and_digit_answer_keys() -> None:
    examples, bad = load_benchmark(FIXTURES / "arc.jsonl", "arc")
    assert bad.count == 0
    assert examples[0] == MCExample(
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        ["Planetary density will decrease.", "Planetary years will become longer.",
         "Planetary days will become shorter.", "Planetary gravity will become stronger."],
        2,
    )
    assert examples[1] == MCExample(
        "Question: Which object is the best conductor of electricity?\nAnswer:",
        ["a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"],
        3,
    )
    assert [len(e.choices) for e in examples] == [4, 4, 3, 5, 4, 4]
    assert [e.label for e in examples] == [2, 3, 1, 1, 1, 0]


def test_piqa_reader() -> None:
    examples, bad = load_benchmark(FIXTURES / "piqa.jsonl", "piqa")
    assert bad.count == 0
    assert examples[1] == MCExample(
        "Question: To keep bread fresh longer,\nAnswer:",
        ["store it in a sealed bag in a cool, dry place.", "store it in an open bowl next to the stove."],
        0,
    )
    assert [e.label for e in examples] == [0, 0, 1, 0, 1, 0]
    assert all(e.context.startswith("Question: ") and e.context.endswith("\nAnswer:") for e in examples)


def test_limit_stops_after_that_many_examples() -> None:
    examples, _ = load_benchmark(FIXTURES / "hellaswag.jsonl", "hellaswag", limit=5)
    assert [e.context.split(":")[0] for e in examples] == [
        "Roof shingle removal", "Clean and jerk", "Home and Garden", "The chef cracks two eggs into a bowl. She",
        "Playing congas",
    ]


GOOD = {
    "hellaswag": {"ctx": "A dog sees a ball. It", "endings": ["runs after it.", "reads a book."], "label": 0},
    "arc": {"question": "What is ice?", "choices": {"text": ["solid water", "gas"], "label": ["A", "B"]},
            "answerKey": "A"},
    "piqa": {"goal": "To open a door,", "sol1": "turn the handle.", "sol2": "eat the handle.", "label": 0},
}


@pytest.mark.parametrize(
    "kind, line, field, fragment",
    [
        ("hellaswag", '{"ctx": "x", "endings": ["a", "b"], "label": 0', None, "not valid JSON"),
        ("hellaswag", '{"ctx": "x", "label": 0}', "endings", "missing"),
        ("hellaswag", '{"endings": ["a", "b"], "label": 0}', "ctx", "missing"),
        ("hellaswag", '{"ctx": "x", "endings": ["a", "b"], "label": 2}', "label", "2 is out of range for 2 choices"),
        ("hellaswag", '{"ctx": "x", "endings": ["a", "b"], "label": ""}', "label", "must be an integer"),
        ("hellaswag", '{"ctx": "x", "endings": ["a", "b"], "label": "\\u00b2"}', "label", "must be an integer"),
        ("hellaswag", '{"ctx": "x", "endings": ["a", 3], "label": 0}', "endings[1]", "must be a string"),
        ("hellaswag", '{"ctx": "x", "endings": ["a", "[step]"], "label": 0}', "endings[1]", "is empty"),
        ("arc", '{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}',
         "answerKey", "'E' is not one of choices.label ['A', 'B']"),
        ("arc", '{"question": "q", "choices": {"text": ["a", "b"]}, "answerKey": "A"}', "choices.label", "missing"),
        ("arc", '{"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}',
         "choices.label", "has 1 labels for 2 choices.text"),
        ("arc", "[1, 2]", None, "expected a JSON object, got list"),
        ("piqa", '{"goal": "g", "sol1": "a", "label": 0}', "sol2", "missing"),
        ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "label", "2 is out of range"),
        ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": true}', "label", "must be an integer"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path: Path, kind: str, line: str, field: str | None,
                                           fragment: str) -> None:
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(json.dumps(GOOD[kind]) + "\n" + line + "\n" + json.dumps(GOOD[kind]) + "\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(path, kind)  # type: ignore[arg-type]
    err = info.value
    assert (err.line, err.field) == (2, field)
    assert str(err).startswith(f"{path}:2: ")
    assert fragment in str(err)
    if field is not None:
        assert f"field {field!r}" in str(err)
    # The same file with skip_bad: the two good lines, one bad counted.
    examples, bad = load_benchmark(path, kind, skip_bad=True)  # type: ignore[arg-type]
    assert len(examples) == 2
    assert bad.count == 1 and bad.first == [(2, str(err))]


@pytest.mark.parametrize(
    "name, kind, good, bad_lines, first_field",
    [
        ("hellaswag_bad.jsonl", "hellaswag", 2, [2, 3, 5, 7], None),
        ("arc_bad.jsonl", "arc", 2, [2, 3, 4, 5], "answerKey"),
        ("piqa_bad.jsonl", "piqa", 2, [2, 3, 4], "sol2"),
    ],
)
def test_skip_bad_counts_and_skips_bad_lines(name: str, kind: str, good: int, bad_lines: list[int],
                                             first_field: str | None) -> None:
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(FIXTURES / name, kind)  # type: ignore[arg-type]
    assert (info.value.line, info.value.field) == (bad_lines[0], first_field)
    examples, bad = load_benchmark(FIXTURES / name, kind, skip_bad=True)  # type: ignore[arg-type]
    assert len(examples) == good
    assert bad.count == len(bad_lines)
    assert [line for line, _ in bad.first] == bad_lines
    assert all(msg.startswith(f"{FIXTURES / name}:{line}: ") for line, msg in bad.first)


def test_bad_report_keeps_the_first_five_and_counts_all(tmp_path: Path) -> None:
    path = tmp_path / "piqa.jsonl"
    lines = ["not json"] * 7 + [json.dumps(GOOD["piqa"])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, bad = load_benchmark(path, "piqa", skip_bad=True)
    assert len(examples) == 1
    assert bad.count == 7
    assert [line for line, _ in bad.first] == [1, 2, 3, 4, 5]


def test_undecodable_line_is_one_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "piqa.jsonl"
    path.write_bytes(json.dumps(GOOD["piqa"]).encode() + b"\n\xff\xfe\n" + json.dumps(GOOD["piqa"]).encode() + b"\n")
    with pytest.raises(BenchmarkFormatError, match=r":2: not valid UTF-8"):
        load_benchmark(path, "piqa")
    examples, bad = load_benchmark(path, "piqa", skip_bad=True)
    assert (len(examples), bad.count) == (2, 1)


def test_file_without_examples_and_bad_arguments(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=f"^{re.escape(str(empty))}: holds no arc examples$"):
        load_benchmark(empty, "arc")
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text("{\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=r"holds no piqa examples; 1 bad line\(s\) skipped"):
        load_benchmark(all_bad, "piqa", skip_bad=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(tmp_path / "missing.jsonl", "piqa")
    with pytest.raises(ValueError, match="kind 'mmlu' is unknown"):
        load_benchmark(empty, "mmlu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_benchmark(empty, "arc", limit=0)


# -- tokenization of (context, continuation) -----------------------------------


@pytest.fixture(scope="module")
def tok(stages) -> Tokenizer:
    tokenizer_result, _ = stages
    return load_tokenizer(tokenizer_result.path("tokenizer.json"))


@pytest.fixture(scope="module")
def eot(tok: Tokenizer) -> int:
    return eot_id(tok, EOT)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_continuation_is_the_tail_of_the_joint_encoding(tok: Tokenizer, eot: int) -> None:
    context = "Question: Who shall be king?\nAnswer:"
    ctx, conts = encode_continuations(tok, context, [" the king", " my lord and master"], eot_id=eot)
    assert ctx == _ids(tok, context)
    assert ctx + conts[0] == _ids(tok, context + " the king")
    assert ctx + conts[1] == _ids(tok, context + " my lord and master")


def test_trailing_context_whitespace_moves_to_the_continuation(tok: Tokenizer, eot: int) -> None:
    ctx, conts = encode_continuations(tok, "Answer:  ", ["king"], eot_id=eot)
    assert ctx == _ids(tok, "Answer:")
    assert ctx + conts[0] == _ids(tok, "Answer:  king")


def test_merge_across_the_boundary_falls_back_to_a_separate_encoding(tok: Tokenizer, eot: int) -> None:
    whole, head = _ids(tok, "the"), _ids(tok, "th")
    assert whole[: len(head)] != head  # premise: BPE merges "th" + "e" into one token
    ctx, conts = encode_continuations(tok, "th", ["e"], eot_id=eot)
    assert (ctx, conts) == (head, [_ids(tok, "e")])


def test_empty_context_is_eot_and_special_text_is_plain(tok: Tokenizer, eot: int) -> None:
    assert encode_continuations(tok, "", [" king"], eot_id=eot) == ([eot], [_ids(tok, " king")])
    ctx, conts = encode_continuations(tok, f"a {EOT} b", [f" {EOT}"], eot_id=eot)
    assert eot not in ctx and eot not in conts[0]


# -- scoring -------------------------------------------------------------------


def tiny_gpt(vocab_size: int, block_size: int = 192) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    # Larger embeddings than the 0.02 init, so the choices' log-likelihoods differ clearly.
    torch.nn.init.normal_(model.transformer.wte.weight, std=0.1)
    return model


def reference_loglik(model: GPT, tok: Tokenizer, context: str, choice: str) -> float:
    """One forward per choice: log P(" " + choice | context) from the full log_softmax."""
    ctx = _ids(tok, context)
    whole = _ids(tok, context + " " + choice)
    assert whole[: len(ctx)] == ctx
    cont = whole[len(ctx):]
    seq = (ctx + cont)[-(model.config.block_size + 1):]  # left truncation
    x = torch.tensor([seq[:-1]])
    with torch.no_grad():
        logits, _ = model(x, torch.zeros_like(x))  # (1, T, V)
    logp = F.log_softmax(logits[0].float(), dim=-1)  # (T, V), float32 as score_mc
    T = len(seq) - 1
    return sum(float(logp[T - len(cont) + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("kind", ["hellaswag", "arc", "piqa"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_score_matches_unbatched_reference(tok: Tokenizer, eot: int, kind: str, batch_size: int) -> None:
    examples, _ = load_benchmark(FIXTURES / f"{kind}.jsonl", kind)  # type: ignore[arg-type]
    model = tiny_gpt(tok.get_vocab_size())
    model.train()
    result = score_mc(model, tok, examples, device="cpu", batch_size=batch_size, eot_id=eot)
    assert model.training  # the mode it came in
    assert result.n == len(examples) and result.truncated == 0
    model.eval()
    for ex, p in zip(examples, result.predictions):
        ref = [reference_loglik(model, tok, ex.context, c) for c in ex.choices]
        assert p.loglikelihoods == pytest.approx(ref, abs=1e-5, rel=0)
        assert p.label == ex.label
        assert p.pred == int(np.argmax(p.loglikelihoods))
        assert p.pred_norm == int(np.argmax([ll / len(c) for ll, c in zip(p.loglikelihoods, ex.choices)]))
    assert result.acc == sum(p.pred == p.label for p in result.predictions) / len(examples)
    assert result.acc_norm == sum(p.pred_norm == p.label for p in result.predictions) / len(examples)


def test_acc_and_acc_norm_differ_on_a_uniform_model(tok: Tokenizer, eot: int) -> None:
    """Zero output weights: every token costs log V, so a choice costs (its token count) * log V.

    The short choice of rare letters has the higher total (fewer tokens) but the
    lower log-likelihood per character, so acc picks it and acc_norm the long one.
    """
    model = tiny_gpt(tok.get_vocab_size())
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with wte: logits are all zero
    short, long = "qz", "and the king of the world"
    ex = MCExample("Question: Who comes?\nAnswer:", [short, long], label=1)
    _, (n_short, n_long) = encode_continuations(tok, ex.context, [" " + short, " " + long], eot_id=eot)
    assert len(n_short) < len(n_long)  # premise: higher total for the short choice
    assert len(n_long) / len(long) < len(n_short) / len(short)  # premise: higher per character for the long
    result = score_mc(model, tok, [ex], device="cpu", eot_id=eot)
    log_v = math.log(tok.get_vocab_size())
    p = result.predictions[0]
    assert p.loglikelihoods == pytest.approx([-len(n_short) * log_v, -len(n_long) * log_v], abs=1e-5, rel=0)
    assert (p.pred, p.pred_norm) == (0, 1)
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


def test_long_context_keeps_its_rightmost_tokens(tok: Tokenizer, eot: int) -> None:
    block = 16
    model = tiny_gpt(tok.get_vocab_size(), block_size=block).eval()
    tail = " The king is dead, long live the king, and all his lords and ladies too. Then"
    assert len(_ids(tok, tail)) > block  # premise: the window lies inside the shared tail
    choices = ["he speaks.", "she weeps and goes."]
    examples = [
        MCExample("O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name." + tail,
                  choices, 0),
        MCExample("Now is the winter of our discontent made glorious summer by this sun of York." + tail,
                  choices, 1),
        MCExample("Then", choices, 0),  # short: not truncated
    ]
    result = score_mc(model, tok, examples, device="cpu", batch_size=4, eot_id=eot)
    assert result.truncated == 4
    a, b, c = (p.loglikelihoods for p in result.predictions)
    assert a == pytest.approx(b, abs=1e-5, rel=0)  # only the window counts, and it is the same
    for ex, p in zip(examples, result.predictions):
        ref = [reference_loglik(model, tok, ex.context, ch) for ch in ex.choices]
        assert p.loglikelihoods == pytest.approx(ref, abs=1e-5, rel=0)
    assert c != pytest.approx(a, abs=1e-3)


def test_too_long_continuation_names_the_example(tok: Tokenizer, eot: int) -> None:
    model = tiny_gpt(tok.get_vocab_size(), block_size=16)
    long_choice = "and then the king and the queen and all the lords went to the castle by the sea"
    assert len(_ids(tok, " " + long_choice)) > 16  # premise
    examples = [
        MCExample("Question: Who?\nAnswer:", ["the king", "the queen"], 0),
        MCExample("Question: What then?\nAnswer:", ["nothing", "the end", long_choice], 0),
    ]
    with pytest.raises(ValueError, match=r"^example 1 choice 2 \('and then the king.*scoring needs 1\.\.16"):
        score_mc(model, tok, examples, device="cpu", eot_id=eot)
    with pytest.raises(ValueError, match=r"^eval\.benchmarks\.3 \(arc\) file 'arc\.jsonl': example 1 choice 2 "):
        score_mc(model, tok, examples, device="cpu", eot_id=eot, where="eval.benchmarks.3 (arc) file 'arc.jsonl'")
    # With read_benchmark's lines (lmpipe evaluate -b, the evaluate stage), the file's line too.
    with pytest.raises(ValueError, match=r"^--benchmark 'arc=a\.jsonl': line 7 \(example 1\) choice 2 "):
        score_mc(model, tok, examples, device="cpu", eot_id=eot, where="--benchmark 'arc=a.jsonl'", lines=[3, 7])


def test_check_benchmarks_fit_rejects_exactly_what_score_mc_cannot_score(tmp_path: Path, tok: Tokenizer,
                                                                         eot: int) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.multiple_choice import check_benchmarks_fit

    long_ctx = "O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name, and I will go."
    long_choice = "and then the king and the queen and all the lords went to the castle by the sea"
    rows = [{"goal": "Who?", "sol1": "the king", "sol2": "the queen", "label": 0},
            {"goal": long_ctx, "sol1": "yes", "sol2": "no", "label": 1},
            {"goal": "What then?", "sol1": "nothing", "sol2": long_choice, "label": 0}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps(rows[0]), "", *map(json.dumps, rows[1:])]) + "\n", encoding="utf-8")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    examples, _ = load_benchmark(path, "piqa")
    n_long = len(encode_continuations(tok, examples[2].context, [" " + long_choice], eot_id=eot)[1][0])
    assert len(_ids(tok, examples[1].context)) > n_long  # premise: a context longer than block_size is no error
    hub = BenchmarkConfig(name="hub-p", kind="piqa", hub="baber/piqa")
    local = BenchmarkConfig(name="p", kind="piqa", path=str(path))
    check_benchmarks_fit([hub, local], {"hub-p": path}, tok, n_long)  # fits exactly: scorable
    check_benchmarks_fit([local.model_copy(update={"limit": 2})], {}, tok, n_long - 1)  # the long line is not read
    message = (f"eval.benchmarks.1 (p) file {str(path)!r}: line 4 (example 2) choice 1 ({long_choice[:60]!r}): the "
               f"continuation is {n_long} tokens; scoring needs 1..{n_long - 1} (model block_size) so that context "
               "precedes it")
    with pytest.raises(ValueError) as err:
        check_benchmarks_fit([hub, local], {"hub-p": short}, tok, n_long - 1)
    assert str(err.value) == message
    # score_mc rejects the same example at the same block_size, naming the benchmark and file given as where.
    model = tiny_gpt(tok.get_vocab_size(), block_size=n_long - 1)
    with pytest.raises(ValueError) as err:
        score_mc(model, tok, examples, device="cpu", eot_id=eot, where=f"eval.benchmarks.1 (p) file {str(path)!r}")
    assert str(err.value) == message.replace("line 4 (example 2)", "example 2")
    with pytest.raises(ValueError, match=r"^eval\.benchmarks\.0 \(x\): no file to check"):
        check_benchmarks_fit([hub.model_copy(update={"name": "x"})], {}, tok, n_long)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"eval.benchmarks.0 (p): {bad}:1: field 'goal'")):
        check_benchmarks_fit([local], {"p": bad}, tok, n_long)


def test_benchmark_and_classification_readers_share_one_jsonl_loop(tmp_path: Path) -> None:
    from lmpipe.data.labelled import ClassifyFormatError, read_examples

    path = tmp_path / "d.jsonl"
    for line, problem in [('{"goal": "g"', "not valid JSON (Expecting ',' delimiter at column 13)"),
                          ("[1]", "expected a JSON object, got list")]:
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(BenchmarkFormatError) as bench_err:
            load_benchmark(path, "piqa")
        with pytest.raises(ClassifyFormatError) as classify_err:
            read_examples(path)
        assert str(bench_err.value) == f"{path}:1: {problem}"
        assert str(classify_err.value) == f"classify.path: {path}:1: {problem}"


def test_example_validation_and_arguments(tok: Tokenizer, eot: int) -> None:
    with pytest.raises(ValueError, match="label 2 is outside 0..1"):
        MCExample("c", ["a", "b"], 2)
    with pytest.raises(ValueError, match="at least 2 non-empty choices"):
        MCExample("c", ["a", ""], 0)
    model = tiny_gpt(tok.get_vocab_size())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_mc(model, tok, [MCExample("c", ["a", "b"], 0)], device="cpu", batch_size=0, eot_id=eot)
    with pytest.raises(ValueError, match="no examples"):
        score_mc(model, tok, [], device="cpu", eot_id=eot)
    with pytest.raises(ValueError, match=r"^benchmark 'b': no examples to score$"):
        score_mc(model, tok, [], device="cpu", eot_id=eot, where="benchmark 'b'")


# -- sources: the Hub (mocked at datasets.load_dataset) or the local file -------------------------------------------


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records each call, returns the given rows as a Dataset
    (or raises ``error``)."""

    def __init__(self, rows: list[dict] | None = None, error: Exception | None = None) -> None:
        self.rows, self.error, self.calls = rows, error, []

    def __call__(self, path, name=None, *, split, revision=None, **kwargs):
        import datasets

        self.calls.append((path, name, split, revision))
        if self.error is not None:
            raise self.error
        return datasets.Dataset.from_list(self.rows)


def _fixture_rows(kind: str, n: int = 3) -> list[dict]:
    """The local fixture's first rows, typed as on the Hub (Rowan/hellaswag's labels are strings)."""
    rows = [json.loads(line) for line in (FIXTURES / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    return [{**r, "label": str(r["label"])} if kind == "hellaswag" else r for r in rows]


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> FakeHub:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


@pytest.mark.parametrize("kind, dataset, config, split", [
    ("hellaswag", "Rowan/hellaswag", None, "validation"),
    ("arc", "allenai/ai2_arc", "ARC-Challenge", "test"),
    ("piqa", "baber/piqa", None, "validation"),
])
def test_hub_rows_are_cached_as_jsonl_and_read_like_the_local_files(tmp_path: Path, online: pytest.MonkeyPatch,
                                                                    kind: str, dataset: str, config: str | None,
                                                                    split: str) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import resolve_benchmark

    hub = _hub(online, FakeHub(_fixture_rows(kind)))
    bench = BenchmarkConfig(name=f"{kind}-hub", kind=kind, hub=dataset, hub_config=config, revision="0a1b2c")
    path = resolve_benchmark(bench, tmp_path / "cache")
    assert hub.calls == [(dataset, config, split, "0a1b2c")]
    name = f"{kind}-hub-{dataset.replace('/', '--')}-{config or 'default'}-{split}@0a1b2c.jsonl"
    assert path == tmp_path / "cache" / name
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the temporary file is gone
    # The file holds exactly the rows the Hub gave, one JSON object a line, in order...
    import datasets

    expected = [json.dumps(row, ensure_ascii=False) for row in datasets.Dataset.from_list(_fixture_rows(kind))]
    assert path.read_text(encoding="utf-8").splitlines() == expected
    # ...and those rows have the local files' fields: the same examples come out.
    assert load_benchmark(path, kind)[0] == load_benchmark(FIXTURES / f"{kind}.jsonl", kind, limit=3)[0]


SHA = "0123456789abcdef0123456789abcdef01234567"


def test_a_pinned_revision_is_read_from_the_cache_and_a_branch_is_downloaded_again(
        tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import resolve_benchmark

    hub = _hub(online, FakeHub(_fixture_rows("piqa")))
    pinned = BenchmarkConfig(name="p", kind="piqa", hub="baber/piqa", revision=SHA)
    first = resolve_benchmark(pinned, tmp_path)
    assert first.name == f"p-baber--piqa-default-validation@{SHA}.jsonl"
    hub.error = ConnectionError("no network")  # not asked again: the sha's rows cannot have changed
    assert resolve_benchmark(pinned, tmp_path) == first and len(hub.calls) == 1

    hub.error = None
    branch = BenchmarkConfig(name="p", kind="piqa", hub="baber/piqa")
    assert resolve_benchmark(branch, tmp_path).name == "p-baber--piqa-default-validation@main.jsonl"
    hub.rows = _fixture_rows("piqa", 2)  # the branch moved: the next run scores the new rows
    assert len(resolve_benchmark(branch, tmp_path).read_text().splitlines()) == 2
    assert hub.calls[1:] == [("baber/piqa", None, "validation", None)] * 2


@pytest.mark.parametrize("revision", ["v1.0", "main", "refs/convert/parquet", SHA[:12], SHA.upper()])
def test_a_cached_branch_or_tag_is_downloaded_again_and_only_a_fallback(
        tmp_path: Path, online: pytest.MonkeyPatch, revision: str) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkSourceWarning, hub_cache_file, resolve_benchmark

    hub = _hub(online, FakeHub(_fixture_rows("piqa", 2)))
    local = str(FIXTURES / "piqa.jsonl")
    bench = BenchmarkConfig(name="p", kind="piqa", hub="baber/piqa", revision=revision, path=local)
    cached = hub_cache_file(bench, tmp_path)
    assert resolve_benchmark(bench, tmp_path) == cached
    hub.rows = _fixture_rows("piqa", 3)  # the tag was moved: the cache is not trusted, the Hub is asked again
    assert resolve_benchmark(bench, tmp_path) == cached and len(cached.read_text().splitlines()) == 3
    assert len(hub.calls) == 2
    before = cached.read_bytes()

    class Broken:  # the connection drops halfway through the rows: the cached file stays whole
        def __iter__(self):
            yield _fixture_rows("piqa", 1)[0]
            raise TimeoutError("read timed out")

    _hub(online, lambda *a, **k: Broken())
    stale = (f"benchmark 'p': scoring the cached file {str(cached)!r} of hub 'baber/piqa', which may be stale "
             f"(revision {revision!r} is a branch or tag and can move): ")
    with pytest.warns(BenchmarkSourceWarning) as caught:
        assert resolve_benchmark(bench, tmp_path) == cached  # the cache before path
    assert [str(w.message) for w in caught] == [stale + "the download failed: TimeoutError: read timed out"]
    assert cached.read_bytes() == before and sorted(tmp_path.iterdir()) == [cached]
    online.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.warns(BenchmarkSourceWarning) as caught:
        assert resolve_benchmark(bench, tmp_path) == cached
    assert [str(w.message) for w in caught] == [stale + "HF_DATASETS_OFFLINE is set"]


def test_a_split_or_config_the_hub_lacks_fails_naming_the_field(tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    from datasets.exceptions import DatasetNotFoundError

    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkHubError, BenchmarkSourceWarning, resolve_benchmarks

    local = str(FIXTURES / "arc.jsonl")
    piqa = BenchmarkConfig(name="piqa", kind="piqa", path=str(FIXTURES / "piqa.jsonl"))
    arc = BenchmarkConfig(name="arc-c", kind="arc", hub="allenai/ai2_arc", hub_config="ARC-Challenge", split="tset",
                          revision="main", path=local)
    _hub(online, FakeHub(error=ValueError("Bad split: tset. Available splits: ['train', 'validation', 'test']")))
    with pytest.raises(BenchmarkHubError) as err:  # a config mistake: no fallback to path
        resolve_benchmarks([piqa, arc], tmp_path)
    assert isinstance(err.value, ValueError) and str(err.value) == (
        "eval.benchmarks.1 (arc-c): the Hub refused hub 'allenai/ai2_arc' config 'ARC-Challenge' split 'tset' "
        "revision 'main': ValueError: Bad split: tset. Available splits: ['train', 'validation', 'test']; "
        "check eval.benchmarks.1.split (unset: 'test', the split lm-evaluation-harness scores)")
    wrong_config = arc.model_copy(update={"hub_config": "ARC-Chalenge", "split": None, "revision": None})
    _hub(online, FakeHub(error=ValueError("BuilderConfig 'ARC-Chalenge' not found. Available: ['ARC-Challenge']")))
    with pytest.raises(BenchmarkHubError, match=re.escape(
            "eval.benchmarks.0 (arc-c): the Hub refused hub 'allenai/ai2_arc' config 'ARC-Chalenge' split 'test' "
            "revision None: ValueError: BuilderConfig 'ARC-Chalenge' not found. Available: ['ARC-Challenge']; "
            "check eval.benchmarks.0.hub_config")):
        resolve_benchmarks([wrong_config], tmp_path)
    # A dataset or revision the Hub does not have is datasets' FileNotFoundError: the local file is scored.
    _hub(online, FakeHub(error=DatasetNotFoundError("Revision 'main' doesn't exist for dataset 'allenai/ai2_arc'")))
    with pytest.warns(BenchmarkSourceWarning, match="the download failed: DatasetNotFoundError: Revision 'main'"):
        assert resolve_benchmarks([arc], tmp_path) == {"arc-c": Path(local)}
    assert not any(tmp_path.iterdir())


def test_a_hub_split_that_is_not_json_fails_naming_the_row_and_column(tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    """A row json cannot write (an image or bytes column) is no multiple-choice text benchmark: named, nothing
    half-written is left in the cache."""
    import datetime

    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkHubError, resolve_benchmarks

    class Rows(FakeHub):
        def __call__(self, *args, **kwargs):
            return [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
                    {"goal": "g", "sol1": "a", "sol2": "b", "label": 0, "when": datetime.date(2020, 1, 1)}]

    _hub(online, Rows())
    bench = BenchmarkConfig(name="p", kind="piqa", hub="baber/piqa", revision=SHA)
    with pytest.raises(BenchmarkHubError, match=re.escape(
            "eval.benchmarks.0 (p): row 1 of hub 'baber/piqa' split 'validation' has columns ['when'] that are "
            "not JSON (Object of type date is not JSON serializable)")):
        resolve_benchmarks([bench], tmp_path)
    assert not any(tmp_path.rglob("*.jsonl*"))


def test_the_resolved_file_is_format_checked_naming_the_benchmark_and_line(
        tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkSourceError, hub_cache_file, resolve_benchmark, resolve_benchmarks

    rows = _fixture_rows("piqa", 3)
    rows[1]["sol2"] = None  # a null on the Hub
    _hub(online, FakeHub(rows))
    bench = BenchmarkConfig(name="p", kind="piqa", hub="baber/piqa", revision=SHA)
    cached = hub_cache_file(bench, tmp_path)
    with pytest.raises(BenchmarkFormatError) as err:
        resolve_benchmarks([bench], tmp_path)
    assert (err.value.path, err.value.line, err.value.field) == (cached, 2, "sol2")
    assert str(err.value) == f"eval.benchmarks.0 (p): {cached}:2: field 'sol2': must be a string, got NoneType"
    assert resolve_benchmark(bench.model_copy(update={"skip_bad": True}), tmp_path) == cached
    assert resolve_benchmark(bench.model_copy(update={"limit": 1}), tmp_path) == cached  # line 2 is never read
    bad_local = tmp_path / "bad.jsonl"
    bad_local.write_text("[1]\n", encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=re.escape(
            f"benchmark 'l': {bad_local}:1: expected a JSON object, got list")):
        resolve_benchmark(BenchmarkConfig(name="l", kind="piqa", path=str(bad_local)), tmp_path)
    with pytest.raises(BenchmarkSourceError):  # a missing file is still a source error, not a format error
        resolve_benchmark(BenchmarkConfig(name="l", kind="piqa", path=str(tmp_path / "gone.jsonl")), tmp_path)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_falls_back_to_the_local_file_with_a_warning(tmp_path: Path, online: pytest.MonkeyPatch,
                                                             variable: str) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkSourceWarning, resolve_benchmarks

    hub = _hub(online, FakeHub(_fixture_rows("arc")))
    online.setenv(variable, "1")
    local = str(FIXTURES / "arc.jsonl")
    benches = [BenchmarkConfig(name="piqa", kind="piqa", path=str(FIXTURES / "piqa.jsonl")),
               BenchmarkConfig(name="arc-c", kind="arc", hub="allenai/ai2_arc", hub_config="ARC-Challenge", path=local)]
    with pytest.warns(BenchmarkSourceWarning) as caught:
        files = resolve_benchmarks(benches, tmp_path)
    assert files == {"piqa": FIXTURES / "piqa.jsonl", "arc-c": Path(local)}
    assert [str(w.message) for w in caught] == [
        f"eval.benchmarks.1 (arc-c): scoring the local file {local!r} instead of hub 'allenai/ai2_arc' "
        f"(ARC-Challenge): {variable} is set"]
    assert hub.calls == [] and not any(tmp_path.iterdir())


def test_a_network_error_falls_back_to_the_local_file_and_leaves_no_partial_cache(
        tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkSourceWarning, resolve_benchmark

    local = str(FIXTURES / "hellaswag.jsonl")
    bench = BenchmarkConfig(name="hs", kind="hellaswag", hub="Rowan/hellaswag", path=local)
    _hub(online, FakeHub(error=ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub")))
    with pytest.warns(BenchmarkSourceWarning, match=re.escape(
            f"benchmark 'hs': scoring the local file {local!r} instead of hub 'Rowan/hellaswag': the download "
            "failed: ConnectionError: Couldn't reach 'Rowan/hellaswag' on the Hub")):
        assert resolve_benchmark(bench, tmp_path / "cache") == Path(local)

    class Broken:  # the connection drops halfway through the rows
        def __iter__(self):
            yield {"ctx": "x", "endings": ["a", "b"], "label": 0}
            raise TimeoutError("read timed out")

    _hub(online, lambda *a, **k: Broken())
    with pytest.warns(BenchmarkSourceWarning, match="the download failed: TimeoutError: read timed out"):
        assert resolve_benchmark(bench, tmp_path / "cache") == Path(local)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_source_to_score_names_the_benchmark_and_both_sources(tmp_path: Path, online: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import BenchmarkSourceError, resolve_benchmark, resolve_benchmarks

    online.setenv("HF_HUB_OFFLINE", "true")
    hub_only = BenchmarkConfig(name="hs", kind="hellaswag", hub="Rowan/hellaswag")
    with pytest.raises(BenchmarkSourceError) as err:
        resolve_benchmarks([hub_only], tmp_path)
    assert str(err.value) == ("eval.benchmarks.0 (hs): no source to score: hub 'Rowan/hellaswag' cannot be read "
                              "(HF_HUB_OFFLINE is set) and no path is set")
    gone = BenchmarkConfig(name="hs", kind="hellaswag", hub="Rowan/hellaswag", path=str(tmp_path / "gone.jsonl"))
    with pytest.raises(BenchmarkSourceError,
                       match=re.escape(f"and path {str(tmp_path / 'gone.jsonl')!r} is not a file")):
        resolve_benchmark(gone, tmp_path)
    local_only = BenchmarkConfig(name="l", kind="piqa", path=str(tmp_path / "gone.jsonl"))
    with pytest.raises(BenchmarkSourceError, match=re.escape(f"benchmark 'l': path {str(tmp_path / 'gone.jsonl')!r} "
                                                             "is not a file")):
        resolve_benchmark(local_only, tmp_path)

    with pytest.raises(ValidationError, match=re.escape("benchmark 'x' needs a source: set path (a local JSONL file), "
                                                        "hub (a Hugging Face dataset id), or both")):
        BenchmarkConfig(name="x", kind="arc")
    with pytest.raises(ValidationError, match="hub_config, split and revision apply to hub, which is unset"):
        BenchmarkConfig(name="x", kind="arc", path="a.jsonl", hub_config="ARC-Easy")
