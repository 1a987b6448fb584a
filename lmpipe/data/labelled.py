"""Labelled examples for sequence classification: CSV or JSONL, checked, split and encoded."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmpipe.config.training import ClassifyConfig
from lmpipe.data.jsonl import BadLineReport, BenchmarkFormatError, jsonl_records
from lmpipe.data.sft import split_indices
from lmpipe.data.tokenizer import encode_ordinary

PATH_FIELD = "classify.path"
MAX_REPORTED = 5  # line numbers of skipped / truncated examples kept in the stage's meta


class ClassifyFormatError(BenchmarkFormatError):
    """A line of the classification file is malformed or has an unknown label.

    Carries ``path``, ``line`` (1-based; 0: the file as a whole), ``field`` and
    ``problem`` like the benchmark readers' error (whose ``BadLineReport`` counts
    skipped lines), and the message starts with the config field that named the file.
    """

    def __init__(self, path: Path, line: int, field: str | None, problem: str,
                 *, config_field: str = PATH_FIELD) -> None:
        super().__init__(path, line, field, problem)
        self.args = (f"{config_field}: {self.args[0]}",)


@dataclass(frozen=True)
class TextExample:
    """One labelled text and the 1-based line of the file it starts on."""

    text: str
    label: str
    line: int


@dataclass
class EncodedSet:
    """Examples ready for the model: token ids (extract token last), class indices, where they came from."""

    ids: list[list[int]]
    targets: list[int]
    examples: list[TextExample]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ClassifyData:
    """The train and val splits, the classes, and what was skipped or truncated on the way."""

    train: EncodedSet
    val: EncodedSet
    labels: list[str]
    bad: BadLineReport
    truncated_lines: list[int] = field(default_factory=list)
    skipped_long_lines: list[int] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "skipped_bad": self.bad.count,
            "skipped_bad_lines": [line for line, _ in self.bad.first],
            "skipped_bad_first": self.bad.first[0][1] if self.bad.first else None,
            "skipped_long": len(self.skipped_long_lines),
            "skipped_long_lines": self.skipped_long_lines[:MAX_REPORTED],
            "truncated": len(self.truncated_lines),
            "truncated_lines": self.truncated_lines[:MAX_REPORTED],
        }


# ---------------------------------------------------------------- readers


def _text_and_label(values: dict[str, Any], path: Path, line: int, text_field: str, label_field: str,
                    config_field: str) -> TextExample:
    """Check one record's two fields; raises ClassifyFormatError naming the field and the value."""
    def bad(name: str, problem: str) -> ClassifyFormatError:
        return ClassifyFormatError(path, line, name, problem, config_field=config_field)

    for name in (text_field, label_field):
        if name not in values:
            raise bad(name, f"missing (fields: {sorted(values)})")
    text, label = values[text_field], values[label_field]
    if not isinstance(text, str):
        raise bad(text_field, f"must be a string, got {type(text).__name__} {json.dumps(text)[:40]}")
    if not text.strip():
        raise bad(text_field, f"is empty ({text!r})")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise bad(label_field, f"must be a string or an integer, got {type(label).__name__} {json.dumps(label)[:40]}")
    if not label.strip():
        raise bad(label_field, f"is empty ({label!r})")
    return TextExample(text, label, line)


def _csv_records(path: Path, text_field: str, label_field: str,
                 config_field: str) -> Iterator[tuple[int, dict[str, Any] | ClassifyFormatError]]:
    """(first line, {column: value}) per CSV record, or (line, error) for a malformed one.

    The header row names the columns and must name both fields exactly once
    (raised: without it no record can be read). The reader recovers after a
    malformed record (csv starts afresh on the next line), so bad records can be skipped.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column's name
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ClassifyFormatError(path, line, None, f"not valid UTF-8 (byte {err.start} of the file)",
                                  config_field=config_field) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problem = f"not valid CSV ({err})"
            if header is None:
                raise ClassifyFormatError(path, start, None, problem, config_field=config_field) from None
            yield start, ClassifyFormatError(path, start, None, problem, config_field=config_field)
            continue
        if not row:  # a blank line
            continue
        if header is None:
            header = row
            for name in (text_field, label_field):
                if header.count(name) != 1:
                    problem = "is not a column of" if name not in header else "is twice in"
                    raise ClassifyFormatError(path, start, name, f"{problem} the header row {header}",
                                              config_field=config_field)
            continue
        if len(row) != len(header):
            yield start, ClassifyFormatError(
                path, start, None, f"has {len(row)} field(s), the header row has {len(header)} ({header})",
                config_field=config_field)
            continue
        yield start, dict(zip(header, row))
    if header is None:
        raise ClassifyFormatError(path, 0, None, "is empty: a CSV file needs a header row naming the fields",
                                  config_field=config_field)


def read_examples(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    skip_bad: bool = False,
    config_field: str = PATH_FIELD,
) -> tuple[list[TextExample], BadLineReport]:
    """Read a CSV or JSONL file (by its suffix) into labelled examples, in file order.

    With ``labels`` a label outside them is a bad line. A bad line raises
    ClassifyFormatError; with ``skip_bad`` it is counted in the report instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{config_field}: {str(path)!r} must end in .csv, .jsonl or .json (the format follows "
                         "the suffix)")
    if not path.is_file():
        raise FileNotFoundError(f"{config_field}: classification file {str(path)!r} does not exist")
    known = set(labels) if labels is not None else None
    examples: list[TextExample] = []
    report = BadLineReport()
    if suffix == ".csv":
        records: Iterator[tuple[int, Any]] = _csv_records(path, text_field, label_field, config_field)
    else:
        records = jsonl_records(path)
    for lineno, record in records:
        try:
            if isinstance(record, ClassifyFormatError):
                raise record
            if isinstance(record, str):
                raise ClassifyFormatError(path, lineno, None, record, config_field=config_field)
            example = _text_and_label(record, path, lineno, text_field, label_field, config_field)
            if known is not None and example.label not in known:
                raise ClassifyFormatError(path, lineno, label_field,
                                          f"unknown label {example.label!r} (classify.labels: {list(labels or [])})",
                                          config_field=config_field)
            examples.append(example)
        except ClassifyFormatError as err:
            if not skip_bad:
                raise err from None
            report.add(err)
    if not examples:
        detail = f"; {report.count} bad line(s) skipped, the first: {report.first[0][1]}" if report.count else ""
        raise ClassifyFormatError(path, 0, None, f"holds no examples{detail}", config_field=config_field)
    return examples, report


# ---------------------------------------------------------------- data of a run


def encode_texts(
    tok: Tokenizer, texts: Sequence[str], extract_id: int, block_size: int
) -> tuple[list[list[int]], list[bool]]:
    """Each text's ids plus the extract token, cut to its last block_size tokens; and whether it was cut.

    Literal special-token text inside a text stays text (as in the shards and SFT):
    only the appended id is the extract token.
    """
    ids = [[*e, extract_id] for e in encode_ordinary(tok, texts)]
    return [x[-block_size:] for x in ids], [len(x) > block_size for x in ids]


def build_classify_data(cfg: ClassifyConfig, tok: Tokenizer, extract_id: int, block_size: int) -> ClassifyData:
    """Read, split, resolve the classes, encode and length-check the examples of cfg.path."""
    path = Path(cfg.path)
    examples, report = read_examples(path, text_field=cfg.text_field, label_field=cfg.label_field,
                                     labels=cfg.labels, skip_bad=cfg.skip_bad)
    try:
        train_idx, val_idx = split_indices(len(examples), cfg.val_every, "classification")
    except ValueError as err:
        raise ClassifyFormatError(path, 0, None, str(err)) from None
    train_ex, val_ex = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    labels = list(cfg.labels) if cfg.labels is not None else sorted({e.label for e in train_ex})
    if len(labels) < 2:
        raise ClassifyFormatError(path, 0, cfg.label_field,
                                  f"the training split has the one label {labels}; a classifier needs at least 2")
    known_val: list[TextExample] = []
    for e in val_ex:  # only possible without cfg.labels: the reader checked them against the given ones
        if e.label in labels:
            known_val.append(e)
            continue
        unseen = ClassifyFormatError(path, e.line, cfg.label_field,
                                     f"label {e.label!r} does not occur in the training split (labels: {labels})")
        if not cfg.skip_bad:
            raise unseen
        report.add(unseen)
    val_ex = known_val
    if not val_ex:
        raise ClassifyFormatError(path, 0, None, "no validation example is left after skipping bad lines")

    index = {label: i for i, label in enumerate(labels)}
    truncated: list[int] = []
    skipped_long: list[int] = []

    def encode(split: list[TextExample]) -> EncodedSet:
        ids, cut = encode_texts(tok, [e.text for e in split], extract_id, block_size)
        kept = EncodedSet([], [], [])
        for e, x, was_cut in zip(split, ids, cut):
            if was_cut:
                (skipped_long if cfg.skip_long else truncated).append(e.line)
                if cfg.skip_long:
                    continue
            kept.ids.append(x)
            kept.targets.append(index[e.label])
            kept.examples.append(e)
        return kept

    train, val = encode(train_ex), encode(val_ex)
    for name, split in (("training", train), ("validation", val)):
        if not len(split):
            raise ClassifyFormatError(path, 0, None, f"the {name} split is empty after skipping "
                                                     f"{len(skipped_long)} text(s) longer than model.block_size="
                                                     f"{block_size} tokens (classify.skip_long)")
    return ClassifyData(train, val, labels, report, sorted(truncated), sorted(skipped_long))
