"""The one reader of users' JSONL files: SFT examples, benchmarks, classification data.

Each reader reports a bad line alike and can skip and count it, so this yields
a problem for a line instead of raising.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def jsonl_records(path: Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, object) per non-blank line of a JSONL file, or (line, problem) for a malformed one.

    Lines are 1-based. A line that is not UTF-8, not JSON, not an object, or whose
    strings hold a lone surrogate escape (``"\\ud83d"``: valid JSON, but not text, and
    no tokenizer takes it) yields the problem as a string, and reading goes on. A
    UTF-8 byte order mark before the first line is dropped. The file is read as
    bytes, so one undecodable line is one bad line, not a failed file; the line's
    end is stripped before parsing, so a JSON error's column is that of the line.
    ``expected`` describes an object in the problem of a line that holds something else.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = parse_jsonl_line(raw, first=lineno == 1, expected=expected)
            if record is not None:
                yield lineno, record


def parse_jsonl_line(raw: bytes, *, first: bool = False,
                     expected: str = "a JSON object") -> dict[str, Any] | str | None:
    """One line of a JSONL file (its end included or not): the object, the problem as a string (see
    ``jsonl_records``), or None for a blank line. ``first``: a UTF-8 byte order mark is dropped."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte {err.start})"
    if not line.strip():
        return None
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return f"expected {expected}, got {type(obj).__name__}"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"a string holds a lone surrogate escape (\\u{ord(err.object[err.start]):04x}), not text"
    return obj


def read_jsonl_objects(path: Path, what: str) -> list[dict[str, Any]]:
    """Every object of a JSONL file lmpipe wrote itself (a stage's metrics.jsonl); a bad line is a
    ValueError naming the file and the line, since such a file is never hand-edited."""
    rows = []
    for lineno, record in jsonl_records(path):
        if isinstance(record, str):
            raise ValueError(f"{what} {path}:{lineno}: {record}; the file is damaged")
        rows.append(record)
    return rows


MAX_REPORTED_BAD = 5  # bad lines quoted in a BadLineReport (all of them are counted)


class BenchmarkFormatError(ValueError):
    """A line of a benchmark file is not valid JSON, lacks a field, or has a field of the wrong shape.

    ``line`` is 1-based (0 for the file as a whole); ``field`` is None when the line as a whole is bad
    (not JSON, not an object).
    """

    def __init__(self, path: Path, line: int, field: str | None, problem: str, *, where: str = "") -> None:
        self.path, self.line, self.field, self.problem = path, line, field, problem
        at = f"{path}:{line}" if line else str(path)  # line 0: the file as a whole
        message = f"{at}: {problem}" if field is None else f"{at}: field {field!r}: {problem}"
        super().__init__(f"{where}: {message}" if where else message)  # where: the config entry, if known


@dataclass
class BadLineReport:
    """Lines skipped by ``load_benchmark(skip_bad=True)``: how many, and the first few (line, message)."""

    count: int = 0
    first: list[tuple[int, str]] = field(default_factory=list)

    def add(self, err: BenchmarkFormatError) -> None:
        self.count += 1
        if len(self.first) < MAX_REPORTED_BAD:
            self.first.append((err.line, str(err)))
