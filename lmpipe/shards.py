"""Token shards: the corpus encoded once, stored as flat binary files that training memory-maps.

Layout of one shard file (all little-endian)::

    bytes 0..255   header: magic b"LMPTOKS\\0", format_version u32, itemsize u32 (2 = uint16, 4 = uint32),
                   token count u64, document count u64, zero padding
    bytes 256..    the tokens, uint16 when the vocabulary fits (<= 65,536 ids), else uint32

Every document is followed by the end-of-text token, so documents stay
separable after concatenation. A split (train / val) is a sequence of files
``{split}_{index:06d}.bin`` of at most ``shard_tokens`` tokens each; a document
may continue into the next file and is counted in the file where it ends.
``manifest.json`` lists every file with its sha256 and counts, and the
tokenizer fingerprint the tokens belong to.

Documents go to train or val by a hash of their id, so the split does not depend
on processing order or batch sizes. (Ids are positions within a source, so
inserting a document in the middle of a file does move later ones.)
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from lmpipe.config import CorpusConfig, ShardConfig
from lmpipe.stage import BuildOutput, StageResult, read_versioned_json, run_stage, sha256_file, write_json_atomic
from lmpipe.tokenizer import (
    DOCUMENTS_FILE,
    META_FILE,
    TOKENIZER_FILE,
    eot_id,
    iter_document_batches,
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
SPLITS = ("train", "val")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """True if the document belongs to the validation split.

    The first 8 bytes of sha256(id) read as a number in [0, 1): stable across
    runs, machines and Python versions (unlike ``hash()``), and independent of
    document order.
    """
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _pack_header(itemsize: int, tokens: int, documents: int) -> bytes:
    return _HEADER.pack(MAGIC, SHARD_FORMAT_VERSION, itemsize, tokens, documents).ljust(HEADER_BYTES, b"\0")


class TokenShardWriter:
    """Streams documents into ``{split}_{index:06d}.bin`` files of at most shard_tokens tokens.

    >>> with TokenShardWriter(out_dir, "train", shard_tokens=1 << 20, vocab_size=4096, eot_id=0) as w:
    ...     w.add_documents([[72, 105], [33]])   # writes 72 105 0 33 0
    >>> w.shards  # [{"file": "train_000000.bin", "sha256": ..., "tokens": 5, "documents": 2}]
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int, eot_id: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"eot_id {eot_id} is outside the vocabulary of {vocab_size} tokens")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = shard_dtype(vocab_size)
        self.eot_id = eot_id
        self.shards: list[dict[str, Any]] = []  # finished shards, in order
        self._file: BinaryIO | None = None
        self._tokens = 0  # in the open shard
        self._documents = 0  # ending in the open shard
        self._closed = False

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._tokens

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards) + self._documents

    def add_document(self, ids: Sequence[int]) -> None:
        self.add_documents([ids])

    def add_documents(self, docs: Sequence[Sequence[int]]) -> None:
        """Append documents, each followed by the end-of-text token."""
        if self._closed:
            raise ValueError(f"shard writer for split {self.split!r} is already closed")
        if not docs:
            return
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        ends = np.cumsum(lengths)  # exclusive end of each document (its eot is at end - 1)
        flat = np.empty(int(ends[-1]), dtype=self.dtype)
        pos = 0
        for d, n in zip(docs, lengths):
            flat[pos : pos + n - 1] = d  # numpy raises OverflowError on an id the dtype cannot hold
            pos += n
        flat[ends - 1] = self.eot_id
        done = 0
        while done < len(flat):
            if self._file is None:
                self._open_shard()
            take = min(self.shard_tokens - self._tokens, len(flat) - done)
            flat[done : done + take].tofile(self._file)
            # Documents whose eot lands in this piece end in this shard.
            ended = np.searchsorted(ends, done + take, "right") - np.searchsorted(ends, done, "right")
            self._documents += int(ended)
            self._tokens += take
            done += take
            if self._tokens == self.shard_tokens:
                self._finish_shard()

    def _open_shard(self) -> None:
        path = self.out_dir / f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(path, "wb")
        self._file.write(_pack_header(self.dtype.itemsize, 0, 0))  # counts patched in _finish_shard
        self._tokens = self._documents = 0

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.write(_pack_header(self.dtype.itemsize, self._tokens, self._documents))
        path = Path(self._file.name)
        self._file.close()
        self._file = None
        self.shards.append(
            {"file": path.name, "sha256": sha256_file(path), "tokens": self._tokens, "documents": self._documents}
        )
        self._tokens = self._documents = 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the list of shards (file, sha256, tokens, documents)."""
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        return self.shards

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # leave the half-written file to the stage's cleanup
            self._file.close()
            self._file = None
            self._closed = True


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
                f"split {split!r} is not in {str(self.shard_dir / MANIFEST_FILE)!r}; it has {sorted(manifest['splits'])}"
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


def run_shard(
    cfg: ShardConfig,
    corpus: CorpusConfig,
    docs: StageResult,
    tokenizer: StageResult,
    out_dir: str | Path,
    fingerprint: str,
    *,
    corpus_field: str,
) -> StageResult:
    """Stage: encode the cleaned documents and write train/val shards plus manifest.json."""
    docs_path = docs.path(DOCUMENTS_FILE)
    tok_path = tokenizer.path(TOKENIZER_FILE)

    def build(tmp: Path) -> BuildOutput:
        tok_meta = read_tokenizer_meta(tokenizer.path(META_FILE))
        tok_sha = tokenizer_fingerprint(tok_path)
        if tok_sha != tok_meta["tokenizer_sha256"]:
            raise ValueError(
                f"tokenizer file {str(tok_path)!r} has sha256 {tok_sha}, its metadata records "
                f"{tok_meta['tokenizer_sha256']}: the tokenizer directory was modified"
            )
        tok = load_tokenizer(tok_path)
        eot = eot_id(tok, tok_meta["eot_token"])
        vocab_size = tok.get_vocab_size()
        # Literal "<|endoftext|>" inside a document is encoded as plain text (like tiktoken's
        # encode_ordinary), so the eot id only ever marks a real document boundary.
        tok.encode_special_tokens = True

        n_bytes = dict.fromkeys(SPLITS, 0)
        text_tokens = 0
        start = time.perf_counter()
        with (
            TokenShardWriter(tmp, "train", cfg.shard_tokens, vocab_size, eot) as train_w,
            TokenShardWriter(tmp, "val", cfg.shard_tokens, vocab_size, eot) as val_w,
        ):
            writers = {"train": train_w, "val": val_w}
            for batch in iter_document_batches(docs_path, cfg.encode_batch_size, ("id", "text")):
                encodings = tok.encode_batch(batch["text"], add_special_tokens=False)
                routed: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
                for doc_id, enc, nb in zip(batch["id"], encodings, batch["nbytes"]):
                    split = "val" if is_validation(doc_id, corpus.val_fraction) else "train"
                    ids = enc.ids
                    routed[split].append(ids)
                    n_bytes[split] += nb
                    text_tokens += len(ids)
                for split, ids_list in routed.items():
                    writers[split].add_documents(ids_list)
        seconds = time.perf_counter() - start

        n_docs = train_w.documents + val_w.documents
        for split, w in writers.items():
            if w.documents == 0:
                raise ValueError(
                    f"{corpus_field}.val_fraction={corpus.val_fraction} leaves the {split} split empty "
                    f"({n_docs} documents in {str(docs_path)!r}); change val_fraction or add documents"
                )
        dtype = shard_dtype(vocab_size)
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "shard_format_version": SHARD_FORMAT_VERSION,
            "header_bytes": HEADER_BYTES,
            "corpus": corpus.name,
            "val_fraction": corpus.val_fraction,
            "shard_tokens": cfg.shard_tokens,
            "tokenizer_fingerprint": tok_sha,
            "vocab_size": vocab_size,
            "eot_id": eot,
            "dtype": dtype.name,
            "splits": {
                s: {"tokens": w.tokens, "documents": w.documents, "bytes": n_bytes[s], "shards": w.shards}
                for s, w in writers.items()
            },
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        total_tokens = train_w.tokens + val_w.tokens
        metrics = {
            "train_tokens": float(train_w.tokens),
            "val_tokens": float(val_w.tokens),
            "train_documents": float(train_w.documents),
            "val_documents": float(val_w.documents),
            # Text tokens only (end-of-text markers excluded): the tokenizer stage's measure.
            "bytes_per_token": sum(n_bytes.values()) / max(text_tokens, 1),
            "tokens_per_second": total_tokens / max(seconds, 1e-9),
        }
        meta = {
            "tokenizer_fingerprint": tok_sha,
            "dtype": dtype.name,
            "shards": {s: len(w.shards) for s, w in writers.items()},
        }
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("shard", fingerprint, out_dir, build)
