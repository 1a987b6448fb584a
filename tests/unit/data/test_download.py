"""Download stage: streaming sources into a document set, bad records, limits, resumable HTTP on the loopback."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard

from lmpipe.config.data import CorpusConfig, SourceConfig
from lmpipe.data.documents import INDEX_FILE, iter_document_batches, read_index
from lmpipe.data.reader import ISSUE_KINDS, MAX_EXAMPLES, READ_REPORT_FILE
from lmpipe.data.sources import (
    SOURCES_FILE,
    DownloadError,
    SourceContentError,
    TransientDownloadError,
    cached_download_path,
    check_sources,
    download_url,
    local_source_digests,
)
from lmpipe.data.splitting import split_documents
from lmpipe.stages.contract import partial_dir
from lmpipe.stages.download import run_download
from tests.conftest import DATA

WIKI_VALID = DATA / "wikitext2-valid.txt"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
WIKI_VALID_SHA = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FIELD = "data.pretrain"
STRICT_HINT = "set data.strict=false to skip bad records"
PART0 = "documents/part-000000.parquet"
OUTPUT_FILES = [INDEX_FILE, PART0, READ_REPORT_FILE, SOURCES_FILE]


def corpus(*sources: SourceConfig, name: str = "c") -> CorpusConfig:
    return CorpusConfig(name=name, sources=list(sources))


def download(tmp_path: Path, cfg: CorpusConfig, name: str = "out", **kwargs):
    kwargs.setdefault("chunk_bytes", 1 << 24)
    return run_download(cfg, tmp_path / name, "fp", field=FIELD, **kwargs)


def documents(result) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"id": [], "text": [], "source": []}
    for batch in iter_document_batches(result.out_dir, 4096, ("id", "text", "source")):
        for key in out:
            out[key] += batch[key]
    return out


def read_json(result, name: str):
    return json.loads(result.path(name).read_text(encoding="utf-8"))


def issues(result) -> dict[str, int]:
    """The non-zero issue counts of a run's read report."""
    return {k: n for k, n in read_json(result, READ_REPORT_FILE)["issues"].items() if n}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# splitting plain text


@pytest.mark.parametrize(
    ("boundary", "expected"),
    [
        ("file", ["a b\r\n\n  \nc\nd\n\n"]),
        ("line", ["a b", "c", "d"]),
        ("blank_line", ["a b", "c\nd"]),
    ],
)
def test_split_documents_boundaries(boundary, expected):
    assert split_documents("a b\r\n\n  \nc\nd\n\n", boundary) == expected


def test_split_documents_old_mac_line_endings_and_whitespace_only_text():
    assert split_documents("x\ry\r\rz", "line") == ["x", "y", "z"]
    assert split_documents("x\ry\r\rz", "blank_line") == ["x\ry", "z"]
    for boundary in ("file", "line", "blank_line", "wikitext_title"):
        assert split_documents(" \n\t\n", boundary) == []


def test_split_documents_wikitext_titles_not_sections():
    text = "intro\n = A = \n x\n = = Sec = = \n y\n = B = \n z"
    assert split_documents(text, "wikitext_title") == ["intro\n", " = A = \n x\n = = Sec = = \n y\n", " = B = \n z"]


@pytest.mark.parametrize("boundary", ["file", "line", "blank_line", "wikitext_title"])
def test_streamed_file_matches_split_documents_on_real_text(tmp_path, boundary):
    # The stage reads line by line; the result must equal cutting the whole text at once.
    cfg = corpus(SourceConfig(uri=str(WIKI_VALID), doc_boundary=boundary))
    expected = split_documents(WIKI_VALID.read_text(encoding="utf-8"), boundary)
    assert documents(download(tmp_path, cfg))["text"] == expected


# ---------------------------------------------------------------------------
# local files on the real corpora


def test_wikitext_valid_sixty_articles_each_starting_at_its_title(tmp_path):
    result = download(tmp_path, corpus(SourceConfig(uri=str(WIKI_VALID), doc_boundary="wikitext_title",
                                                    sha256=WIKI_VALID_SHA), name="wikitext2"))
    docs = documents(result)
    assert len(docs["text"]) == 60
    assert docs["id"][:2] == ["wikitext2/0/0", "wikitext2/0/1"] and docs["id"][-1] == "wikitext2/0/59"
    assert set(docs["source"]) == {str(WIKI_VALID)}
    firsts = [t.split("\n", 1)[0] for t in docs["text"]]
    assert firsts[:3] == [" = Homarus gammarus = ", " = Frank <unk> = ", " = M @-@ 82 ( Michigan highway ) = "]
    assert all(f.startswith(" = ") and not f.startswith(" = = ") and f.endswith(" = ") for f in firsts)
    # Text is kept verbatim: only the blank line before the first title is gone.
    raw = WIKI_VALID.read_text(encoding="utf-8")
    assert raw.startswith(" \n = Homarus") and "".join(docs["text"]) == raw[2:]
    nbytes = len(raw.encode()) - 2
    assert result.metrics == {"documents": 60.0, "bytes": float(nbytes), "sources": 1.0, "chunks": 1.0,
                              "bad_records": 0.0}
    assert read_json(result, SOURCES_FILE) == [
        {"uri": str(WIKI_VALID), "files": [{"path": str(WIKI_VALID), "sha256": WIKI_VALID_SHA, "bytes": 1_121_681}],
         "documents": 60, "bytes": nbytes}
    ]
    assert result.meta["chunks"] == [PART0] and result.meta["read_issues"] == dict.fromkeys(ISSUE_KINDS, 0)
    assert read_json(result, READ_REPORT_FILE) == {
        "issues": dict.fromkeys(ISSUE_KINDS, 0), "examples": [],
        "per_source": [{"uri": str(WIKI_VALID), "issues": {}}]}
    assert read_index(result.out_dir)["documents"] == 60
    assert sorted(result.files) == OUTPUT_FILES  # no scratch left in the output


def test_tinyshakespeare_blank_line_speeches_and_two_sources(tmp_path):
    cfg = corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line", sha256=SHAKESPEARE_SHA),
                 SourceConfig(uri=str(SHAKESPEARE), doc_boundary="line"), name="shakes")
    result = download(tmp_path, cfg)
    docs = documents(result)
    assert result.metrics["documents"] == 7222 + 32777
    assert docs["id"][0] == "shakes/0/0" and docs["id"][7221] == "shakes/0/7221" and docs["id"][7222] == "shakes/1/0"
    assert docs["text"][0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert docs["text"][7222:7224] == ["First Citizen:", "Before we proceed any further, hear me speak."]
    assert docs["text"][7221].endswith("Whiles thou art waking.")
    # The unpinned source is hashed while it is read.
    assert [s["files"][0]["sha256"] for s in read_json(result, SOURCES_FILE)] == [SHAKESPEARE_SHA, SHAKESPEARE_SHA]


def test_relative_path_and_file_url(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rel = download(tmp_path, corpus(SourceConfig(uri="t.txt", doc_boundary="blank_line")), "rel")
    url = download(tmp_path, corpus(SourceConfig(uri=(tmp_path / "t.txt").as_uri(), doc_boundary="blank_line")), "url")
    assert documents(rel)["text"] == documents(url)["text"] == ["one", "two"]
    assert documents(rel)["source"] == ["t.txt", "t.txt"]


def test_bom_is_dropped_and_offsets_count_it(tmp_path):
    ok = tmp_path / "bom.txt"
    ok.write_bytes(b"\xef\xbb\xbfhi")
    assert documents(download(tmp_path, corpus(SourceConfig(uri=str(ok)))))["text"] == ["hi"]
    ok.write_bytes(b"\xef\xbb\xbfhi\xc3")  # truncated 2-byte sequence at offset 5
    with pytest.raises(SourceContentError, match="offset 5"):
        download(tmp_path, corpus(SourceConfig(uri=str(ok))), "out2", strict=True)


def test_local_sha256_mismatch_is_permanent(tmp_path):
    with pytest.raises(DownloadError) as err:
        download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), sha256="0" * 64)))
    assert not isinstance(err.value, TransientDownloadError)
    assert f"{FIELD}.sources[0].sha256" in str(err.value) and SHAKESPEARE_SHA in str(err.value)


# ---------------------------------------------------------------------------
# compression, globs, tables, Hub folders, fsspec


def test_gzip_and_zstd_give_the_plain_text_documents(tmp_path):
    raw = SHAKESPEARE.read_bytes()
    (tmp_path / "s.txt.gz").write_bytes(gzip.compress(raw, mtime=0))
    # Two zstd frames back to back: a file may hold several.
    half = len(raw) // 2
    zst = zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:])
    (tmp_path / "s.txt.zst").write_bytes(zst)
    (tmp_path / "s.data").write_bytes(zst)  # no telling extension: compression given
    plain = documents(download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line")),
                               "plain"))["text"]
    cfg = corpus(*(SourceConfig(uri=str(tmp_path / n), doc_boundary="blank_line") for n in ("s.txt.gz", "s.txt.zst")),
                 SourceConfig(uri=str(tmp_path / "s.data"), doc_boundary="blank_line", compression="zstd"))
    result = download(tmp_path, cfg)
    assert documents(result)["text"] == plain * 3 and len(plain) == 7222
    files = [s["files"][0] for s in read_json(result, SOURCES_FILE)]
    assert files[0]["sha256"] == sha((tmp_path / "s.txt.gz").read_bytes()) and files[1]["sha256"] == sha(zst)
    assert files[1]["bytes"] == len(zst) and issues(result) == {}


def test_glob_of_many_files_sorted_with_an_empty_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name, text in [("b.txt", "b1\nb2\n"), ("a.txt", "a1\n"), ("c.txt", ""), ("sub/e.txt", "e1\n"),
                       ("d.jsonl", '{"text": "ignored"}\n')]:
        (tmp_path / "d" / name).write_text(text, encoding="utf-8")
    result = download(tmp_path, corpus(SourceConfig(uri="d/**/*.txt", doc_boundary="line")))
    docs = documents(result)
    assert docs["text"] == ["a1", "b1", "b2", "e1"]
    assert docs["id"] == ["c/0/0", "c/0/1", "c/0/2", "c/0/3"]  # numbered across the glob's files
    assert docs["source"] == ["d/a.txt", "d/b.txt", "d/b.txt", "d/sub/e.txt"]
    entry = read_json(result, SOURCES_FILE)[0]
    assert [f["path"] for f in entry["files"]] == ["d/a.txt", "d/b.txt", "d/c.txt", "d/sub/e.txt"]
    assert entry["files"][2] == {"path": "d/c.txt", "bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}  # hashed too
    assert issues(result) == {"empty_file": 1} and result.metrics["bad_records.empty_file"] == 1.0
    assert read_json(result, READ_REPORT_FILE)["examples"] == [
        {"kind": "empty_file", "source": 0, "file": "d/c.txt", "message": "the file is empty"}]


def test_jsonl_and_parquet_text_column(tmp_path):
    rows = [{"body": "first doc", "n": 1}, {"body": "  ", "n": 2}, {"body": None, "n": 3},
            {"body": "ünï\ncode", "n": 4}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)  # rows come in several batches
    table_file = tmp_path / "d.data"  # no telling extension: format given explicitly
    table_file.write_bytes(parquet.read_bytes())
    cfg = corpus(SourceConfig(uri=str(jsonl), text_column="body"),
                 SourceConfig(uri=str(parquet), text_column="body"),
                 SourceConfig(uri=str(table_file), text_column="body", format="parquet"))
    result = download(tmp_path, cfg)
    docs = documents(result)
    assert docs["text"] == ["first doc", "ünï\ncode"] * 3
    assert docs["id"] == ["c/0/0", "c/0/1", "c/1/0", "c/1/1", "c/2/0", "c/2/1"]
    entries = read_json(result, SOURCES_FILE)
    assert entries[0]["files"][0]["sha256"] == sha(jsonl.read_bytes())
    assert entries[1]["files"][0] == {"path": str(parquet), "bytes": parquet.stat().st_size,
                                      "sha256": sha(parquet.read_bytes())}
    assert entries[1]["documents"] == 2 and entries[1]["bytes"] == len("first doc") + len("ünï\ncode".encode())
    assert issues(result) == {} and sorted(result.files) == OUTPUT_FILES


def test_id_column_in_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "d.jsonl.gz"
    lines = [{"doc": "a1", "t": "x"}, {"doc": 7, "t": "y"}, {"t": "no id"}, {"doc": [1], "t": "list id"},
             {"doc": True, "t": "bool id"}, {"doc": "blank", "t": " "}]
    jsonl.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode()))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"doc": ["p", "q"], "t": ["pp", "qq"]}), parquet)
    result = download(tmp_path, corpus(SourceConfig(uri=str(jsonl), text_column="t", id_column="doc"),
                                       SourceConfig(uri=str(parquet), text_column="t", id_column="doc")))
    docs = documents(result)
    assert docs["id"] == ["c/0/a1", "c/0/7", "c/1/p", "c/1/q"] and docs["text"] == ["x", "y", "pp", "qq"]
    assert issues(result) == {"missing_field": 1, "not_text": 2}
    examples = read_json(result, READ_REPORT_FILE)["examples"]
    assert [(e["kind"], e["line"]) for e in examples] == [("missing_field", 3), ("not_text", 4), ("not_text", 5)]
    assert examples[0]["message"] == "no id field 'doc'"


def test_hf_local_folder_is_streamed(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"row {i}", "key": f"k{i}"} for i in range(5)] + [{"text": None, "key": "k5"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    uri = f"hf:{folder}"
    result = download(tmp_path, corpus(SourceConfig(uri=uri, id_column="key", max_documents=4)))
    docs = documents(result)
    assert docs == {"id": [f"c/0/k{i}" for i in range(4)], "text": [f"row {i}" for i in range(4)],
                    "source": [uri] * 4}
    assert read_json(result, SOURCES_FILE) == [
        {"uri": uri, "files": [{"path": uri, "bytes": None, "sha256": None}], "documents": 4, "bytes": 20}]
    # A text column the dataset lacks is one bad record naming the columns there are.
    bad = download(tmp_path, corpus(SourceConfig(uri=uri, text_column="body")), "bad")
    assert issues(bad) == {"missing_field": 1} and bad.metrics["documents"] == 0
    assert "available: text, key" in read_json(bad, READ_REPORT_FILE)["examples"][0]["message"]
    with pytest.raises(SourceContentError, match=r"data\.pretrain\.sources\[0\]\.text_column: hf:.*no column 'body'"):
        download(tmp_path, corpus(SourceConfig(uri=uri, text_column="body")), "strict", strict=True)


@pytest.fixture
def memdir():
    """A fresh folder in fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/t{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_fsspec_memory_url_and_glob(tmp_path, memdir):
    fs, root = memdir
    fs.pipe(f"{root}/b.txt", b"b1\n\nb2\n")
    fs.pipe(f"{root}/a.txt.gz", gzip.compress(b"a1\n", mtime=0))
    fs.pipe(f"{root}/c.jsonl", b'{"text": "c1"}\n')
    result = download(tmp_path, corpus(SourceConfig(uri=f"memory://{root}/*.txt*", doc_boundary="blank_line"),
                                       SourceConfig(uri=f"memory://{root}/c.jsonl")))
    docs = documents(result)
    assert docs["text"] == ["a1", "b1", "b2", "c1"]
    assert docs["source"] == [f"memory://{root}/a.txt.gz", f"memory://{root}/b.txt", f"memory://{root}/b.txt",
                              f"memory://{root}/c.jsonl"]
    entries = read_json(result, SOURCES_FILE)
    assert entries[0]["files"] == [{"path": f"memory://{root}/a.txt.gz", "bytes": len(gzip.compress(b"a1\n", mtime=0)),
                                    "sha256": None}, {"path": f"memory://{root}/b.txt", "bytes": 7, "sha256": None}]
    with pytest.raises(FileNotFoundError, match=r"sources\[0\]\.uri: glob 'memory://.*/\*\.md' matches no files"):
        download(tmp_path, corpus(SourceConfig(uri=f"memory://{root}/*.md")), "none")


# ---------------------------------------------------------------------------
# limits


def test_max_documents_and_max_bytes_take_the_first_documents(tmp_path):
    full = documents(download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line")),
                              "full"))["text"]
    first = download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line",
                                                   max_documents=5)), "docs")
    assert documents(first)["text"] == full[:5] and first.metrics["documents"] == 5
    # The file was not read to its end, so its hash is not known.
    assert read_json(first, SOURCES_FILE)[0]["files"][0]["sha256"] is None
    sizes = [len(t.encode()) for t in full[:4]]
    for limit, kept in [(sum(sizes), 4), (sum(sizes) - 1, 3), (sizes[0] - 1, 0)]:
        result = download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line",
                                                        max_bytes=limit)), f"bytes{limit}")
        assert documents(result)["text"] == full[:kept] and result.metrics["bytes"] == sum(sizes[:kept])


def test_limit_stops_reading_before_later_files(tmp_path):
    (tmp_path / "a.txt").write_text("a1\na2\n", encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"b1\n" * 1000)[:50])  # truncated, never opened
    result = download(tmp_path, corpus(SourceConfig(uri=str(tmp_path / "*.txt*"), doc_boundary="line",
                                                    max_documents=2)))
    assert documents(result)["text"] == ["a1", "a2"]
    assert [f["path"] for f in read_json(result, SOURCES_FILE)[0]["files"]] == [str(tmp_path / "a.txt")]
    assert issues(result) == {}


# ---------------------------------------------------------------------------
# bad input: counted and skipped, or the first one raises in strict mode


CUT_LINES = 50_000


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bad_files(root: Path) -> dict[str, bytes]:
    """One file per bad-input kind (and good records around them)."""
    full = "".join(f"line {i}\n" for i in range(CUT_LINES)).encode()  # ~0.5 MB: several zstd blocks
    files = {
        "binary.txt": b"looks like text\x00\x01\x02",
        "utf8.txt": b"ok\n\nbad " + b"\xff" + b" here\nstill the same paragraph\n\nfine\n",
        "rows.jsonl": b'{"text": "j1"}\n'
                      b'not json\n'
                      b'{"body": "no text field"}\n'
                      b'{"text": 5}\n'
                      b'["a", "list"]\n'
                      b'{"text": "\xff"}\n'
                      b'\n'
                      b'{"text": null}\n'
                      b'{"text": "  "}\n'
                      b'{"text": "j2"}\n',
        "empty.txt": b"",
        "cut.txt.gz": cut_in_half(gzip.compress(full, mtime=0)),
        "cut2.txt.zst": cut_in_half(zstandard.ZstdCompressor().compress(full)),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def test_every_bad_input_kind_is_counted_in_lenient_mode(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad_files(src)
    cfg = corpus(SourceConfig(uri=str(src / "*.txt"), doc_boundary="blank_line"),
                 SourceConfig(uri=str(src / "rows.jsonl")),
                 SourceConfig(uri=str(src / "cut*"), doc_boundary="line"))
    result = download(tmp_path, cfg)
    docs = documents(result)
    assert issues(result) == {"binary_file": 1, "invalid_utf8": 2, "bad_json": 2, "missing_field": 1, "not_text": 1,
                              "empty_file": 1, "truncated": 2}
    assert result.metrics["bad_records"] == 10.0
    assert {k: v for k, v in result.metrics.items() if k.startswith("bad_records.")} == {
        "bad_records.binary_file": 1.0, "bad_records.invalid_utf8": 2.0, "bad_records.bad_json": 2.0,
        "bad_records.missing_field": 1.0, "bad_records.not_text": 1.0, "bad_records.empty_file": 1.0,
        "bad_records.truncated": 2.0}
    assert result.meta["read_issues"]["truncated"] == 2
    # The whole paragraph holding the bad byte is skipped; the jsonl keeps its good rows.
    by_file = {}
    for text, origin in zip(docs["text"], docs["source"], strict=True):
        by_file.setdefault(Path(origin).name, []).append(text)
    assert by_file["utf8.txt"] == ["ok", "fine"] and by_file["rows.jsonl"] == ["j1", "j2"]
    assert "binary.txt" not in by_file and "empty.txt" not in by_file
    # Truncated files keep the lines read before the cut, in order, and nothing after it.
    for name in ("cut.txt.gz", "cut2.txt.zst"):
        lines = by_file[name]
        assert 0 < len(lines) < CUT_LINES and lines == [f"line {i}" for i in range(len(lines))], name
    report = read_json(result, READ_REPORT_FILE)
    assert report["per_source"][1] == {"uri": str(src / "rows.jsonl"),
                                       "issues": {"bad_json": 2, "missing_field": 1, "not_text": 1, "invalid_utf8": 1}}
    examples = {(Path(e["file"]).name, e["kind"]): e for e in report["examples"]}
    assert examples["utf8.txt", "invalid_utf8"] == {
        "kind": "invalid_utf8", "source": 0, "file": str(src / "utf8.txt"), "line": 3,
        "message": "not valid UTF-8: byte 0xff at offset 8 (invalid start byte)"}
    assert examples["rows.jsonl", "invalid_utf8"]["message"] == (
        "not valid UTF-8: byte 0xff at offset 86 (invalid start byte)")
    assert examples["rows.jsonl", "missing_field"] == {
        "kind": "missing_field", "source": 1, "file": str(src / "rows.jsonl"), "line": 3,
        "message": "no field 'text'"}
    assert examples["rows.jsonl", "not_text"]["message"] == "field 'text' holds int, not text"
    assert examples["binary.txt", "binary_file"]["message"] == "NUL byte at offset 15: a binary file, skipped whole"
    assert "ended before the end-of-stream marker" in examples["cut.txt.gz", "truncated"]["message"]
    assert "zstd stream ended" in examples["cut2.txt.zst", "truncated"]["message"]


def test_examples_keep_only_the_first_twenty(tmp_path):
    (tmp_path / "x.jsonl").write_text("oops\n" * 30 + '{"text": "fine"}\n', encoding="utf-8")
    result = download(tmp_path, corpus(SourceConfig(uri=str(tmp_path / "x.jsonl"))))
    report = read_json(result, READ_REPORT_FILE)
    assert report["issues"]["bad_json"] == 30 and len(report["examples"]) == MAX_EXAMPLES == 20
    assert [e["line"] for e in report["examples"]] == list(range(1, 21))
    assert documents(result)["text"] == ["fine"]


@pytest.mark.parametrize(
    ("name", "fmt", "where", "detail"),
    [
        ("binary.txt", "text", "", "NUL byte at offset 15"),
        ("utf8.txt", "text", " line 3", "byte 0xff at offset 8"),
        ("rows.jsonl", "jsonl", " line 2", "not JSON"),
        ("empty.txt", "text", "", "the file is empty"),
        ("cut.txt.gz", "text", "", "cut short or corrupt"),
    ],
)
def test_strict_mode_raises_on_the_first_bad_record(tmp_path, name, fmt, where, detail):
    bad_files(tmp_path)
    cfg = corpus(SourceConfig(uri=str(SHAKESPEARE)), SourceConfig(uri=str(tmp_path / name), format=fmt))
    with pytest.raises(SourceContentError) as err:
        download(tmp_path, cfg, strict=True)
    msg = str(err.value)
    assert msg.startswith(f"{FIELD}.sources[1].uri: {tmp_path / name}{where}: ")
    assert detail in msg and msg.endswith(STRICT_HINT)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_strict_mode_names_text_column_for_field_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": [1]}\n', encoding="utf-8")
    with pytest.raises(SourceContentError) as err:
        download(tmp_path, corpus(SourceConfig(uri=str(tmp_path / "x.jsonl"))), strict=True)
    assert str(err.value) == (f"{FIELD}.sources[0].text_column: {tmp_path / 'x.jsonl'} line 2: field 'text' holds "
                              f"list, not text; {STRICT_HINT}")


def test_all_bad_still_publishes_an_empty_document_set(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    result = download(tmp_path, corpus(SourceConfig(uri=str(tmp_path / "e.txt"))))
    assert result.metrics["documents"] == 0 and result.meta["chunks"] == []
    assert read_index(result.out_dir)["chunks"] == [] and documents(result)["text"] == []


def test_missing_parquet_column_lists_available_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "d.parquet")
    result = download(tmp_path, corpus(SourceConfig(uri=str(tmp_path / "d.parquet"))))
    assert issues(result) == {"missing_field": 1}
    assert read_json(result, READ_REPORT_FILE)["examples"][0]["message"] == "no column(s) ['text']; available: body, n"


def test_a_100_mb_single_line_document_comes_through_whole(tmp_path):
    rng = random.Random(0)
    words = [rng.choice(["lorem", "ipsum", "dolor", "sit", "amet"]) for _ in range(1000)]
    block = (" ".join(words) + " ").encode()
    size = 100 * 2**20
    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(b"x" * (size - f.tell()))
    result = download(tmp_path, corpus(SourceConfig(uri=str(path), doc_boundary="line")), chunk_bytes=1 << 20)
    assert result.metrics["documents"] == 1 and result.metrics["bytes"] == size
    table = pq.read_table(result.path(PART0))
    assert table.num_rows == 1 and pc.binary_length(table.column("text"))[0].as_py() == size
    assert table.column("text")[0].as_py().encode()[: len(block)] == block


# ---------------------------------------------------------------------------
# chunks and determinism


def test_small_chunks_keep_the_order_and_split_where_the_bytes_say(tmp_path):
    cfg = corpus(SourceConfig(uri=str(WIKI_VALID), doc_boundary="wikitext_title"),
                 SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line"))
    whole = documents(download(tmp_path, cfg, "whole"))
    chunked = download(tmp_path, cfg, "chunked", chunk_bytes=200_000)
    assert documents(chunked) == whole
    # A chunk closes as soon as it holds chunk_bytes of text.
    expected, run, count = [], 0, 0
    for text in whole["text"]:
        run += len(text.encode())
        count += 1
        if run >= 200_000:
            expected.append(count)
            run, count = 0, 0
    expected += [count] if count else []
    index = read_index(chunked.out_dir)
    assert [c["documents"] for c in index["chunks"]] == expected and len(expected) > 5
    assert chunked.meta["chunks"] == [f"documents/part-{i:06d}.parquet" for i in range(len(expected))]
    assert chunked.metrics["chunks"] == len(expected)


def test_two_runs_give_byte_identical_output(tmp_path):
    cfg = corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line"),
                 SourceConfig(uri=str(WIKI_VALID), doc_boundary="wikitext_title"))
    a = download(tmp_path, cfg, "a", chunk_bytes=300_000)
    time.sleep(1.1)  # a timestamp in the files would now differ
    b = download(tmp_path, cfg, "b", chunk_bytes=300_000)
    assert len(a.meta["chunks"]) > 2
    for name in a.meta["chunks"] + [INDEX_FILE, SOURCES_FILE, READ_REPORT_FILE]:
        assert a.path(name).read_bytes() == b.path(name).read_bytes(), name
    assert a.files == b.files


# ---------------------------------------------------------------------------
# preflight and fingerprint digests


def test_check_sources_missing_files_globs_and_schemes(tmp_path):
    cfg = corpus(SourceConfig(uri=str(WIKI_VALID)), SourceConfig(uri=str(tmp_path / "nope.txt")))
    with pytest.raises(FileNotFoundError, match=r"data\.pretrain\.sources\[1\]\.uri: .*nope\.txt.* does not exist"):
        check_sources(cfg, FIELD)
    with pytest.raises(FileNotFoundError, match=r"sources\[0\]\.uri: .* is not a file"):
        check_sources(corpus(SourceConfig(uri=str(tmp_path))), FIELD)
    with pytest.raises(FileNotFoundError, match=r"sources\[0\]\.uri: glob '.*\*\.txt' matches no files"):
        check_sources(corpus(SourceConfig(uri=str(tmp_path / "*.txt"))), FIELD)
    with pytest.raises(ValueError, match=r"data\.pretrain\.sources\[0\]\.uri: unknown scheme 'nosuch'"):
        check_sources(corpus(SourceConfig(uri="nosuch://bucket/x.txt")), FIELD)
    with pytest.raises(ValueError, match=r"sources\[0\]\.sha256: can only be checked for a single local file"):
        check_sources(corpus(SourceConfig(uri="hf:wikitext", sha256="0" * 64)), FIELD)
    with pytest.raises(ValueError, match=r"sources\[0\]\.sha256: can only be checked"):
        check_sources(corpus(SourceConfig(uri=str(DATA / "*.txt"), sha256="0" * 64)), FIELD)
    with pytest.raises(ValueError, match=r"sources\[0\]\.uri: 'hf:' names no dataset"):
        check_sources(corpus(SourceConfig(uri="hf:")), FIELD)
    # http, hf and fsspec URLs are only checked for form (no network here).
    check_sources(corpus(SourceConfig(uri="https://example.invalid/x.txt", sha256="0" * 64),
                         SourceConfig(uri="hf:some/dataset"), SourceConfig(uri="memory://nothing/*.txt")), FIELD)
    # run_download checks before any work, so nothing is created.
    with pytest.raises(FileNotFoundError):
        download(tmp_path, cfg)
    assert not partial_dir(tmp_path / "out").exists()


def test_check_sources_names_the_missing_fsspec_package():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here")
    with pytest.raises(ValueError, match=r"sources\[0\]\.uri: 's3://b/x\.txt' needs a package .*s3fs"):
        check_sources(corpus(SourceConfig(uri="s3://b/x.txt")), FIELD)


def test_local_source_digests_files_globs_and_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "b.txt").write_bytes(b"bbb")
    (tmp_path / "g" / "a.txt").write_bytes(b"aa")
    cfg = corpus(SourceConfig(uri=str(SHAKESPEARE)), SourceConfig(uri="g/*.txt"),
                 SourceConfig(uri="https://example.invalid/x"), SourceConfig(uri="hf:x"))
    glob_digest = sha(json.dumps([["g/a.txt", sha(b"aa")], ["g/b.txt", sha(b"bbb")]]).encode())
    assert local_source_digests(cfg) == [SHAKESPEARE_SHA, glob_digest, None, None]
    cache = tmp_path / "cache" / "digests.json"
    assert local_source_digests(cfg, cache) == [SHAKESPEARE_SHA, glob_digest, None, None]
    stored = json.loads(cache.read_text())
    assert stored["format_version"] == 1 and stored["files"][str((tmp_path / "g" / "a.txt").resolve())]["size"] == 2
    # Same size and mtime: the cached digest is trusted without reading the file (here: knowingly stale).
    a = tmp_path / "g" / "a.txt"
    st = a.stat()
    a.write_bytes(b"zz")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert local_source_digests(cfg, cache)[1] == glob_digest
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: read again
    assert local_source_digests(cfg, cache)[1] == sha(json.dumps([["g/a.txt", sha(b"zz")],
                                                                  ["g/b.txt", sha(b"bbb")]]).encode())
    assert local_source_digests(cfg)[1] == local_source_digests(cfg, cache)[1]
    cache.write_text("not json")  # a broken cache costs a re-read, not a failure
    assert local_source_digests(cfg, cache)[0] == SHAKESPEARE_SHA


# ---------------------------------------------------------------------------
# HTTP against a real server on 127.0.0.1


class Handler(http.server.SimpleHTTPRequestHandler):
    root = str(DATA)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=self.root, **kwargs)

    def do_GET(self):
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.rsplit("/", 1)[1]))
        elif self.path == "/slow":
            time.sleep(2)
            self.send_error(500)
        elif self.path == "/truncated":
            # Promise 1000 bytes, send 10, hang up; Range requests are ignored.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


JSONL_ROWS = [{"body": "alpha"}, {"body": ""}, {"body": "beta\n"}]


def serve(handler: type) -> tuple[http.server.ThreadingHTTPServer, str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serves the bundled corpora and a small rows.jsonl."""
    root = tmp_path_factory.mktemp("www")
    for f in DATA.glob("*.txt"):
        (root / f.name).symlink_to(f)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL_ROWS), encoding="utf-8")
    httpd, url = serve(type("RootedHandler", (Handler,), {"root": str(root)}))
    yield url
    httpd.shutdown()
    httpd.server_close()


def test_http_download_with_right_sha256(tmp_path, server):
    url = f"{server}/wikitext2-valid.txt"
    result = download(tmp_path, corpus(SourceConfig(uri=url, sha256=WIKI_VALID_SHA, doc_boundary="wikitext_title")))
    local = download(tmp_path, corpus(SourceConfig(uri=str(WIKI_VALID), doc_boundary="wikitext_title")), "local")
    assert documents(result)["text"] == documents(local)["text"]
    assert set(documents(result)["source"]) == {url}
    assert read_json(result, SOURCES_FILE)[0]["files"] == [{"path": url, "sha256": WIKI_VALID_SHA,
                                                            "bytes": 1_121_681}]
    assert sorted(result.files) == OUTPUT_FILES  # the download went to scratch, which is gone


def test_http_jsonl_source(tmp_path, server):
    # The format comes from the URL's path; the file then takes the same path as a local one.
    result = download(tmp_path, corpus(SourceConfig(uri=f"{server}/rows.jsonl?x=1", text_column="body")))
    assert documents(result)["text"] == ["alpha", "beta\n"]
    assert read_json(result, SOURCES_FILE)[0]["files"][0]["sha256"] == sha(
        "".join(json.dumps(r) + "\n" for r in JSONL_ROWS).encode())


def test_http_sha256_mismatch_leaves_nothing(tmp_path, server):
    url = f"{server}/tinyshakespeare.txt"
    with pytest.raises(DownloadError) as err:
        download_url(url, tmp_path / "x.txt", field="data.finetune.sources[0]", sha256="ab" * 32)
    msg = str(err.value)
    assert not isinstance(err.value, TransientDownloadError)
    assert "data.finetune.sources[0].sha256" in msg and url in msg and "ab" * 32 in msg and SHAKESPEARE_SHA in msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError):
        download(tmp_path, corpus(SourceConfig(uri=url, sha256="ab" * 32)), download_dir=tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == [] and not (tmp_path / "out").exists()


def test_http_download_url_returns_digest(tmp_path, server):
    digest = download_url(f"{server}/tinyshakespeare.txt", tmp_path / "s.txt", field="f")
    assert digest == SHAKESPEARE_SHA and [p.name for p in tmp_path.iterdir()] == ["s.txt"]


def test_http_404_and_403_are_permanent(tmp_path, server):
    for code in (404, 403):
        url = f"{server}/status/{code}"
        with pytest.raises(DownloadError) as err:
            download(tmp_path, corpus(SourceConfig(uri=url)))
        assert type(err.value) is DownloadError
        msg = str(err.value)
        assert f"{FIELD}.sources[0].uri" in msg and url in msg and f"HTTP {code}" in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [500, 503, 429])
def test_http_5xx_and_429_are_transient(tmp_path, server, code):
    with pytest.raises(TransientDownloadError, match=f"HTTP {code}.*after 2 attempt"):
        download_url(f"{server}/status/{code}", tmp_path / "x", field="f", retries=1, backoff_s=0)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_transient(tmp_path):
    with socket.socket() as s:  # a port that was just free and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.txt"
    with pytest.raises(TransientDownloadError) as err:
        download(tmp_path, corpus(SourceConfig(uri=url)), retries=0)
    assert f"{FIELD}.sources[0].uri" in str(err.value) and url in str(err.value) and "Refused" in str(err.value)


def test_timeout_is_transient_and_a_cut_body_keeps_its_part(tmp_path, server):
    with pytest.raises(TransientDownloadError, match="timed out"):
        download_url(f"{server}/slow", tmp_path / "slow", field="f", timeout=0.3, retries=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TransientDownloadError, match="IncompleteRead.*10 bytes kept in cut.part"):
        download_url(f"{server}/truncated", tmp_path / "cut", field="f", retries=0)
    assert [p.name for p in tmp_path.iterdir()] == ["cut.part"]
    assert (tmp_path / "cut.part").read_bytes() == b"0123456789"


class RangeState:
    """What the range server serves and how it misbehaves; counts requests and body bytes sent."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests = 0
        self.served = 0
        self.ranges: list[str | None] = []
        self.drops = 0  # this many next responses are cut after drop_after body bytes
        self.drop_after = 0
        self.honour_range = True


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves bytes with Range support (206 + Content-Range), and drops connections on request."""

    state: RangeState

    def do_GET(self):
        st = self.state
        st.requests += 1
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        st.ranges.append(rng)
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and st.honour_range else 0
        if start >= len(data) and rng and st.honour_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng and st.honour_range else 200)
        if rng and st.honour_range:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if st.drops > 0:
            st.drops -= 1
            body = body[:st.drop_after]
        st.served += len(body)  # counted first: the client may finish before this thread runs on
        self.wfile.write(body)

    def log_message(self, *args):
        pass


PAYLOAD = random.Random(1).randbytes(1_000_000)
PAYLOAD_SHA = sha(PAYLOAD)


@pytest.fixture
def ranged():
    state = RangeState({"/blob.bin": PAYLOAD, "/doc.txt": b"one\n\ntwo\n"})
    httpd, url = serve(type("Ranged", (RangeHandler,), {"state": state}))
    yield state, url
    httpd.shutdown()
    httpd.server_close()


def test_dropped_connections_resume_with_range_requests(tmp_path, ranged):
    state, url = ranged
    state.drops, state.drop_after = 2, 300_000
    digest = download_url(f"{url}/blob.bin", tmp_path / "blob.bin", field="f", sha256=PAYLOAD_SHA, backoff_s=0)
    assert digest == PAYLOAD_SHA and (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    # Every byte was sent once: the retries asked only for what was missing.
    assert state.ranges == [None, "bytes=300000-", "bytes=600000-"] and state.served == len(PAYLOAD)
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_part_survives_a_failed_call_and_the_next_call_resumes(tmp_path, ranged):
    state, url = ranged
    state.drops, state.drop_after = 5, 300_000
    with pytest.raises(TransientDownloadError, match="after 2 attempt.*600000 bytes kept in blob.bin.part"):
        download_url(f"{url}/blob.bin", tmp_path / "blob.bin", field="f", retries=1, backoff_s=0)
    assert (tmp_path / "blob.bin.part").stat().st_size == 600_000 and not (tmp_path / "blob.bin").exists()
    assert download_url(f"{url}/blob.bin", tmp_path / "blob.bin", field="f", backoff_s=0) == PAYLOAD_SHA
    assert state.ranges == [None, "bytes=300000-", "bytes=600000-", "bytes=900000-"]
    assert state.served == len(PAYLOAD)


def test_server_without_range_support_starts_over(tmp_path, ranged):
    state, url = ranged
    state.drops, state.drop_after, state.honour_range = 1, 300_000, False
    assert download_url(f"{url}/blob.bin", tmp_path / "b", field="f", backoff_s=0) == PAYLOAD_SHA
    assert (tmp_path / "b").read_bytes() == PAYLOAD and state.served == 300_000 + len(PAYLOAD)


def test_complete_part_is_finished_by_a_416_answer(tmp_path, ranged):
    state, url = ranged
    (tmp_path / "b.part").write_bytes(PAYLOAD)  # a run that died between the last byte and the rename
    assert download_url(f"{url}/blob.bin", tmp_path / "b", field="f", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert state.ranges == ["bytes=1000000-"] and state.served == 0 and (tmp_path / "b").read_bytes() == PAYLOAD


def test_download_cache_is_reused_without_network(tmp_path, ranged):
    state, url = ranged
    cache = tmp_path / "downloads"
    cfg = corpus(SourceConfig(uri=f"{url}/doc.txt", doc_boundary="blank_line"),
                 SourceConfig(uri=f"{url}/blob.bin", sha256=PAYLOAD_SHA))
    first = download(tmp_path, cfg, "first", download_dir=cache)
    assert state.requests == 2 and issues(first) == {"binary_file": 1}  # random bytes are no text
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [cached_download_path(f"{url}/doc.txt", cache).name, cached_download_path(f"{url}/blob.bin", cache).name])
    assert cached_download_path(f"{url}/doc.txt", cache).name == f"{sha(f'{url}/doc.txt'.encode())[:16]}-doc.txt"
    second = download(tmp_path, cfg, "second", download_dir=cache)
    assert state.requests == 2  # nothing was fetched again
    assert documents(first) == documents(second) and documents(first)["text"] == ["one", "two"]
    assert read_json(second, SOURCES_FILE)[0]["files"][0]["sha256"] == sha(b"one\n\ntwo\n")
    # A damaged cached file with a pinned sha256 is fetched again.
    cached_download_path(f"{url}/blob.bin", cache).write_bytes(b"damaged")
    download(tmp_path, cfg, "third", download_dir=cache)
    assert state.requests == 3 and cached_download_path(f"{url}/blob.bin", cache).read_bytes() == PAYLOAD
