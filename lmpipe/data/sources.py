"""Where a corpus comes from: local files and globs, fsspec URLs, HTTP downloads with resume, content digests."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmpipe.artifacts import read_versioned_json, sha256_file, write_json_atomic
from lmpipe.config.data import CorpusConfig, SourceConfig

SOURCES_FILE = "sources.json"

HTTP_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
HTTP_RETRIES = 3
HTTP_BACKOFF_S = 1.0
COPY_BYTES = 1 << 20
DIGEST_CACHE_VERSION = 1
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


def source_kind(uri: str) -> str:
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
    if source_kind(uri) == "path":
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{field}.uri: file URL {uri!r} names host {parsed.netloc!r}; only local files are supported")
    return Path(urllib.request.url2pathname(parsed.path))


def _is_glob(uri: str) -> bool:
    return bool(GLOB_MAGIC.search(uri))


def expand_local(source: SourceConfig, field: str) -> list[tuple[str, Path]]:
    """(name for the ``source`` column, path) of each local file a path, file URL or glob names."""
    kind = source_kind(source.uri)
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


def expand_fsspec(source: SourceConfig, field: str) -> tuple[Any, list[tuple[str, str]]]:
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


def sha256_mismatch(field: str, uri: str, expected: str, actual: str) -> str:
    """The error of a source whose bytes are not the ones its sha256 pins. ``field`` names the source
    (``data.pretrain.sources[0]``). A pin stays when only ``uri`` is edited (a preset's or the run form's source),
    so the message says how to get out."""
    return (f"{field}.sha256: {uri!r} has sha256 {actual}, expected {expected}; if you changed {field}.uri, "
            f"clear sha256 or pin the new file's hash (sha256: {actual})")


def check_sources(corpus: CorpusConfig, field: str) -> None:
    """Preflight without network: local files and globs exist, schemes are known, sha256 fits (a pinned local
    file's hash is checked here, so a stale pin fails before any stage)."""
    for i, source in enumerate(corpus.sources):
        f = f"{field}.sources[{i}]"
        kind = source_kind(source.uri)
        if kind == "hf":
            if not source.uri[3:].strip():
                raise ValueError(f"{f}.uri: {source.uri!r} names no dataset; write hf:<dataset id>")
        elif kind in ("path", "file"):
            files = expand_local(source, f)
            if source.sha256 is not None and not _is_glob(source.uri):
                actual = sha256_file(files[0][1])
                if actual != source.sha256:
                    raise DownloadError(sha256_mismatch(f, source.uri, source.sha256, actual))
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


@contextlib.contextmanager
def cached_digests(cache_file: Path | None) -> Iterator[Callable[[Path], str]]:
    """A sha256 function for local files that remembers digests by (absolute path, size, mtime_ns) in
    ``cache_file`` (written back on exit if it learnt any), so a multi-GB local corpus is not re-read on every run."""
    cache = _digest_cache(cache_file)
    before = json.dumps(cache, sort_keys=True)
    yield functools.partial(_cached_sha256, cache=cache)
    if cache_file is not None and json.dumps(cache, sort_keys=True) != before:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cache_file), {"format_version": DIGEST_CACHE_VERSION, "files": cache})


def local_source_digests(corpus: CorpusConfig, cache_file: Path | None = None) -> list[str | None]:
    """A content digest per source, for the download stage's fingerprint.

    A local file gives its sha256, a local glob the sha256 over the sorted
    (name, sha256) pairs of its files; URLs and Hub ids give None (they name
    their content themselves, through sha256 or hf_revision). With
    ``cache_file``, digests are remembered (``cached_digests``).
    """
    digests: list[str | None] = []
    with cached_digests(cache_file) as sha256:
        for i, source in enumerate(corpus.sources):
            if source_kind(source.uri) not in ("path", "file"):
                digests.append(None)
                continue
            files = expand_local(source, f"{corpus.name}.sources[{i}]")
            if _is_glob(source.uri):
                pairs = [[name, sha256(path)] for name, path in files]
                digests.append(hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest())
            else:
                digests.append(sha256(files[0][1]))
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
        raise DownloadError(sha256_mismatch(field, url, sha256, actual) + "; the download was deleted")
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
