"""A held-out next-line benchmark from the documents a corpus source leaves unread.

Every byte of the bundled corpora is trained on by the demo, so a benchmark
cut from them would measure memorisation. A source's ``max_bytes`` stops the
download stage at the first document that would go over it (``lmpipe.data.reader``);
the documents from there on are never read by any stage. ``make_cloze`` turns
such held-out documents into multiple-choice items in HellaSwag's shape, which
``lmpipe.eval.benchmark_files`` scores like any HellaSwag file:

- a document qualifies when it has at least three lines, its third at least
  ``MIN_ENDING_CHARS`` characters (for Tiny Shakespeare: a speaker line and
  at least two lines of the speech);
- ``ctx`` is its first two lines (the speaker and the speech's first line), the
  gold ending its third line;
- the other endings are third lines of other qualifying documents, all
  different from the gold one and from each other;
- which documents become items, which endings they get and where the gold one
  goes are decided by sha256 of (seed, item, ...), not by a random-number
  generator, so the file is the same on every machine and Python version.

A model that learned the corpus's style and speakers should prefer the true
next line; chance is ``1 / n_endings``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.data.documents import utf8_len
from lmpipe.data.splitting import split_documents

MIN_ENDING_CHARS = 12


def _rank(seed: int, *parts: object) -> int:
    """A stable pseudo-random integer for (seed, parts): sha256, so the same everywhere."""
    key = ":".join(str(p) for p in (seed, *parts)).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def held_out_documents(text: str, boundary: str, max_bytes: int, *,
                       source: str = "the text") -> tuple[int, list[str]]:
    """(index of the first unread document, all documents) of a text source read with ``max_bytes``.

    The same rule as the download stage: documents are taken while their UTF-8
    bytes add up to at most ``max_bytes``; reading stops at the first one that
    would go over. A ``max_bytes`` that reads every document leaves nothing held
    out, which is a ValueError naming the option, its value and the size of
    ``source`` (the file's name, for the message) rather than an empty benchmark.
    """
    docs = split_documents(text, boundary)
    total = 0
    for i, doc in enumerate(docs):
        total += utf8_len(doc)
        if total > max_bytes:
            return i, docs
    raise ValueError(f"--max-bytes {max_bytes} reads every document of {source} ({len(docs)} documents, {total} "
                     f"bytes of its {utf8_len(text)}): none is left unread to make items from; give the max_bytes "
                     f"of a source that stops before the end (below {total})")


def make_cloze(documents: Sequence[str], *, n_items: int, n_endings: int = 4, seed: int = 0,
               first_index: int = 0) -> list[dict[str, Any]]:
    """HellaSwag-shaped items from ``documents`` (see the module docstring), in document order.

    ``first_index`` is the index of ``documents[0]`` in its source, recorded in each
    item's ``doc`` field. Raises ValueError when fewer than ``n_items`` documents
    qualify or fewer than ``n_endings`` distinct endings exist.
    """
    if n_endings < 2:
        raise ValueError(f"n_endings must be at least 2, got {n_endings}")
    eligible: list[tuple[int, str, str]] = []  # (document index, ctx, ending)
    for i, doc in enumerate(documents):
        lines = doc.split("\n")
        if len(lines) >= 3 and len(lines[2].strip()) >= MIN_ENDING_CHARS:
            eligible.append((first_index + i, lines[0] + "\n" + lines[1], lines[2].strip()))
    endings = sorted({e for _, _, e in eligible})
    if len(eligible) < n_items or len(endings) < n_endings:
        raise ValueError(f"{len(eligible)} documents qualify (at least 3 lines, the third of at least "
                         f"{MIN_ENDING_CHARS} characters) with {len(endings)} distinct endings; "
                         f"{n_items} items of {n_endings} endings were asked for")
    chosen = sorted(sorted(range(len(eligible)), key=lambda j: _rank(seed, "item", j))[:n_items])
    items: list[dict[str, Any]] = []
    for j in chosen:
        doc_index, ctx, gold = eligible[j]
        others = sorted((e for e in endings if e != gold), key=lambda e: _rank(seed, "ending", doc_index, e))
        choices = others[: n_endings - 1]
        label = _rank(seed, "label", doc_index) % n_endings
        choices.insert(label, gold)
        items.append({"ctx": ctx, "endings": choices, "label": label, "doc": doc_index})
    return items


def write_cloze(items: list[dict[str, Any]], dest: Path) -> Path:
    """Write the items as JSONL, atomically (a temporary file renamed over ``dest``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    os.replace(tmp, dest)
    return dest
