"""Token shards: the corpus encoded once, stored as flat binary files that training memory-maps.

Layout of one shard file (all little-endian)::

    bytes 0..255   header: magic b"LMPTOKS\\0", format_version u32, itemsize u32 (2 = uint16, 4 = uint32),
                   token count u64, document count u64, zero padding
    bytes 256..    the tokens, uint16 when the vocabulary fits (<= 65,536 ids), else uint32

Every document is followed by the end-of-text token, so documents stay
separable after concatenation. A split (train / val) is a sequence of files
``{split}_{index:06d}.bin`` of exactly ``shard_tokens`` tokens (the last one
shorter); a document may continue into the next file and is counted in the
file where it ends. ``manifest.json`` lists every file with its sha256 and
counts, and the tokenizer fingerprint the tokens belong to;
``doc_index.parquet`` says where each document's tokens are.

The work is split in two stages so it scales with the corpus:

* ``encode_chunk`` (one per document-set chunk, run in parallel): the chunk's
  documents as raw token files ``train.tokens`` / ``val.tokens`` plus
  ``docs.parquet`` (id, split, tokens, bytes per document);
* ``shard`` (one per corpus): concatenates the encoded chunks in corpus order
  with bulk copies. The token stream, hence every shard file and the document
  index, is the same however the corpus was chunked or the chunks scheduled.

Documents go to train or val by a hash of their id, so the split does not depend
on processing order or batch sizes. (Ids are positions within a source, so
inserting a document in the middle of a file does move later ones.)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Encoding, Tokenizer

from lmpipe.config import CorpusConfig, ShardConfig
from lmpipe.docset import ROW_GROUP_ROWS, iter_document_batches
from lmpipe.stage import BuildOutput, StageResult, read_versioned_json, run_stage, sha256_file, write_json_atomic
from lmpipe.tokenizer import (
    META_FILE,
    TOKENIZER_FILE,
    eot_id,
    id_fraction,
    load_tokenizer,
    read_tokenizer_meta,
    tokenizer_fingerprint,
)

MAGIC = b"LMPTOKS\0"
SHARD_FORMAT_VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQQ")  # magic, format_version, itemsize, tokens, documents
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
DOC_INDEX_FILE = "doc_index.parquet"
ENCODED_DOCS_FILE = "docs.parquet"
SPLITS = ("train", "val")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SIDECAR = ".json"  # <shard>.bin.json: sha256/tokens/documents of a shard finished by an interrupted attempt
_COPY_TOKENS = 1 << 22  # tokens per bulk copy from an encoded chunk into a shard


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """True if the document belongs to the validation split.

    The first 8 bytes of sha256(id) read as a number in [0, 1): stable across
    runs, machines and Python versions (unlike ``hash()``), and independent of
    document order.
    """
    return id_fraction(doc_id) < val_fraction


def tokens_file(split: str) -> str:
    """An encoded chunk's raw token file of one split (no header: shard_dtype, little-endian)."""
    return f"{split}.tokens"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _pack_header(itemsize: int, tokens: int, documents: int) -> bytes:
    return _HEADER.pack(MAGIC, SHARD_FORMAT_VERSION, itemsize, tokens, documents).ljust(HEADER_BYTES, b"\0")


def write_shard(path: Path, pieces: Iterable[np.ndarray], documents: int) -> dict[str, Any]:
    """Write one shard file from token arrays (all of one shard dtype) and return its manifest entry.

    The file is written as ``<path>.tmp``, fsync'd and renamed, so a shard file
    that exists is complete. The sha256 is computed while writing, not by
    reading the file back. ``documents`` is the number of documents ending in
    this shard, as the header records it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        raise ValueError(f"token shard {str(path)!r} would hold no tokens; shards are never empty")
    dtypes = {p.dtype for p in pieces}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES.values():
        raise ValueError(f"token shard {str(path)!r}: pieces have dtype(s) {sorted(map(str, dtypes))}, "
                         f"expected one of {[d.str for d in _DTYPES.values()]}")
    dtype = pieces[0].dtype
    tokens = sum(len(p) for p in pieces)
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        header = _pack_header(dtype.itemsize, tokens, documents)
        f.write(header)
        digest.update(header)
        for piece in pieces:
            view = memoryview(np.ascontiguousarray(piece)).cast("B")
            f.write(view)
            digest.update(view)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "sha256": digest.hexdigest(), "tokens": tokens, "documents": documents}


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map one shard's tokens after checking its header against the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"token shard {str(path)!r} is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        magic, version, itemsize, tokens, _documents = _HEADER.unpack(f.read(_HEADER.size))
    if magic != MAGIC:
        raise ValueError(f"token shard {str(path)!r} has magic {magic!r}, expected {MAGIC!r}: not an lmpipe shard")
    if version != SHARD_FORMAT_VERSION:
        raise ValueError(
            f"token shard {str(path)!r} has format_version {version}, this code reads {SHARD_FORMAT_VERSION}; "
            "re-run the shard stage"
        )
    if itemsize not in _DTYPES:
        raise ValueError(f"token shard {str(path)!r} has itemsize {itemsize}, expected one of {sorted(_DTYPES)}")
    expected = HEADER_BYTES + tokens * itemsize
    if size != expected:
        raise ValueError(
            f"token shard {str(path)!r} is {size} bytes but its header promises {tokens} tokens "
            f"({expected} bytes): truncated or corrupt"
        )
    if tokens == 0:
        raise ValueError(f"token shard {str(path)!r} holds no tokens; the writer never writes empty shards")
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(tokens,))


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read a shard directory's ``manifest.json``, checking its format version."""
    return read_versioned_json(Path(shard_dir) / MANIFEST_FILE, MANIFEST_FORMAT_VERSION, "shard manifest",
                               "re-run the shard stage")


class TokenSplit:
    """All shards of one split, memory-mapped, addressed as one token sequence."""

    def __init__(self, shard_dir: Path, split: str) -> None:
        self.shard_dir = Path(shard_dir)
        self.split = split
        manifest = read_manifest(self.shard_dir)
        if split not in manifest["splits"]:
            raise ValueError(
                f"split {split!r} is not in {str(self.shard_dir / MANIFEST_FILE)!r}; "
                f"it has {sorted(manifest['splits'])}"
            )
        entry = manifest["splits"][split]
        self.vocab_size: int = manifest["vocab_size"]
        self.eot_id: int = manifest["eot_id"]
        self.tokenizer_fingerprint: str = manifest["tokenizer_fingerprint"]
        self.num_documents: int = entry["documents"]
        self.num_bytes: int = entry["bytes"]
        self._shards: list[np.memmap] = []
        for s in entry["shards"]:
            tokens = read_shard(self.shard_dir / s["file"])
            if len(tokens) != s["tokens"] or tokens.dtype.name != manifest["dtype"]:
                raise ValueError(
                    f"token shard {str(self.shard_dir / s['file'])!r} holds {len(tokens)} {tokens.dtype.name} "
                    f"tokens, the manifest says {s['tokens']} {manifest['dtype']}"
                )
            self._shards.append(tokens)
        # _starts[i] is the global index of shard i's first token; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum([len(t) for t in self._shards], dtype=np.int64)])
        self.num_tokens: int = int(self._starts[-1])
        if self.num_tokens != entry["tokens"]:
            raise ValueError(
                f"split {split!r} in {str(self.shard_dir)!r}: shards hold {self.num_tokens} tokens, "
                f"the manifest says {entry['tokens']}"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """int64 copy of tokens[start:start+length]; may cross shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window start={start} length={length} is outside split {self.split!r} "
                f"of {self.num_tokens} tokens in {str(self.shard_dir)!r}"
            )
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, "right")) - 1  # shard holding `start`
        done = 0
        while done < length:
            lo = start + done - int(self._starts[i])
            take = min(length - done, len(self._shards[i]) - lo)
            out[done : done + take] = self._shards[i][lo : lo + take]
            done += take
            i += 1
        return out


# --- encoding one chunk ---------------------------------------------------------------------------


def load_checked_tokenizer(tokenizer: StageResult) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer set up for encoding corpora, after checking it is the one its metadata describes.

    Returns the tokenizer and {"sha256", "eot_id", "vocab_size", "dtype"}. Literal
    "<|endoftext|>" inside a document is encoded as plain text (like tiktoken's
    encode_ordinary), so the eot id only ever marks a real document boundary.
    """
    tok_path = tokenizer.path(TOKENIZER_FILE)
    tok_meta = read_tokenizer_meta(tokenizer.path(META_FILE))
    tok_sha = tokenizer_fingerprint(tok_path)
    if tok_sha != tok_meta["tokenizer_sha256"]:
        raise ValueError(
            f"tokenizer file {str(tok_path)!r} has sha256 {tok_sha}, its metadata records "
            f"{tok_meta['tokenizer_sha256']}: the tokenizer directory was modified"
        )
    tok = load_tokenizer(tok_path)
    tok.encode_special_tokens = True
    vocab_size = tok.get_vocab_size()
    info = {"sha256": tok_sha, "eot_id": eot_id(tok, tok_meta["eot_token"]), "vocab_size": vocab_size,
            "dtype": shard_dtype(vocab_size)}
    return tok, info


def tokens_with_eot(encodings: Sequence[Encoding], eot: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate encoded documents, each followed by ``eot``; returns (tokens, lengths including the eot).

    The ids go to numpy in one pass, without per-document arrays: this is the
    only per-token Python work of the shard stages.
    """
    lengths = np.fromiter((len(e) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    is_eot = np.zeros(total, dtype=bool)
    is_eot[ends - 1] = True
    tokens = np.empty(total, dtype=dtype)
    # numpy raises OverflowError on an id the dtype cannot hold instead of wrapping it around.
    tokens[~is_eot] = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype,
                                  count=total - len(encodings))
    tokens[is_eot] = eot
    return tokens, lengths


def encoded_batches(tok: Tokenizer, batches: Iterable[dict[str, list]]) -> Iterator[tuple[dict[str, list], list]]:
    """(batch, encodings) for each document batch, in order, encoding one batch ahead.

    The batch encoder runs in Rust on every core without the GIL; while it works
    on batch k+1 in a helper thread, the caller's Python work on batch k (ids to
    numpy, routing, writing) proceeds, so the cores do not idle between batches.
    Offsets are not needed, so ``encode_batch_fast`` skips computing them (same
    ids as ``encode_batch``).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="lmpipe-encode") as encoder:
        pending: tuple[dict[str, list], Future] | None = None
        for batch in batches:
            future = encoder.submit(tok.encode_batch_fast, batch["text"], add_special_tokens=False)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def run_encode_chunk(
    chunk_file: Path,
    tokenizer: StageResult,
    val_fraction: float,
    encode_batch_size: int,
    out_dir: str | Path,
    fingerprint: str,
) -> StageResult:
    """Stage: encode one document-set chunk into ``train.tokens`` / ``val.tokens`` and ``docs.parquet``.

    Documents keep their chunk order within each split; ``docs.parquet`` has one
    row per document (id, split, tokens including the eot, UTF-8 bytes), which
    the shard stage turns into the document index without touching the tokens.
    """
    chunk_file = Path(chunk_file)

    def build(tmp: Path) -> BuildOutput:
        tok, info = load_checked_tokenizer(tokenizer)
        rows: dict[str, list] = {"id": [], "split": [], "tokens": [], "bytes": []}
        start = time.perf_counter()
        with open(tmp / tokens_file("train"), "wb") as train_f, open(tmp / tokens_file("val"), "wb") as val_f:
            batches = iter_document_batches(chunk_file, encode_batch_size, ("id", "text"))
            for batch, encodings in encoded_batches(tok, batches):
                tokens, lengths = tokens_with_eot(encodings, info["eot_id"], info["dtype"])
                val = np.fromiter((is_validation(d, val_fraction) for d in batch["id"]), dtype=bool,
                                  count=len(lengths))
                token_is_val = np.repeat(val, lengths)
                tokens[~token_is_val].tofile(train_f)
                tokens[token_is_val].tofile(val_f)
                rows["id"] += batch["id"]
                rows["split"] += np.where(val, "val", "train").tolist()
                rows["tokens"] += lengths.tolist()
                rows["bytes"] += batch["nbytes"]
        seconds = time.perf_counter() - start
        table = pa.table({"id": pa.array(rows["id"], pa.string()), "split": pa.array(rows["split"], pa.string()),
                          "tokens": pa.array(rows["tokens"], pa.int64()), "bytes": pa.array(rows["bytes"], pa.int64())})
        pq.write_table(table, tmp / ENCODED_DOCS_FILE, row_group_size=ROW_GROUP_ROWS)
        metrics: dict[str, float] = {"encode_seconds": seconds}
        for split in SPLITS:
            in_split = [i for i, s in enumerate(rows["split"]) if s == split]
            metrics[f"{split}_documents"] = float(len(in_split))
            metrics[f"{split}_tokens"] = float(sum(rows["tokens"][i] for i in in_split))
            metrics[f"{split}_bytes"] = float(sum(rows["bytes"][i] for i in in_split))
        meta = {"chunk": chunk_file.name, "tokenizer_fingerprint": info["sha256"], "dtype": info["dtype"].name,
                "val_fraction": val_fraction}
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("encode_chunk", fingerprint, out_dir, build)


# --- merging encoded chunks into shards -------------------------------------------------------------


class _IndexWriter:
    """Writes doc_index.parquet in row groups of exactly ROW_GROUP_ROWS rows.

    The file's bytes then depend only on the rows, not on how many encoded
    chunks delivered them: one chunk or fifty give the same index file.
    """

    SCHEMA = pa.schema([("split", pa.string()), ("id", pa.string()), ("start", pa.int64()),
                        ("tokens", pa.int64()), ("bytes", pa.int64()), ("shard", pa.int64())])

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, self.SCHEMA)
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.SCHEMA))
        self._rows += table.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self._pending)
            full = (self._rows // ROW_GROUP_ROWS) * ROW_GROUP_ROWS
            for lo in range(0, full, ROW_GROUP_ROWS):
                self._write_group(whole.slice(lo, ROW_GROUP_ROWS))
            rest = whole.slice(full)
            self._pending, self._rows = [rest], rest.num_rows

    def _write_group(self, table: pa.Table) -> None:
        # One contiguous array per column, so page boundaries never depend on how the rows arrived.
        self._writer.write_table(table.combine_chunks(), row_group_size=ROW_GROUP_ROWS)

    def close(self) -> None:
        if self._rows:
            self._write_group(pa.concat_tables(self._pending))
        self._writer.close()


class _SplitPlan:
    """Where each encoded chunk's tokens of one split go: chunk offsets, per-shard document counts, bytes."""

    def __init__(self, split: str, shard_tokens: int) -> None:
        self.split = split
        self.shard_tokens = shard_tokens
        self.chunk_starts: list[int] = []  # global offset of each encoded chunk's first token of this split
        self.chunk_tokens: list[int] = []
        self.tokens = self.documents = self.bytes = self.text_tokens = 0
        self.docs_ending = np.zeros(0, dtype=np.int64)  # per shard: documents whose eot lies in it

    @property
    def num_shards(self) -> int:
        return -(-self.tokens // self.shard_tokens)

    def add_chunk(self, docs: pa.Table) -> pa.Table:
        """Account for one encoded chunk's documents of this split; returns their doc_index rows."""
        lengths = docs.column("tokens").to_numpy().astype(np.int64, copy=False)
        ends = self.tokens + np.cumsum(lengths)
        starts = ends - lengths
        counts = np.bincount((ends - 1) // self.shard_tokens) if len(ends) else np.zeros(0, dtype=np.int64)
        if len(counts) > len(self.docs_ending):
            self.docs_ending = np.pad(self.docs_ending, (0, len(counts) - len(self.docs_ending)))
        self.docs_ending[: len(counts)] += counts
        self.chunk_starts.append(self.tokens)
        self.chunk_tokens.append(int(lengths.sum()))
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)
        self.text_tokens += int(lengths.sum()) - len(lengths)
        self.bytes += int(pc.sum(docs.column("bytes")).as_py() or 0)
        return pa.table({"split": pa.array([self.split] * len(lengths), pa.string()), "id": docs.column("id"),
                         "start": starts, "tokens": lengths, "bytes": docs.column("bytes"),
                         "shard": starts // self.shard_tokens})

    def shard_range(self, index: int) -> tuple[int, int]:
        lo = index * self.shard_tokens
        return lo, min(lo + self.shard_tokens, self.tokens)


def _check_encoded(encoded: Sequence[StageResult], tok_info: dict[str, Any], corpus: CorpusConfig,
                   corpus_field: str) -> None:
    """Every encoded chunk must come from this tokenizer and this val_fraction, or the shards would mix."""
    if not encoded:
        raise ValueError(f"{corpus_field}: the shard stage got no encoded chunks; the document set is empty "
                         "or no encode_chunk task ran")
    for i, enc in enumerate(encoded):
        if enc.meta.get("tokenizer_fingerprint") != tok_info["sha256"]:
            raise ValueError(
                f"encoded chunk {i} ({enc.out_dir}) was encoded with tokenizer "
                f"{enc.meta.get('tokenizer_fingerprint')}, the shard stage got tokenizer {tok_info['sha256']}; "
                "re-run encode_chunk with this tokenizer"
            )
        if enc.meta.get("val_fraction") != corpus.val_fraction:
            raise ValueError(
                f"encoded chunk {i} ({enc.out_dir}) was split with val_fraction {enc.meta.get('val_fraction')}, "
                f"{corpus_field}.val_fraction is {corpus.val_fraction}; re-run encode_chunk"
            )


def _plan_and_index(encoded: Sequence[StageResult], shard_tokens: int, index_path: Path) -> dict[str, _SplitPlan]:
    """First pass, over the per-document rows only: token offsets per split and chunk, and doc_index.parquet."""
    plans = {split: _SplitPlan(split, shard_tokens) for split in SPLITS}
    writer = _IndexWriter(index_path)
    try:
        for split in SPLITS:  # train rows first, then val rows, each in corpus order
            for enc in encoded:
                docs = pq.read_table(enc.path(ENCODED_DOCS_FILE), columns=["id", "split", "tokens", "bytes"])
                writer.write(plans[split].add_chunk(docs.filter(pc.equal(docs.column("split"), split))))
    finally:
        writer.close()
    return plans


def _chunk_tokens(enc: StageResult, split: str, expected: int, dtype: np.dtype) -> np.ndarray:
    """Memory-map one encoded chunk's tokens of a split, checking the file holds what docs.parquet says."""
    path = enc.path(tokens_file(split))
    size = path.stat().st_size if path.is_file() else None
    if size != expected * dtype.itemsize:
        found = "is missing" if size is None else f"is {size} bytes"
        raise ValueError(
            f"encoded token file {str(path)!r} {found}, expected {expected} {dtype.name} tokens "
            f"({expected * dtype.itemsize} bytes) as its {ENCODED_DOCS_FILE} says; re-run encode_chunk for it"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _shard_pieces(plan: _SplitPlan, index: int, encoded: Sequence[StageResult], dtype: np.dtype
                  ) -> list[np.ndarray]:
    """Slices of the encoded chunks' token files that make up shard ``index`` of a split, in order."""
    lo, hi = plan.shard_range(index)
    pieces = []
    for enc, start, n in zip(encoded, plan.chunk_starts, plan.chunk_tokens):
        if n == 0 or start + n <= lo or start >= hi:
            continue
        tokens = _chunk_tokens(enc, plan.split, n, dtype)
        a, b = max(lo, start) - start, min(hi, start + n) - start
        pieces += [tokens[i : min(i + _COPY_TOKENS, b)] for i in range(a, b, _COPY_TOKENS)]
    return pieces


def _finished_shard(path: Path, tokens: int, documents: int) -> dict[str, Any] | None:
    """The manifest entry of a shard an interrupted attempt completed, if its sidecar vouches for it.

    The file must match the sidecar's sha256 and the counts this attempt
    expects; anything else is rewritten.
    """
    sidecar = path.with_name(path.name + _SIDECAR)
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        entry = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if (entry.get("file"), entry.get("tokens"), entry.get("documents")) != (path.name, tokens, documents):
        return None
    if sha256_file(path) != entry.get("sha256"):
        return None
    return entry


def _write_split(plan: _SplitPlan, encoded: Sequence[StageResult], dtype: np.dtype, tmp: Path
                 ) -> list[dict[str, Any]]:
    """Second pass: the split's shard files, skipping those an earlier attempt already finished."""
    shards = []
    for index in range(plan.num_shards):
        path = tmp / shard_name(plan.split, index)
        lo, hi = plan.shard_range(index)
        documents = int(plan.docs_ending[index]) if index < len(plan.docs_ending) else 0
        entry = _finished_shard(path, hi - lo, documents)
        if entry is None:
            entry = write_shard(path, _shard_pieces(plan, index, encoded, dtype), documents)
            write_json_atomic(path.with_name(path.name + _SIDECAR), entry)
        shards.append(entry)
    return shards


def _remove_leftovers(tmp: Path, keep: set[str]) -> None:
    """Drop sidecars and anything else an interrupted attempt left, so the output is the same as an
    uninterrupted run's."""
    for p in tmp.iterdir():
        if p.name not in keep and p.is_file():
            p.unlink()


def run_shard(
    cfg: ShardConfig,
    corpus: CorpusConfig,
    encoded: list[StageResult],
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    corpus_field: str,
) -> StageResult:
    """Stage: merge the encoded chunks, in list order, into train/val shards, doc_index.parquet and manifest.json.

    Resumable: the ``.partial`` directory survives a failure, and a shard file
    finished by an earlier attempt is verified against its sidecar and kept,
    so a long merge that dies near the end does not start over.
    """

    def build(tmp: Path) -> BuildOutput:
        start = time.perf_counter()
        _, tok_info = load_checked_tokenizer(tokenizer)
        _check_encoded(encoded, tok_info, corpus, corpus_field)
        dtype = tok_info["dtype"]
        plans = _plan_and_index(encoded, cfg.shard_tokens, tmp / DOC_INDEX_FILE)
        n_docs = sum(p.documents for p in plans.values())
        for split, plan in plans.items():
            if plan.documents == 0:
                raise ValueError(
                    f"{corpus_field}.val_fraction={corpus.val_fraction} leaves the {split} split empty "
                    f"({n_docs} documents in {len(encoded)} encoded chunk(s)); change val_fraction or add documents"
                )
        shards = {split: _write_split(plan, encoded, dtype, tmp) for split, plan in plans.items()}
        _remove_leftovers(tmp, {DOC_INDEX_FILE} | {s["file"] for entries in shards.values() for s in entries})
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "shard_format_version": SHARD_FORMAT_VERSION,
            "header_bytes": HEADER_BYTES,
            "corpus": corpus.name,
            "val_fraction": corpus.val_fraction,
            "shard_tokens": cfg.shard_tokens,
            "tokenizer_fingerprint": tok_info["sha256"],
            "vocab_size": tok_info["vocab_size"],
            "eot_id": tok_info["eot_id"],
            "dtype": dtype.name,
            "doc_index": DOC_INDEX_FILE,
            "chunks": len(encoded),
            "splits": {
                s: {"tokens": p.tokens, "documents": p.documents, "bytes": p.bytes, "shards": shards[s]}
                for s, p in plans.items()
            },
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        seconds = sum(e.metrics.get("encode_seconds", 0.0) for e in encoded) + time.perf_counter() - start
        total_tokens = sum(p.tokens for p in plans.values())
        text_tokens = sum(p.text_tokens for p in plans.values())
        metrics = {
            **{f"{s}_tokens": float(p.tokens) for s, p in plans.items()},
            **{f"{s}_documents": float(p.documents) for s, p in plans.items()},
            # Text tokens only (end-of-text markers excluded): the tokenizer stage's measure.
            "bytes_per_token": sum(p.bytes for p in plans.values()) / max(text_tokens, 1),
            "tokens_per_second": total_tokens / max(seconds, 1e-9),
        }
        meta = {
            "tokenizer_fingerprint": tok_info["sha256"],
            "dtype": dtype.name,
            "shards": {s: len(entries) for s, entries in shards.items()},
            "chunks": len(encoded),
        }
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("shard", fingerprint, out_dir, build, keep_partial=True)
