"""Download stage: fetch a corpus's sources and cut them into documents.

A source is a local path (relative to the working directory), a ``file://``,
``http://`` or ``https://`` URL, or a Hub dataset ``hf:<dataset id>``. Files
are plain text (cut into documents by ``doc_boundary``), JSON lines or
parquet (one document per row, taken from ``text_column``). The stage writes

- ``documents.parquet``: string columns ``id``, ``text``, ``source``, one row
  per document in source order; ids are ``<corpus>/<source index>/<n>``;
- ``sources.json``: per source its uri, the sha256 and size of the raw bytes,
  and how many documents it gave.

Documents keep their text exactly as read (cleaning is the next stage's job);
only empty or whitespace-only pieces are dropped.

    >>> split_documents("a\\n\\n\\nb\\nc\\n", "blank_line")
    ['a', 'b\\nc']
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.config import CorpusConfig, SourceConfig
from lmpipe.stage import BuildOutput, StageResult, run_stage, sha256_file, write_json_atomic

DOCUMENTS_FILE = "documents.parquet"
SOURCES_FILE = "sources.json"
DOCUMENT_COLUMNS = ("id", "text", "source")

HTTP_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
CHUNK_BYTES = 1 << 20

# A WikiText article starts at " = Title = "; sections are " = = Section = = ".
WIKITEXT_TITLE = re.compile(r"^\s*= (?!=)(.*\S) =\s*$")
# Only these end a line; str.splitlines would also split on \x0c, \x1c, \u2028, ...
LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
LINE_END = re.compile(r"(?:\r\n|\r|\n)\Z")


class DownloadError(OSError):
    """A source could not be fetched, and trying again will not help (404, checksum mismatch)."""


class TransientDownloadError(DownloadError):
    """A source could not be fetched for a reason that may pass (refused, reset, timeout, 5xx, 429)."""


class SourceContentError(ValueError):
    """A source was read but its content is unusable (not UTF-8, missing text column)."""


# ---------------------------------------------------------------------------
# documents.parquet: written here, read by clean, tokenizer and shard stages


def write_documents(path: Path, ids: list[str], texts: list[str], sources: list[str]) -> None:
    """Write the documents table. Byte-identical for identical input (no timestamps in parquet)."""
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                      "source": pa.array(sources, pa.string())})
    pq.write_table(table, path)


def read_documents(path: Path) -> pa.Table:
    """Read a documents table written by ``write_documents``, checking its columns."""
    table = pq.read_table(path)
    if tuple(table.column_names[:3]) != DOCUMENT_COLUMNS:
        raise ValueError(f"{path}: expected columns {list(DOCUMENT_COLUMNS)}, got {table.column_names}")
    return table


# ---------------------------------------------------------------------------
# where a source lives


def _source_kind(uri: str) -> str:
    """'hf', 'http', 'file' (file:// URL), 'path' (local path) or the unknown scheme itself."""
    if uri.startswith("hf:"):
        return "hf"
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "file"
    # No scheme, or a one-letter "scheme" that is really a Windows drive letter.
    return "path" if len(scheme) <= 1 else scheme


def _local_path(uri: str, field: str) -> Path:
    if _source_kind(uri) == "path":
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{field}.uri: file URL {uri!r} names host {parsed.netloc!r}; only local files are supported")
    return Path(urllib.request.url2pathname(parsed.path))


def check_sources(corpus: CorpusConfig, field: str) -> None:
    """Cheap preflight without network: local files exist, URL schemes are known."""
    for i, source in enumerate(corpus.sources):
        f = f"{field}.sources[{i}]"
        kind = _source_kind(source.uri)
        if kind == "hf":
            if not source.uri[3:].strip():
                raise ValueError(f"{f}.uri: {source.uri!r} names no dataset; write hf:<dataset id>")
            if source.sha256 is not None:
                raise ValueError(f"{f}.sha256: cannot be checked for a Hub dataset ({source.uri}); remove it")
        elif kind in ("path", "file"):
            path = _local_path(source.uri, f)
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise FileNotFoundError(
                    f"{f}.uri: {str(path)!r} {what} (relative paths are resolved against {os.getcwd()})"
                )
        elif kind != "http":
            raise ValueError(
                f"{f}.uri: unknown scheme {kind!r} in {source.uri!r}; use a local path, file://, http(s):// or hf:"
            )


def local_source_digests(corpus: CorpusConfig) -> list[str | None]:
    """sha256 of each local source file (None for URLs and Hub ids, which name their content
    themselves or through their own sha256 field): part of the download stage's fingerprint."""
    digests: list[str | None] = []
    for i, source in enumerate(corpus.sources):
        if _source_kind(source.uri) in ("path", "file"):
            digests.append(sha256_file(_local_path(source.uri, f"sources[{i}]")))
        else:
            digests.append(None)
    return digests


# ---------------------------------------------------------------------------
# fetching


def download_url(url: str, dest: Path, *, field: str, sha256: str | None = None,
                 timeout: float = HTTP_TIMEOUT_S) -> str:
    """Stream ``url`` to ``dest`` and return the sha256 of its bytes.

    The bytes go to ``dest + '.part'`` first and are renamed only when complete
    and verified, so a failed or mismatched download leaves no file behind.
    """
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                received = 0
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                # http.client returns a short body without complaint when the server hangs up early.
                promised = response.headers.get("Content-Length")
                if promised is not None and received != int(promised):
                    raise http.client.IncompleteRead(b"", int(promised) - received)
        except urllib.error.HTTPError as err:
            # Servers say 429 and 5xx when busy or broken for a while; other 4xx are final.
            retry = err.code == 429 or err.code >= 500
            cls = TransientDownloadError if retry else DownloadError
            raise cls(f"{field}.uri: {url} answered HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # Refused, reset, timed out or cut short: the network, not the config, failed.
            reason = getattr(err, "reason", None) or err
            raise TransientDownloadError(f"{field}.uri: fetching {url} failed: {reason!r}") from err
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise DownloadError(
                f"{field}.sha256: {url} has sha256 {actual}, expected {sha256}; the download was deleted"
            )
        os.replace(part, dest)
        return actual
    finally:
        part.unlink(missing_ok=True)


def _fetch(source: SourceConfig, field: str, scratch: Path, index: int) -> tuple[Path, str]:
    """A local file holding the source's bytes, and their verified sha256."""
    if _source_kind(source.uri) == "http":
        name = Path(urllib.parse.urlparse(source.uri).path).name or "download"
        dest = scratch / f"{index}-{name}"
        return dest, download_url(source.uri, dest, field=field, sha256=source.sha256)
    path = _local_path(source.uri, field)
    actual = sha256_file(path)
    if source.sha256 is not None and actual != source.sha256:
        raise DownloadError(f"{field}.sha256: {path} has sha256 {actual}, expected {source.sha256}")
    return path, actual


# ---------------------------------------------------------------------------
# cutting text into documents


def decode_utf8(raw: bytes, *, name: str, field: str) -> str:
    """Strict UTF-8 (a leading byte-order mark is dropped); errors give the byte offset."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        raise SourceContentError(
            f"{field}.uri: {name} is not valid UTF-8: byte 0x{raw[offset]:02x} at offset {offset} ({err.reason})"
        ) from None


def _lines(text: str) -> list[str]:
    """Lines with their line endings; ''.join(_lines(t)) == t."""
    return LINE.findall(text)


def _blank(s: str) -> bool:
    return not s.strip()


def split_documents(text: str, boundary: str) -> list[str]:
    """Cut plain text into documents; whitespace-only pieces are dropped.

    file: the whole text; line: each line (without its line ending);
    blank_line: runs of non-blank lines (without the final line ending);
    wikitext_title: from each ' = Title = ' line up to the next one, verbatim,
    with any text before the first title as a document of its own.
    """
    if boundary == "file":
        pieces = [text]
    elif boundary == "line":
        pieces = [LINE_END.sub("", line) for line in _lines(text)]
    elif boundary == "blank_line":
        pieces, run = [], []
        for line in _lines(text) + [""]:  # the sentinel closes the last paragraph
            if _blank(line):
                if run:
                    pieces.append(LINE_END.sub("", "".join(run)))
                run = []
            else:
                run.append(line)
    elif boundary == "wikitext_title":
        pieces, run = [], []
        for line in _lines(text):
            if WIKITEXT_TITLE.match(line) and run:
                pieces.append("".join(run))
                run = []
            run.append(line)
        pieces.append("".join(run))
    else:
        raise ValueError(f"unknown doc_boundary {boundary!r}")
    return [p for p in pieces if not _blank(p)]


# ---------------------------------------------------------------------------
# reading one source


def _format(source: SourceConfig, path: Path) -> str:
    if source.format != "auto":
        return source.format
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _column_texts(dataset, source: SourceConfig, field: str, what: str) -> list[str]:
    """The text column of a datasets.Dataset as documents (None and blank rows dropped)."""
    if source.text_column not in dataset.column_names:
        raise SourceContentError(
            f"{field}.text_column: {what} has no column {source.text_column!r}; "
            f"available: {', '.join(dataset.column_names)}"
        )
    texts = dataset[source.text_column]
    for n, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise SourceContentError(
                f"{field}.text_column: {what} row {n} holds {type(t).__name__}, not text, in {source.text_column!r}"
            )
    return [t for t in texts if t is not None and not _blank(t)]


def _load_table_file(source: SourceConfig, path: Path, fmt: str, field: str, scratch: Path) -> list[str]:
    import datasets  # heavy import, only needed for these formats

    # A private cache inside the build directory: nothing leaks into ~/.cache, and it is removed after use.
    cache = scratch / "hf-cache"
    try:
        ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(path),
                                   split="train", cache_dir=str(cache))
        return _column_texts(ds, source, field, str(path))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _load_hub(source: SourceConfig, field: str) -> list[str]:
    import datasets

    dataset_id = source.uri[3:]
    ds = datasets.load_dataset(dataset_id, source.hf_config, split=source.hf_split)
    return _column_texts(ds, source, field, source.uri)


def load_source(source: SourceConfig, field: str, scratch: Path, index: int = 0) -> tuple[list[str], dict]:
    """Fetch one source and return its documents and its sources.json entry."""
    if _source_kind(source.uri) == "hf":
        docs = _load_hub(source, field)
        # No raw file to hash: the Hub revision identifies the data.
        return docs, {"uri": source.uri, "sha256": None, "bytes": None, "documents": len(docs)}
    path, digest = _fetch(source, field, scratch, index)
    size = path.stat().st_size
    fmt = _format(source, path)
    if fmt == "text":
        docs = split_documents(decode_utf8(path.read_bytes(), name=str(path), field=field), source.doc_boundary)
    else:
        docs = _load_table_file(source, path, fmt, field, scratch)
    return docs, {"uri": source.uri, "sha256": digest, "bytes": size, "documents": len(docs)}


# ---------------------------------------------------------------------------
# the stage


def run_download(corpus: CorpusConfig, out_dir: str | Path, fingerprint: str, *, field: str) -> StageResult:
    """Read every source of ``corpus`` into ``documents.parquet`` and ``sources.json``.

    field: the corpus's config path (e.g. "data.pretrain"), used in error messages.
    """
    check_sources(corpus, field)

    def build(tmp: Path) -> BuildOutput:
        scratch = tmp / "_scratch"  # downloads and caches; removed before publishing
        scratch.mkdir()
        ids: list[str] = []
        texts: list[str] = []
        origins: list[str] = []
        entries = []
        try:
            for i, source in enumerate(corpus.sources):
                docs, entry = load_source(source, f"{field}.sources[{i}]", scratch, i)
                ids += [f"{corpus.name}/{i}/{n}" for n in range(len(docs))]
                texts += docs
                origins += [source.uri] * len(docs)
                entries.append(entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_documents(tmp / DOCUMENTS_FILE, ids, texts, origins)
        write_json_atomic(tmp / SOURCES_FILE, entries)
        metrics = {
            "documents": float(len(texts)),
            "bytes": float(sum(len(t.encode("utf-8")) for t in texts)),
            "sources": float(len(entries)),
        }
        return BuildOutput(metrics=metrics, meta={"sources": entries})

    return run_stage("download", fingerprint, out_dir, build)
