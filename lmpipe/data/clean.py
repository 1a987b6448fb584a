"""Clean stage: a plain list of named steps, run chunk by chunk, then de-duplicated over the whole corpus.

Transforms rewrite each document's text; filters decide which documents to
keep. A step that rewrites a document and leaves it blank, or shorter than
``min_chars`` when it was not before, removes it under its own name (a C4 line
filter that keeps no line, a licence cut that leaves a fragment). The last two
steps (exact and MinHash de-duplication) need the whole corpus and run in the
reducer. Steps that the config turns off are not in the
list at all, so the printed pipeline and the report show exactly what ran::

    >>> [step.name for step in build_steps(CleanConfig(max_chars=1000))]
    ['normalize_unicode', 'strip_control', 'normalize_whitespace', 'min_chars', 'max_chars', 'dedup']

Two stages, so chunks can be cleaned in parallel (one Prefect task each):

- ``run_clean_chunk``: one download chunk through the per-document steps, into
  ``kept.parquet``, ``removed.parquet``, ``stats.json`` and the signatures the
  de-duplication needs (``exact.npy``, ``minhash.npy``);
- ``run_clean``: the reducer. It finds duplicates from the signatures alone
  (lmpipe.data.dedup), then streams the chunks once more into the final document
  set (``documents/part-NNNNNN.parquet`` + ``documents.json``, chunk i from
  download chunk i), ``removed.parquet`` (every dropped document with its step
  and reason) and ``clean_report.json`` (documents and UTF-8 bytes in and out
  of every step, and sample removals).

Output depends only on the chunks' content and their order in the list, never
on which process built them or when.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from lmpipe.config.data import CleanConfig
from lmpipe.data import documents as docset
from lmpipe.data import filters, transforms
from lmpipe.data.splitting import is_blank

REPORT_FILE = "clean_report.json"
REMOVED_FILE = "removed.parquet"
KEPT_FILE = "kept.parquet"
STATS_FILE = "stats.json"
EXACT_FILE = "exact.npy"
MINHASH_FILE = "minhash.npy"
LANGUAGES_FILE = "languages.npy"  # per survivor: its language's index in the chunk stats' "language_labels"
STATS_FORMAT_VERSION = 1
CLEAN_FIELD = "data.clean"  # where PipelineConfig keeps CleanConfig
BATCH_DOCS = 1024  # documents per batch through the steps: bounds memory besides the chunk's survivors
EXCERPT_CHARS = 300

REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("step", pa.string()),
                            ("reason", pa.string()), ("bytes", pa.int64()), ("excerpt", pa.string())])
ROW_KEYS = ("docs_in", "docs_out", "bytes_in", "bytes_out")

# Unicode category Cc is exactly C0 (U+0000-U+001F), DEL and C1 (U+007F-U+009F).
# \n separates lines and \t is layout, so both stay; \r is turned into \n first.
# (A regex is ~18x faster here than str.translate with a deletion table.)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
TRAILING_BLANKS = re.compile(r"[ \t]+$", re.MULTILINE)
BLANK_LINE_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Transform:
    """Rewrites every document's text (a document it leaves empty or too short is removed, see _ChunkState)."""

    name: str
    fn: Callable[[str], str]
    field: str  # the CleanConfig field (or section) that controls it, for error messages


@dataclass(frozen=True)
class Filter:
    """Judges one document: returns its (possibly rewritten) text and None to keep it, or a reason to drop it.

    The reason starts with the step's name ("min_chars: 0 chars < 1") so it reads on its own in
    removed.parquet.
    """

    name: str
    fn: Callable[..., tuple[str, str | None]]  # (text) or, with by_language, (text, language)
    field: str  # the CleanConfig field (or section) that controls it, for error messages
    by_language: bool = False  # its rules depend on the document's language (None when language id is off)


@dataclass(frozen=True)
class LanguageStep(Filter):
    """The language id filter: it also labels each document with its language, for the later filters and the report."""

    @property
    def identifier(self) -> filters.LanguageFilter:
        assert isinstance(self.fn, filters.LanguageFilter)
        return self.fn


@dataclass(frozen=True)
class Dedup:
    """A step over the whole corpus, run by the reducer from the chunks' signatures."""

    name: str
    field: str


Step = Transform | Filter | Dedup


def strip_control(text: str) -> str:
    """Unify line endings to \\n, then drop control characters other than \\n and \\t."""
    return CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def normalize_whitespace(text: str) -> str:
    """Strip trailing spaces/tabs per line, allow at most one blank line in a row, trim the ends."""
    return BLANK_LINE_RUN.sub("\n\n", TRAILING_BLANKS.sub("", text)).strip()


@dataclass(frozen=True)
class MinChars:
    """Drop documents shorter than ``limit`` characters (a class, not a lambda, so steps pickle)."""

    limit: int

    def __call__(self, text: str) -> tuple[str, str | None]:
        return text, None if len(text) >= self.limit else f"min_chars: {len(text)} chars < {self.limit}"


@dataclass(frozen=True)
class MaxChars:
    """Drop documents longer than ``limit`` characters."""

    limit: int

    def __call__(self, text: str) -> tuple[str, str | None]:
        return text, None if len(text) <= self.limit else f"max_chars: {len(text)} chars > {self.limit}"


@dataclass(frozen=True)
class NormalizeUnicode:
    form: Literal["NFC", "NFKC"]

    def __call__(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


def build_steps(cfg: CleanConfig) -> list[Step]:
    """The steps ``cfg`` turns on, in the order they run.

    Transforms first, then filters, then PII masking (last, so filters judge the text as written),
    then the corpus-wide de-duplication.
    """
    steps: list[Step] = []
    if cfg.fix_text:
        steps.append(Transform("fix_text", transforms.fix_text, "fix_text"))
    if cfg.normalization != "none":
        steps.append(Transform("normalize_unicode", NormalizeUnicode(cfg.normalization), "normalization"))
    if cfg.strip_control:
        steps.append(Transform("strip_control", strip_control, "strip_control"))
    # cfg.gutenberg_boilerplate is no step here: the download stage cuts it from each file before splitting it
    # into documents (lmpipe.data.gutenberg), and the clean report shows it first (``before_split``).
    if cfg.normalize_whitespace:
        steps.append(Transform("normalize_whitespace", normalize_whitespace, "normalize_whitespace"))
    if cfg.min_chars > 0:
        steps.append(Filter("min_chars", MinChars(cfg.min_chars), "min_chars"))
    if cfg.max_chars is not None:
        steps.append(Filter("max_chars", MaxChars(cfg.max_chars), "max_chars"))
    if cfg.language.enabled:
        steps.append(LanguageStep("language", filters.LanguageFilter(cfg.language), "language"))
    sections: list[tuple[str, Any, Callable[[Any], Callable[..., tuple[str, str | None]]]]] = [
        ("gopher_repetition", cfg.gopher_repetition, filters.GopherRepetition),
        ("gopher_quality", cfg.gopher_quality, filters.GopherQuality),
        ("c4", cfg.c4, filters.C4Filter),
    ]
    steps += [Filter(name, make(section), name, by_language=True) for name, section, make in sections
              if section.enabled]
    if cfg.pii.enabled:
        steps.append(Transform("pii", transforms.PIIMasker(cfg.pii), "pii"))
    if cfg.dedup:
        steps.append(Dedup("dedup", "dedup"))
    if cfg.minhash.enabled:
        steps.append(Dedup("minhash", "minhash"))
    return steps


def _row(name: str) -> dict[str, Any]:
    return {"step": name, "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0}


@dataclass
class _ChunkState:
    """What one chunk's pass through the per-document steps gathers.

    A step that rewrites a document (a transform, or a filter such as C4 that removes lines) also
    removes it, under its own name, when it leaves the document blank, or takes it from at least
    ``min_chars`` characters to fewer: nothing downstream should see an empty document or a fragment
    that the min_chars rule would have dropped. A document that was already blank or short when it
    reached the step is left to the min_chars filter, so a removal is charged to the step that caused it.
    """

    steps: list[Transform | Filter]
    samples_per_step: int
    min_chars: int = 0
    rows: list[dict[str, Any]] = field(init=False)
    kept: dict[str, list] = field(default_factory=lambda: {"id": [], "text": [], "source": []})
    removed: dict[str, list] = field(default_factory=lambda: {k: [] for k in REMOVED_SCHEMA.names})
    samples: dict[str, list[dict[str, str]]] = field(init=False)
    kept_languages: list[str | None] = field(default_factory=list)  # per survivor (None: language id is off)
    languages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per language: a row like rows'

    def __post_init__(self) -> None:
        self.rows = [_row(s.name) for s in self.steps]
        self.samples = {s.name: [] for s in self.steps}  # any step can remove a document

    def remove(self, step: str, doc_id: str, source: str, reason: str, nbytes: int, text: str) -> None:
        excerpt = text[:EXCERPT_CHARS]
        for key, value in zip(REMOVED_SCHEMA.names, (doc_id, source, step, reason, nbytes, excerpt)):
            self.removed[key].append(value)
        if len(self.samples[step]) < self.samples_per_step:
            self.samples[step].append({"id": doc_id, "reason": reason, "excerpt": excerpt})

    def add_batch(self, ids: list[str], texts: list[str], sources: list[str], nbytes: list[int]) -> None:
        """Run one batch through every step; survivors join ``kept`` in input order."""
        langs: list[str | None] = [None] * len(texts)
        for step, row in zip(self.steps, self.rows):
            row["docs_in"] += len(texts)
            row["bytes_in"] += sum(nbytes)
            if isinstance(step, Transform):
                ids, texts, sources, nbytes, langs = self._rewrite(step, ids, texts, sources, nbytes, langs)
            else:
                ids, texts, sources, nbytes, langs = self._filter(step, ids, texts, sources, nbytes, langs)
            row["docs_out"] += len(texts)
            row["bytes_out"] += sum(nbytes)
        for key, values in (("id", ids), ("text", texts), ("source", sources)):
            self.kept[key].extend(values)
        self.kept_languages.extend(langs)
        for lang, n in zip(langs, nbytes):
            if lang is not None:
                self._language_row(lang)["docs_out"] += 1
                self._language_row(lang)["bytes_out"] += n

    def _language_row(self, lang: str) -> dict[str, Any]:
        if lang not in self.languages:
            self.languages[lang] = {"language": lang, **{key: 0 for key in ROW_KEYS}}
        return self.languages[lang]

    def _rewrite(self, step: Transform, ids: list[str], texts: list[str], sources: list[str], nbytes: list[int],
                 langs: list[str | None]) -> tuple[list[str], list[str], list[str], list[int], list[str | None]]:
        new = [step.fn(t) for t in texts]
        # Most steps return the very same object when nothing changed: no need to look at it again.
        gone = {i: reason for i, (a, b) in enumerate(zip(new, texts))
                if a is not b and (reason := self._shortened(step.name, b, a)) is not None}
        for i, reason in gone.items():
            self.remove(step.name, ids[i], sources[i], reason, nbytes[i], texts[i])
        nbytes = [n if a is b else docset.utf8_len(a) for a, b, n in zip(new, texts, nbytes)]
        if not gone:
            return ids, new, sources, nbytes, langs
        keep = [i for i in range(len(new)) if i not in gone]
        return ([ids[i] for i in keep], [new[i] for i in keep], [sources[i] for i in keep], [nbytes[i] for i in keep],
                [langs[i] for i in keep])

    def _filter(self, step: Filter, ids: list[str], texts: list[str], sources: list[str], nbytes: list[int],
                langs: list[str | None]) -> tuple[list[str], list[str], list[str], list[int], list[str | None]]:
        out: tuple[list, list, list, list, list] = ([], [], [], [], [])
        for doc_id, text, source, n, lang in zip(ids, texts, sources, nbytes, langs):
            new: str = text
            if isinstance(step, LanguageStep):
                lang, reason = step.identifier.label(text)
                self._language_row(lang)["docs_in"] += 1
                self._language_row(lang)["bytes_in"] += n
            elif step.by_language:
                new, reason = step.fn(text, lang)
            else:
                new, reason = step.fn(text)
            if reason is None and new is not text:  # a filter that rewrites (C4 removes lines)
                reason = self._shortened(step.name, text, new)
            if reason is not None:
                self.remove(step.name, doc_id, source, reason, n, text)
                continue
            for col, value in zip(out, (doc_id, new, source, n if new is text else docset.utf8_len(new), lang)):
                col.append(value)
        return out

    def _shortened(self, step: str, before: str, after: str) -> str | None:
        """The reason to remove a document that ``step`` rewrote from ``before`` to ``after``, or None."""
        if is_blank(after) and not is_blank(before):
            return f"{step}: emptied the document (had {len(before)} chars)"
        if len(after) < self.min_chars <= len(before):
            return f"{step}: left {len(after)} chars < min_chars {self.min_chars} (had {len(before)})"
        return None
