"""Stage train_tokenizer: byte-level BPE on (a deterministic sample of) the cleaned corpus."""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from lmpipe.artifacts import BuildOutput, StageResult, sha256_file, write_json_atomic
from lmpipe.config.data import TokenizerConfig
from lmpipe.data.documents import iter_document_batches, read_index
from lmpipe.data.tokenizer import (
    META_FILE,
    META_FORMAT_VERSION,
    READ_BATCH_DOCS,
    TOKENIZER_FILE,
    eot_id,
    in_sample,
    sample_fraction,
    special_tokens_as_text,
    train_tokenizer,
)
from lmpipe.stages.contract import run_stage

_SCRATCH_SAMPLE = ".sample.parquet"  # the sampled texts, re-read for the compression stats, removed before publish


def _sample_batches(docs_dir: Path, fraction: float, scratch: Path | None, counts: dict[str, int]
                    ) -> Generator[list[str], None, None]:
    """The sampled texts in corpus order, in batches, counted into ``counts``.

    With a scratch path the batches are also written there, so the compression
    pass reads only the sample instead of the whole corpus a second time.
    """
    writer: pq.ParquetWriter | None = None
    try:
        for batch in iter_document_batches(docs_dir, READ_BATCH_DOCS, ("id", "text")):
            texts, nbytes = batch["text"], batch["nbytes"]
            if fraction < 1.0:
                keep = [i for i, doc_id in enumerate(batch["id"]) if in_sample(doc_id, fraction)]
                texts, nbytes = [texts[i] for i in keep], [nbytes[i] for i in keep]
            if not texts:
                continue
            counts["documents"] += len(texts)
            counts["bytes"] += sum(nbytes)
            if scratch is not None:
                table = pa.table({"text": pa.array(texts, pa.string())})
                writer = writer or pq.ParquetWriter(scratch, table.schema)
                writer.write_table(table)
            yield texts
    finally:
        if writer is not None:
            writer.close()


def count_tokens(tok: Tokenizer, texts_source: Path) -> int:
    """Tokens the tokenizer makes of every text in a document set or parquet file (text column).

    Literal special-token text counts as plain text, as it does in the shards.
    """
    with special_tokens_as_text(tok):
        return sum(
            sum(len(e) for e in tok.encode_batch_fast(batch["text"], add_special_tokens=False))
            for batch in iter_document_batches(texts_source, READ_BATCH_DOCS)
        )


def run_train_tokenizer(
    cfg: TokenizerConfig, docs: StageResult, out_dir: str | Path, fingerprint: str
) -> StageResult:
    """Stage: train the tokenizer on (a sample of) the cleaned document set; write tokenizer.json and
    tokenizer_meta.json.

    The corpus is read once, as a stream: the trainer keeps only word counts, and
    the compression stats are computed on the same sample (re-read from a scratch
    copy), so the stage stays cheap on a corpus far larger than the sample.
    """
    docs_dir = Path(docs.out_dir)

    def build(tmp: Path) -> BuildOutput:
        index = read_index(docs_dir)
        fraction = sample_fraction(cfg, index["bytes"])
        scratch = tmp / _SCRATCH_SAMPLE if fraction < 1.0 else None
        counts = {"documents": 0, "bytes": 0}
        start = time.perf_counter()
        batches = _sample_batches(docs_dir, fraction, scratch, counts)
        tok = train_tokenizer(batches, cfg)
        batches.close()  # flushes the scratch file, should the trainer have stopped early
        train_seconds = time.perf_counter() - start
        if counts["documents"] == 0:
            if index["documents"] == 0:
                raise ValueError(f"document set {str(docs_dir)!r} holds no documents to train the tokenizer on")
            raise ValueError(
                f"tokenizer.sample_bytes={cfg.sample_bytes} selects none of the {index['documents']} documents "
                f"({index['bytes']} bytes) in {str(docs_dir)!r}; raise it"
            )
        tok_path = tmp / TOKENIZER_FILE
        tok.save(str(tok_path))
        n_tokens = count_tokens(tok, scratch or docs_dir)
        if scratch is not None:
            scratch.unlink()

        vocab_size = tok.get_vocab_size()
        meta = {
            "format_version": META_FORMAT_VERSION,
            "type": "byte_level_bpe",
            "pretokenizer": cfg.pretokenizer,
            "vocab_size": vocab_size,
            "requested_vocab_size": cfg.vocab_size,
            # A tiny corpus runs out of pairs seen min_frequency times before reaching vocab_size.
            "vocab_shortfall": cfg.vocab_size - vocab_size,
            "min_frequency": cfg.min_frequency,
            "special_tokens": [{"token": t, "id": tok.token_to_id(t)} for t in cfg.special_tokens],
            "eot_token": cfg.eot_token,
            "eot_id": eot_id(tok, cfg.eot_token),
            "tokenizer_sha256": sha256_file(tok_path),
            "corpus_documents": index["documents"],
            "corpus_bytes": index["bytes"],
            "requested_sample_bytes": cfg.sample_bytes,
            "sample_fraction": fraction,
            # The sample the tokenizer was trained and measured on (the whole corpus without sample_bytes).
            "training_documents": counts["documents"],
            "training_bytes": counts["bytes"],
            "training_tokens": n_tokens,
        }
        write_json_atomic(tmp / META_FILE, meta)
        metrics = {
            "vocab_size": float(vocab_size),
            "vocab_shortfall": float(cfg.vocab_size - vocab_size),
            "bytes_per_token": counts["bytes"] / max(n_tokens, 1),
            "sample_fraction": fraction,
            "training_bytes": float(counts["bytes"]),
            "train_seconds": train_seconds,
        }
        summary = {k: meta[k] for k in ("vocab_size", "requested_vocab_size", "eot_id", "tokenizer_sha256",
                                        "pretokenizer")}
        return BuildOutput(metrics=metrics, meta=summary)

    return run_stage("train_tokenizer", fingerprint, out_dir, build)
