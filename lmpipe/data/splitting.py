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


def utf8_error(raw: bytes | memoryview, err: UnicodeDecodeError, base: int) -> str:
    return f"not valid UTF-8: byte 0x{raw[err.start]:02x} at offset {base + err.start} ({err.reason})"


# ---------------------------------------------------------------------------
# byte streams: hashing, decompression, lines


def split_lines(text: str) -> list[str]:
    """Lines with their line endings; ''.join(split_lines(t)) == t."""
    return LINE.findall(text)


def is_blank(s: str) -> bool:
    return not s.strip()


@dataclass(slots=True)
class Line:
    text: str  # with its line ending
    number: int  # 1-based line number in the file
    error: str | None = None  # why the line is not valid UTF-8 (its text then holds U+FFFD)


@dataclass(slots=True)
class Piece:
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

    def add(self, line: Line) -> None:
        self.texts.append(line.text)
        if line.error is not None and self.error is None:
            self.error, self.error_line = line.error, line.number

    def take(self, strip_end: bool = False) -> Piece:
        text = "".join(self.texts)
        piece = Piece(LINE_END.sub("", text) if strip_end else text, self.error, self.error_line)
        self.__init__()  # type: ignore[misc]
        return piece


def document_pieces(lines: Iterable[Line], boundary: str) -> Iterator[Piece]:
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
            yield Piece(LINE_END.sub("", line.text), line.error, line.number if line.error else None)
        elif boundary == "blank_line":
            if not is_blank(line.text):
                run.add(line)
            elif run.texts:
                yield run.take(strip_end=True)
        else:
            if boundary == "wikitext_title" and run.texts and WIKITEXT_TITLE.match(line.text):
                yield run.take()
            run.add(line)
    if run.texts:
        yield run.take(strip_end=boundary == "blank_line")


def whole_file_piece(head: bytes, stream: IO[bytes]) -> Piece:
    """The rest of the stream as one document (doc_boundary 'file'): bytes gathered once, decoded once,
    so a file is held about twice at most, however its lines fall."""
    buf = bytearray(head)
    while block := stream.read(COPY_BYTES):
        buf += block
    skip = len(codecs.BOM_UTF8) if buf.startswith(codecs.BOM_UTF8) else 0
    with memoryview(buf) as whole, whole[skip:] as body:  # no copy of the bytes for the slice
        try:
            return Piece(str(body, "utf-8"))
        except UnicodeDecodeError as err:
            return Piece("\ufffd", utf8_error(body, err, skip), buf.count(b"\n", 0, skip + err.start) + 1)


def split_documents(text: str, boundary: str) -> list[str]:
    """Cut plain text into documents by ``boundary`` (see ``document_pieces``); whitespace-only pieces are dropped."""
    pieces = document_pieces((Line(t, 0) for t in split_lines(text)), boundary)
    return [p.text for p in pieces if not is_blank(p.text)]
