"""The one reader of users' JSON files: JSONL (SFT examples, benchmarks, classification data) and JSON arrays
of records (SFT examples).

Each reader reports a bad line alike and can skip and count it, so this yields
a problem for a line instead of raising.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def jsonl_records(path: Path, expected: str = "a JSON object", *,
                  array_hint: str = "") -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, object) per non-blank line of a JSONL file, or (line, problem) for a malformed one.

    Lines are 1-based. A line that is not UTF-8, not JSON, not an object, or whose
    strings hold a lone surrogate escape (``"\\ud83d"``: valid JSON, but not text, and
    no tokenizer takes it) yields the problem as a string, and reading goes on. A
    UTF-8 byte order mark before the first line is dropped. The file is read as
    bytes, so one undecodable line is one bad line, not a failed file; the line's
    end is stripped before parsing, so a JSON error's column is that of the line.
    ``expected`` describes an object in the problem of a line that holds something else; ``array_hint``, when
    given, is the problem of a line that holds a JSON array (saying what to do about it).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = parse_jsonl_line(raw, first=lineno == 1, expected=expected, array_hint=array_hint)
            if record is not None:
                yield lineno, record


def parse_jsonl_line(raw: bytes, *, first: bool = False, expected: str = "a JSON object",
                     array_hint: str = "") -> dict[str, Any] | str | None:
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
    if isinstance(obj, list) and array_hint:
        return array_hint
    return record_problem(obj, expected) or obj


def record_problem(obj: Any, expected: str = "a JSON object") -> str | None:
    """What is wrong with one decoded record, or None: not an object, or a string holding a lone surrogate
    escape (``"\\ud83d"``: valid JSON, but not text, and no tokenizer takes it)."""
    if not isinstance(obj, dict):
        return f"expected {expected}, got {type(obj).__name__}"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"a string holds a lone surrogate escape (\\u{ord(err.object[err.start]):04x}), not text"
    return None


def starts_with_array(path: Path) -> bool:
    """Whether the file's first character that is not white space (after a UTF-8 byte order mark) is ``[``: a
    file holding one JSON array rather than JSON lines (whose lines start with ``{``)."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            text = chunk.removeprefix(codecs.BOM_UTF8) if f.tell() == len(chunk) else chunk
            stripped = text.lstrip()
            if stripped:
                return stripped[:1] == b"["
    return False


class JSONArrayError(ValueError):
    """A file that should hold one JSON array of records does not: its ``line`` (1-based) and the ``problem``.
    Unlike a bad record, reading cannot go on past it (the records' boundaries are lost)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line, self.problem = line, problem
        super().__init__(f"line {line}: {problem}")


_NOT_SPACE = re.compile(r"[^ \t\r\n]")  # JSON's white space is these four


class _ArrayText:
    """The text of a file read in chunks, with the line number of a position, for :func:`json_array_records`."""

    def __init__(self, f: Any, chunk_chars: int) -> None:
        self.f, self.chunk_chars = f, chunk_chars
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.carry = 0  # characters of buf[0]'s line dropped from the buffer before it
        self.bytes_read, self.raw_lines = 0, 0  # for the line of an undecodable byte

    def more(self) -> bool:
        """Append the next chunk (at least as much as is buffered, so a long record is re-parsed a few times
        only); False at the end of the file."""
        if self.eof:
            return False
        raw = self.f.read(max(self.chunk_chars, len(self.buf) - self.pos))
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as err:
            at = self.bytes_read + err.start
            raise JSONArrayError(self.raw_lines + raw[: err.start].count(b"\n") + 1,
                                 f"not valid UTF-8 (byte {at} of the file)") from None
        self.bytes_read += len(raw)
        self.raw_lines += raw.count(b"\n")
        if self.pos > self.chunk_chars:  # drop what was read: memory stays about one chunk plus one record
            newline = self.buf.rfind("\n", 0, self.pos)
            self.carry = self.pos - newline - 1 if newline >= 0 else self.carry + self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += text
        return True

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def peek(self) -> str:
        """The next character that is not white space (moving past the white space), or "" at the end."""
        while True:
            found = _NOT_SPACE.search(self.buf, self.pos)
            self.advance(found.start() if found else len(self.buf))
            if found or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def where(self, at: int) -> tuple[int, int]:
        """(line, column) of position ``at``, at or after ``pos``."""
        line = self.line + self.buf.count("\n", self.pos, at)
        newline = self.buf.rfind("\n", 0, at)
        return line, at - newline if newline >= 0 else self.carry + at + 1


def json_array_records(path: Path, expected: str = "a JSON object", *,
                       chunk_chars: int = 1 << 20) -> Iterator[tuple[int, int, dict[str, Any] | str]]:
    """(line, record number, object or problem) per item of a file holding one JSON array, read as a stream.

    Lines and record numbers are 1-based; the line is where the record starts. The
    file is decoded and parsed in chunks of about ``chunk_chars`` characters, so
    memory holds about one chunk and the record being parsed, never the whole text.
    A record that is not an object or holds a lone surrogate escape yields its
    problem, and reading goes on (``record_problem``); a file that is not UTF-8, not
    an array or not valid JSON raises JSONArrayError naming the line, since the
    records after it cannot be found.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        text = _ArrayText(f, chunk_chars)
        if text.peek() != "[":
            raise JSONArrayError(text.line, "expected a JSON array of records ('[' first)")
        text.advance(text.pos + 1)
        number = 0
        while True:
            c = text.peek()
            if not c:
                raise JSONArrayError(text.line, "the file ends inside the array (no closing ']')")
            if c == "]" and number == 0:
                text.advance(text.pos + 1)
                break
            if number:
                if c == "]":
                    text.advance(text.pos + 1)
                    break
                if c != ",":
                    line, col = text.where(text.pos)
                    raise JSONArrayError(line, f"not valid JSON (expected ',' or ']' after record {number} at "
                                               f"column {col})")
                text.advance(text.pos + 1)
                c = text.peek()
            if not c:
                raise JSONArrayError(text.line, "the file ends inside the array (no closing ']')")
            while True:
                try:
                    obj, end = decoder.raw_decode(text.buf, text.pos)
                except json.JSONDecodeError as err:
                    if text.more():  # the record may go on in the next chunk
                        continue
                    line, col = text.where(err.pos)
                    raise JSONArrayError(line, f"not valid JSON ({err.msg} at column {col})") from None
                if end < len(text.buf) or not text.more():  # a number at the buffer's end may go on
                    break
            number += 1
            line = text.line
            text.advance(end)
            yield line, number, record_problem(obj, expected) or obj
        if text.peek():
            line, col = text.where(text.pos)
            raise JSONArrayError(line, f"not valid JSON (data after the array's closing ']' at column {col})")


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
