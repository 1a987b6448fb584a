"""Project Gutenberg header and licence: cut from each file before it is split into documents, under every
doc_boundary, on a real book (tests/fixtures/books/pg11.txt), and reported by the clean stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpipe.artifacts import StageResult
from lmpipe.config.data import CleanConfig, CorpusConfig, SourceConfig
from lmpipe.data.documents import iter_document_batches
from lmpipe.data.gutenberg import HEADER_WINDOW, STEP, GutenbergCut, strip_gutenberg
from lmpipe.data.splitting import Line, split_lines
from lmpipe.stages.clean import run_clean, run_clean_chunk
from lmpipe.stages.download import run_download

BOOK = Path(__file__).resolve().parents[2] / "fixtures" / "books" / "pg11.txt"
RAW = BOOK.read_bytes()
BOM = 3  # the file starts with a UTF-8 byte order mark, which the reader drops
START = b"*** START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***"
END = b"*** END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***"
BODY_START = RAW.index(b"\n", RAW.index(START)) + 1  # just past the START line (line 23)
BODY_END = RAW.index(END)  # the END line (line 3408) and everything after it is the licence
HEADER_BYTES, LICENCE_BYTES = 811, 18_683
BODY = RAW[BODY_START:BODY_END].decode("utf-8")
REASON = (f"{STEP}: header {HEADER_BYTES} bytes, through line 23 {START.decode()!r}; "
          f"licence {LICENCE_BYTES} bytes, from line 3408 {END.decode()!r}")
BOUNDARIES = ("file", "line", "blank_line", "wikitext_title")


def test_the_fixture_is_the_whole_book_with_header_and_licence():
    assert RAW.startswith(b"\xef\xbb\xbfThe Project Gutenberg eBook of Alice's Adventures in Wonderland\n")
    assert RAW.endswith(b"subscribe to our email newsletter to hear about new eBooks.\n\n\n")
    assert b"Section 5. General Information About Project Gutenberg" in RAW[BODY_END:]
    assert (BODY_START - BOM, len(RAW) - BODY_END) == (HEADER_BYTES, LICENCE_BYTES)
    assert "gutenberg" not in BODY.lower()


def download(tmp_path: Path, boundary: str, on: bool = True, uri: Path = BOOK, name: str = "dl") -> StageResult:
    corpus = CorpusConfig(name="book", sources=[SourceConfig(uri=str(uri), doc_boundary=boundary)])
    return run_download(corpus, tmp_path / name, "fp", field="data.pretrain", chunk_bytes=1 << 24,
                        gutenberg_boilerplate=on)


def texts(result: StageResult) -> list[str]:
    return [t for b in iter_document_batches(result.out_dir, 4096, ("text",)) for t in b["text"]]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_header_and_licence_are_cut_from_the_file_before_it_is_split(tmp_path, boundary):
    result = download(tmp_path, boundary)
    docs = texts(result)
    cut = {"step": STEP, "file": str(BOOK), "bytes_removed": HEADER_BYTES + LICENCE_BYTES,
           "header_bytes": HEADER_BYTES, "licence_bytes": LICENCE_BYTES, "reason": REASON}
    assert result.meta["before_split"] == [{"step": STEP, "bytes_removed": 19_494, "files": [cut]}]
    assert result.metrics[f"{STEP}.bytes_removed"] == 19_494.0
    joined = "\n".join(docs)
    assert "gutenberg" not in joined.lower() and "Section 5" not in joined
    if boundary in ("file", "wikitext_title"):  # one document: exactly the text between the markers
        assert docs == [BODY]
        assert docs[0].startswith("\n[Illustration]\n") and docs[0].endswith("THE END\n\n\n\n")
    else:  # the first and last documents are the book's first and last lines
        assert (docs[0], docs[-1]) == ("[Illustration]", "THE END")
    # Without the cut, the header and licence are documents (or parts of the one document).
    whole = "\n".join(texts(download(tmp_path, boundary, on=False, name="off")))
    assert START.decode() in whole and "subscribe to our email newsletter" in whole


def test_the_cut_streams_lines_as_it_cuts_whole_texts():
    """cut_lines (line, blank_line, wikitext_title) and cut_text (file, records) agree, CRLF and old forms too."""
    cases = [
        RAW.decode("utf-8-sig"),
        RAW.decode("utf-8-sig").replace("\n", "\r\n"),
        "Header\n***START OF THIS PROJECT GUTENBERG EBOOK THE ADVENTURES\nOF TOM SAWYER ***\nbody\n\n"
        "End of the Project Gutenberg EBook of Tom Sawyer\n\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence\n",
        "Hamlet\n**The Small Print!**\nlegal\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nbody\n",
        "A book about Gutenberg and the printing press.\nNo markers.\n",
    ]
    for text in cases:
        by_text, by_lines = GutenbergCut("t"), GutenbergCut("t")
        whole = by_text.cut_text(text, numbered=True)
        lines = [Line(line, number) for number, line in enumerate(split_lines(text), 1)]
        assert "".join(line.text for line in by_lines.cut_lines(lines)) == whole == strip_gutenberg(text)
        assert by_lines.to_json() == by_text.to_json()
    crlf = GutenbergCut("t")
    crlf.cut_text(cases[1], numbered=True)
    assert (crlf.header_bytes, crlf.licence_bytes) == (HEADER_BYTES + 23, LICENCE_BYTES + RAW[BODY_END:].count(b"\n"))


def test_a_header_ending_after_the_window_is_kept_and_the_licence_still_cut():
    filler = ("x" * 99 + "\n") * (HEADER_WINDOW // 100 + 1)
    text = filler + START.decode() + "\nbody\n" + END.decode() + "\nlicence\n"
    cut = GutenbergCut("t")
    assert cut.cut_text(text) == filler + START.decode() + "\nbody\n"
    assert (cut.header_bytes, cut.licence_bytes) == (0, len(END) + len("\nlicence\n"))


def test_each_record_of_a_jsonl_source_is_cut(tmp_path):
    path = tmp_path / "books.jsonl"
    book = RAW.decode("utf-8-sig")
    path.write_text(json.dumps({"text": book}) + "\n" + json.dumps({"text": "plain record"}) + "\n" +
                    json.dumps({"text": book}) + "\n", encoding="utf-8")
    result = download(tmp_path, "file", uri=path)
    assert texts(result) == [BODY, "plain record", BODY]
    [entry] = result.meta["before_split"]
    [cut] = entry["files"]
    assert (cut["header_bytes"], cut["licence_bytes"]) == (2 * HEADER_BYTES, 2 * LICENCE_BYTES)
    assert cut["reason"] == (f"{STEP}: header {2 * HEADER_BYTES} bytes, through {START.decode()!r}; "
                             f"licence {2 * LICENCE_BYTES} bytes, from {END.decode()!r}")


def test_a_file_without_markers_is_read_unchanged_and_reported_as_nothing_cut(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("One.\n\nTwo.\n", encoding="utf-8")
    result = download(tmp_path, "blank_line", uri=plain)
    assert texts(result) == ["One.", "Two."]
    assert result.meta["before_split"] == [{"step": STEP, "bytes_removed": 0, "files": []}]
    assert "before_split" not in download(tmp_path, "blank_line", on=False, uri=plain, name="off").meta


def test_the_clean_report_has_the_cut_first_with_each_file_and_its_reason(tmp_path):
    docs = download(tmp_path, "blank_line")
    cfg = CleanConfig(gutenberg_boilerplate=True)
    chunks = [run_clean_chunk(cfg, docs.path(c), tmp_path / f"chunk{i}", f"c{i}")
              for i, c in enumerate(docs.meta["chunks"])]
    result = run_clean(cfg, chunks, tmp_path / "clean", "fp", corpus_field="data.pretrain",
                       before_split=docs.meta["before_split"])
    report = json.loads(result.path("clean_report.json").read_text())
    first, second = report["steps"][:2]
    n, nbytes = int(docs.metrics["documents"]), int(docs.metrics["bytes"])
    assert first == {"step": STEP, "docs_in": n, "docs_out": n, "bytes_in": nbytes + 19_494, "bytes_out": nbytes}
    assert (second["step"], second["bytes_in"]) == ("normalize_unicode", nbytes)
    assert report["totals"]["bytes_in"] == nbytes + 19_494
    assert report["before_split"] == docs.meta["before_split"]
    assert report["samples"][STEP] == [{"id": str(BOOK), "reason": REASON, "excerpt": ""}]
    assert result.metrics[f"{STEP}.bytes_removed"] == 19_494.0 and result.metrics[f"{STEP}.docs_removed"] == 0.0


def test_the_setting_re_runs_the_download_and_clean_stages_and_other_clean_settings_do_not_re_read():
    import tasks.stages as stages

    corpus = CorpusConfig(name="book", sources=[SourceConfig(uri=str(BOOK))])
    up = StageResult(stage="download", fingerprint="d", out_dir="unused")

    def download_fp(on: bool) -> str:
        return stages.DOWNLOAD.fingerprint({"corpus": corpus, "local_sha256": None, "chunk_bytes": 1024,
                                            "strict": False, "gutenberg_boilerplate": on})

    def clean_fp(cfg: CleanConfig) -> str:
        return stages.CLEAN.fingerprint({"cfg": cfg, "docs": up})

    assert download_fp(True) != download_fp(False)
    assert clean_fp(CleanConfig(gutenberg_boilerplate=True)) != clean_fp(CleanConfig())
    # the corpus's other cleaning settings are not the download's
    other = corpus.model_copy(update={"clean": CleanConfig(min_chars=5)})
    assert stages.DOWNLOAD.fingerprint({"corpus": other, "local_sha256": None, "chunk_bytes": 1024,
                                        "strict": False, "gutenberg_boilerplate": True}) == download_fp(True)
