"""Stages encode_chunk and shard: tokenize each chunk of documents, then write the token shards and manifest."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmpipe.artifacts import BuildOutput, StageResult, sha256_file, write_json_atomic
from lmpipe.config.data import CorpusConfig, ShardConfig
from lmpipe.data.documents import ROW_GROUP_ROWS, iter_document_batches
from lmpipe.data.shards import (
    DOC_INDEX_FILE,
    ENCODED_DOCS_FILE,
    HEADER_BYTES,
    MANIFEST_FILE,
    MANIFEST_FORMAT_VERSION,
    SHARD_FORMAT_VERSION,
    SPLITS,
    VAL_BY_DOCUMENT,
    VAL_INSIDE,
    document_split_is_one_sided,
    encoded_batches,
    load_checked_tokenizer,
    shard_name,
    split_batch,
    tokens_file,
    tokens_with_eot,
    write_shard,
)
from lmpipe.stages.contract import run_stage

log = logging.getLogger(__name__)
_SIDECAR = ".json"  # <shard>.bin.json: sha256/tokens/documents of a shard finished by an interrupted attempt
_COPY_TOKENS = 1 << 22  # tokens per bulk copy from an encoded chunk into a shard
_ID_BATCH = 4096  # document ids read at a time to decide how the validation split is taken


def choose_val_split(docs: StageResult, val_fraction: float, may_be_empty: tuple[str, ...] = ()) -> str:
    """How a corpus's validation split is taken: by document (VAL_BY_DOCUMENT), unless that puts every document
    on one side (a one-book corpus is one document) and both splits are needed: then inside every document
    (VAL_INSIDE). Decided from the document ids alone, so a corpus is always split the same way (a continual
    run's held-out set stays the one its line began with). ``may_be_empty``: splits that may be empty."""
    if may_be_empty:
        return VAL_BY_DOCUMENT
    ids = (doc_id for batch in iter_document_batches(docs.out_dir, _ID_BATCH, ("id",)) for doc_id in batch["id"])
    return VAL_INSIDE if document_split_is_one_sided(ids, val_fraction) else VAL_BY_DOCUMENT


def run_encode_chunk(
    chunk_file: Path,
    tokenizer: StageResult,
    val_fraction: float,
    encode_batch_size: int,
    out_dir: str | Path,
    fingerprint: str,
    val_split: str = VAL_BY_DOCUMENT,
) -> StageResult:
    """Stage: encode one document-set chunk into ``train.tokens`` / ``val.tokens`` and ``docs.parquet``.

    Documents keep their chunk order within each split; ``docs.parquet`` has one
    row per document (id, split, tokens including the eot, UTF-8 bytes), which
    the shard stage turns into the document index without touching the tokens.
    With ``val_split`` VAL_INSIDE (see ``choose_val_split``) each document gives a
    train row and a val row, its two parts (``lmpipe.data.shards.held_out_cut``).
    """
    chunk_file = Path(chunk_file)

    def build(tmp: Path) -> BuildOutput:
        tok, info = load_checked_tokenizer(tokenizer)
        rows: dict[str, list] = {"id": [], "split": [], "tokens": [], "bytes": []}
        start = time.perf_counter()
        with open(tmp / tokens_file("train"), "wb") as train_f, open(tmp / tokens_file("val"), "wb") as val_f:
            batches = (split_batch(b, val_fraction, val_split)
                       for b in iter_document_batches(chunk_file, encode_batch_size, ("id", "text")))
            for batch, encodings in encoded_batches(tok, batches):
                tokens, lengths = tokens_with_eot(encodings, info["eot_id"], info["dtype"])
                val = np.array(batch["val"], dtype=bool)
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
                "val_fraction": val_fraction, "val_split": val_split}
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
                   corpus_field: str, val_split: str) -> None:
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
        if enc.meta.get("val_split", VAL_BY_DOCUMENT) != val_split:
            raise ValueError(f"encoded chunk {i} ({enc.out_dir}) took its validation split {enc.meta.get('val_split')}"
                             f", the shard stage takes it {val_split}; re-run encode_chunk")


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
    may_be_empty: tuple[str, ...] = (),
    val_split: str = VAL_BY_DOCUMENT,
) -> StageResult:
    """Stage: merge the encoded chunks, in list order, into train/val shards, doc_index.parquet and manifest.json.

    Resumable: the ``.partial`` directory survives a failure, and a shard file
    finished by an earlier attempt is verified against its sidecar and kept,
    so a long merge that dies near the end does not start over. ``may_be_empty``: splits that may hold no
    document (a continual run's new documents all train; its validation is on the fixed held-out set).
    ``val_split``: how the encoded chunks took the validation split (``choose_val_split``); the manifest and the
    stage's meta say which, and a split taken inside the documents is logged.
    """

    def build(tmp: Path) -> BuildOutput:
        start = time.perf_counter()
        _, tok_info = load_checked_tokenizer(tokenizer)
        _check_encoded(encoded, tok_info, corpus, corpus_field, val_split)
        dtype = tok_info["dtype"]
        plans = _plan_and_index(encoded, cfg.shard_tokens, tmp / DOC_INDEX_FILE)
        n_docs = sum(p.documents for p in plans.values())
        for split, plan in plans.items():
            if plan.documents == 0 and split not in may_be_empty:
                how = ("; inside documents: every one is too short to cut" if val_split == VAL_INSIDE else "")
                raise ValueError(
                    f"{corpus_field}.val_fraction={corpus.val_fraction} leaves the {split} split empty "
                    f"({n_docs} documents in {len(encoded)} encoded chunk(s){how}); change val_fraction or add "
                    "documents"
                )
        if val_split == VAL_INSIDE:
            log.warning("%s: val_fraction=%s by document would leave a split empty (%d document(s)), so the "
                        "validation split is the last %s of each document, cut at a paragraph break: %d tokens "
                        "train, %d validate", corpus_field, corpus.val_fraction, plans["train"].documents,
                        corpus.val_fraction, plans["train"].tokens, plans["val"].tokens)
        shards = {split: _write_split(plan, encoded, dtype, tmp) for split, plan in plans.items()}
        _remove_leftovers(tmp, {DOC_INDEX_FILE} | {s["file"] for entries in shards.values() for s in entries})
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "shard_format_version": SHARD_FORMAT_VERSION,
            "header_bytes": HEADER_BYTES,
            "corpus": corpus.name,
            "val_fraction": corpus.val_fraction,
            "val_split": val_split,
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
            "val_split": val_split,
        }
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("shard", fingerprint, out_dir, build, keep_partial=True)
