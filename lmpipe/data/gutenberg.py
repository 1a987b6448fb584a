"""Project Gutenberg boilerplate: the header and the licence cut from a source file before it becomes documents.

A Project Gutenberg file is a header (title, release date, credits) ending in a
``*** START OF THE PROJECT GUTENBERG EBOOK <title> ***`` line, the book, and an
``*** END OF THE PROJECT GUTENBERG EBOOK <title> ***`` line followed by the
licence (about 18 KB). The cut must see the whole file: once the file is split
into paragraphs or lines, the header's and the licence's pieces look like any
others. So the download stage cuts each text file (and each record of a JSON
lines, parquet or Hub source, where a record is a whole book) here, before
``doc_boundary`` splits it, and records what it cut (:class:`GutenbergCut`).

The header is looked for in the first :data:`HEADER_WINDOW` characters of a
file (whole lines), so a file is streamed with at most that much held back; a
file whose header ends later keeps it. The last start marker in the window
wins (old files carry the small-print header and then a START line); the
licence is cut from the first end marker after the header. Text without
markers is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lmpipe.data.documents import utf8_len
from lmpipe.data.splitting import Line

STEP = "gutenberg_boilerplate"  # the CleanConfig field that switches the cut on, and its name in the reports
HEADER_WINDOW = 1 << 18  # characters (whole lines) searched for the header's end

# Markers, each matched at the start of a line, case-insensitively.
# Header ends: "*** START OF THE/THIS PROJECT GUTENBERG EBOOK <title> ***" (the title may wrap onto
# the next lines; the cut goes through the line with the closing ***), and the older
# "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*".
_START = re.compile(
    r"^[ \t]*\*+[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|^[ \t]*(?P<small>\*END\*[ \t]*THE SMALL PRINT)",
    re.IGNORECASE | re.MULTILINE,
)
# Licence starts: "*** END OF THE/THIS PROJECT GUTENBERG EBOOK ..." and the older
# "End of the Project Gutenberg EBook of <title>" / "End of Project Gutenberg's <title>".
_END = re.compile(
    r"^[ \t]*\*+[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|^[ \t]*End of (?:the |this )?Project Gutenberg(?:'s|’s)?\b",
    re.IGNORECASE | re.MULTILINE,
)
_START_MARKER_SPAN = 500  # how far a wrapped "*** START ... ***" title may reach for its closing ***
_MARKER_CHARS = 120  # of a marker line, quoted in the reason


def _mentions_gutenberg(text: str) -> bool:
    return "utenberg" in text or "UTENBERG" in text or "SMALL PRINT" in text


def _line_end(text: str, pos: int) -> int:
    """Index just past the line that contains pos (past its \\n), or len(text)."""
    nl = text.find("\n", pos)
    return len(text) if nl < 0 else nl + 1


def header_end(text: str) -> int:
    """Where the text after the header starts: just past the line that closes the last start marker; 0 if none."""
    if not _mentions_gutenberg(text):
        return 0
    start = 0
    for m in _START.finditer(text):
        close = m.end()
        if m.group("small") is None:  # look for the closing *** before the next blank line
            blank = text.find("\n\n", close, close + _START_MARKER_SPAN)
            found = text.find("***", close, blank if blank >= 0 else close + _START_MARKER_SPAN)
            close = found if found >= 0 else close
        start = _line_end(text, close)
    return start


def is_licence_start(line: str) -> bool:
    """Whether ``line`` is an end marker: the licence starts with it."""
    return _mentions_gutenberg(line) and _END.match(line) is not None


def _marker(line: str) -> str:
    line = line.strip()
    return line if len(line) <= _MARKER_CHARS else line[:_MARKER_CHARS] + "..."


@dataclass
class GutenbergCut:
    """What was cut from one file (summed over its records for JSON lines, parquet and Hub sources)."""

    file: str
    header_bytes: int = 0  # UTF-8 bytes of the header, through its last marker line
    licence_bytes: int = 0  # from the end marker line to the end
    header_through: str | None = None  # the marker line that closes the header (of the first record cut)
    header_line: int | None = None  # its 1-based line number (text files)
    licence_from: str | None = None
    licence_line: int | None = None

    @property
    def bytes_removed(self) -> int:
        return self.header_bytes + self.licence_bytes

    def reason(self) -> str:
        parts = []
        if self.header_bytes:
            at = f" line {self.header_line}" if self.header_line is not None else ""
            parts.append(f"header {self.header_bytes} bytes, through{at} {self.header_through!r}")
        if self.licence_bytes:
            at = f" line {self.licence_line}" if self.licence_line is not None else ""
            parts.append(f"licence {self.licence_bytes} bytes, from{at} {self.licence_from!r}")
        return f"{STEP}: " + "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {"step": STEP, "file": self.file, "bytes_removed": self.bytes_removed,
                "header_bytes": self.header_bytes, "licence_bytes": self.licence_bytes, "reason": self.reason()}

    def cut_text(self, text: str, *, numbered: bool = False) -> str:
        """``text`` (a whole file, or a record) without its header and licence; the cut is added to this record.
        numbered: the text is a whole file, so the reason gives the markers' line numbers."""
        start = header_end(text[:_line_end(text, HEADER_WINDOW - 1)])
        end_match = _END.search(text, start) if _mentions_gutenberg(text) else None
        end = end_match.start() if end_match else len(text)
        if start == 0 and end == len(text):
            return text
        if start and self.header_through is None:
            self.header_through = _marker(text[text.rfind("\n", 0, start - 1) + 1:start])
            self.header_line = text.count("\n", 0, start) if numbered else None
        if end_match and self.licence_from is None:
            self.licence_from = _marker(text[end:_line_end(text, end)])
            self.licence_line = text.count("\n", 0, end) + 1 if numbered else None
        self.header_bytes += utf8_len(text[:start])
        self.licence_bytes += utf8_len(text[end:])
        return text[start:end]

    def cut_lines(self, lines: Iterable[Line]) -> Iterator[Line]:
        """The lines of a text file without its header and licence, streamed: only the first HEADER_WINDOW
        characters are held back until the header's end is known."""
        rest = iter(lines)
        head: list[Line] = []
        size = 0
        for line in rest:
            head.append(line)
            size += len(line.text)
            if size >= HEADER_WINDOW:
                break
        start = header_end("".join(line.text for line in head))
        pos = 0
        for i, line in enumerate(head):
            if pos < start:  # the header ends at a line end, so a line is wholly in it or wholly after it
                pos += len(line.text)
                self.header_bytes += utf8_len(line.text)
                self.header_through, self.header_line = _marker(line.text), line.number
            elif is_licence_start(line.text):
                self._licence(line, head[i + 1:], rest)
                return
            else:
                yield line
        for line in rest:  # every line of a book passes here: the cheap test first, inline
            if ("utenberg" in line.text or "UTENBERG" in line.text) and _END.match(line.text):
                self._licence(line, [], rest)
                return
            yield line

    def _licence(self, first: Line, *more: Iterable[Line]) -> None:
        """Count the licence: ``first`` (its end marker line) and every line after it, read to the file's end."""
        self.licence_from, self.licence_line = _marker(first.text), first.number
        self.licence_bytes += utf8_len(first.text)
        for lines in more:
            self.licence_bytes += sum(utf8_len(line.text) for line in lines)


def strip_gutenberg(text: str) -> str:
    """``text`` without a Project Gutenberg header and licence (see :meth:`GutenbergCut.cut_text`)."""
    return GutenbergCut("").cut_text(text)
