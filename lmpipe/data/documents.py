"""Document sets: a corpus as numbered parquet chunks plus an index, written by download and clean.

A document set is a directory::

    documents/part-000000.parquet   string columns id, text, source; input order
    documents/part-000001.parquet
    documents.json                  format version, and per chunk: file, documents, bytes, sha256

Chunks hold about ``chunk_bytes`` of UTF-8 text each, so every later stage can
work chunk by chunk in bounded memory, and mapped Prefect tasks can take one
chunk each. Reading the chunks in index order gives the corpus in order::

    >>> with ChunkWriter(out_dir, chunk_bytes=1 << 20) as w:
    ...     w.add("c/0/0", "first document", "data/a.txt")
    >>> [b["text"] for b in iter_document_batches(out_dir, 256)]
    [['first document']]

Parquet files are written without timestamps, so the same documents give
byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmpipe.artifacts import read_versioned_json, sha256_file, write_json_atomic

DOCS_DIR = "documents"
INDEX_FILE = "documents.json"
INDEX_FORMAT_VERSION = 1
DOCUMENT_COLUMNS = ("id", "text", "source")
ROW_GROUP_ROWS = 8192  # fixed, so the file layout never depends on how rows arrived


def chunk_name(index: int) -> str:
    return f"{DOCS_DIR}/part-{index:06d}.parquet"


def write_documents(path: Path, ids: Sequence[str], texts: Sequence[str], sources: Sequence[str]) -> None:
    """Write one documents table. Byte-identical for identical input."""
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                      "source": pa.array(sources, pa.string())})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # No min/max statistics for the text column: for a 100 MB document they cost ~600 MB of memory, and
    # nothing filters on text ranges.
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, write_statistics=["id", "source"])


def read_documents(path: Path) -> pa.Table:
    """Read one documents table, checking its columns."""
    table = pq.read_table(path)
    if tuple(table.column_names[:3]) != DOCUMENT_COLUMNS:
        raise ValueError(f"{path}: expected columns {list(DOCUMENT_COLUMNS)}, got {table.column_names}")
    return table


def utf8_len(text: str) -> int:
    """UTF-8 length of a text. isascii() is O(1) on CPython's compact strings and most text is ASCII,
    so the encode is skipped for it."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class ChunkWriter:
    """Collects documents in order and writes a chunk file whenever about chunk_bytes have gathered.

    ``close()`` writes the last chunk and ``documents.json``; leaving the
    ``with`` block through an exception writes no index, so the set is never
    mistaken for complete.
    """

    def __init__(self, out_dir: Path, chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.out_dir = Path(out_dir)
        self.chunk_bytes = chunk_bytes
        self.chunks: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._sources: list[str] = []
        self._bytes = 0

    def add(self, doc_id: str, text: str, source: str, nbytes: int | None = None) -> None:
        self._ids.append(doc_id)
        self._texts.append(text)
        self._sources.append(source)
        self._bytes += utf8_len(text) if nbytes is None else nbytes
        if self._bytes >= self.chunk_bytes:
            self.flush()

    def add_many(self, ids: Sequence[str], texts: Sequence[str], sources: Sequence[str]) -> None:
        for doc_id, text, source in zip(ids, texts, sources, strict=True):
            self.add(doc_id, text, source)

    def flush(self) -> None:
        """Write what has gathered as the next chunk (nothing if empty)."""
        if not self._ids:
            return
        name = chunk_name(len(self.chunks))
        path = self.out_dir / name
        write_documents(path, self._ids, self._texts, self._sources)
        self.chunks.append({"file": name, "documents": len(self._ids), "bytes": self._bytes,
                            "sha256": sha256_file(path)})
        self._ids, self._texts, self._sources, self._bytes = [], [], [], 0

    @property
    def documents(self) -> int:
        return sum(c["documents"] for c in self.chunks) + len(self._ids)

    @property
    def bytes(self) -> int:
        return sum(c["bytes"] for c in self.chunks) + self._bytes

    def close(self) -> dict[str, Any]:
        self.flush()
        return write_index(self.out_dir, self.chunks)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()


def write_index(out_dir: Path, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``documents.json`` for chunk entries already on disk (file, documents, bytes, sha256)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # an empty set is a set too
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "documents": sum(c["documents"] for c in chunks),
        "bytes": sum(c["bytes"] for c in chunks),
        "chunks": chunks,
    }
    write_json_atomic(Path(out_dir) / INDEX_FILE, index)
    return index


def read_index(docset_dir: str | Path) -> dict[str, Any]:
    """A document set's ``documents.json``, checked."""
    return read_versioned_json(Path(docset_dir) / INDEX_FILE, INDEX_FORMAT_VERSION, "document set index",
                               "re-run the stage that wrote it")


def chunk_paths(docset_dir: str | Path) -> list[Path]:
    """The chunk files of a document set, in corpus order."""
    root = Path(docset_dir)
    return [root / c["file"] for c in read_index(root)["chunks"]]


def iter_document_batches(
    path: str | Path, batch_size: int, columns: Sequence[str] = ("text",)
) -> Iterator[dict[str, list]]:
    """Yield documents as column dicts of up to batch_size rows, in corpus order.

    ``path`` is a document set directory (all its chunks) or one chunk file.
    Each batch also has ``nbytes``, the UTF-8 length of each text, when
    ``text`` is among the columns. Memory stays flat however large the corpus.
    """
    path = Path(path)
    if path.is_dir():
        files = chunk_paths(path)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"documents {str(path)!r} do not exist (did the stage that writes them finish?)")
    for file in files:
        try:
            pf = pq.ParquetFile(file)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"documents file {str(file)!r} lacks column(s) {missing}; "
                                 f"it has {pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
                out: dict[str, list] = {c: batch.column(c).to_pylist() for c in columns}
                if "text" in columns:
                    # UTF-8 byte length of each text, computed by Arrow without re-encoding in Python.
                    out["nbytes"] = pc.binary_length(batch.column("text")).to_pylist()
                yield out
        except (pa.ArrowException, OSError) as err:
            # A damaged chunk must name itself: a corpus has thousands.
            raise ValueError(f"documents file {str(file)!r} cannot be read ({err}); delete the stage directory "
                             "that holds it to have it written again") from err
