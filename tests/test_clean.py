"""Clean stage: each step on crafted text, the report's exact counts, and a run on real WikiText."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest

from lmpipe.clean import (
    CONTROL_CHARS,
    REPORT_FILE,
    EmptyCorpusError,
    build_steps,
    dedup_mask,
    normalize_whitespace,
    run_clean,
    strip_control,
)
from lmpipe.config import CleanConfig, CorpusConfig, SourceConfig
from lmpipe.download import DOCUMENTS_FILE, read_documents, run_download, write_documents
from lmpipe.stage import StageResult, partial_dir

DATA = Path(__file__).resolve().parents[1] / "data"
OFF = dict(normalization="none", strip_control=False, normalize_whitespace=False, min_chars=0, dedup=False)


def downloaded(tmp_path: Path, texts: list[str]) -> StageResult:
    """A download stage's result holding these texts (ids t/0/n, source 'mem')."""
    out = tmp_path / "download"
    out.mkdir(parents=True)
    write_documents(out / DOCUMENTS_FILE, [f"t/0/{n}" for n in range(len(texts))], texts, ["mem"] * len(texts))
    return StageResult(stage="download", fingerprint="dl", out_dir=str(out))


def clean(tmp_path: Path, texts: list[str], name: str = "clean", **cfg):
    result = run_clean(CleanConfig(**cfg), downloaded(tmp_path / name, texts),
                       tmp_path / name / "out", "fp", corpus_field="data.pretrain")
    return result, read_documents(result.path(DOCUMENTS_FILE)).to_pydict()


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
    result, docs = clean(tmp_path, ["e\u0301te\u0301", "\ufb01ne", "\u2460 x\u00b2"], **{**OFF, "normalization": form})
    assert docs["text"] == expected
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


def test_dedup_mask_keeps_first():
    assert dedup_mask(["a", "b", "a", "c", "b", "a"]) == [True, True, False, True, False, False]


def test_steps_that_are_off_are_not_listed():
    assert [s.name for s in build_steps(CleanConfig(**OFF))] == []
    assert [s.name for s in build_steps(CleanConfig())] == [
        "normalize_unicode", "strip_control", "normalize_whitespace", "min_chars", "dedup"]
    assert [s.name for s in build_steps(CleanConfig(max_chars=5, normalization="NFKC"))][-3:] == [
        "min_chars", "max_chars", "dedup"]


# ---------------------------------------------------------------------------
# the whole stage


CRAFTED = [
    "  Hello\r\nworld  \n\n\n\nbye\x00 ",  # 0: cleans to the same text as 1
    "Hello\nworld\n\nbye",  # 1: duplicate of 0 after cleaning
    "short",  # 2: below min_chars
    "x" * 50,  # 3: above max_chars
    "e\u0301t\u00e9 ok",  # 4: NFC composes the first é
    " \t\r\n ",  # 5: nothing left after cleaning
]


def test_all_steps_exact_outputs_and_report(tmp_path):
    result, docs = clean(tmp_path, CRAFTED, min_chars=6, max_chars=40)
    assert docs == {"id": ["t/0/0", "t/0/4"], "text": ["Hello\nworld\n\nbye", "\u00e9t\u00e9 ok"], "source": ["mem", "mem"]}
    # bytes in: 25 + 16 + 5 + 50 + 9 + 5 = 110
    rows = [
        {"step": "normalize_unicode", "docs_in": 6, "docs_out": 6, "bytes_in": 110, "bytes_out": 109},
        # doc 0 loses \r and \x00, doc 5 its \r
        {"step": "strip_control", "docs_in": 6, "docs_out": 6, "bytes_in": 109, "bytes_out": 106},
        # doc 0: 23 -> 16; doc 5: 4 -> 0
        {"step": "normalize_whitespace", "docs_in": 6, "docs_out": 6, "bytes_in": 106, "bytes_out": 95},
        {"step": "min_chars", "docs_in": 6, "docs_out": 4, "bytes_in": 95, "bytes_out": 90},
        {"step": "max_chars", "docs_in": 4, "docs_out": 3, "bytes_in": 90, "bytes_out": 40},
        {"step": "dedup", "docs_in": 3, "docs_out": 2, "bytes_in": 40, "bytes_out": 24},
    ]
    assert result.meta["report"] == rows
    report = json.loads(result.path(REPORT_FILE).read_text())
    assert report == {"corpus_field": "data.pretrain", "steps": rows,
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


def test_length_bounds_are_inclusive(tmp_path):
    _, docs = clean(tmp_path, ["abc", "abcd", "abcde", "abcdef"], **{**OFF, "min_chars": 4, "max_chars": 5})
    assert docs["text"] == ["abcd", "abcde"]


def test_everything_off_passes_documents_through(tmp_path):
    result, docs = clean(tmp_path, CRAFTED, **OFF)
    assert docs["text"] == CRAFTED and result.meta["report"] == []
    assert result.metrics == {"docs_in": 6.0, "docs_out": 6.0, "bytes_in": 110.0, "bytes_out": 110.0}


def test_empty_corpus_error_names_field_counts_and_knobs(tmp_path):
    with pytest.raises(EmptyCorpusError) as err:
        clean(tmp_path, CRAFTED, min_chars=20, max_chars=30)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith("data.pretrain: no document survived cleaning (6 in; removed per step: min_chars 5, max_chars 1)")
    assert "data.clean.min_chars (now 20)" in msg and "data.clean.max_chars (now 30)" in msg
    assert "dedup" not in msg
    out = tmp_path / "clean" / "out"
    assert not out.exists() and not partial_dir(out).exists()


def test_empty_download_is_reported_as_such(tmp_path):
    with pytest.raises(EmptyCorpusError, match=r"data.pretrain: the download produced no documents"):
        clean(tmp_path, [])


# ---------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory) -> StageResult:
    corpus = CorpusConfig(name="wikitext2", sources=[
        SourceConfig(uri=str(DATA / "wikitext2-valid.txt"), doc_boundary="wikitext_title")])
    return run_download(corpus, tmp_path_factory.mktemp("dl") / "out", "dl", field="data.pretrain")


def test_wikitext_defaults(tmp_path, wikitext):
    result = run_clean(CleanConfig(), wikitext, tmp_path / "out", "fp", corpus_field="data.pretrain")
    docs = read_documents(result.path(DOCUMENTS_FILE)).to_pydict()
    assert result.metrics["docs_in"] == 60 and result.metrics["docs_out"] == 60
    assert result.metrics["bytes_in"] == 1_121_681 - 2
    assert docs["id"] == [f"wikitext2/0/{n}" for n in range(60)]
    assert docs["text"][0].startswith("= Homarus gammarus =\n\n Homarus gammarus , known as")
    assert all(t == t.strip() and "\n\n\n" not in t and " \n" not in t for t in docs["text"])
    # WikiText is already NFC and free of control characters: only whitespace changes it.
    removed = {r["step"]: r["bytes_in"] - r["bytes_out"] for r in result.meta["report"]}
    assert removed["normalize_unicode"] == 0 and removed["strip_control"] == 0 and removed["normalize_whitespace"] > 0
    assert result.metrics["bytes_out"] == result.metrics["bytes_in"] - removed["normalize_whitespace"]


def test_two_runs_are_byte_identical(tmp_path, wikitext):
    cfg = CleanConfig(normalization="NFKC", min_chars=7000)
    a = run_clean(cfg, wikitext, tmp_path / "a", "fp", corpus_field="data.pretrain")
    b = run_clean(cfg, wikitext, tmp_path / "b", "fp", corpus_field="data.pretrain")
    assert a.path(DOCUMENTS_FILE).read_bytes() == b.path(DOCUMENTS_FILE).read_bytes()
    assert a.path(REPORT_FILE).read_bytes() == b.path(REPORT_FILE).read_bytes()
    assert a.files == b.files and a.metrics["docs_out"] == 50 and a.metrics["min_chars.docs_removed"] == 10
