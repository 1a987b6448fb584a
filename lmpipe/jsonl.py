"""The one reader of users' JSONL files: SFT examples, benchmarks, classification data.

Each reader reports a bad line alike and can skip and count it, so this yields
a problem for a line instead of raising.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield lineno, f"not valid UTF-8 (byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield lineno, f"not valid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict):
                yield lineno, f"expected {expected}, got {type(obj).__name__}"
                continue
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as err:
                yield lineno, f"a string holds a lone surrogate escape (\\u{ord(err.object[err.start]):04x}), not text"
                continue
            yield lineno, obj
