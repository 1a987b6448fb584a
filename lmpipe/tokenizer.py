"""Byte-level BPE tokenizer: train it on the cleaned documents, save it, load it back.

The tokenizer is GPT-2 style: text is split by the GPT-2 regex, every byte is
mapped to one printable character (the "bytes-to-unicode" table) and BPE merges
are learned over those characters. Any string round-trips::

    >>> tok = load_tokenizer(result.path("tokenizer.json"))
    >>> ids = tok.encode("Héllo 🌍", add_special_tokens=False).ids
    >>> tok.decode(ids, skip_special_tokens=False)
    'Héllo 🌍'

Training is deterministic: the trainer's word counts are sums (order-free) and
ties between equally frequent merges are broken by the pair's token ids, so the
same documents and config give a byte-identical ``tokenizer.json`` whatever the
thread count (checked with RAYON_NUM_THREADS=1, 2, 16 and 64).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmpipe.config import TokenizerConfig
from lmpipe.download import DOCUMENTS_FILE
from lmpipe.stage import BuildOutput, StageResult, read_versioned_json, run_stage, sha256_file, write_json_atomic

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
META_FORMAT_VERSION = 1
READ_BATCH_DOCS = 256  # documents per parquet read when no caller-specific batch size applies


def iter_document_batches(
    path: Path, batch_size: int, columns: Sequence[str] = ("text",)
) -> Iterator[dict[str, list]]:
    """Yield the documents of a ``documents.parquet`` as column dicts of up to batch_size rows, in file order.

    Reading in batches keeps memory flat however large the corpus; the shard
    stage uses the same reader.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"documents file {str(path)!r} does not exist (did the clean stage finish?)")
    pf = pq.ParquetFile(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"documents file {str(path)!r} lacks column(s) {missing}; it has {pf.schema_arrow.names}")
    for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
        out: dict[str, list] = {c: batch.column(c).to_pylist() for c in columns}
        # UTF-8 byte length of each text, computed by Arrow without re-encoding in Python.
        if "text" in columns:
            out["nbytes"] = pc.binary_length(batch.column("text")).to_pylist()
        yield out


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE tokenizer; special tokens get ids 0..k-1 in config order.

    The vocabulary may come out smaller than cfg.vocab_size when the corpus has
    too few pairs occurring at least cfg.min_frequency times.
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: " word" and "word" stay different tokens, and decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        # All 256 byte symbols up front, so any byte is encodable even if the corpus never shows it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by :func:`run_train_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    return Tokenizer.from_file(str(path))


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 hex of the tokenizer.json bytes: what shards and checkpoints record to stay matched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    return sha256_file(path)


def read_tokenizer_meta(path: str | Path) -> dict[str, Any]:
    """Read ``tokenizer_meta.json``, checking its format version."""
    return read_versioned_json(Path(path), META_FORMAT_VERSION, "tokenizer metadata", "retrain the tokenizer")


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """How many UTF-8 bytes each token id stands for (int64, length vocab_size); special tokens count 0.

    In byte-level BPE each character of a token's string form is one byte (the
    GPT-2 bytes-to-unicode map), so the length is the string's length. Used to
    turn a per-token loss into bits per byte.
    """
    n = tok.get_vocab_size()
    specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in specials:
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"tokenizer has no token for id {i} below its vocab_size {n}")
        lengths[i] = len(piece)
    return lengths


def eot_id(tok: Tokenizer, eot_token: str) -> int:
    """The id of the end-of-text token; fails clearly if the tokenizer lacks it."""
    i = tok.token_to_id(eot_token)
    if i is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise ValueError(
            f"tokenizer.eot_token {eot_token!r} is not in the tokenizer (its special tokens: {specials}); "
            "retrain the tokenizer with it in tokenizer.special_tokens"
        )
    return i


def run_train_tokenizer(
    cfg: TokenizerConfig, docs: StageResult, out_dir: str | Path, fingerprint: str
) -> StageResult:
    """Stage: train the tokenizer on the cleaned documents; write tokenizer.json and tokenizer_meta.json."""
    docs_path = docs.path(DOCUMENTS_FILE)

    def texts() -> Iterator[list[str]]:
        # Batches of strings, in file order: train_from_iterator accepts either.
        for batch in iter_document_batches(docs_path, READ_BATCH_DOCS):
            yield batch["text"]

    def build(tmp: Path) -> BuildOutput:
        start = time.perf_counter()
        tok = train_tokenizer(texts(), cfg)
        train_seconds = time.perf_counter() - start
        tok_path = tmp / TOKENIZER_FILE
        tok.save(str(tok_path))

        # Compression on the training documents; literal special-token text counts as plain text here,
        # as it does in the shards.
        tok.encode_special_tokens = True
        n_docs = n_bytes = n_tokens = 0
        for batch in iter_document_batches(docs_path, READ_BATCH_DOCS):
            encodings = tok.encode_batch(batch["text"], add_special_tokens=False)
            n_tokens += sum(len(e.ids) for e in encodings)
            n_bytes += sum(batch["nbytes"])
            n_docs += len(encodings)
        if n_docs == 0:
            raise ValueError(f"documents file {str(docs_path)!r} holds no documents to train the tokenizer on")

        vocab_size = tok.get_vocab_size()
        meta = {
            "format_version": META_FORMAT_VERSION,
            "type": "byte_level_bpe",
            "vocab_size": vocab_size,
            "requested_vocab_size": cfg.vocab_size,
            # A tiny corpus runs out of pairs seen min_frequency times before reaching vocab_size.
            "vocab_shortfall": cfg.vocab_size - vocab_size,
            "min_frequency": cfg.min_frequency,
            "special_tokens": [{"token": t, "id": tok.token_to_id(t)} for t in cfg.special_tokens],
            "eot_token": cfg.eot_token,
            "eot_id": eot_id(tok, cfg.eot_token),
            "tokenizer_sha256": sha256_file(tok_path),
            "training_documents": n_docs,
            "training_bytes": n_bytes,
            "training_tokens": n_tokens,
        }
        write_json_atomic(tmp / META_FILE, meta)
        metrics = {
            "vocab_size": float(vocab_size),
            "vocab_shortfall": float(cfg.vocab_size - vocab_size),
            "bytes_per_token": n_bytes / max(n_tokens, 1),
            "train_seconds": train_seconds,
        }
        summary = {k: meta[k] for k in ("vocab_size", "requested_vocab_size", "eot_id", "tokenizer_sha256")}
        return BuildOutput(metrics=metrics, meta=summary)

    return run_stage("train_tokenizer", fingerprint, out_dir, build)
