"""Cutting plain text into documents: one per file, per line, per blank-line paragraph, or per WikiText title."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from lmpipe.data.sources import COPY_BYTES

# A WikiText article starts at " = Title = "; sections are " = = Section = = ".
WIKITEXT_TITLE = re.compile(r"^\s*= (?!=)(.*\S) =\s*$")
# Only these end a line; str.splitlines would also split on \x0c, \x1c, \u2028, ...
LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
LINE_END = re.compile(r"(?:\r\n|\r|\n)\Z")


def utf8_error(raw: bytes, err: UnicodeDecodeError, base: int) -> str:
    return f"not valid UTF-8: byte 0x{raw[err.start]:02x} at offset {base + err.start} ({err.reason})"


# ---------------------------------------------------------------------------
# byte streams: hashing, decompression, lines


def _lines(text: str) -> list[str]:
    """Lines with their line endings; ''.join(_lines(t)) == t."""
    return LINE.findall(text)


def _blank(s: str) -> bool:
    return not s.strip()


@dataclass(slots=True)
class _Line:
    text: str  # with its line ending
    number: int  # 1-based line number in the file
    error: str | None = None  # why the line is not valid UTF-8 (its text then holds U+FFFD)


@dataclass(slots=True)
class _Piece:
    text: str
    error: str | None = None  # the first UTF-8 error in it, if any
    error_line: int | None = None  # and the line it is on


class _Run:
    """Lines gathering into one document: only their text is kept, plus the first UTF-8 error."""

    __slots__ = ("texts", "error", "error_line")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.error: str | None = None
        self.error_line: int | None = None

    def add(self, line: _Line) -> None:
        self.texts.append(line.text)
        if line.error is not None and self.error is None:
            self.error, self.error_line = line.error, line.number

    def take(self, strip_end: bool = False) -> _Piece:
        text = "".join(self.texts)
        piece = _Piece(LINE_END.sub("", text) if strip_end else text, self.error, self.error_line)
        self.__init__()  # type: ignore[misc]
        return piece


def _pieces(lines: Iterable[_Line], boundary: str) -> Iterator[_Piece]:
    """Cut a stream of lines into documents (blank ones included; the caller drops them).

    file: the whole text; line: each line (without its line ending);
    blank_line: runs of non-blank lines (without the final line ending);
    wikitext_title: from each ' = Title = ' line up to the next one, verbatim,
    with any text before the first title as a document of its own.
    A document in progress when the stream raises is lost with it, so a
    truncated file gives only the documents completed before the cut.
    """
    if boundary not in ("file", "line", "blank_line", "wikitext_title"):
        raise ValueError(f"unknown doc_boundary {boundary!r}")
    run = _Run()
    for line in lines:
        if boundary == "line":
            yield _Piece(LINE_END.sub("", line.text), line.error, line.number if line.error else None)
        elif boundary == "blank_line":
            if not _blank(line.text):
                run.add(line)
            elif run.texts:
                yield run.take(strip_end=True)
        else:
            if boundary == "wikitext_title" and run.texts and WIKITEXT_TITLE.match(line.text):
                yield run.take()
            run.add(line)
    if run.texts:
        yield run.take(strip_end=boundary == "blank_line")


def _whole_file(head: bytes, stream: IO[bytes]) -> _Piece:
    """The rest of the stream as one document (doc_boundary 'file'): bytes gathered once, decoded once,
    so a file is held about twice at most, however its lines fall."""
    buf = bytearray(head)
    while block := stream.read(COPY_BYTES):
        buf += block
    skip = len(codecs.BOM_UTF8) if buf.startswith(codecs.BOM_UTF8) else 0
    with memoryview(buf) as whole, whole[skip:] as body:  # no copy of the bytes for the slice
        try:
            return _Piece(str(body, "utf-8"))
        except UnicodeDecodeError as err:
            return _Piece("\ufffd", utf8_error(body, err, skip), buf.count(b"\n", 0, skip + err.start) + 1)


def split_documents(text: str, boundary: str) -> list[str]:
    """Cut plain text into documents by ``boundary`` (see ``_pieces``); whitespace-only pieces are dropped."""
    pieces = _pieces((_Line(t, 0) for t in _lines(text)), boundary)
    return [p.text for p in pieces if not _blank(p.text)]
