"""Download stage on the bundled corpora, local tables, and a real HTTP server on the loopback interface."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmpipe.config import CorpusConfig, SourceConfig
from lmpipe.download import (
    DOCUMENTS_FILE,
    SOURCES_FILE,
    DownloadError,
    SourceContentError,
    TransientDownloadError,
    check_sources,
    download_url,
    read_documents,
    run_download,
    split_documents,
)
from lmpipe.stage import partial_dir

DATA = Path(__file__).resolve().parents[1] / "data"
WIKI_VALID = DATA / "wikitext2-valid.txt"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
WIKI_VALID_SHA = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FIELD = "data.pretrain"


def corpus(*sources: SourceConfig, name: str = "c") -> CorpusConfig:
    return CorpusConfig(name=name, sources=list(sources))


def download(tmp_path: Path, cfg: CorpusConfig, name: str = "out"):
    return run_download(cfg, tmp_path / name, "fp", field=FIELD)


def documents(result) -> dict[str, list[str]]:
    return read_documents(result.path(DOCUMENTS_FILE)).to_pydict()


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
    assert result.metrics == {"documents": 60.0, "bytes": float(len(raw.encode()) - 2), "sources": 1.0}
    assert json.loads(result.path(SOURCES_FILE).read_text()) == [
        {"uri": str(WIKI_VALID), "sha256": WIKI_VALID_SHA, "bytes": 1_121_681, "documents": 60}
    ]
    assert sorted(result.files) == [DOCUMENTS_FILE, SOURCES_FILE]  # no scratch left in the output


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


def test_relative_path_and_file_url(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rel = download(tmp_path, corpus(SourceConfig(uri="t.txt", doc_boundary="blank_line")), "rel")
    url = download(tmp_path, corpus(SourceConfig(uri=(tmp_path / "t.txt").as_uri(), doc_boundary="blank_line")), "url")
    assert documents(rel)["text"] == documents(url)["text"] == ["one", "two"]


def test_not_utf8_names_file_field_and_byte_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo ".encode() + b"\xff" + " wörld".encode())
    with pytest.raises(SourceContentError) as err:
        download(tmp_path, corpus(SourceConfig(uri=str(bad))))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert f"{FIELD}.sources[0].uri" in msg and str(bad) in msg and "byte 0xff at offset 7" in msg
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_bom_is_dropped_and_offsets_count_it(tmp_path):
    ok = tmp_path / "bom.txt"
    ok.write_bytes(b"\xef\xbb\xbfhi")
    assert documents(download(tmp_path, corpus(SourceConfig(uri=str(ok)))))["text"] == ["hi"]
    ok.write_bytes(b"\xef\xbb\xbfhi\xc3")  # truncated 2-byte sequence at offset 5
    with pytest.raises(SourceContentError, match="offset 5"):
        download(tmp_path, corpus(SourceConfig(uri=str(ok))), "out2")


def test_local_sha256_mismatch_is_permanent(tmp_path):
    with pytest.raises(DownloadError) as err:
        download(tmp_path, corpus(SourceConfig(uri=str(SHAKESPEARE), sha256="0" * 64)))
    assert not isinstance(err.value, TransientDownloadError)
    assert f"{FIELD}.sources[0].sha256" in str(err.value) and SHAKESPEARE_SHA in str(err.value)


def test_check_sources_missing_file_and_unknown_scheme(tmp_path):
    cfg = corpus(SourceConfig(uri=str(WIKI_VALID)), SourceConfig(uri=str(tmp_path / "nope.txt")))
    with pytest.raises(FileNotFoundError, match=r"data\.pretrain\.sources\[1\]\.uri: .*nope\.txt.* does not exist"):
        check_sources(cfg, FIELD)
    with pytest.raises(FileNotFoundError, match=r"sources\[0\]\.uri: .* is not a file"):
        check_sources(corpus(SourceConfig(uri=str(tmp_path))), FIELD)
    with pytest.raises(ValueError, match=r"data\.pretrain\.sources\[0\]\.uri: unknown scheme 's3'"):
        check_sources(corpus(SourceConfig(uri="s3://bucket/x.txt")), FIELD)
    with pytest.raises(ValueError, match=r"sources\[0\]\.sha256: cannot be checked for a Hub dataset"):
        check_sources(corpus(SourceConfig(uri="hf:wikitext", sha256="0" * 64)), FIELD)
    # http and hf are only checked for form (no network here).
    check_sources(corpus(SourceConfig(uri="https://example.invalid/x.txt"), SourceConfig(uri="hf:some/dataset")), FIELD)
    # run_download checks before any work, so nothing is created.
    with pytest.raises(FileNotFoundError):
        download(tmp_path, cfg)
    assert not partial_dir(tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# jsonl and parquet through datasets (the same loader the hf: path uses)


def test_jsonl_and_parquet_text_column(tmp_path):
    rows = [{"body": "first doc", "n": 1}, {"body": "  ", "n": 2}, {"body": None, "n": 3}, {"body": "ünï\ncode", "n": 4}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    table_file = tmp_path / "d.data"  # no telling extension: format given explicitly
    table_file.write_bytes(parquet.read_bytes())
    cfg = corpus(SourceConfig(uri=str(jsonl), text_column="body"),
                 SourceConfig(uri=str(parquet), text_column="body"),
                 SourceConfig(uri=str(table_file), text_column="body", format="parquet"))
    result = download(tmp_path, cfg)
    docs = documents(result)
    assert docs["text"] == ["first doc", "ünï\ncode"] * 3
    assert docs["id"] == ["c/0/0", "c/0/1", "c/1/0", "c/1/1", "c/2/0", "c/2/1"]
    entries = json.loads(result.path(SOURCES_FILE).read_text())
    assert entries[0]["sha256"] == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    assert entries[1]["bytes"] == parquet.stat().st_size and entries[1]["documents"] == 2
    assert sorted(result.files) == [DOCUMENTS_FILE, SOURCES_FILE]  # the datasets cache was removed


def test_missing_text_column_lists_available_columns(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "x", "n": 1}\n', encoding="utf-8")
    with pytest.raises(SourceContentError) as err:
        download(tmp_path, corpus(SourceConfig(uri=str(jsonl))))
    msg = str(err.value)
    assert f"{FIELD}.sources[0].text_column" in msg and "no column 'text'" in msg and "available: body, n" in msg


def test_non_string_text_column_is_an_error(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(SourceContentError, match="row 0 holds int"):
        download(tmp_path, corpus(SourceConfig(uri=str(jsonl))))


def test_two_runs_give_byte_identical_documents(tmp_path):
    cfg = corpus(SourceConfig(uri=str(SHAKESPEARE), doc_boundary="blank_line"))
    a = download(tmp_path, cfg, "a")
    time.sleep(1.1)  # a timestamp in the file would now differ
    b = download(tmp_path, cfg, "b")
    assert a.path(DOCUMENTS_FILE).read_bytes() == b.path(DOCUMENTS_FILE).read_bytes()
    assert a.files == b.files


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
            # Promise 1000 bytes, send 10, hang up: the client must not keep the stub.
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serves the bundled corpora and a small rows.jsonl."""
    root = tmp_path_factory.mktemp("www")
    for f in DATA.glob("*.txt"):
        (root / f.name).symlink_to(f)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL_ROWS), encoding="utf-8")
    handler = type("RootedHandler", (Handler,), {"root": str(root)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_download_with_right_sha256(tmp_path, server):
    url = f"{server}/wikitext2-valid.txt"
    result = download(tmp_path, corpus(SourceConfig(uri=url, sha256=WIKI_VALID_SHA, doc_boundary="wikitext_title")))
    local = download(tmp_path, corpus(SourceConfig(uri=str(WIKI_VALID), doc_boundary="wikitext_title")), "local")
    assert documents(result)["text"] == documents(local)["text"]
    assert set(documents(result)["source"]) == {url}
    assert json.loads(result.path(SOURCES_FILE).read_text()) == [
        {"uri": url, "sha256": WIKI_VALID_SHA, "bytes": 1_121_681, "documents": 60}
    ]
    assert sorted(result.files) == [DOCUMENTS_FILE, SOURCES_FILE]


def test_http_jsonl_source(tmp_path, server):
    # The format comes from the URL's extension; the file then takes the same path as a local one.
    result = download(tmp_path, corpus(SourceConfig(uri=f"{server}/rows.jsonl?x=1", text_column="body")))
    assert documents(result)["text"] == ["alpha", "beta\n"]
    assert sorted(result.files) == [DOCUMENTS_FILE, SOURCES_FILE]


def test_http_sha256_mismatch_leaves_nothing(tmp_path, server):
    url = f"{server}/tinyshakespeare.txt"
    with pytest.raises(DownloadError) as err:
        download_url(url, tmp_path / "x.txt", field="data.finetune.sources[0]", sha256="ab" * 32)
    msg = str(err.value)
    assert not isinstance(err.value, TransientDownloadError)
    assert "data.finetune.sources[0].sha256" in msg and url in msg and "ab" * 32 in msg and SHAKESPEARE_SHA in msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError):
        download(tmp_path, corpus(SourceConfig(uri=url, sha256="ab" * 32)))
    assert list(tmp_path.iterdir()) == []


def test_http_download_url_returns_digest(tmp_path, server):
    digest = download_url(f"{server}/tinyshakespeare.txt", tmp_path / "s.txt", field="f")
    assert digest == SHAKESPEARE_SHA and [p.name for p in tmp_path.iterdir()] == ["s.txt"]


def test_http_404_and_403_are_permanent(tmp_path, server):
    for code in (404, 403):
        url = f"{server}/status/{code}"
        with pytest.raises(DownloadError) as err:
            download(tmp_path, corpus(SourceConfig(uri=url)))
        assert type(err.value) is DownloadError
        assert f"{FIELD}.sources[0].uri" in str(err.value) and url in str(err.value) and f"HTTP {code}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [500, 503, 429])
def test_http_5xx_and_429_are_transient(tmp_path, server, code):
    with pytest.raises(TransientDownloadError, match=f"HTTP {code}"):
        download_url(f"{server}/status/{code}", tmp_path / "x", field="f")
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_transient(tmp_path):
    with socket.socket() as s:  # a port that was just free and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.txt"
    with pytest.raises(TransientDownloadError) as err:
        download(tmp_path, corpus(SourceConfig(uri=url)))
    assert f"{FIELD}.sources[0].uri" in str(err.value) and url in str(err.value) and "Refused" in str(err.value)


def test_timeout_and_truncated_body_are_transient_and_leave_nothing(tmp_path, server):
    with pytest.raises(TransientDownloadError, match="timed out"):
        download_url(f"{server}/slow", tmp_path / "slow", field="f", timeout=0.3)
    with pytest.raises(TransientDownloadError, match="IncompleteRead"):
        download_url(f"{server}/truncated", tmp_path / "cut", field="f")
    assert list(tmp_path.iterdir()) == []
