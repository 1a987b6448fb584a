"""Sequence classification (GPT-1 style): readers with line-numbered errors, metrics, the extract-token
encoding, the classifier model, training and the classify stage.

The fixtures tests/fixtures/classify/corpus.{csv,jsonl} hold the same 200 lines in the same order: 100 lines
of Tiny Shakespeare and 100 sentences of WikiText-2 (validation split, ending in " ."), drawn with a fixed
seed from data/; the label is the corpus a line comes from ("shakespeare" or "wikitext").
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lmpipe.artifacts import StageResult
from lmpipe.config.training import ClassifyConfig, ModelConfig, Qwen3ModelConfig, TrainConfig
from lmpipe.data.labelled import ClassifyFormatError, TextExample, build_classify_data, encode_texts, read_examples
from lmpipe.data.sft import split_indices
from lmpipe.data.shards import ArraySource
from lmpipe.data.tokenizer import tokenizer_fingerprint
from lmpipe.eval.classification import classification_metrics, render_report
from lmpipe.model.checkpoint import CheckpointMismatchError
from lmpipe.model.classifier import (
    CONFIG_FILE,
    EVAL_BATCH_SIZE,
    MODEL_DIR,
    WEIGHTS_FILE,
    GPTClassifier,
    collate,
    lm_targets,
    load_classifier,
    predict,
)
from lmpipe.model.gpt import IGNORE_INDEX, GPTConfig
from lmpipe.stages.classify import METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE, ValScores, run_classify
from lmpipe.training.checkpoint import load_checkpoint
from lmpipe.training.classifier import batch_order, fit_classifier
from lmpipe.training.data import TrainData
from lmpipe.training.loop import Reporters, train
from tests.conftest import NANOGPT, REPO

FIXTURES = REPO / "tests" / "fixtures" / "classify"
CSV_FILE, JSONL_FILE = FIXTURES / "corpus.csv", FIXTURES / "corpus.jsonl"
DATA = REPO / "data"
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
EOT_ID = 0  # the default tokenizer.special_tokens put <|endoftext|> first


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tokenizer: StageResult, tok: Tokenizer) -> Path:
    """A briefly pretrained body: 20 steps on Tiny Shakespeare."""
    fp = tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    stream = np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    summary = train(MODEL, TrainConfig(**NANOGPT, max_steps=20, batch_size=8, warmup_steps=2, eval_batches=1, device="cpu"),
                    tok.get_vocab_size(), TrainData(ArraySource(stream[:-2000]), ArraySource(stream[-2000:])),
                    tmp_path_factory.mktemp("base"), tokenizer_fingerprint=fp)
    return summary.checkpoint


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(path: Path, **kw: object) -> ClassifyConfig:
    return ClassifyConfig(path=str(path), device="cpu", **kw)


# ---------------------------------------------------------------- metrics


def test_accuracy_and_macro_f1_on_a_hand_example() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "d"]
    m = classification_metrics(gold, pred)
    # a: TP 1, FP 0, FN 1 -> 2/3; b: TP 2, FP 1, FN 0 -> 4/5; c: never predicted -> 0; d: never right -> 0.
    assert m.per_class_f1 == {"a": 2 / 3, "b": 4 / 5, "c": 0.0, "d": 0.0}
    assert m.accuracy == 3 / 5 and m.n == 5
    assert m.macro_f1 == pytest.approx(11 / 30, rel=1e-15)  # (2/3 + 4/5) / 4
    perfect = classification_metrics(["x", "y", "y"], ["x", "y", "y"])
    assert (perfect.accuracy, perfect.macro_f1, perfect.per_class_f1) == (1.0, 1.0, {"x": 1.0, "y": 1.0})
    # A class of neither gold nor predictions is not averaged in: only "y" occurs.
    assert classification_metrics(["y", "y"], ["y", "y"]).per_class_f1 == {"y": 1.0}
    swapped = classification_metrics(["x", "y"], ["y", "x"])
    assert (swapped.accuracy, swapped.macro_f1) == (0.0, 0.0)


def test_report_shows_scores_per_class_f1_support_and_the_confusion_matrix() -> None:
    gold = ["a", "a", "b", "b", "c|d"]
    pred = ["a", "b", "b", "b", "a"]
    text = render_report(classification_metrics(gold, pred), gold, pred, train_examples=20, path="x.csv")
    assert text.splitlines() == [
        "# Sequence classification", "",
        "`x.csv`: 5 held-out examples (20 trained on). Accuracy **0.6000**, macro-F1 **0.4333**.", "",
        "| class | F1 | support |", "|---|---:|---:|",
        "| a | 0.5000 | 2 |", "| b | 0.8000 | 2 |", "| c\\|d | 0.0000 | 1 |", "",
        "Confusion matrix (rows: true label, columns: predicted):", "",
        "| true \\ predicted | a | b | c\\|d |", "|---|---:|---:|---:|",
        "| a | 1 | 1 | 0 |", "| b | 0 | 2 | 0 |", "| c\\|d | 1 | 0 | 0 |"]


def test_metrics_refuse_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match=r"^2 gold labels but 1 predictions$"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"^no examples to score$"):
        classification_metrics([], [])


# ---------------------------------------------------------------- readers


def test_csv_and_jsonl_fixtures_read_the_same_examples_with_line_numbers() -> None:
    from_csv, bad_csv = read_examples(CSV_FILE)
    from_jsonl, bad_jsonl = read_examples(JSONL_FILE)
    assert len(from_csv) == len(from_jsonl) == 200 and bad_csv.count == bad_jsonl.count == 0
    assert [(e.text, e.label) for e in from_csv] == [(e.text, e.label) for e in from_jsonl]
    assert [e.line for e in from_csv] == list(range(2, 202))  # line 1 is the header row
    assert [e.line for e in from_jsonl] == list(range(1, 201))
    assert sorted({e.label for e in from_csv}) == ["shakespeare", "wikitext"]
    assert sum(e.label == "wikitext" for e in from_csv) == 100


def test_csv_quoted_newlines_other_columns_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('id,sentence,y\n1,"two\nlines",pos\n\n2,"a, b",neg\n', encoding="utf-8")
    examples, _ = read_examples(f, text_field="sentence", label_field="y")
    assert examples == [TextExample("two\nlines", "pos", 2), TextExample("a, b", "neg", 5)]


def test_json_integer_labels_are_their_decimal_strings(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}', "", '{"text": "b", "label": "0", "id": 3}'])
    examples, _ = read_examples(f)
    assert examples == [TextExample("a", "1", 1), TextExample("b", "0", 3)]


@pytest.mark.parametrize(
    ("name", "lines", "kwargs", "message"),
    [
        ("d.jsonl", ['{"text": "fine", "label": "pos"}', '{"text": "hi"}'], {},
         "{f}:2: field 'label': missing (fields: ['text'])"),
        ("d.jsonl", ['{"text": "fine", "label": "pos"}', '{"text": "meh", "label": "neutral"}'],
         {"labels": ["neg", "pos"]}, "{f}:2: field 'label': unknown label 'neutral' (classify.labels: ['neg', 'pos'])"),
        ("d.jsonl", ['{"text": "fine", "label": "pos"}', "", "{oops"], {},
         "{f}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ("d.jsonl", ["[1, 2]"], {}, "{f}:1: expected a JSON object, got list"),
        ("d.jsonl", ['{"text": "x", "label": 1.5}'], {},
         "{f}:1: field 'label': must be a string or an integer, got float 1.5"),
        ("d.jsonl", ['{"text": ["x"], "label": "pos"}'], {}, "{f}:1: field 'text': must be a string, got list [\"x\"]"),
        ("d.jsonl", ['{"text": "  ", "label": "pos"}'], {}, "{f}:1: field 'text': is empty ('  ')"),
        ("d.jsonl", ['{"text": "x", "label": ""}'], {}, "{f}:1: field 'label': is empty ('')"),
        ("d.csv", ["txt,label", "hello,pos"], {}, "{f}:1: field 'text': is not a column of the header row "
                                                  "['txt', 'label']"),
        ("d.csv", ["text,label,text", "a,pos,b"], {}, "{f}:1: field 'text': is twice in the header row "
                                                      "['text', 'label', 'text']"),
        ("d.csv", ["text,label", "hello,pos", "a,b,c"], {},
         "{f}:3: has 3 field(s), the header row has 2 (['text', 'label'])"),
        ("d.csv", ["text,label", '"a"b,pos'], {}, "{f}:2: not valid CSV (',' expected after '\"')"),
        ("d.csv", [""], {}, "{f}: is empty: a CSV file needs a header row naming the fields"),
        ("d.jsonl", [""], {}, "{f}: holds no examples"),
    ],
)
def test_bad_input_names_file_line_field_and_value(tmp_path: Path, name: str, lines: list[str],
                                                   kwargs: dict, message: str) -> None:
    f = write(tmp_path / name, lines)
    with pytest.raises(ClassifyFormatError) as info:
        read_examples(f, **kwargs)
    assert str(info.value) == "classify.path: " + message.format(f=f)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^classify\.path: '.*d\.txt' must end in \.csv, \.jsonl or \.json"):
        read_examples(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match=r"^classify\.path: classification file '.*nope\.csv' does not exist$"):
        read_examples(tmp_path / "nope.csv")
    f = tmp_path / "latin1.csv"
    f.write_bytes(b"text,label\ncaf\xe9,pos\n")
    with pytest.raises(ClassifyFormatError, match=r"latin1\.csv:2: not valid UTF-8 \(byte 14 of the file\)$"):
        read_examples(f)
    with pytest.raises(ValueError, match=r"path 'd\.tsv' must end in \.csv, \.jsonl or \.json"):
        ClassifyConfig(path="d.tsv")
    with pytest.raises(ValueError, match=r"labels must be at least 2 distinct non-empty strings, got \['a', 'a'\]"):
        ClassifyConfig(path="d.csv", labels=["a", "a"])


def test_skip_bad_counts_and_reports_the_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a", "label": "pos"}\n{oops\n{"text": "b"}\n{"text": "c", "label": "neutral"}\n'
                  b'\xff\n{"text": "d", "label": "neg"}\n')
    examples, report = read_examples(f, labels=["neg", "pos"], skip_bad=True)
    assert [e.line for e in examples] == [1, 6]
    assert report.count == 4 and [line for line, _ in report.first] == [2, 3, 4, 5]
    assert report.first[2][1] == (f"classify.path: {f}:4: field 'label': unknown label 'neutral' "
                                  "(classify.labels: ['neg', 'pos'])")
    assert report.first[3][1] == f"classify.path: {f}:5: not valid UTF-8 (byte 0)"
    csv_file = write(tmp_path / "d.csv", ["text,label", "a,pos", "x,y,z", '"q"r,pos', "b,neg"])
    examples, report = read_examples(csv_file, skip_bad=True)
    assert [e.line for e in examples] == [2, 5] and [line for line, _ in report.first] == [3, 4]
    only_bad = write(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(ClassifyFormatError, match=r"bad\.jsonl: holds no examples; 1 bad line\(s\) skipped, the "
                                                  r"first: classify\.path: .*bad\.jsonl:1: not valid JSON"):
        read_examples(only_bad, skip_bad=True)


# ---------------------------------------------------------------- data of a run


def test_split_every_kth_example_at_least_one() -> None:
    assert split_indices(10, 5) == ([0, 1, 2, 3, 5, 6, 7, 8], [4, 9])
    assert split_indices(3, 5) == ([0, 1], [2])
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_indices(1, 5)


def test_encoding_appends_the_extract_token_and_keeps_the_last_tokens(tok: Tokenizer) -> None:
    text = "To be, or not to be, that is the question"
    body = tok.encode(text, add_special_tokens=False).ids
    (full, short), cut = encode_texts(tok, [text, "<|endoftext|>"], EOT_ID, 64)
    assert full == [*body, EOT_ID] and cut == [False, False]
    assert short[-1] == EOT_ID and EOT_ID not in short[:-1]  # literal special-token text stays text
    (kept,), (was_cut,) = encode_texts(tok, [text], EOT_ID, 4)
    assert kept == [*body[-3:], EOT_ID] and was_cut


def test_labels_from_training_split_and_unseen_val_labels(tmp_path: Path, tok: Tokenizer) -> None:
    lines = [json.dumps({"text": f"line {i}", "label": "ab"[i % 2]}) for i in range(9)]
    lines.append(json.dumps({"text": "line 9", "label": "c"}))  # the 10th: held out, never trained on
    f = write(tmp_path / "d.jsonl", lines)
    with pytest.raises(ClassifyFormatError) as info:
        build_classify_data(config(f), tok, EOT_ID, 64)
    assert str(info.value) == (f"classify.path: {f}:10: field 'label': label 'c' does not occur in the training "
                               "split (labels: ['a', 'b'])")
    data = build_classify_data(config(f, skip_bad=True), tok, EOT_ID, 64)
    assert data.labels == ["a", "b"] and (len(data.train), len(data.val)) == (8, 1)
    assert data.meta()["skipped_bad"] == 1 and data.meta()["skipped_bad_lines"] == [10]
    assert data.val.targets == [0] and [e.line for e in data.val.examples] == [5]
    given = build_classify_data(config(f, labels=["c", "b", "a"]), tok, EOT_ID, 64)
    assert given.labels == ["c", "b", "a"] and given.val.targets == [2, 0]
    one = write(tmp_path / "one.jsonl", [json.dumps({"text": f"t{i}", "label": "a"}) for i in range(4)])
    with pytest.raises(ClassifyFormatError, match=r"one\.jsonl: field 'label': the training split has the one "
                                                  r"label \['a'\]; a classifier needs at least 2"):
        build_classify_data(config(one), tok, EOT_ID, 64)


def test_long_texts_are_truncated_or_skipped_and_counted(tmp_path: Path, tok: Tokenizer) -> None:
    long = "Now is the winter of our discontent made glorious summer by this sun of York"
    lines = [json.dumps({"text": long if i in (0, 4) else "short", "label": "ab"[i % 2]}) for i in range(10)]
    f = write(tmp_path / "d.jsonl", lines)
    data = build_classify_data(config(f), tok, EOT_ID, 8)
    meta = data.meta()
    assert (meta["truncated"], meta["truncated_lines"], meta["skipped_long"]) == (2, [1, 5], 0)
    assert max(len(x) for x in data.train.ids + data.val.ids) == 8
    skipped = build_classify_data(config(f, skip_long=True), tok, EOT_ID, 8).meta()
    assert (skipped["truncated"], skipped["skipped_long"], skipped["skipped_long_lines"]) == (0, 2, [1, 5])
    assert (skipped["train_examples"], skipped["val_examples"]) == (7, 1)


def test_collate_pads_right_and_lm_targets_stop_at_the_last_real_token() -> None:
    idx, lengths = collate([[5, 6, 7], [8]], pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
    X = IGNORE_INDEX
    assert lm_targets(idx, lengths).tolist() == [[6, 7, X], [X, X, X]]


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    order = batch_order(5, 3, seed=1)
    batches = [next(order).tolist() for _ in range(4)]  # 12 indices: epochs 0, 1 and two of epoch 2
    flat = sum(batches, [])
    assert sorted(flat[:5]) == sorted(flat[5:10]) == [0, 1, 2, 3, 4]
    assert flat[:5] == np.random.default_rng([1, 0]).permutation(5).tolist()
    assert batches == [next(o).tolist() for o in [batch_order(5, 3, seed=1)] for _ in range(4)]


# ---------------------------------------------------------------- the model


def test_head_reads_each_rows_last_real_token_whatever_the_padding() -> None:
    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16), ["a", "b", "c"],
                          eot_id=0).eval()
    rows = [[3, 4, 5, 0], [7, 0], [9, 9, 9, 9, 9, 0]]
    together, _ = model(*collate(rows, 0))
    alone = torch.cat([model(*collate([r], 0))[0] for r in rows])
    torch.testing.assert_close(together, alone)
    # The head sees the final LayerNorm's output at the last real position, nothing after it.
    idx, lengths = collate(rows, 0)
    model.body(idx)
    hidden = model.body.transformer.ln_f(model.body.transformer.h[1](model.body.transformer.h[0](
        model.body.transformer.wte(idx) + model.body.transformer.wpe(torch.arange(idx.size(1))))))
    expected = model.head(hidden[torch.arange(3), lengths - 1])
    torch.testing.assert_close(together, expected)
    assert model._hidden is None  # no activation kept between calls


def test_a_pretrained_checkpoint_loads_into_the_body(base: Path, tok: Tokenizer) -> None:
    model = GPTClassifier(GPTConfig.from_config(MODEL, tok.get_vocab_size()), ["x", "y"], eot_id=EOT_ID)
    load_checkpoint(base, model.body, None, restore_rng=False)
    from lmpipe.model.checkpoint import load_model

    lm = load_model(base)
    assert torch.equal(model.body.transformer.wte.weight, lm.transformer.wte.weight)


# ---------------------------------------------------------------- training and the stage


def _fit(base: Path, tok: Tokenizer, cfg: ClassifyConfig):
    data = build_classify_data(cfg, tok, EOT_ID, MODEL.block_size)
    torch.manual_seed(cfg.seed)
    model = GPTClassifier(GPTConfig.from_config(MODEL, tok.get_vocab_size()), data.labels, eot_id=EOT_ID,
                          head_dropout=cfg.head_dropout)
    load_checkpoint(base, model.body, None, restore_rng=False)
    scores = ValScores(model, data.val)
    metrics, _ = fit_classifier(model, data.train, cfg, scores)
    return SimpleNamespace(rows=metrics.rows, predicted=scores.predicted, metrics=scores.metrics)


def test_training_is_bitwise_reproducible(base: Path, tok: Tokenizer) -> None:
    cfg = config(CSV_FILE, max_steps=10, eval_interval=5, learning_rate=2e-3, min_lr=2e-4, lm_loss_weight=0.5)
    first, second = _fit(base, tok, cfg), _fit(base, tok, cfg)
    assert [r["loss"] for r in first.rows] == [r["loss"] for r in second.rows]
    assert first.rows == second.rows and first.predicted == second.predicted
    assert len(first.rows) == 10 and set(first.rows[4]) == {"step", "loss", "lr", "grad_norm", "val_loss",
                                                            "val_accuracy", "val_macro_f1"}
    assert first.metrics.n == 40  # every 5th of 200
    other_seed = _fit(base, tok, cfg.model_copy(update={"seed": 1, "max_steps": 1}))
    assert other_seed.rows[0]["loss"] != first.rows[0]["loss"]


def test_run_classify_publishes_and_predict_round_trips(tmp_path: Path, base: Path, tokenizer: StageResult,
                                                        tok: Tokenizer) -> None:
    cfg = config(JSONL_FILE, max_steps=60, eval_interval=30, learning_rate=2e-3, min_lr=2e-4)
    logged: list[tuple[dict[str, float], int]] = []
    progress: list[tuple[int, int]] = []
    result = run_classify(cfg, MODEL, base, tokenizer, tmp_path / "cls", "fp",
                          report=Reporters(metrics=lambda m, s: logged.append((m, s)),
                                           progress=lambda d, t: progress.append((d, t))))
    assert set(result.files) == {f"{MODEL_DIR}/{WEIGHTS_FILE}", f"{MODEL_DIR}/{CONFIG_FILE}", METRICS_FILE,
                                 PREDICTIONS_FILE, REPORT_FILE}
    assert result.path(REPORT_FILE).read_text(encoding="utf-8") == result.meta["markdown"]
    assert [s for _, s in logged] == [30, 60] and progress == [(30, 60), (60, 60)]
    # Observed: accuracy 0.975 (39 of 40), macro-F1 0.9749; chance is 0.5. The " ." ending WikiText's
    # tokenization is a cue a 20-step body can pick up from 160 examples.
    assert result.metrics["accuracy"] >= 0.9 and result.metrics["macro_f1"] >= 0.9
    assert set(logged[0][0]) == {"train/loss", "train/lr", "val/loss", "val/accuracy", "val/macro_f1"}
    rows = [json.loads(r) for r in result.path(METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61)) and rows[-1]["val_accuracy"] == result.metrics["accuracy"]
    assert {k: result.meta[k] for k in ("labels", "train_examples", "val_examples", "skipped_bad", "skipped_long",
                                        "truncated")} == {
        "labels": ["shakespeare", "wikitext"], "train_examples": 160, "val_examples": 40, "skipped_bad": 0,
        "skipped_long": 0, "truncated": 0}
    assert set(result.meta["per_class_f1"]) <= {"shakespeare", "wikitext"}
    predictions = [json.loads(r) for r in result.path(PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [p["line"] for p in predictions] == list(range(5, 201, 5))
    assert set(predictions[0]) == {"line", "text", "label", "predicted"}
    accuracy = sum(p["label"] == p["predicted"] for p in predictions) / len(predictions)
    assert accuracy == result.metrics["accuracy"]

    model, labels = load_classifier(result.path(MODEL_DIR), tokenizer_path=tokenizer.path("tokenizer.json"))
    assert labels == ["shakespeare", "wikitext"] and not model.training
    texts = [p["text"] for p in predictions]
    assert predict(model, tok, texts) == [p["predicted"] for p in predictions]
    assert predict(model, tok, texts[:3], batch_size=EVAL_BATCH_SIZE) == [p["predicted"] for p in predictions[:3]]
    info = json.loads(result.path(f"{MODEL_DIR}/{CONFIG_FILE}").read_text(encoding="utf-8"))
    assert (info["text_field"], info["label_field"], info["eot_id"], info["model"]["block_size"]) == (
        "text", "label", EOT_ID, 64)
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    assert run_classify(cfg, MODEL, base, tokenizer, tmp_path / "cls", "fp").meta["reused"] is True


def test_a_qwen3_body_classifies_and_round_trips(tmp_path: Path, tokenizer: StageResult, tok: Tokenizer) -> None:
    """model.arch=qwen3: the head reads the final RMSNorm's output; the published classifier is a qwen3 one."""
    qwen3 = Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, n_kv_head=1, tie_embeddings=False)
    fp = tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    stream = np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    body = train(qwen3, TrainConfig(**NANOGPT, max_steps=20, batch_size=8, warmup_steps=2, eval_batches=1, device="cpu"),
                 tok.get_vocab_size(), TrainData(ArraySource(stream[:-2000]), ArraySource(stream[-2000:])),
                 tmp_path / "base", tokenizer_fingerprint=fp).checkpoint
    cfg = config(JSONL_FILE, max_steps=40, eval_interval=40, learning_rate=2e-3, min_lr=2e-4)
    result = run_classify(cfg, qwen3, body, tokenizer, tmp_path / "cls", "fp")
    # Observed: accuracy 0.95, macro-F1 0.95 (chance 0.5), as the GPT-2 body's above.
    assert result.metrics["accuracy"] >= 0.9 and result.metrics["macro_f1"] >= 0.9
    model, _ = load_classifier(result.path(MODEL_DIR), tokenizer_path=tokenizer.path("tokenizer.json"))
    assert model.body.config == GPTConfig.from_config(qwen3, tok.get_vocab_size())
    predictions = [json.loads(r) for r in result.path(PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert predict(model, tok, [p["text"] for p in predictions]) == [p["predicted"] for p in predictions]
    # The head sees each row's last real position, whatever the padding after it.
    rows = [tok.encode(p["text"]).ids[:20] + [EOT_ID] for p in predictions[:3]]
    together, _ = model(*collate(rows, EOT_ID))
    torch.testing.assert_close(together, torch.cat([model(*collate([r], EOT_ID))[0] for r in rows]))


def test_run_classify_checks_data_before_the_checkpoint(tmp_path: Path, base: Path, tokenizer: StageResult) -> None:
    bad = write(tmp_path / "bad.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", "label": "z"}'])
    cfg = config(bad, labels=["x", "y"], max_steps=1)
    with pytest.raises(ClassifyFormatError, match=r"bad\.jsonl:2: field 'label': unknown label 'z'"):
        run_classify(cfg, MODEL, tmp_path / "no-checkpoint", tokenizer, tmp_path / "c1", "fp")
    good = config(CSV_FILE, max_steps=1)
    with pytest.raises(FileNotFoundError, match=r"classify\.init_checkpoint: '.*no-checkpoint' is not a checkpoint"):
        run_classify(good, MODEL, tmp_path / "no-checkpoint", tokenizer, tmp_path / "c2", "fp")
    with pytest.raises(CheckpointMismatchError, match=r"model\.block_size: checkpoint has 64, config has 32"):
        run_classify(good, MODEL.model_copy(update={"block_size": 32}), base, tokenizer, tmp_path / "c3", "fp")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c1.partial").exists()
