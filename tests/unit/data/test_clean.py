"""Clean stage: each step on crafted text, chunk tasks and the reducer's exact counts, dedup, real WikiText."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmpipe.artifacts import StageResult
from lmpipe.config.data import (
    C4Config,
    CleanConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    MinHashConfig,
    PIIConfig,
)
from lmpipe.data import documents as docset
from lmpipe.data.clean import (
    CONTROL_CHARS,
    EXACT_FILE,
    KEPT_FILE,
    MINHASH_FILE,
    REMOVED_FILE,
    REPORT_FILE,
    STATS_FILE,
    build_steps,
    normalize_whitespace,
    strip_control,
)
from lmpipe.data.dedup import exact_hashes, minhash_signatures
from lmpipe.data.splitting import split_documents
from lmpipe.stages.clean import EmptyCorpusError, Removals, run_clean, run_clean_chunk, why_removed
from lmpipe.stages.contract import partial_dir
from tests.conftest import DATA, REPO

REPO = REPO
OFF = dict(normalization="none", strip_control=False, normalize_whitespace=False, min_chars=0, dedup=False)
MINHASH = MinHashConfig(enabled=True)  # 5-word shingles, 112 permutations, threshold 0.8


# ---------------------------------------------------------------------------
# helpers: a download's chunks, every chunk task, then the reducer


def write_chunks(root: Path, parts: list[list[str]]) -> list[Path]:
    """Download-style chunk files holding these texts; ids t/0/<n> numbered across chunks, source 'mem'."""
    files, n = [], 0
    for i, texts in enumerate(parts):
        path = root / docset.chunk_name(i)
        docset.write_documents(path, [f"t/0/{n + k}" for k in range(len(texts))], texts, ["mem"] * len(texts))
        files.append(path)
        n += len(texts)
    return files


def clean_files(root: Path, files: list[Path], cfg: CleanConfig, order: list[int] | None = None) -> StageResult:
    """run_clean_chunk for every file (in ``order``), then run_clean over the results in corpus order."""
    results: list[StageResult | None] = [None] * len(files)
    for i in order if order is not None else range(len(files)):
        results[i] = run_clean_chunk(cfg, files[i], root / f"chunk-{i}", f"fp{i}")
    return run_clean(cfg, results, root / "out", "fp", corpus_field="data.pretrain")


def clean(tmp_path: Path, parts: list[list[str]], name: str = "clean", **cfg) -> StageResult:
    root = tmp_path / name
    return clean_files(root, write_chunks(root / "download", parts), CleanConfig(**cfg))


def documents(result: StageResult) -> dict[str, list[str]]:
    """The final document set, all chunks in order."""
    out: dict[str, list[str]] = {"id": [], "text": [], "source": []}
    for batch in docset.iter_document_batches(result.out_dir, 1000, columns=docset.DOCUMENT_COLUMNS):
        for key in out:
            out[key] += batch[key]
    return out


def removed(result: StageResult) -> list[dict]:
    return pq.read_table(result.path(REMOVED_FILE)).to_pylist()


def words(rng: random.Random, n: int = 200) -> list[str]:
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


# ---------------------------------------------------------------------------
# steps one by one


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("NFC", ["\u00e9t\u00e9", "\ufb01ne", "\u2460 x\u00b2"]),  # composes accents, keeps compatibility characters
        ("NFKC", ["\u00e9t\u00e9", "fine", "1 x2"]),  # also folds the ligature, circled digit, superscript
        ("none", ["e\u0301te\u0301", "\ufb01ne", "\u2460 x\u00b2"]),
    ],
)
def test_unicode_normalization(tmp_path, form, expected):
    result = clean(tmp_path, [["e\u0301te\u0301", "\ufb01ne"], ["\u2460 x\u00b2"]], **{**OFF, "normalization": form})
    assert documents(result)["text"] == expected
    if form == "none":
        assert result.meta["report"] == []
    else:
        # é is 2 bytes composed and 3 decomposed; ﬁ 3 bytes vs "fi" 2, ① 3 vs "1" 1, ² 2 vs "2" 1.
        bytes_out = {"NFC": 5 + 5 + 7, "NFKC": 5 + 4 + 4}[form]
        assert result.meta["report"] == [
            {"step": "normalize_unicode", "docs_in": 3, "docs_out": 3, "bytes_in": 7 + 5 + 7, "bytes_out": bytes_out}
        ]


def test_strip_control():
    assert strip_control("a\x00b\x07c\td\r\ne\rf\x7fg\x85h\u200bi\n") == "abc\td\ne\nfgh\u200bi\n"
    assert strip_control("\r\n\r\r\n") == "\n\n\n"  # CRLF is one newline, a lone CR another


def test_control_chars_are_exactly_category_cc_minus_newline_and_tab():
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    cc = {c for c in every if unicodedata.category(c) == "Cc"}
    assert set(CONTROL_CHARS.findall(every)) == cc - {"\n", "\t"}


def test_normalize_whitespace():
    text = "  \n\n  indented line  \t\nline two\n\n\n\n\nend \n \n"
    assert normalize_whitespace(text) == "indented line\nline two\n\nend"
    assert normalize_whitespace("a\n\nb\n  c") == "a\n\nb\n  c"  # one blank line and inner indentation stay
    assert normalize_whitespace(" \t\n \n") == ""


def test_steps_that_are_off_are_not_listed():
    assert [s.name for s in build_steps(CleanConfig(**OFF))] == []
    assert [s.name for s in build_steps(CleanConfig())] == [
        "normalize_unicode", "strip_control", "normalize_whitespace", "min_chars", "dedup"]
    assert [s.name for s in build_steps(CleanConfig(max_chars=5, normalization="NFKC"))][-3:] == [
        "min_chars", "max_chars", "dedup"]


def test_every_step_in_order():
    cfg = CleanConfig(fix_text=True, gutenberg_boilerplate=True, max_chars=10**6,
                      language=LanguageConfig(enabled=True), gopher_repetition=GopherRepetitionConfig(enabled=True),
                      gopher_quality=GopherQualityConfig(enabled=True), c4=C4Config(enabled=True),
                      pii=PIIConfig(enabled=True), minhash=MINHASH)
    assert [s.name for s in build_steps(cfg)] == [
        "fix_text", "normalize_unicode", "strip_control", "normalize_whitespace",  # gutenberg: in download
        "min_chars", "max_chars", "language", "gopher_repetition", "gopher_quality", "c4", "pii",
        "dedup", "minhash"]


# ---------------------------------------------------------------------------
# the whole stage on a crafted corpus in three chunks


CRAFTED = [
    ["  Hello\r\nworld  \n\n\n\nbye\x00 "],  # t/0/0: cleans to the same text as t/0/1, in the next chunk
    ["Hello\nworld\n\nbye",  # t/0/1: duplicate of t/0/0 after cleaning
     "short",  # t/0/2: below min_chars
     "x" * 50],  # t/0/3: above max_chars
    ["e\u0301t\u00e9 ok",  # t/0/4: NFC composes the first é
     " \t\r\n "],  # t/0/5: nothing left after cleaning
]
CRAFTED_ROWS = [
    # bytes in: 25 + 16 + 5 + 50 + 9 + 5 = 110
    {"step": "normalize_unicode", "docs_in": 6, "docs_out": 6, "bytes_in": 110, "bytes_out": 109},
    # t/0/0 loses \r and \x00, t/0/5 its \r
    {"step": "strip_control", "docs_in": 6, "docs_out": 6, "bytes_in": 109, "bytes_out": 106},
    # t/0/0: 23 -> 16; t/0/5: 4 -> 0
    {"step": "normalize_whitespace", "docs_in": 6, "docs_out": 6, "bytes_in": 106, "bytes_out": 95},
    {"step": "min_chars", "docs_in": 6, "docs_out": 4, "bytes_in": 95, "bytes_out": 90},
    {"step": "max_chars", "docs_in": 4, "docs_out": 3, "bytes_in": 90, "bytes_out": 40},
    {"step": "dedup", "docs_in": 3, "docs_out": 2, "bytes_in": 40, "bytes_out": 24},
]
CRAFTED_REMOVED = [  # chunk by chunk in corpus order, then the dedup removals
    {"id": "t/0/2", "source": "mem", "step": "min_chars", "reason": "min_chars: 5 chars < 6", "bytes": 5,
     "excerpt": "short"},
    {"id": "t/0/3", "source": "mem", "step": "max_chars", "reason": "max_chars: 50 chars > 40", "bytes": 50,
     "excerpt": "x" * 50},
    {"id": "t/0/5", "source": "mem", "step": "min_chars", "reason": "min_chars: 0 chars < 6", "bytes": 0,
     "excerpt": ""},
    {"id": "t/0/1", "source": "mem", "step": "dedup", "reason": "dedup: same text as t/0/0", "bytes": 16,
     "excerpt": "Hello\nworld\n\nbye"},
]


def sample(row: dict) -> dict:
    return {k: row[k] for k in ("id", "reason", "excerpt")}


# Every step can remove a document (a transform one it empties), so every step has a list of samples.
NO_SAMPLES: dict[str, list] = {"normalize_unicode": [], "strip_control": [], "normalize_whitespace": []}


def test_all_steps_exact_outputs_and_report(tmp_path):
    result = clean(tmp_path, CRAFTED, min_chars=6, max_chars=40)
    assert documents(result) == {"id": ["t/0/0", "t/0/4"], "text": ["Hello\nworld\n\nbye", "\u00e9t\u00e9 ok"],
                                 "source": ["mem", "mem"]}
    # Chunk 1 ends empty and is skipped; the others keep their download chunk's number.
    chunks = ["documents/part-000000.parquet", "documents/part-000002.parquet"]
    assert result.meta["chunks"] == chunks
    index = docset.read_index(result.out_dir)
    assert [(c["file"], c["documents"], c["bytes"]) for c in index["chunks"]] == [(chunks[0], 1, 16),
                                                                                 (chunks[1], 1, 8)]
    assert result.meta["report"] == CRAFTED_ROWS
    assert removed(result) == CRAFTED_REMOVED
    samples = {**NO_SAMPLES, "min_chars": [sample(CRAFTED_REMOVED[0]), sample(CRAFTED_REMOVED[2])],
               "max_chars": [sample(CRAFTED_REMOVED[1])], "dedup": [sample(CRAFTED_REMOVED[3])]}
    assert result.meta["samples"] == samples
    report = json.loads(result.path(REPORT_FILE).read_text())
    assert report == {"corpus_field": "data.pretrain", "steps": CRAFTED_ROWS, "samples": samples,
                      "totals": {"docs_in": 6, "docs_out": 2, "bytes_in": 110, "bytes_out": 24}}
    assert result.metrics == {
        "docs_in": 6.0, "docs_out": 2.0, "bytes_in": 110.0, "bytes_out": 24.0,
        "normalize_unicode.docs_removed": 0.0, "normalize_unicode.bytes_removed": 1.0,
        "strip_control.docs_removed": 0.0, "strip_control.bytes_removed": 3.0,
        "normalize_whitespace.docs_removed": 0.0, "normalize_whitespace.bytes_removed": 11.0,
        "min_chars.docs_removed": 2.0, "min_chars.bytes_removed": 5.0,
        "max_chars.docs_removed": 1.0, "max_chars.bytes_removed": 50.0,
        "dedup.docs_removed": 1.0, "dedup.bytes_removed": 16.0,
    }
    assert sorted(result.files) == sorted([REPORT_FILE, REMOVED_FILE, docset.INDEX_FILE, *chunks])


def test_chunk_task_outputs(tmp_path):
    files = write_chunks(tmp_path / "download", CRAFTED)
    cfg = CleanConfig(min_chars=6, max_chars=40, minhash=MinHashConfig(enabled=True, permutations=8))
    chunk = run_clean_chunk(cfg, files[1], tmp_path / "chunk", "fp")
    assert chunk.stage == "clean_chunk" and chunk.meta == {"chunk": "part-000001.parquet"}
    assert chunk.metrics == {"docs_in": 3.0, "docs_out": 1.0, "bytes_in": 71.0, "bytes_out": 16.0}
    assert sorted(chunk.files) == sorted([KEPT_FILE, REMOVED_FILE, EXACT_FILE, MINHASH_FILE, STATS_FILE])
    kept = docset.read_documents(chunk.path(KEPT_FILE)).to_pydict()
    assert kept == {"id": ["t/0/1"], "text": ["Hello\nworld\n\nbye"], "source": ["mem"]}
    assert removed(chunk) == CRAFTED_REMOVED[:2]
    assert np.load(chunk.path(EXACT_FILE)).tolist() == exact_hashes(kept["text"]).tolist()
    assert np.load(chunk.path(MINHASH_FILE)).tolist() == minhash_signatures(kept["text"], 5, 8, 1).tolist()
    stats = json.loads(chunk.path(STATS_FILE).read_text())
    assert stats["chunk"] == "part-000001.parquet"
    assert stats["totals"] == {"docs_in": 3, "docs_out": 1, "bytes_in": 71, "bytes_out": 16}
    assert [(r["step"], r["docs_in"], r["docs_out"]) for r in stats["steps"]] == [
        ("normalize_unicode", 3, 3), ("strip_control", 3, 3), ("normalize_whitespace", 3, 3),
        ("min_chars", 3, 2), ("max_chars", 2, 1)]
    assert stats["samples"] == {**NO_SAMPLES, "min_chars": [sample(CRAFTED_REMOVED[0])],
                                "max_chars": [sample(CRAFTED_REMOVED[1])]}


def test_report_samples_are_the_first_removals_in_corpus_order(tmp_path):
    result = clean(tmp_path, CRAFTED, min_chars=6, max_chars=40, report_samples=1)
    assert result.meta["samples"] == {**NO_SAMPLES, "min_chars": [sample(CRAFTED_REMOVED[0])],
                                      "max_chars": [sample(CRAFTED_REMOVED[1])],
                                      "dedup": [sample(CRAFTED_REMOVED[3])]}
    none = clean(tmp_path, CRAFTED, "none", min_chars=6, max_chars=40, report_samples=0)
    assert none.meta["samples"] == {**NO_SAMPLES, "min_chars": [], "max_chars": [], "dedup": []}
    assert removed(none) == CRAFTED_REMOVED  # removed.parquet always has every removal


def test_length_bounds_are_inclusive(tmp_path):
    result = clean(tmp_path, [["abc", "abcd"], ["abcde", "abcdef"]], **{**OFF, "min_chars": 4, "max_chars": 5})
    assert documents(result)["text"] == ["abcd", "abcde"]
    assert [r["reason"] for r in removed(result)] == ["min_chars: 3 chars < 4", "max_chars: 6 chars > 5"]


def test_everything_off_passes_documents_through(tmp_path):
    result = clean(tmp_path, CRAFTED, **OFF)
    assert documents(result)["text"] == [t for part in CRAFTED for t in part] and result.meta["report"] == []
    assert result.metrics == {"docs_in": 6.0, "docs_out": 6.0, "bytes_in": 110.0, "bytes_out": 110.0}
    assert removed(result) == []


def test_exact_dedup_keeps_the_first_occurrence_across_chunks(tmp_path):
    parts = [["b", "a"], ["a", "c", "b"], ["c", "a", "d"]]
    result = clean(tmp_path, parts)
    assert documents(result) == {"id": ["t/0/0", "t/0/1", "t/0/3", "t/0/7"], "text": ["b", "a", "c", "d"],
                                 "source": ["mem"] * 4}
    assert [(r["id"], r["reason"]) for r in removed(result)] == [
        ("t/0/2", "dedup: same text as t/0/1"), ("t/0/4", "dedup: same text as t/0/0"),
        ("t/0/5", "dedup: same text as t/0/3"), ("t/0/6", "dedup: same text as t/0/1")]
    assert result.meta["chunks"] == ["documents/part-000000.parquet", "documents/part-000001.parquet",
                                     "documents/part-000002.parquet"]


def test_dedup_removal_rows_hold_bytes_and_a_300_character_excerpt(tmp_path):
    long = "\u00e9" * 400  # 800 UTF-8 bytes
    result = clean(tmp_path, [[long], ["x", long]])
    assert removed(result) == [{"id": "t/0/2", "source": "mem", "step": "dedup", "reason": "dedup: same text as t/0/0",
                                "bytes": 800, "excerpt": "\u00e9" * 300}]
    assert result.meta["report"][-1] == {"step": "dedup", "docs_in": 3, "docs_out": 2, "bytes_in": 1601,
                                         "bytes_out": 801}


def near_duplicate_corpus() -> list[list[str]]:
    rng = random.Random(7)
    a, b = words(rng), words(rng)
    a2 = [*a[:100], "changed", *a[101:]]  # one word of 200 changed
    a3 = [*a2[:30], "again", *a2[31:]]  # and one more: near a2 and a
    half = a[:100] + words(rng, 100)  # half of a: estimated Jaccard far below 0.8
    return [[" ".join(a), " ".join(b)],
            [" ".join(a2), " ".join(half), " ".join(b)],
            [" ".join(a3), "a short distinct document"]]


def test_minhash_finds_near_duplicates_not_distinct_documents(tmp_path):
    result = clean(tmp_path, near_duplicate_corpus(), minhash=MINHASH)
    assert documents(result)["id"] == ["t/0/0", "t/0/1", "t/0/3", "t/0/6"]
    assert [(r["id"], r["step"], r["reason"]) for r in removed(result)] == [
        ("t/0/4", "dedup", "dedup: same text as t/0/1"),
        ("t/0/2", "minhash", "minhash: ~0.96 similar to t/0/0"),
        ("t/0/5", "minhash", "minhash: ~0.91 similar to t/0/0"),
    ]
    rows = {r["step"]: (r["docs_in"], r["docs_out"]) for r in result.meta["report"]}
    assert rows["dedup"] == (7, 6) and rows["minhash"] == (6, 4)
    assert result.metrics["minhash.docs_removed"] == 2.0
    assert [s["id"] for s in result.meta["samples"]["minhash"]] == ["t/0/2", "t/0/5"]
    # Off, the near duplicates stay; exact dedup still runs.
    plain = clean(tmp_path, near_duplicate_corpus(), "plain")
    assert documents(plain)["id"] == ["t/0/0", "t/0/1", "t/0/2", "t/0/3", "t/0/5", "t/0/6"]


def test_near_duplicate_clusters_are_transitive(tmp_path):
    # Estimated similarities: t/0/0-t/0/2 0.955, t/0/2-t/0/5 0.946, t/0/0-t/0/5 0.911.
    strict = clean(tmp_path, near_duplicate_corpus(), "strict", minhash=MinHashConfig(enabled=True, threshold=0.95))
    assert [(r["id"], r["reason"]) for r in removed(strict) if r["step"] == "minhash"] == [
        ("t/0/2", "minhash: ~0.96 similar to t/0/0")]
    # At 0.93 t/0/5 joins through t/0/2; the reason gives its similarity to the document kept.
    chained = clean(tmp_path, near_duplicate_corpus(), "chained", minhash=MinHashConfig(enabled=True, threshold=0.93))
    assert [(r["id"], r["reason"]) for r in removed(chained) if r["step"] == "minhash"] == [
        ("t/0/2", "minhash: ~0.96 similar to t/0/0"), ("t/0/5", "minhash: ~0.91 similar to t/0/0")]


WEB = CleanConfig(fix_text=True, language=LanguageConfig(enabled=True),
                  gopher_repetition=GopherRepetitionConfig(enabled=True),
                  gopher_quality=GopherQualityConfig(enabled=True), c4=C4Config(enabled=True),
                  pii=PIIConfig(enabled=True))
HARBOUR = ("The harbour of the old town was built in the twelfth century by the merchants of the river valley.\n"
           "Menu\n"  # a line C4 removes (fewer than 3 words, no end punctuation)
           "Ships from the northern ports brought timber, wool and salt to the markets that lined the quay.\n"
           "Over the years the town grew rich, and the merchants built stone houses with tall gables.\n"
           "A great fire in the winter of 1521 destroyed most of the wooden warehouses near the water.\n"
           "The council rebuilt the quay in brick and paid for it with a tax on every barrel of wine.\n"
           "Today the harbour is a quiet place where visitors can write to info@harbour-museum.org for tours.")
FRENCH = ("Le port de la vieille ville a \u00e9t\u00e9 construit au douzi\u00e8me si\u00e8cle par les marchands.\n"
          "Les navires des ports du nord apportaient du bois, de la laine et du sel aux march\u00e9s du quai.\n"
          "Un grand incendie a d\u00e9truit la plupart des entrep\u00f4ts en bois pr\u00e8s de l'eau.")
WEB_DOCS = [[HARBOUR, FRENCH, "\n".join(["The harbour was built by the merchants of the river valley."] * 10)],
            [HARBOUR.replace("Today the harbour", "Lorem ipsum dolor sit amet, the harbour"),
             "The cat sat on the mat and looked at the dog."]]


def test_web_filters_in_the_stage(tmp_path):
    result = clean(tmp_path, WEB_DOCS, **WEB.model_dump())
    expected = HARBOUR.replace("Menu\n", "").replace("info@harbour-museum.org", "<EMAIL>")
    assert documents(result) == {"id": ["t/0/0"], "text": [expected], "source": ["mem"]}
    assert [(r["id"], r["step"], r["reason"]) for r in removed(result)] == [
        ("t/0/1", "language", "language: fr (0.98) not in ['en']"),
        ("t/0/2", "gopher_repetition", "gopher_repetition: duplicate lines 0.9 > 0.3"),
        ("t/0/4", "gopher_quality", "gopher_quality: 11 words < 50"),
        ("t/0/3", "c4", "c4: contains 'lorem ipsum'"),
    ]
    rows = {r["step"]: r for r in result.meta["report"]}
    assert [(name, rows[name]["docs_in"], rows[name]["docs_out"]) for name in rows] == [
        ("fix_text", 5, 5), ("normalize_unicode", 5, 5), ("strip_control", 5, 5), ("normalize_whitespace", 5, 5),
        ("min_chars", 5, 5), ("language", 5, 4), ("gopher_repetition", 4, 3), ("gopher_quality", 3, 2),
        ("c4", 2, 1), ("pii", 1, 1), ("dedup", 1, 1)]
    # C4 removed "Menu\n" from the kept document; the masked address is 16 bytes shorter.
    assert rows["c4"]["bytes_out"] == len(HARBOUR) - 5
    assert rows["pii"]["bytes_in"] - rows["pii"]["bytes_out"] == len("info@harbour-museum.org") - len("<EMAIL>")
    # The excerpt is the text as the removing step saw it.
    assert removed(result)[3]["excerpt"] == WEB_DOCS[1][0][:300]


# ---------------------------------------------------------------------------
# a step that empties a document, or takes it below min_chars, removes it


def assert_rows_add_up(result: StageResult) -> None:
    """Each step starts where the one before ended; documents removed per step match removed.parquet."""
    rows, metrics = result.meta["report"], result.metrics
    assert (rows[0]["docs_in"], rows[0]["bytes_in"]) == (metrics["docs_in"], metrics["bytes_in"])
    assert (rows[-1]["docs_out"], rows[-1]["bytes_out"]) == (metrics["docs_out"], metrics["bytes_out"])
    for before, after in zip(rows, rows[1:]):
        assert (before["docs_out"], before["bytes_out"]) == (after["docs_in"], after["bytes_in"])
    gone = [r["step"] for r in removed(result)]
    assert {r["step"]: r["docs_in"] - r["docs_out"] for r in rows} == {r["step"]: gone.count(r["step"]) for r in rows}


# One line each, in nine languages, none ending in . ! ? or a quote: C4 removes every line of every one.
NON_ENGLISH = ["\u0397 \u03b3\u03ac\u03c4\u03b1 \u03ba\u03bf\u03b9\u03bc\u03ac\u03c4\u03b1\u03b9 "
               "\u03c3\u03c4\u03bf\u03bd \u03ba\u03b1\u03bd\u03b1\u03c0\u03ad",
               "Le chat dort sur le canap\u00e9",
               "\u041a\u043e\u0448\u043a\u0430 \u0441\u043f\u0438\u0442 \u043d\u0430 "
               "\u0434\u0438\u0432\u0430\u043d\u0435",
               "Pisica doarme pe canapea", "Con m\u00e8o \u0111ang ng\u1ee7 tr\u00ean gh\u1ebf",
               "M\u00f3s\u00ed bik\u00e1\u00e1 yi\u0142hosh", "Die Katze schl\u00e4ft auf dem Sofa",
               "El gato duerme en el sof\u00e1", "Kedi kanepede uyuyor"]
C4_KEEPS_NO_LINE = CleanConfig(c4=C4Config(enabled=True, min_sentences=0))


def test_c4_removing_every_line_removes_the_document(tmp_path):
    files = write_chunks(tmp_path / "download", [NON_ENGLISH])
    chunk = run_clean_chunk(C4_KEEPS_NO_LINE, files[0], tmp_path / "chunk", "fp")
    nbytes = [len(t.encode()) for t in NON_ENGLISH]
    assert sum(nbytes) == 270
    assert [(r["id"], r["step"], r["reason"], r["bytes"], r["excerpt"]) for r in removed(chunk)] == [
        (f"t/0/{i}", "c4", f"c4: emptied the document (had {len(t)} chars)", n, t)
        for i, (t, n) in enumerate(zip(NON_ENGLISH, nbytes))]
    stats = json.loads(chunk.path(STATS_FILE).read_text())
    assert stats["steps"][-1] == {"step": "c4", "docs_in": 9, "docs_out": 0, "bytes_in": 270, "bytes_out": 0}
    assert docset.read_documents(chunk.path(KEPT_FILE)).num_rows == 0
    assert stats["samples"]["c4"][0] == {"id": "t/0/0", "reason": "c4: emptied the document (had 27 chars)",
                                         "excerpt": NON_ENGLISH[0]}


def test_a_corpus_emptied_by_c4_fails_naming_c4_and_its_bytes(tmp_path):
    with pytest.raises(EmptyCorpusError) as err:
        clean(tmp_path, [NON_ENGLISH[:4], NON_ENGLISH[4:]], **C4_KEEPS_NO_LINE.model_dump())
    assert str(err.value) == (
        "data.pretrain: no document survived cleaning (9 documents, 270 bytes in). c4 removed the most: 270 of "
        "the 270 bytes (9 of the 9 documents); documents removed per step: c4 9 (270 bytes). Relax "
        "data.clean.c4 (now enabled), or check that data.pretrain.sources hold the text you expect.")
    out = tmp_path / "clean" / "out"
    assert not out.exists() and not partial_dir(out).exists()  # nothing for the tokenizer to train on


def test_a_corpus_that_may_be_empty_finishes_empty_with_the_error_message(tmp_path):
    files = write_chunks(tmp_path / "download", [NON_ENGLISH[:4], NON_ENGLISH[4:]])
    chunks = [run_clean_chunk(C4_KEEPS_NO_LINE, f, tmp_path / f"chunk-{i}", f"fp{i}") for i, f in enumerate(files)]
    result = run_clean(C4_KEEPS_NO_LINE, chunks, tmp_path / "out", "fp", corpus_field="data.pretrain",
                       may_be_empty=True)
    assert result.meta["empty"] == (
        "data.pretrain: no document survived cleaning (9 documents, 270 bytes in). c4 removed the most: 270 of "
        "the 270 bytes (9 of the 9 documents); documents removed per step: c4 9 (270 bytes). Relax "
        "data.clean.c4 (now enabled), or check that data.pretrain.sources hold the text you expect.")
    assert result.meta["chunks"] == [] and documents(result)["text"] == []
    assert result.metrics["docs_in"] == 9.0 and result.metrics["docs_out"] == 0.0
    assert [r["id"] for r in removed(result)] == [f"t/0/{i}" for i in range(9)]  # each one, in the report
    assert "empty" not in clean(tmp_path, [NON_ENGLISH[:1]]).meta  # a corpus with survivors has no such note


def test_a_finished_empty_clean_stage_is_reused_only_where_it_may_be_empty(tmp_path):
    import tasks.stages as stages
    from lmpipe.tracking.runs import TrackingContext

    ctx = TrackingContext(workdir=str(tmp_path), uri="sqlite:///x.db", experiment_id="0", parent_run_id="p")
    docs = StageResult(stage="download", fingerprint="d", out_dir="unused")
    args = {"cfg": C4_KEEPS_NO_LINE, "docs": docs, "chunks": [], "corpus_field": "data.pretrain",
            "clean_field": "data.clean", "ctx": ctx}
    fp, out_dir = stages.CLEAN.locate(args)
    [file] = write_chunks(tmp_path / "download", [NON_ENGLISH])
    chunk = run_clean_chunk(C4_KEEPS_NO_LINE, file, tmp_path / "chunk", "fp0")
    made = run_clean(C4_KEEPS_NO_LINE, [chunk], out_dir, fp, corpus_field="data.pretrain", may_be_empty=True)
    body = stages.clean.fn.__wrapped__  # the task's body, outside a Prefect run
    assert body(**args, may_be_empty=True).meta["empty"] == made.meta["empty"]  # reused: no MLflow run
    with pytest.raises(EmptyCorpusError, match=r"^data\.pretrain: no document survived cleaning \(9 documents"):
        body(**args)  # a corpus that must not be empty fails as if cleaned now
    with pytest.raises(EmptyCorpusError, match=r"^data\.pretrain: no document survived cleaning \(9 documents"):
        # the stage found finished by run_stage itself (as after waiting for another run's lease)
        run_clean(C4_KEEPS_NO_LINE, [chunk], out_dir, fp, corpus_field="data.pretrain")
    assert "empty" in run_clean(C4_KEEPS_NO_LINE, [chunk], out_dir, fp, corpus_field="data.pretrain",
                                may_be_empty=True).meta


NOVEL = ['Chapter 1\nHe said that he would come\nvisit him if you do not."',  # C4 keeps only the last line
         "Menu\nThe harbour was built by the merchants of the river valley.",  # C4 removes "Menu"
         "Too short."]  # 10 characters from the start: the min_chars filter's
FRAGMENT = 'visit him if you do not."'


def test_a_fragment_below_min_chars_after_c4_is_removed_by_c4(tmp_path):
    result = clean(tmp_path, [NOVEL], **{**OFF, "min_chars": 30, "c4": C4Config(enabled=True, min_sentences=1)})
    assert documents(result)["text"] == ["The harbour was built by the merchants of the river valley."]
    assert [(r["id"], r["step"], r["reason"], r["bytes"]) for r in removed(result)] == [
        ("t/0/2", "min_chars", "min_chars: 10 chars < 30", 10),
        ("t/0/0", "c4", f"c4: left {len(FRAGMENT)} chars < min_chars 30 (had {len(NOVEL[0])})", 62)]
    assert len(FRAGMENT) == 25
    assert result.meta["report"] == [
        {"step": "min_chars", "docs_in": 3, "docs_out": 2, "bytes_in": 136, "bytes_out": 126},
        # t/0/0's 62 bytes, and the 5 of "Menu\n" from t/0/1
        {"step": "c4", "docs_in": 2, "docs_out": 1, "bytes_in": 126, "bytes_out": 59}]
    assert_rows_add_up(result)


def test_a_fragment_c4_leaves_is_kept_when_min_chars_allows_it(tmp_path):
    result = clean(tmp_path, [NOVEL], **{**OFF, "min_chars": 25, "c4": C4Config(enabled=True, min_sentences=1)})
    assert documents(result)["text"] == [FRAGMENT, "The harbour was built by the merchants of the river valley."]


def test_transforms_that_empty_or_shorten_a_document_remove_it(tmp_path):
    docs = ["\x00\x01\x02",  # strip_control empties it
            "\x00 \t\x00",  # strip_control leaves only blanks
            "ab\x00\x00",  # short from the start: strip_control changes it, min_chars removes it
            "mail a@example.org now",  # 22 characters; masked, 16
            "Long enough to stay, with no address."]
    result = clean(tmp_path, [docs], **{**OFF, "strip_control": True, "normalize_whitespace": True,
                                        "min_chars": 17, "pii": PIIConfig(enabled=True)})
    assert documents(result)["text"] == [docs[4]]
    assert [(r["id"], r["step"], r["reason"]) for r in removed(result)] == [
        ("t/0/0", "strip_control", "strip_control: emptied the document (had 3 chars)"),
        ("t/0/1", "strip_control", "strip_control: emptied the document (had 4 chars)"),
        ("t/0/2", "min_chars", "min_chars: 2 chars < 17"),
        ("t/0/3", "pii", "pii: left 16 chars < min_chars 17 (had 22)")]
    assert result.meta["report"] == [
        {"step": "strip_control", "docs_in": 5, "docs_out": 3, "bytes_in": 70, "bytes_out": 61},
        {"step": "normalize_whitespace", "docs_in": 3, "docs_out": 3, "bytes_in": 61, "bytes_out": 61},
        {"step": "min_chars", "docs_in": 3, "docs_out": 2, "bytes_in": 61, "bytes_out": 59},
        {"step": "pii", "docs_in": 2, "docs_out": 1, "bytes_in": 59, "bytes_out": 37}]
    assert result.meta["samples"]["strip_control"] == [
        {"id": "t/0/0", "reason": "strip_control: emptied the document (had 3 chars)", "excerpt": "\x00\x01\x02"},
        {"id": "t/0/1", "reason": "strip_control: emptied the document (had 4 chars)", "excerpt": "\x00 \t\x00"}]
    assert_rows_add_up(result)


def test_without_min_chars_only_an_emptied_document_is_removed(tmp_path):
    result = clean(tmp_path, [["\x00\x01", "a\x00"]], **{**OFF, "strip_control": True})
    assert documents(result)["text"] == ["a"]
    assert [r["reason"] for r in removed(result)] == ["strip_control: emptied the document (had 2 chars)"]


# ---------------------------------------------------------------------------
# errors


def test_empty_corpus_error_names_field_counts_and_knobs(tmp_path):
    with pytest.raises(EmptyCorpusError) as err:
        clean(tmp_path, CRAFTED, min_chars=20, max_chars=30)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    # normalize_whitespace takes t/0/0 from 23 characters to 16, below min_chars: it removes it (see below).
    assert msg == (
        "data.pretrain: no document survived cleaning (6 documents, 110 bytes in). max_chars removed the most: 50 "
        "of the 110 bytes (1 of the 6 documents); documents removed per step: normalize_whitespace 1 (27 bytes), "
        "min_chars 4 (29 bytes), max_chars 1 (50 bytes). Relax data.clean.normalize_whitespace (now True) or "
        "data.clean.min_chars (now 20) or data.clean.max_chars (now 30), or check that data.pretrain.sources hold "
        "the text you expect.")
    out = tmp_path / "clean" / "out"
    assert not out.exists() and not partial_dir(out).exists()


def test_empty_corpus_error_names_the_corpus_clean_override(tmp_path):
    files = write_chunks(tmp_path / "download", [["tiny"]])
    cfg = CleanConfig(min_chars=10)
    chunk = run_clean_chunk(cfg, files[0], tmp_path / "chunk", "fp")
    with pytest.raises(EmptyCorpusError, match=r"Relax data\.finetune\.clean\.min_chars \(now 10\), or check "
                                               r"that data\.finetune\.sources hold"):
        run_clean(cfg, [chunk], tmp_path / "out", "fp", corpus_field="data.finetune",
                  clean_field="data.finetune.clean")


def test_empty_corpus_error_names_a_filter_section(tmp_path):
    with pytest.raises(EmptyCorpusError, match=r"language removed the most: 259 of the 259 bytes \(1 of the 1 "
                                               r"documents\); documents removed per step: language 1 \(259 bytes\)\. "
                                               r"Relax data\.clean\.language \(now enabled\), or check"):
        clean(tmp_path, [[FRENCH]], language=LanguageConfig(enabled=True))


def test_empty_download_is_reported_as_such(tmp_path):
    with pytest.raises(EmptyCorpusError, match=r"data.pretrain: the download produced no documents"):
        run_clean(CleanConfig(), [], tmp_path / "out", "fp", corpus_field="data.pretrain")


def test_chunks_cleaned_with_other_steps_are_refused(tmp_path):
    files = write_chunks(tmp_path / "download", CRAFTED)
    chunk = run_clean_chunk(CleanConfig(), files[0], tmp_path / "chunk", "fp")
    with pytest.raises(ValueError, match=r"clean chunk 'part-000000.parquet' ran steps \['normalize_unicode', "
                                         r"'strip_control', 'normalize_whitespace', 'min_chars'\], this config runs "
                                         r"\['min_chars'\]: re-run its clean_chunk task"):
        run_clean(CleanConfig(**{**OFF, "min_chars": 1}), [chunk], tmp_path / "out", "fp",
                  corpus_field="data.pretrain")


def test_chunks_cleaned_without_minhash_are_refused(tmp_path):
    files = write_chunks(tmp_path / "download", CRAFTED)
    chunk = run_clean_chunk(CleanConfig(), files[0], tmp_path / "chunk", "fp")
    with pytest.raises(ValueError, match=r"clean chunk 'part-000000.parquet' has no minhash.npy: it was cleaned "
                                         r"with minhash off; re-run its clean_chunk task with this config"):
        run_clean(CleanConfig(minhash=MINHASH), [chunk], tmp_path / "out", "fp", corpus_field="data.pretrain")
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# why: which step removed a document, also when the clean stage did not finish


def chunk_stages(workdir: Path, parts: list[list[str]], cfg: CleanConfig) -> list[StageResult]:
    """The clean_chunk stages of a download, where a pipeline puts them: <workdir>/clean_chunk/<fingerprint>."""
    files = write_chunks(workdir.parent / "download", parts)
    return [run_clean_chunk(cfg, f, workdir / "clean_chunk" / f"fp{i}", f"fp{i}") for i, f in enumerate(files)]


def test_why_answers_from_the_chunk_stages_when_the_clean_stage_failed(tmp_path):
    workdir = tmp_path / "w"
    chunks = chunk_stages(workdir, [NON_ENGLISH[:4], NON_ENGLISH[4:]], C4_KEEPS_NO_LINE)
    with pytest.raises(EmptyCorpusError):
        run_clean(C4_KEEPS_NO_LINE, chunks, workdir / "clean" / "fp", "fp", corpus_field="data.pretrain")
    found = why_removed(workdir, "t/0/5")
    assert found.rows == [{"stage": "clean_chunk", "stage_dir": str(workdir / "clean_chunk" / "fp1"),
                           "chunk": "part-000001.parquet", "id": "t/0/5", "source": "mem", "step": "c4",
                           "reason": "c4: emptied the document (had 18 chars)", "bytes": 23,
                           "excerpt": NON_ENGLISH[5]}]
    assert found.uncombined == [str(workdir / "clean_chunk" / "fp0"), str(workdir / "clean_chunk" / "fp1")]


def test_why_does_not_call_a_document_kept_while_its_clean_stage_has_not_finished(tmp_path):
    workdir = tmp_path / "w"
    chunks = chunk_stages(workdir, CRAFTED, CleanConfig(min_chars=6))
    chunks[2].path(STATS_FILE).write_text("{not json", encoding="utf-8")  # the reducer cannot read chunk 2
    with pytest.raises(ValueError):
        run_clean(CleanConfig(min_chars=6), chunks, workdir / "clean" / "fp", "fp", corpus_field="data.pretrain")
    assert [(r["stage_dir"], r["step"]) for r in why_removed(workdir, "t/0/2").rows] == [
        (str(workdir / "clean_chunk" / "fp1"), "min_chars")]
    # t/0/1 passed its chunk's steps; dedup, which would remove it, never ran.
    assert why_removed(workdir, "t/0/1") == Removals([], [c.out_dir for c in chunks])


def test_why_after_a_finished_clean_stage_reads_it_alone(tmp_path):
    workdir = tmp_path / "w"
    cfg = CleanConfig(min_chars=6, max_chars=40)
    chunks = chunk_stages(workdir, CRAFTED, cfg)
    result = run_clean(cfg, chunks, workdir / "clean" / "fp", "fp", corpus_field="data.pretrain")
    assert result.meta["chunk_stages"] == ["fp0", "fp1", "fp2"]
    for row in CRAFTED_REMOVED:  # once each, from the clean stage, though its chunk stage holds it too
        assert why_removed(workdir, row["id"]) == Removals(
            [{"stage": "clean", "stage_dir": str(workdir / "clean" / "fp"), "chunk": None, **row}], [])
    assert why_removed(workdir, "t/0/0") == Removals([], [])  # kept: every chunk stage was combined


# ---------------------------------------------------------------------------
# determinism


def test_runs_in_any_order_are_byte_identical(tmp_path):
    files = write_chunks(tmp_path / "download", near_duplicate_corpus())
    cfg = CleanConfig(minhash=MINHASH)
    a = clean_files(tmp_path / "a", files, cfg)
    b = clean_files(tmp_path / "b", files, cfg)
    backwards = clean_files(tmp_path / "c", files, cfg, order=[2, 1, 0])
    assert a.files == b.files == backwards.files
    assert len(a.files) == 6  # report, removed, index and three chunks
    assert a.meta == backwards.meta and a.metrics == backwards.metrics


def test_a_chunk_cleaned_in_another_process_is_byte_identical(tmp_path):
    files = write_chunks(tmp_path / "download", near_duplicate_corpus())
    cfg = CleanConfig(minhash=MINHASH)
    here = run_clean_chunk(cfg, files[1], tmp_path / "here", "fp")
    code = ("import sys; from lmpipe.stages.clean import run_clean_chunk; from lmpipe.config import CleanConfig; "
            "cfg = CleanConfig.model_validate_json(sys.argv[1]); "
            "print(run_clean_chunk(cfg, sys.argv[2], sys.argv[3], 'fp').model_dump_json())")
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    out = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json(), str(files[1]), str(tmp_path / "there")],
                         capture_output=True, text=True, cwd=REPO, env=env, check=True).stdout
    there = StageResult.model_validate_json(out)
    assert there.files == here.files and there.metrics == here.metrics


# ---------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def wikitext_chunks(tmp_path_factory) -> list[Path]:
    """WikiText-2 validation articles as a download would chunk them: 4 chunks of about 256 KiB."""
    out = tmp_path_factory.mktemp("wikitext")
    docs = split_documents((DATA / "wikitext2-valid.txt").read_text(encoding="utf-8"), "wikitext_title")
    with docset.ChunkWriter(out, chunk_bytes=256 * 1024) as writer:
        for n, text in enumerate(docs):
            writer.add(f"wikitext2/0/{n}", text, "wikitext2-valid.txt")
    return docset.chunk_paths(out)


def test_wikitext_defaults(tmp_path, wikitext_chunks):
    assert len(wikitext_chunks) == 4
    result = clean_files(tmp_path, wikitext_chunks, CleanConfig())
    docs = documents(result)
    assert result.metrics["docs_in"] == 60 and result.metrics["docs_out"] == 60
    assert result.metrics["bytes_in"] == 1_121_679
    assert docs["id"] == [f"wikitext2/0/{n}" for n in range(60)]
    assert docs["text"][0].startswith("= Homarus gammarus =\n\n Homarus gammarus , known as")
    assert all(t == t.strip() and "\n\n\n" not in t and " \n" not in t for t in docs["text"])
    # WikiText is already NFC and free of control characters: only whitespace changes it.
    removed_bytes = {r["step"]: r["bytes_in"] - r["bytes_out"] for r in result.meta["report"]}
    assert removed_bytes == {"normalize_unicode": 0, "strip_control": 0, "normalize_whitespace": 4077,
                             "min_chars": 0, "dedup": 0}
    assert result.metrics["bytes_out"] == 1_117_602
    assert [e["documents"] for e in docset.read_index(result.out_dir)["chunks"]] == [20, 12, 15, 13]


def test_wikitext_min_chars_and_near_copies(tmp_path, wikitext_chunks):
    """The corpus plus exact copies of its first chunk and one-word edits of its second, as two more chunks."""
    first = docset.read_documents(wikitext_chunks[0]).column("text").to_pylist()
    second = docset.read_documents(wikitext_chunks[1]).column("text").to_pylist()
    edited = [t.replace(" the ", " a ", 1) for t in second]
    assert all(e != t for e, t in zip(edited, second))
    # t/0/0-19 are copies of wikitext2/0/0-19; t/0/20-31 are edits of wikitext2/0/20-31.
    extra = write_chunks(tmp_path / "extra", [first, edited])
    cfg = CleanConfig(min_chars=7000, minhash=MINHASH)
    result = clean_files(tmp_path / "run", [*wikitext_chunks, *extra], cfg)
    rows = {r["step"]: (r["docs_in"], r["docs_out"]) for r in result.meta["report"]}
    # 50 of the 60 articles have 7000+ characters after cleaning, 14 of the 20 copies and 10 of the 12 edits;
    # one article and its edit had 7000+ before whitespace was normalized: that step removes them.
    assert rows["normalize_whitespace"] == (92, 90) and rows["min_chars"] == (90, 74)
    assert [(r["id"], r["reason"]) for r in removed(result) if r["step"] == "normalize_whitespace"] == [
        ("wikitext2/0/23", "normalize_whitespace: left 6980 chars < min_chars 7000 (had 7007)"),
        ("t/0/23", "normalize_whitespace: left 6978 chars < min_chars 7000 (had 7005)")]
    assert rows["dedup"] == (74, 60) and rows["minhash"] == (60, 50)
    assert result.metrics["minhash.bytes_removed"] == 1_309_575 - 1_057_265
    assert {r["id"] for r in removed(result) if r["step"] == "dedup"} == {f"t/0/{n}" for n in range(20)} - {
        r["id"] for r in removed(result) if r["step"] == "min_chars"}
    near = [r for r in removed(result) if r["step"] == "minhash"]
    assert len(near) == 10
    for r in near:  # each edit is found as a copy of its own original
        assert r["reason"].startswith("minhash: ~") and r["reason"].endswith(f"similar to wikitext2/0/{r['id'][4:]}")
    assert documents(result)["id"] == documents(clean_files(tmp_path / "alone", wikitext_chunks, cfg))["id"]
