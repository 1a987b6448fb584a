"""Download stage: stream a corpus's sources into a document set, in bounded memory.

Sources (``data.<corpus>.sources[i].uri``):

- a local path or glob (``data/*.jsonl.gz``, ``data/**/*.txt``), relative to
  the working directory, or a ``file://`` URL (globs allowed too);
- ``http://`` / ``https://``: fetched by :func:`download_url` into the
  download cache (``<workdir>/downloads``), resuming an interrupted transfer
  with a ``Range`` request; a complete file there is reused without network;
- any other fsspec URL (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...),
  globs expanded by the filesystem; its package (s3fs, gcsfs ...) must be
  installed;
- ``hf:<dataset id>`` (or ``hf:<local folder>`` of jsonl/parquet files),
  streamed with ``datasets.load_dataset(id, hf_config, split=hf_split,
  revision=hf_revision, streaming=True)``. Pin ``hf_revision``: the stage
  fingerprint only knows the name.

Globs expand in sorted order, so the corpus order never depends on the file
system. Files are plain text (cut into documents by ``doc_boundary``), JSON
lines, or parquet (one document per record, from ``text_column``; optional
``id_column``). ``.gz`` and ``.zst`` files are decompressed on the fly
(or as ``compression`` says). Text is read line by line and parquet a record
batch at a time, so no source is ever held in memory whole (with
``doc_boundary: file`` a file is one document, held about twice while it is
decoded). ``max_documents`` and ``max_bytes`` take the first documents of a
source, at most that many documents or UTF-8 bytes (reading stops at the
first document that would go over), and stop reading it.

The stage writes a document set (see :mod:`lmpipe.data.documents`: ``documents/``
chunks of about ``data.chunk_bytes`` plus ``documents.json``) with ids
``<corpus>/<source index>/<n>`` (n counts within the source, across its
files) or ``<corpus>/<source index>/<id_column value>``; the ``source``
column is the file's path or URL as given or as the glob expanded it (for
``hf:`` the uri). Beside it:

- ``sources.json``: per source its uri, files (path, sha256 of the raw bytes,
  size), documents and UTF-8 bytes kept; sha256 is None for ``hf:`` and fsspec
  sources and for a file whose reading a limit cut short;
- ``read_report.json``: bad records counted by kind, the first
  ``MAX_EXAMPLES`` with file, line (1-based) or row (0-based) and message.

Bad input never stops a lenient run (``data.strict=false``, the default); it
is counted and skipped: a binary file (NUL in its first 8 KiB, whole file),
invalid UTF-8 (the document holding it), a JSON line that is not a JSON
object, a record without the text (or id) field, a text field that is not a
string, an empty file, a truncated or corrupt compressed file (the documents
before the cut are kept). With ``data.strict=true`` the first of them fails
the stage. Documents keep their text exactly as read (cleaning is the next
stage's job); empty or whitespace-only ones, and null text fields, are
dropped silently. The one exception: with ``gutenberg_boilerplate`` a Project
Gutenberg file's header and licence are cut before the file is split
(``lmpipe.data.gutenberg``), since once split they cannot be told from the book.

    >>> split_documents("a\\n\\n\\nb\\nc\\n", "blank_line")
    ['a', 'b\\nc']
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import hashlib
import io
import json
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from lmpipe.artifacts import sha256_file
from lmpipe.config.data import SourceConfig
from lmpipe.data.documents import utf8_len
from lmpipe.data.gutenberg import GutenbergCut
from lmpipe.data.sources import (
    COPY_BYTES,
    HTTP_BACKOFF_S,
    HTTP_RETRIES,
    DownloadError,
    SourceContentError,
    TransientDownloadError,
    expand_fsspec,
    expand_local,
    fetch_http,
    sha256_mismatch,
    source_kind,
)
from lmpipe.data.splitting import Line, Piece, document_pieces, is_blank, split_lines, utf8_error, whole_file_piece

READ_REPORT_FILE = "read_report.json"
READ_BUFFER = 1 << 20
SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a binary file
PARQUET_BATCH_ROWS = 1024
MAX_EXAMPLES = 20
ISSUE_KINDS = ("binary_file", "invalid_utf8", "bad_json", "missing_field", "not_text", "empty_file", "truncated")


# ---------------------------------------------------------------------------
# bad records: counted, or fatal in strict mode


class ReadReport:
    """Bad records by kind, with the first MAX_EXAMPLES; in strict mode the first one raises."""

    def __init__(self, field: str, strict: bool, num_sources: int) -> None:
        self.field = field
        self.strict = strict
        self.issues = dict.fromkeys(ISSUE_KINDS, 0)
        self.per_source: list[dict[str, int]] = [{} for _ in range(num_sources)]
        self.examples: list[dict[str, Any]] = []

    def add(self, index: int, kind: str, file: str, message: str, *, line: int | None = None,
            row: int | None = None, attr: str = "uri") -> None:
        where = f" line {line}" if line is not None else f" row {row}" if row is not None else ""
        if self.strict:
            raise SourceContentError(f"{self.field}.sources[{index}].{attr}: {file}{where}: {message}; "
                                     "set data.strict=false to skip bad records")
        self.issues[kind] += 1
        self.per_source[index][kind] = self.per_source[index].get(kind, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            example: dict[str, Any] = {"kind": kind, "source": index, "file": file, "message": message}
            if line is not None:
                example["line"] = line
            if row is not None:
                example["row"] = row
            self.examples.append(example)

    @property
    def total(self) -> int:
        return sum(self.issues.values())

    def to_json(self, uris: list[str]) -> dict[str, Any]:
        return {"issues": self.issues, "examples": self.examples,
                "per_source": [{"uri": u, "issues": c} for u, c in zip(uris, self.per_source, strict=True)]}


# ---------------------------------------------------------------------------
# cutting text into documents


class _Tap(io.RawIOBase):
    """A raw reader that hashes and counts the bytes passing through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = cast(io.RawIOBase, self.raw).readinto(buffer)
        if n:
            view = memoryview(buffer)[:n]
            self.sha.update(view)
            self.count += n
        return n or 0

    def finish(self) -> str:
        """Hash what the reader left unread and return the file's sha256."""
        while block := self.raw.read(COPY_BYTES):
            self.sha.update(block)
            self.count += len(block)
        return self.sha.hexdigest()


class _ZstdRaw(io.RawIOBase):
    """zstd decompression that notices a stream cut inside a frame (zstandard's stream_reader does not)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            out.append(self._dobj.decompress(data))
            self._in_frame = True
            if not self._dobj.eof:
                break
            data = self._dobj.unused_data  # the next frame (zstd files may hold several)
            self._dobj = self._dctx.decompressobj()
            self._in_frame = False
        self._out, self._pos = b"".join(out), 0

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            data = self.raw.read(1 << 16)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its last frame")
                return 0
            self._feed(data)
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


def file_compression(source: SourceConfig, name: str) -> str:
    """How a file of ``source`` is compressed: "gzip", "zstd" or "none" (its setting, else its name's suffix)."""
    if source.compression != "auto":
        return source.compression
    suffix = Path(urllib.parse.urlparse(name).path if "://" in name else name).suffix.lower()
    return {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}.get(suffix, "none")


def file_format(source: SourceConfig, name: str) -> str:
    """How a file of ``source`` is read: "text", "jsonl" or "parquet" (its setting, else its name's suffix)."""
    if source.format != "auto":
        return source.format
    path = Path(urllib.parse.urlparse(name).path if "://" in name else name)
    if path.suffix.lower() in (".gz", ".zst", ".zstd"):
        path = path.with_suffix("")
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


class _Capped(io.RawIOBase):
    """A local file read up to ``limit`` bytes (its size when it was listed): bytes appended while it is read are
    left for the next read, so the size and the sha256 recorded for it describe the same bytes."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw, self.limit = raw, limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: Any) -> int:
        left = self.limit - self.raw.tell()
        if left <= 0:
            return 0
        view = memoryview(buffer)
        return cast(io.RawIOBase, self.raw).readinto(view[: min(len(view), left)]) or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_capped(path: Path, limit: int) -> IO[bytes]:
    return cast(IO[bytes], _Capped(open(path, "rb", buffering=0), limit))


def _decompressed(raw: IO[bytes], compression: str) -> IO[bytes]:
    buffered = io.BufferedReader(cast(io.RawIOBase, raw), READ_BUFFER)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return io.BufferedReader(_ZstdRaw(buffered), READ_BUFFER)
    return buffered


def _read_head(stream: IO[bytes]) -> bytes:
    parts, size = [], 0
    while size < SNIFF_BYTES and (block := stream.read(SNIFF_BYTES - size)):
        parts.append(block)
        size += len(block)
    return b"".join(parts)


def _byte_lines(head: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    """Lines (ending in b'\\n', the last maybe not) of head + the rest of stream, read with readline."""
    start = 0
    while (end := head.find(b"\n", start)) >= 0:
        yield head[start:end + 1]
        start = end + 1
    if start < len(head):
        yield head[start:] + stream.readline()
    yield from iter(stream.readline, b"")


def _decoded_lines(byte_lines: Iterable[bytes]) -> Iterator[Line]:
    """Text lines; a line that is not UTF-8 comes through decoded with U+FFFD, its error noted."""
    offset = 0
    for number, raw in enumerate(byte_lines, 1):
        skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        body = raw[skip:] if skip else raw
        error = None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            error = utf8_error(body, err, offset + skip)
            text = body.decode("utf-8", "replace")
        offset += len(raw)
        if "\r" in text:
            for sub in split_lines(text):
                yield Line(sub, number, error)
        else:
            yield Line(text, number, error)


# ---------------------------------------------------------------------------
# records: what one file or dataset gives


@dataclass
class _Doc:
    text: str
    nbytes: int
    doc_id: str | None = None


@dataclass
class _FileEntry:
    path: str
    bytes: int | None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class SourceReader:
    """Reads one source (all files of a glob, or a Hub dataset) into documents, reporting bad records."""

    source: SourceConfig
    index: int
    field: str  # e.g. data.pretrain.sources[0]
    report: ReadReport
    scratch: Path
    download_dir: Path
    retries: int = HTTP_RETRIES
    backoff_s: float = HTTP_BACKOFF_S
    gutenberg: bool = False  # cut Project Gutenberg headers and licences from each file (record) before splitting
    files: list[_FileEntry] = dc_field(default_factory=list)
    cuts: list[GutenbergCut] = dc_field(default_factory=list)  # per file read, when gutenberg is on

    def _start_file(self, entry: _FileEntry) -> None:
        self.files.append(entry)
        if self.gutenberg:
            self.cuts.append(GutenbergCut(entry.path))

    def _cut(self, text: str, *, numbered: bool = False) -> str:
        return self.cuts[-1].cut_text(text, numbered=numbered) if self.gutenberg else text

    def _issue(self, kind: str, file: str, message: str, **where: Any) -> None:
        self.report.add(self.index, kind, file, message, **where)

    # -- one record (jsonl line, parquet row, dataset example) -----------------

    def _record(self, obj: Any, file: str, where: dict[str, int]) -> _Doc | None:
        src = self.source
        if not isinstance(obj, dict):
            self._issue("bad_json", file, f"not a JSON object but {type(obj).__name__}", **where)
            return None
        if src.text_column not in obj:
            self._issue("missing_field", file, f"no field {src.text_column!r}", attr="text_column", **where)
            return None
        text = obj[src.text_column]
        if text is None:
            return None
        if not isinstance(text, str):
            self._issue("not_text", file, f"field {src.text_column!r} holds {type(text).__name__}, not text",
                        attr="text_column", **where)
            return None
        doc_id = None
        if src.id_column is not None:
            value = obj.get(src.id_column)
            if value is None:
                self._issue("missing_field", file, f"no id field {src.id_column!r}", attr="id_column", **where)
                return None
            if isinstance(value, bool) or not isinstance(value, str | int):
                self._issue("not_text", file, f"id field {src.id_column!r} holds {type(value).__name__}",
                            attr="id_column", **where)
                return None
            doc_id = str(value)
        text = self._cut(text)
        if is_blank(text):
            return None
        return _Doc(text, utf8_len(text), doc_id)

    # -- formats -------------------------------------------------------------

    def _text_docs(self, pieces: Iterable[Piece], name: str) -> Iterator[_Doc]:
        for piece in pieces:
            if piece.error is not None:
                self._issue("invalid_utf8", name, piece.error, line=piece.error_line)
            elif not is_blank(piece.text):
                yield _Doc(piece.text, utf8_len(piece.text))

    def _jsonl_docs(self, lines: Iterable[Line], name: str) -> Iterator[_Doc]:
        for line in lines:
            if is_blank(line.text):
                continue
            where = {"line": line.number}
            if line.error is not None:
                self._issue("invalid_utf8", name, line.error, **where)
                continue
            try:
                obj = json.loads(line.text)
            except ValueError as err:
                self._issue("bad_json", name, f"not JSON: {err}", **where)
                continue
            if (doc := self._record(obj, name, where)) is not None:
                yield doc

    def _parquet_docs(self, fileobj: IO[bytes], name: str) -> Iterator[_Doc]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(fileobj)
        except (pa.ArrowException, OSError) as err:
            self._issue("truncated", name, f"cannot read parquet: {err}")
            return
        wanted = [c for c in (self.source.text_column, self.source.id_column) if c is not None]
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
        if missing:
            self._issue("missing_field", name, f"no column(s) {missing}; available: {', '.join(pf.schema_arrow.names)}",
                        attr="text_column" if self.source.text_column in missing else "id_column")
            return
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                for obj in batch.to_pylist():
                    if (doc := self._record(obj, name, {"row": row})) is not None:
                        yield doc
                    row += 1
        except (pa.ArrowException, OSError) as err:
            self._issue("truncated", name, f"parquet unreadable after row {row}: {err}", row=row)

    def _stream_docs(self, stream: IO[bytes], name: str, fmt: str) -> Iterator[_Doc]:
        """Text or jsonl documents of a decompressed stream, after the empty and binary checks."""
        try:
            head = _read_head(stream)
            if not head:
                self._issue("empty_file", name, "the file is empty")
                return
            if b"\0" in head:
                nul = head.index(0)
                self._issue("binary_file", name, f"NUL byte at offset {nul}: a binary file, skipped whole")
                return
            if fmt == "text" and self.source.doc_boundary == "file":
                piece = whole_file_piece(head, stream)
                if piece.error is None:
                    piece.text = self._cut(piece.text, numbered=True)
                yield from self._text_docs([piece], name)
                return
            lines = _decoded_lines(_byte_lines(head, stream))
            if fmt == "jsonl":
                yield from self._jsonl_docs(lines, name)
            else:
                if self.gutenberg:  # before the file is cut into documents: the header and licence span many
                    lines = self.cuts[-1].cut_lines(lines)
                yield from self._text_docs(document_pieces(lines, self.source.doc_boundary), name)
        except READ_ERRORS as err:
            self._issue("truncated", name, f"the file is cut short or corrupt ({err}); documents before the cut "
                                           "are kept")

    def _file_docs(self, opener: Callable[[], IO[bytes]], name: str, entry: _FileEntry, *, hash_it: bool
                   ) -> Iterator[_Doc]:
        """Documents of one file; entry.sha256 is set once the file has been read to its end."""
        self._start_file(entry)
        if entry.bytes == 0:
            self._issue("empty_file", name, "the file is empty")
            if hash_it and entry.sha256 is None:
                entry.sha256 = hashlib.sha256(b"").hexdigest()
            return
        fmt = file_format(self.source, name)
        with opener() as raw:
            if fmt == "parquet":
                yield from self._parquet_docs(raw, name)
                if hash_it and entry.sha256 is None:
                    raw.seek(0)
                    entry.sha256 = _Tap(raw).finish()
                return
            tap = _Tap(raw)
            with _decompressed(cast(IO[bytes], tap), file_compression(self.source, name)) as stream:
                yield from self._stream_docs(stream, name, fmt)
            if hash_it and entry.sha256 is None:
                entry.sha256 = tap.finish()

    # -- where the files come from ----------------------------------------------

    def _local_files(self) -> Iterator[_Doc]:
        files = expand_local(self.source, self.field)
        if self.source.sha256 is not None:
            actual = sha256_file(files[0][1])
            if actual != self.source.sha256:
                raise DownloadError(sha256_mismatch(self.field, self.source.uri, self.source.sha256, actual))
        for name, path in files:
            size = path.stat().st_size
            entry = _FileEntry(name, size, self.source.sha256)
            yield from self._file_docs(functools.partial(_open_capped, path, size), name, entry, hash_it=True)

    def _http_file(self) -> Iterator[_Doc]:
        path, digest = fetch_http(self.source, self.field, self.download_dir, retries=self.retries,
                                  backoff_s=self.backoff_s)
        entry = _FileEntry(self.source.uri, path.stat().st_size, digest)
        yield from self._file_docs(lambda: open(path, "rb", buffering=0), self.source.uri, entry, hash_it=True)

    def _fsspec_files(self) -> Iterator[_Doc]:
        fs, files = expand_fsspec(self.source, self.field)
        for name, path in files:
            try:
                size = fs.size(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.field}.uri: {name!r} does not exist") from None
            yield from self._file_docs(functools.partial(fs.open, path, "rb"), name, _FileEntry(name, size),
                                       hash_it=False)

    def _hub_docs(self) -> Iterator[_Doc]:
        import datasets

        src = self.source
        self._start_file(_FileEntry(src.uri, None))
        try:
            ds = datasets.load_dataset(src.uri[3:], src.hf_config, split=src.hf_split, revision=src.hf_revision,
                                       streaming=True, cache_dir=str(self.scratch / "hf-cache"))
            columns = ds.column_names
            if columns is not None and src.text_column not in columns:
                self._issue("missing_field", src.uri, f"no column {src.text_column!r}; "
                                                      f"available: {', '.join(columns)}", attr="text_column")
                return
            for row, example in enumerate(ds):
                if (doc := self._record(example, src.uri, {"row": row})) is not None:
                    yield doc
        except OSError as err:
            raise _hub_error(err, self.field, src.uri) from err

    def documents(self) -> Generator[_Doc, None, None]:
        """The source's documents in order, stopping at max_documents / max_bytes without reading on."""
        kind = source_kind(self.source.uri)
        readers = {"hf": self._hub_docs, "http": self._http_file, "fsspec": self._fsspec_files}
        read = readers.get(kind, self._local_files)
        docs = cast(Generator[_Doc, None, None], read())
        max_docs, max_bytes = self.source.max_documents, self.source.max_bytes
        count, total = 0, 0
        with contextlib.closing(docs):  # closing the generator closes the file without reading the rest
            for doc in docs:
                if max_bytes is not None and total + doc.nbytes > max_bytes:
                    return
                count += 1
                total += doc.nbytes
                yield doc
                if max_docs is not None and count >= max_docs:
                    return


def _hub_error(err: OSError, field: str, uri: str) -> DownloadError:
    """A missing dataset, revision or split is final; anything else from the network may pass."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # "not cached, and the Hub was unreachable"

    if isinstance(err, FileNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        return DownloadError(f"{field}.uri: {uri} not found: {err}")
    return TransientDownloadError(f"{field}.uri: reading {uri} failed: {err!r}")
