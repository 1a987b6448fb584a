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

The stage writes a document set (see :mod:`lmpipe.docset`: ``documents/``
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
dropped silently.

    >>> split_documents("a\\n\\n\\nb\\nc\\n", "blank_line")
    ['a', 'b\\nc']
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import IO, Any

import zstandard

from lmpipe.config import CorpusConfig, SourceConfig
from lmpipe.docset import ChunkWriter, utf8_len
from lmpipe.stage import BuildOutput, StageResult, read_versioned_json, run_stage, sha256_file, write_json_atomic

SOURCES_FILE = "sources.json"
READ_REPORT_FILE = "read_report.json"

HTTP_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
HTTP_RETRIES = 3
HTTP_BACKOFF_S = 1.0
COPY_BYTES = 1 << 20
READ_BUFFER = 1 << 20
SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a binary file
PARQUET_BATCH_ROWS = 1024
MAX_EXAMPLES = 20
ISSUE_KINDS = ("binary_file", "invalid_utf8", "bad_json", "missing_field", "not_text", "empty_file", "truncated")
DIGEST_CACHE_VERSION = 1

# A WikiText article starts at " = Title = "; sections are " = = Section = = ".
WIKITEXT_TITLE = re.compile(r"^\s*= (?!=)(.*\S) =\s*$")
# Only these end a line; str.splitlines would also split on \x0c, \x1c, \u2028, ...
LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
LINE_END = re.compile(r"(?:\r\n|\r|\n)\Z")
GLOB_MAGIC = re.compile(r"[*?[]")
CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(OSError):
    """A source could not be fetched, and trying again will not help (404, checksum mismatch)."""


class TransientDownloadError(DownloadError):
    """A source could not be fetched for a reason that may pass (refused, reset, timeout, 5xx, 429)."""


class SourceContentError(ValueError):
    """A source was read but its content is unusable (strict mode: the first bad record)."""


# ---------------------------------------------------------------------------
# where a source lives


def _source_kind(uri: str) -> str:
    """'hf' (datasets), 'http', 'file' (file:// URL), 'path' (local path) or 'fsspec'."""
    if uri.startswith("hf:") and not uri.startswith("hf://"):
        return "hf"
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "file"
    # No scheme, or a one-letter "scheme" that is really a Windows drive letter.
    return "path" if len(scheme) <= 1 else "fsspec"


def _local_path(uri: str, field: str) -> Path:
    if _source_kind(uri) == "path":
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{field}.uri: file URL {uri!r} names host {parsed.netloc!r}; only local files are supported")
    return Path(urllib.request.url2pathname(parsed.path))


def _is_glob(uri: str) -> bool:
    return bool(GLOB_MAGIC.search(uri))


def _expand_local(source: SourceConfig, field: str) -> list[tuple[str, Path]]:
    """(name for the ``source`` column, path) of each local file a path, file URL or glob names."""
    kind = _source_kind(source.uri)
    path = _local_path(source.uri, field)
    where = f"(relative paths are resolved against {os.getcwd()})"
    if not _is_glob(source.uri):
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise FileNotFoundError(f"{field}.uri: {str(path)!r} {what} {where}")
        return [(source.uri, path)]
    matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    if not matches:
        raise FileNotFoundError(f"{field}.uri: glob {source.uri!r} matches no files {where}")
    if kind == "file":
        return [(Path(p).absolute().as_uri(), Path(p)) for p in matches]
    return [(p, Path(p)) for p in matches]


def _fsspec_protocol(uri: str) -> str:
    return urllib.parse.urlparse(uri).scheme.lower()


def _fsspec_filesystem_class(uri: str, field: str) -> type:
    """The fsspec filesystem class for the uri's protocol, with errors that name the field."""
    import fsspec

    protocol = _fsspec_protocol(uri)
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        raise ValueError(f"{field}.uri: {uri!r} needs a package that is not installed: {err}") from None
    except ValueError:
        raise ValueError(
            f"{field}.uri: unknown scheme {protocol!r} in {uri!r}; use a local path or glob, file://, http(s)://, "
            "an fsspec URL (s3://, gs://, hf://, memory:// ...) or hf:<dataset id>"
        ) from None


def _expand_fsspec(source: SourceConfig, field: str) -> tuple[Any, list[tuple[str, str]]]:
    """The filesystem and (name, path in it) of each file an fsspec URL or glob names, sorted."""
    import fsspec

    _fsspec_filesystem_class(source.uri, field)
    fs, path = fsspec.core.url_to_fs(source.uri)
    if not _is_glob(source.uri):
        return fs, [(source.uri, path)]
    matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
    if not matches:
        raise FileNotFoundError(f"{field}.uri: glob {source.uri!r} matches no files")
    return fs, [(fs.unstrip_protocol(p), p) for p in matches]


def check_sources(corpus: CorpusConfig, field: str) -> None:
    """Cheap preflight without network: local files and globs exist, schemes are known, sha256 fits."""
    for i, source in enumerate(corpus.sources):
        f = f"{field}.sources[{i}]"
        kind = _source_kind(source.uri)
        if kind == "hf":
            if not source.uri[3:].strip():
                raise ValueError(f"{f}.uri: {source.uri!r} names no dataset; write hf:<dataset id>")
        elif kind in ("path", "file"):
            _expand_local(source, f)
        elif kind == "fsspec":
            _fsspec_filesystem_class(source.uri, f)
        if source.sha256 is not None and (kind in ("hf", "fsspec") or _is_glob(source.uri) and kind != "http"):
            raise ValueError(
                f"{f}.sha256: can only be checked for a single local file or http(s) URL, not {source.uri!r}; "
                "remove it (pin hf: datasets with hf_revision)"
            )


def _digest_cache(cache_file: Path | None) -> dict[str, dict[str, Any]]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return read_versioned_json(Path(cache_file), DIGEST_CACHE_VERSION, "digest cache", "")["files"]
    except (ValueError, KeyError, OSError):
        return {}  # an unreadable cache only costs a re-read


def _cached_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    """sha256 of a file, remembered by (absolute path, size, mtime_ns) so an unchanged file is not re-read."""
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    digest = sha256_file(path)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def local_source_digests(corpus: CorpusConfig, cache_file: Path | None = None) -> list[str | None]:
    """A content digest per source, for the download stage's fingerprint.

    A local file gives its sha256, a local glob the sha256 over the sorted
    (name, sha256) pairs of its files; URLs and Hub ids give None (they name
    their content themselves, through sha256 or hf_revision). With
    ``cache_file``, digests are remembered by (absolute path, size, mtime_ns),
    so a multi-GB local corpus is not re-read on every run.
    """
    cache = _digest_cache(cache_file)
    before = json.dumps(cache, sort_keys=True)
    digests: list[str | None] = []
    for i, source in enumerate(corpus.sources):
        if _source_kind(source.uri) not in ("path", "file"):
            digests.append(None)
            continue
        files = _expand_local(source, f"{corpus.name}.sources[{i}]")
        if _is_glob(source.uri):
            pairs = [[name, _cached_sha256(path, cache)] for name, path in files]
            digests.append(hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest())
        else:
            digests.append(_cached_sha256(files[0][1], cache))
    if cache_file is not None and json.dumps(cache, sort_keys=True) != before:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cache_file), {"format_version": DIGEST_CACHE_VERSION, "files": cache})
    return digests


# ---------------------------------------------------------------------------
# HTTP: resumable, verified downloads


def _content_range_start(header: str | None) -> int | None:
    m = CONTENT_RANGE.match(header or "")
    return int(m.group(1)) if m else None


def _fetch_once(url: str, part: Path, field: str, timeout: float) -> None:
    """One request: continue ``part`` from its size (Range), or start it over when the server sends it all.

    Raises TransientDownloadError on anything a later attempt may fix, DownloadError otherwise.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = offset > 0 and response.status == 206
            if resumed and _content_range_start(response.headers.get("Content-Range")) != offset:
                part.unlink()  # the server answered another range than asked: start over next time
                raise TransientDownloadError(f"{field}.uri: {url} answered range "
                                             f"{response.headers.get('Content-Range')!r} for bytes={offset}-")
            received = 0
            with open(part, "ab" if resumed else "wb") as out:
                while block := response.read(COPY_BYTES):
                    out.write(block)
                    received += len(block)
            # http.client returns a short body without complaint when the server hangs up early.
            promised = response.headers.get("Content-Length")
            if promised is not None and received != int(promised):
                raise http.client.IncompleteRead(b"", int(promised) - received)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Nothing left after `offset`: the part is complete if the server's size says so.
            m = UNSATISFIED_RANGE.match(err.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == offset:
                return
            part.unlink()
            raise TransientDownloadError(f"{field}.uri: {url} refused to resume at byte {offset}; "
                                         "starting over") from err
        # Servers say 429 and 5xx when busy or broken for a while; other 4xx are final.
        cls = TransientDownloadError if err.code == 429 or err.code >= 500 else DownloadError
        raise cls(f"{field}.uri: {url} answered HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        if isinstance(err, DownloadError):
            raise
        # Refused, reset, timed out or cut short: the network, not the config, failed.
        reason = getattr(err, "reason", None) or err
        raise TransientDownloadError(f"{field}.uri: fetching {url} failed: {reason!r}") from err


def download_url(url: str, dest: Path, *, field: str, sha256: str | None = None, timeout: float = HTTP_TIMEOUT_S,
                 retries: int = HTTP_RETRIES, backoff_s: float = HTTP_BACKOFF_S) -> str:
    """Stream ``url`` to ``dest`` and return the sha256 of its bytes.

    Bytes go to ``dest + '.part'``; a dropped connection or short body is
    retried after ``backoff_s * 2**k`` seconds and resumed with a ``Range``
    request (a server that answers 200 instead of 206 is read from the start).
    The ``.part`` file outlives a call that runs out of retries, so the next
    call (a Prefect retry, the next run) resumes it too. ``dest`` appears only
    when complete and, if ``sha256`` is given, verified. A permanent error (404,
    checksum mismatch) deletes the part and raises DownloadError; a transient
    one raises TransientDownloadError once ``retries`` are spent.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, field, timeout)
            break
        except TransientDownloadError as err:
            if attempt >= retries:
                kept = part.stat().st_size if part.exists() else 0
                raise TransientDownloadError(f"{err} (after {attempt + 1} attempt(s); {kept} bytes kept in "
                                             f"{part.name}, the next try resumes there)") from err
            time.sleep(backoff_s * 2**attempt)
            attempt += 1
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise DownloadError(f"{field}.sha256: {url} has sha256 {actual}, expected {sha256}; the download was deleted")
    os.replace(part, dest)
    return actual


def cached_download_path(url: str, download_dir: Path) -> Path:
    """Where ``url`` is kept in the download cache: sha256(url)[:16] + '-' + the URL's file name."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return Path(download_dir) / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{name}"


def fetch_http(source: SourceConfig, field: str, download_dir: Path, *, retries: int = HTTP_RETRIES,
               backoff_s: float = HTTP_BACKOFF_S) -> tuple[Path, str | None]:
    """The cached file holding an http(s) source, and its sha256 when known without reading it again.

    A complete file in the cache is reused without network (re-verified when the source pins sha256).
    """
    dest = cached_download_path(source.uri, download_dir)
    if dest.is_file():
        if source.sha256 is None:
            return dest, None
        if sha256_file(dest) == source.sha256:
            return dest, source.sha256
        dest.unlink()  # stale or damaged: fetch it again
    return dest, download_url(source.uri, dest, field=field, sha256=source.sha256, retries=retries,
                              backoff_s=backoff_s)


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


def _utf8_error(raw: bytes, err: UnicodeDecodeError, base: int) -> str:
    return f"not valid UTF-8: byte 0x{raw[err.start]:02x} at offset {base + err.start} ({err.reason})"


def _lines(text: str) -> list[str]:
    """Lines with their line endings; ''.join(_lines(t)) == t."""
    return LINE.findall(text)


def _blank(s: str) -> bool:
    return not s.strip()


@dataclass(slots=True)
class _Line:
    text: str  # with its line ending
    number: int  # 1-based line number in the file
    error: str | None = None  # why the line is not valid UTF-8 (its text then holds U+FFFD)


@dataclass(slots=True)
class _Piece:
    text: str
    error: str | None = None  # the first UTF-8 error in it, if any
    error_line: int | None = None  # and the line it is on


class _Run:
    """Lines gathering into one document: only their text is kept, plus the first UTF-8 error."""

    __slots__ = ("texts", "error", "error_line")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.error: str | None = None
        self.error_line: int | None = None

    def add(self, line: _Line) -> None:
        self.texts.append(line.text)
        if line.error is not None and self.error is None:
            self.error, self.error_line = line.error, line.number

    def take(self, strip_end: bool = False) -> _Piece:
        text = "".join(self.texts)
        piece = _Piece(LINE_END.sub("", text) if strip_end else text, self.error, self.error_line)
        self.__init__()  # type: ignore[misc]
        return piece


def _pieces(lines: Iterable[_Line], boundary: str) -> Iterator[_Piece]:
    """Cut a stream of lines into documents (blank ones included; the caller drops them).

    file: the whole text; line: each line (without its line ending);
    blank_line: runs of non-blank lines (without the final line ending);
    wikitext_title: from each ' = Title = ' line up to the next one, verbatim,
    with any text before the first title as a document of its own.
    A document in progress when the stream raises is lost with it, so a
    truncated file gives only the documents completed before the cut.
    """
    if boundary not in ("file", "line", "blank_line", "wikitext_title"):
        raise ValueError(f"unknown doc_boundary {boundary!r}")
    run = _Run()
    for line in lines:
        if boundary == "line":
            yield _Piece(LINE_END.sub("", line.text), line.error, line.number if line.error else None)
        elif boundary == "blank_line":
            if not _blank(line.text):
                run.add(line)
            elif run.texts:
                yield run.take(strip_end=True)
        else:
            if boundary == "wikitext_title" and run.texts and WIKITEXT_TITLE.match(line.text):
                yield run.take()
            run.add(line)
    if run.texts:
        yield run.take(strip_end=boundary == "blank_line")


def _whole_file(head: bytes, stream: IO[bytes]) -> _Piece:
    """The rest of the stream as one document (doc_boundary 'file'): bytes gathered once, decoded once,
    so a file is held about twice at most, however its lines fall."""
    buf = bytearray(head)
    while block := stream.read(COPY_BYTES):
        buf += block
    skip = len(codecs.BOM_UTF8) if buf.startswith(codecs.BOM_UTF8) else 0
    with memoryview(buf) as whole, whole[skip:] as body:  # no copy of the bytes for the slice
        try:
            return _Piece(str(body, "utf-8"))
        except UnicodeDecodeError as err:
            return _Piece("\ufffd", _utf8_error(body, err, skip), buf.count(b"\n", 0, skip + err.start) + 1)


def split_documents(text: str, boundary: str) -> list[str]:
    """Cut plain text into documents by ``boundary`` (see ``_pieces``); whitespace-only pieces are dropped."""
    pieces = _pieces((_Line(t, 0) for t in _lines(text)), boundary)
    return [p.text for p in pieces if not _blank(p.text)]


# ---------------------------------------------------------------------------
# byte streams: hashing, decompression, lines


class _Tap(io.RawIOBase):
    """A raw reader that hashes and counts the bytes passing through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
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


def _compression(source: SourceConfig, name: str) -> str:
    if source.compression != "auto":
        return source.compression
    suffix = Path(urllib.parse.urlparse(name).path if "://" in name else name).suffix.lower()
    return {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}.get(suffix, "none")


def _format(source: SourceConfig, name: str) -> str:
    if source.format != "auto":
        return source.format
    path = Path(urllib.parse.urlparse(name).path if "://" in name else name)
    if path.suffix.lower() in (".gz", ".zst", ".zstd"):
        path = path.with_suffix("")
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _decompressed(raw: IO[bytes], compression: str) -> IO[bytes]:
    buffered = io.BufferedReader(raw, READ_BUFFER)  # type: ignore[arg-type]
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


def _decoded_lines(byte_lines: Iterable[bytes]) -> Iterator[_Line]:
    """Text lines; a line that is not UTF-8 comes through decoded with U+FFFD, its error noted."""
    offset = 0
    for number, raw in enumerate(byte_lines, 1):
        skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        body = raw[skip:] if skip else raw
        error = None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            error = _utf8_error(body, err, offset + skip)
            text = body.decode("utf-8", "replace")
        offset += len(raw)
        if "\r" in text:
            for sub in _lines(text):
                yield _Line(sub, number, error)
        else:
            yield _Line(text, number, error)


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


def _hub_error(err: OSError, field: str, uri: str) -> DownloadError:
    """A missing dataset, revision or split is final; anything else from the network may pass."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # "not cached, and the Hub was unreachable"

    if isinstance(err, FileNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        return DownloadError(f"{field}.uri: {uri} not found: {err}")
    return TransientDownloadError(f"{field}.uri: reading {uri} failed: {err!r}")


@dataclass
class _SourceReader:
    """Reads one source (all files of a glob, or a Hub dataset) into documents, reporting bad records."""

    source: SourceConfig
    index: int
    field: str  # e.g. data.pretrain.sources[0]
    report: ReadReport
    scratch: Path
    download_dir: Path
    retries: int = HTTP_RETRIES
    backoff_s: float = HTTP_BACKOFF_S
    files: list[_FileEntry] = dc_field(default_factory=list)

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
        if _blank(text):
            return None
        return _Doc(text, utf8_len(text), doc_id)

    # -- formats -------------------------------------------------------------

    def _text_docs(self, pieces: Iterable[_Piece], name: str) -> Iterator[_Doc]:
        for piece in pieces:
            if piece.error is not None:
                self._issue("invalid_utf8", name, piece.error, line=piece.error_line)
            elif not _blank(piece.text):
                yield _Doc(piece.text, utf8_len(piece.text))

    def _jsonl_docs(self, lines: Iterable[_Line], name: str) -> Iterator[_Doc]:
        for line in lines:
            if _blank(line.text):
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
                yield from self._text_docs([_whole_file(head, stream)], name)
                return
            lines = _decoded_lines(_byte_lines(head, stream))
            if fmt == "jsonl":
                yield from self._jsonl_docs(lines, name)
            else:
                yield from self._text_docs(_pieces(lines, self.source.doc_boundary), name)
        except READ_ERRORS as err:
            self._issue("truncated", name, f"the file is cut short or corrupt ({err}); documents before the cut "
                                           "are kept")

    def _file_docs(self, opener: Callable[[], IO[bytes]], name: str, entry: _FileEntry, *, hash_it: bool
                   ) -> Iterator[_Doc]:
        """Documents of one file; entry.sha256 is set once the file has been read to its end."""
        self.files.append(entry)
        if entry.bytes == 0:
            self._issue("empty_file", name, "the file is empty")
            return
        fmt = _format(self.source, name)
        with opener() as raw:
            if fmt == "parquet":
                yield from self._parquet_docs(raw, name)
                if hash_it and entry.sha256 is None:
                    raw.seek(0)
                    entry.sha256 = _Tap(raw).finish()
                return
            tap = _Tap(raw)
            with _decompressed(tap, _compression(self.source, name)) as stream:
                yield from self._stream_docs(stream, name, fmt)
            if hash_it and entry.sha256 is None:
                entry.sha256 = tap.finish()

    # -- where the files come from ----------------------------------------------

    def _local_files(self) -> Iterator[_Doc]:
        files = _expand_local(self.source, self.field)
        if self.source.sha256 is not None:
            actual = sha256_file(files[0][1])
            if actual != self.source.sha256:
                raise DownloadError(f"{self.field}.sha256: {files[0][1]} has sha256 {actual}, "
                                    f"expected {self.source.sha256}")
        for name, path in files:
            entry = _FileEntry(name, path.stat().st_size, self.source.sha256)
            yield from self._file_docs(lambda p=path: open(p, "rb", buffering=0), name, entry, hash_it=True)

    def _http_file(self) -> Iterator[_Doc]:
        path, digest = fetch_http(self.source, self.field, self.download_dir, retries=self.retries,
                                  backoff_s=self.backoff_s)
        entry = _FileEntry(self.source.uri, path.stat().st_size, digest)
        yield from self._file_docs(lambda: open(path, "rb", buffering=0), self.source.uri, entry, hash_it=True)

    def _fsspec_files(self) -> Iterator[_Doc]:
        fs, files = _expand_fsspec(self.source, self.field)
        for name, path in files:
            try:
                size = fs.size(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.field}.uri: {name!r} does not exist") from None
            yield from self._file_docs(lambda p=path: fs.open(p, "rb"), name, _FileEntry(name, size),
                                       hash_it=False)

    def _hub_docs(self) -> Iterator[_Doc]:
        import datasets

        src = self.source
        self.files.append(_FileEntry(src.uri, None))
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

    def documents(self) -> Iterator[_Doc]:
        """The source's documents in order, stopping at max_documents / max_bytes without reading on."""
        kind = _source_kind(self.source.uri)
        docs = {"hf": self._hub_docs, "http": self._http_file, "fsspec": self._fsspec_files}.get(
            kind, self._local_files)()
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


# ---------------------------------------------------------------------------
# the stage


def run_download(corpus: CorpusConfig, out_dir: str | Path, fingerprint: str, *, field: str, chunk_bytes: int,
                 strict: bool = False, download_dir: Path | None = None, retries: int = HTTP_RETRIES,
                 backoff_s: float = HTTP_BACKOFF_S) -> StageResult:
    """Stream every source of ``corpus`` into a document set, ``sources.json`` and ``read_report.json``.

    field: the corpus's config path (e.g. "data.pretrain") for messages.
    chunk_bytes: about this many UTF-8 bytes of text per chunk file.
    strict: raise SourceContentError on the first bad record instead of counting it.
    download_dir: cache of http(s) downloads kept across runs (the flow passes
    ``<workdir>/downloads``); None downloads into the build directory and discards.
    retries, backoff_s: of each http(s) download (see ``download_url``).
    """
    check_sources(corpus, field)

    def build(tmp: Path) -> BuildOutput:
        scratch = tmp / "_scratch"  # a Hub cache, and downloads without a cache dir; removed before publishing
        scratch.mkdir()
        report = ReadReport(field, strict, len(corpus.sources))
        entries = []
        try:
            with ChunkWriter(tmp, chunk_bytes) as writer:
                for i, source in enumerate(corpus.sources):
                    reader = _SourceReader(source, i, f"{field}.sources[{i}]", report, scratch,
                                           Path(download_dir) if download_dir is not None else scratch / "downloads",
                                           retries, backoff_s)
                    entries.append(_read_source(reader, corpus.name, writer))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(tmp / SOURCES_FILE, entries)
        write_json_atomic(tmp / READ_REPORT_FILE, report.to_json([s.uri for s in corpus.sources]))
        metrics = {"documents": float(writer.documents), "bytes": float(writer.bytes),
                   "sources": float(len(entries)), "chunks": float(len(writer.chunks)),
                   "bad_records": float(report.total)}
        metrics.update({f"bad_records.{k}": float(n) for k, n in report.issues.items() if n})
        meta = {"sources": entries, "chunks": [c["file"] for c in writer.chunks], "read_issues": report.issues}
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("download", fingerprint, out_dir, build)


def _read_source(reader: _SourceReader, corpus_name: str, writer: ChunkWriter) -> dict[str, Any]:
    """Write one source's documents; its sources.json entry."""
    prefix = f"{corpus_name}/{reader.index}/"
    count, total = 0, 0
    for doc in reader.documents():
        origin = reader.files[-1].path if reader.files else reader.source.uri
        writer.add(prefix + (doc.doc_id if doc.doc_id is not None else str(count)), doc.text, origin, doc.nbytes)
        count += 1
        total += doc.nbytes
    return {"uri": reader.source.uri, "files": [f.to_json() for f in reader.files], "documents": count,
            "bytes": total}
