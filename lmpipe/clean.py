"""Clean stage: a plain list of named steps over the downloaded documents.

Transforms rewrite each document's text; filters decide which documents to
keep. Steps that the config turns off are not in the list at all, so the
printed pipeline and the report show exactly what ran::

    >>> [step.name for step in build_steps(CleanConfig(max_chars=1000))]
    ['normalize_unicode', 'strip_control', 'normalize_whitespace', 'min_chars', 'max_chars', 'dedup']

The stage writes ``documents.parquet`` (same columns as the download, input
order kept) and ``clean_report.json`` with documents and UTF-8 bytes in and
out of every step.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmpipe.config import CleanConfig
from lmpipe.download import DOCUMENTS_FILE, read_documents, write_documents
from lmpipe.stage import BuildOutput, StageResult, run_stage, write_json_atomic

REPORT_FILE = "clean_report.json"
CLEAN_FIELD = "data.clean"  # where PipelineConfig keeps CleanConfig

# Unicode category Cc is exactly C0 (U+0000-U+001F), DEL and C1 (U+007F-U+009F).
# \n separates lines and \t is layout, so both stay; \r is turned into \n first.
# (A regex is ~18x faster here than str.translate with a deletion table.)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
TRAILING_BLANKS = re.compile(r"[ \t]+$", re.MULTILINE)
BLANK_LINE_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Transform:
    """Rewrites every document's text."""

    name: str
    fn: Callable[[str], str]


@dataclass(frozen=True)
class Filter:
    """Answers "keep this document?" for each document, in order.

    It sees the whole list rather than one document so that a stateful filter
    (dedup remembers what it has seen) stays a plain function.
    """

    name: str
    keep: Callable[[list[str]], list[bool]]
    field: str  # the CleanConfig field that controls it, for error messages


Step = Transform | Filter


def strip_control(text: str) -> str:
    """Unify line endings to \\n, then drop control characters other than \\n and \\t."""
    return CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def normalize_whitespace(text: str) -> str:
    """Strip trailing spaces/tabs per line, allow at most one blank line in a row, trim the ends."""
    return BLANK_LINE_RUN.sub("\n\n", TRAILING_BLANKS.sub("", text)).strip()


def dedup_mask(texts: list[str]) -> list[bool]:
    """True for the first occurrence of each exact text (compared by sha256)."""
    seen: set[bytes] = set()
    keep = []
    for t in texts:
        h = hashlib.sha256(t.encode("utf-8")).digest()
        keep.append(h not in seen)
        seen.add(h)
    return keep


def build_steps(cfg: CleanConfig) -> list[Step]:
    """The steps ``cfg`` turns on, in the order they run: transforms, then filters."""
    steps: list[Step] = []
    if cfg.normalization != "none":
        form = cfg.normalization
        steps.append(Transform("normalize_unicode", lambda t: unicodedata.normalize(form, t)))
    if cfg.strip_control:
        steps.append(Transform("strip_control", strip_control))
    if cfg.normalize_whitespace:
        steps.append(Transform("normalize_whitespace", normalize_whitespace))
    if cfg.min_chars > 0:
        lo = cfg.min_chars
        steps.append(Filter("min_chars", lambda texts: [len(t) >= lo for t in texts], "min_chars"))
    if cfg.max_chars is not None:
        hi = cfg.max_chars
        steps.append(Filter("max_chars", lambda texts: [len(t) <= hi for t in texts], "max_chars"))
    if cfg.dedup:
        steps.append(Filter("dedup", dedup_mask, "dedup"))
    return steps


def _utf8_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def apply_steps(steps: list[Step], ids: list[str], texts: list[str], sources: list[str]
                ) -> tuple[list[str], list[str], list[str], list[dict]]:
    """Run the steps in order; return the surviving columns and one report row per step."""
    rows = []
    bytes_in = _utf8_bytes(texts)
    for step in steps:
        docs_in = len(texts)
        if isinstance(step, Transform):
            texts = [step.fn(t) for t in texts]
        else:
            keep = step.keep(texts)
            ids, texts, sources = [[x for x, k in zip(col, keep) if k] for col in (ids, texts, sources)]
        bytes_out = _utf8_bytes(texts)
        rows.append({"step": step.name, "docs_in": docs_in, "docs_out": len(texts),
                     "bytes_in": bytes_in, "bytes_out": bytes_out})
        bytes_in = bytes_out
    return ids, texts, sources, rows


class EmptyCorpusError(ValueError):
    """Cleaning removed every document."""


def _empty_message(corpus_field: str, clean_field: str, steps: list[Step], rows: list[dict],
                   cfg: CleanConfig, docs_in: int) -> str:
    if docs_in == 0:
        return f"{corpus_field}: the download produced no documents; check {corpus_field}.sources"
    removed = ", ".join(f"{r['step']} {r['docs_in'] - r['docs_out']}" for r in rows if r["docs_in"] != r["docs_out"])
    culprits = [s for s, r in zip(steps, rows) if isinstance(s, Filter) and r["docs_in"] != r["docs_out"]]
    hints = " or ".join(f"{clean_field}.{s.field} (now {getattr(cfg, s.field)!r})" for s in culprits)
    return (
        f"{corpus_field}: no document survived cleaning ({docs_in} in; removed per step: {removed}). "
        f"Relax {hints}, or check that {corpus_field}.sources hold the text you expect."
    )


def run_clean(cfg: CleanConfig, docs: StageResult, out_dir: str | Path, fingerprint: str, *,
              corpus_field: str, clean_field: str = CLEAN_FIELD) -> StageResult:
    """Clean the documents of a download stage into ``documents.parquet`` and ``clean_report.json``.

    corpus_field: the corpus's config path (e.g. "data.pretrain"), for error messages.
    """
    steps = build_steps(cfg)

    def build(tmp: Path) -> BuildOutput:
        table = read_documents(docs.path(DOCUMENTS_FILE))
        ids, texts, sources = (table.column(c).to_pylist() for c in ("id", "text", "source"))
        docs_in, bytes_in = len(texts), _utf8_bytes(texts)
        ids, texts, sources, rows = apply_steps(steps, ids, texts, sources)
        if not texts:
            raise EmptyCorpusError(_empty_message(corpus_field, clean_field, steps, rows, cfg, docs_in))

        totals = {"docs_in": docs_in, "docs_out": len(texts), "bytes_in": bytes_in, "bytes_out": _utf8_bytes(texts)}
        write_documents(tmp / DOCUMENTS_FILE, ids, texts, sources)
        write_json_atomic(tmp / REPORT_FILE, {"corpus_field": corpus_field, "steps": rows, "totals": totals})
        metrics = {k: float(v) for k, v in totals.items()}
        for r in rows:
            metrics[f"{r['step']}.docs_removed"] = float(r["docs_in"] - r["docs_out"])
            metrics[f"{r['step']}.bytes_removed"] = float(r["bytes_in"] - r["bytes_out"])
        return BuildOutput(metrics=metrics, meta={"report": rows})

    return run_stage("clean", fingerprint, out_dir, build)
