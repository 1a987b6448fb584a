"""Token shards: binary format, train/val split, the shard stage on real WikiText, TokenSplit windows."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lmpipe.config import EOT, CorpusConfig, ShardConfig, SourceConfig, TokenizerConfig
from lmpipe.shards import (
    HEADER_BYTES,
    MAGIC,
    TokenShardWriter,
    TokenSplit,
    is_validation,
    read_manifest,
    read_shard,
    run_shard,
)
from lmpipe.stage import StageResult
from lmpipe.tokenizer import load_tokenizer, run_train_tokenizer
from tests.test_tokenizer import wikitext_documents, write_documents

FIELD = "data.pretrain"
SHARD_TOKENS = 16_384


def corpus(val_fraction: float = 0.1) -> CorpusConfig:
    return CorpusConfig(name="wikitext2", sources=[SourceConfig(uri="data/wikitext2-valid.txt")], val_fraction=val_fraction)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return wikitext_documents()


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> StageResult:
    return write_documents(tmp_path_factory.mktemp("docs"), texts)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, docs: StageResult) -> StageResult:
    return run_train_tokenizer(TokenizerConfig(vocab_size=1024), docs, tmp_path_factory.mktemp("tok") / "out", "fp-tok")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, docs: StageResult, tokenizer: StageResult) -> StageResult:
    cfg = ShardConfig(shard_tokens=SHARD_TOKENS, encode_batch_size=7)  # batches that do not divide 60 documents
    return run_shard(cfg, corpus(), docs, tokenizer, tmp_path_factory.mktemp("shards") / "out", "fp-shard", corpus_field=FIELD)


def expected_stream(tokenizer: StageResult, texts: list[str], split: str) -> np.ndarray:
    """The split's tokens computed independently: each document's ids, then the eot id (0)."""
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    out: list[int] = []
    for i, text in enumerate(texts):
        if is_validation(f"doc-{i:05d}", 0.1) == (split == "val"):
            out += tok.encode(text, add_special_tokens=False).ids + [0]
    return np.array(out, dtype=np.int64)


# --- the binary format ---------------------------------------------------------------------------


def write_shards(out_dir: Path, docs: list[list[int]], shard_tokens: int = 1024, vocab_size: int = 4096) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with TokenShardWriter(out_dir, "train", shard_tokens, vocab_size, eot_id=0) as w:
        w.add_document(docs[0])
        w.add_documents(docs[1:])
    return w.shards


def test_writer_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Empty documents too: they still contribute their end-of-text token.
    docs = [rng.integers(1, 4096, size=int(n)).tolist() for n in rng.integers(0, 300, size=40)]
    stream = np.concatenate([np.array(d + [0]) for d in docs])
    shards = write_shards(tmp_path, docs)

    assert [s["file"] for s in shards] == [f"train_{i:06d}.bin" for i in range(-(-len(stream) // 1024))]
    assert [s["tokens"] for s in shards[:-1]] == [1024] * (len(shards) - 1)
    assert sum(s["tokens"] for s in shards) == len(stream)
    assert sum(s["documents"] for s in shards) == 40
    read = [read_shard(tmp_path / s["file"]) for s in shards]
    assert np.array_equal(np.concatenate(read), stream)
    for s, tokens in zip(shards, read):
        raw = (tmp_path / s["file"]).read_bytes()
        assert raw[:8] == MAGIC
        assert struct.unpack_from("<IIQQ", raw, 8) == (1, 2, s["tokens"], s["documents"])
        assert raw[32:HEADER_BYTES] == bytes(HEADER_BYTES - 32)
        assert len(raw) == HEADER_BYTES + 2 * s["tokens"]
        assert s["sha256"] == hashlib.sha256(raw).hexdigest()
        assert tokens.dtype == np.uint16
        # A document is counted in the shard holding its end-of-text token.
        assert s["documents"] == int((tokens == 0).sum())


def test_writer_exact_fill_leaves_no_empty_shard(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [[7] * 1023, [8] * 1023])
    assert [(s["file"], s["tokens"], s["documents"]) for s in shards] == [
        ("train_000000.bin", 1024, 1),
        ("train_000001.bin", 1024, 1),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000000.bin", "train_000001.bin"]


def test_uint32_for_large_vocabulary(tmp_path: Path) -> None:
    docs = [[65_535, 65_536, 69_999], [1, 2]]
    shards = write_shards(tmp_path, docs, vocab_size=70_000)
    tokens = read_shard(tmp_path / shards[0]["file"])
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [65_535, 65_536, 69_999, 0, 1, 2, 0]
    assert (tmp_path / shards[0]["file"]).stat().st_size == HEADER_BYTES + 4 * 7
    # A uint16 writer refuses an id it cannot hold instead of wrapping it around.
    with pytest.raises(OverflowError):
        write_shards(tmp_path / "small", [[70_000]], vocab_size=4096)


def test_header_is_checked(tmp_path: Path) -> None:
    write_shards(tmp_path, [[5] * 100])
    good = (tmp_path / "train_000000.bin").read_bytes()

    bad_magic = tmp_path / "bad_magic.bin"
    bad_magic.write_bytes(b"NOTASHRD" + good[8:])
    with pytest.raises(ValueError, match=r"bad_magic\.bin.*magic"):
        read_shard(bad_magic)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good[:-2])
    with pytest.raises(ValueError, match=r"truncated\.bin' is 456 bytes but its header promises 101 tokens"):
        read_shard(truncated)

    stub = tmp_path / "stub.bin"
    stub.write_bytes(good[:100])
    with pytest.raises(ValueError, match=r"stub\.bin.*shorter than its 256-byte header"):
        read_shard(stub)

    future = tmp_path / "future.bin"
    future.write_bytes(good[:8] + struct.pack("<I", 99) + good[12:])
    with pytest.raises(ValueError, match=r"future\.bin' has format_version 99"):
        read_shard(future)

    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_shard(tmp_path / "missing.bin")


# --- the train/val split -------------------------------------------------------------------------


def test_split_is_deterministic_and_about_the_fraction() -> None:
    ids = [f"doc-{i}" for i in range(1000)]
    val = {i for i in ids if is_validation(i, 0.1)}
    assert len(val) == 103
    assert {i for i in reversed(ids) if is_validation(i, 0.1)} == val
    # A larger fraction only adds documents: raising val_fraction never moves one back to train.
    smaller = {i for i in ids if is_validation(i, 0.05)}
    assert len(smaller) == 47 and smaller < val
    # Pinned answers: the hash scheme must not change across machines or versions.
    assert is_validation("doc-00021", 0.01) and not is_validation("doc-00020", 0.01)


# --- the shard stage on real text ----------------------------------------------------------------


def test_manifest_is_consistent(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    m = read_manifest(Path(shards.out_dir))
    assert (m["format_version"], m["vocab_size"], m["eot_id"], m["dtype"]) == (1, 1024, 0, "uint16")
    assert m["tokenizer_fingerprint"] == tokenizer.files["tokenizer.json"]
    val_ids = {i for i in range(len(texts)) if is_validation(f"doc-{i:05d}", 0.1)}
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (51, 9)
    for split, entry in m["splits"].items():
        in_split = [t for i, t in enumerate(texts) if (i in val_ids) == (split == "val")]
        assert entry["bytes"] == sum(len(t.encode("utf-8")) for t in in_split)
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        assert entry["documents"] == sum(s["documents"] for s in entry["shards"]) == len(in_split)
        assert len(entry["shards"]) == -(-entry["tokens"] // SHARD_TOKENS)
        eots = 0
        for s in entry["shards"]:
            path = Path(shards.out_dir) / s["file"]
            tokens = read_shard(path)
            assert len(tokens) == s["tokens"]
            assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == shards.files[s["file"]]
            assert struct.unpack_from("<Q", path.read_bytes(), 24)[0] == s["documents"]
            assert int((tokens == 0).sum()) == s["documents"]
            eots += s["documents"]
        assert eots == entry["documents"]
        assert shards.metrics[f"{split}_tokens"] == entry["tokens"]
        assert shards.metrics[f"{split}_documents"] == entry["documents"]
    # Same text, same tokenizer: the shard stage's compression equals the tokenizer stage's.
    assert shards.metrics["bytes_per_token"] == pytest.approx(tokenizer.metrics["bytes_per_token"], rel=1e-12)


def test_token_split_equals_independent_encoding(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    for split in ("train", "val"):
        ts = TokenSplit(Path(shards.out_dir), split)
        expected = expected_stream(tokenizer, texts, split)
        assert len(ts) == ts.num_tokens == len(expected)
        whole = ts.window(0, ts.num_tokens)
        assert whole.dtype == np.int64
        assert np.array_equal(whole, expected)
        assert ts.num_bytes == read_manifest(Path(shards.out_dir))["splits"][split]["bytes"]


def test_windows_cross_shard_boundaries(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    ts = TokenSplit(Path(shards.out_dir), "train")
    expected = expected_stream(tokenizer, texts, "train")
    n = ts.num_tokens
    assert n > 3 * SHARD_TOKENS
    cases = [(SHARD_TOKENS - 5, 10), (SHARD_TOKENS, 1), (SHARD_TOKENS - 1, 2 * SHARD_TOKENS + 2), (0, 1), (n - 7, 7), (n, 0)]
    for start, length in cases:
        assert np.array_equal(ts.window(start, length), expected[start : start + length]), (start, length)
    for start, length in [(n - 1, 2), (-1, 1), (0, -1), (n + 1, 0)]:
        with pytest.raises(IndexError, match=rf"start={start} length={length} is outside split 'train' of {n} tokens"):
            ts.window(start, length)


def test_first_train_document_decodes_to_its_text(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    ts = TokenSplit(Path(shards.out_dir), "train")
    head = ts.window(0, 20_000)
    first = head[: int(np.argmax(head == ts.eot_id))]
    first_train = next(t for i, t in enumerate(texts) if not is_validation(f"doc-{i:05d}", 0.1))
    assert load_tokenizer(tokenizer.path("tokenizer.json")).decode(first.tolist()) == first_train


def test_run_shard_is_byte_identical(tmp_path: Path, shards: StageResult, docs: StageResult, tokenizer: StageResult) -> None:
    cfg = ShardConfig(shard_tokens=SHARD_TOKENS, encode_batch_size=256)  # batching must not matter either
    again = run_shard(cfg, corpus(), docs, tokenizer, tmp_path / "again", "fp-shard", corpus_field=FIELD)
    assert again.files == shards.files  # sha256 of every .bin and manifest.json
    first = Path(shards.out_dir)
    for name in shards.files:
        assert (first / name).read_bytes() == again.path(name).read_bytes(), name


def test_empty_val_split_names_the_field(tmp_path: Path, docs: StageResult, tokenizer: StageResult) -> None:
    with pytest.raises(ValueError, match=r"data\.pretrain\.val_fraction=0\.001 leaves the val split empty \(60 documents"):
        run_shard(ShardConfig(shard_tokens=SHARD_TOKENS), corpus(0.001), docs, tokenizer, tmp_path / "s", "fp", corpus_field=FIELD)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_literal_eot_text_is_not_a_document_boundary(tmp_path: Path, tokenizer: StageResult) -> None:
    texts = [f"document {i} mentions {EOT} in its text" for i in range(20)]
    docs = write_documents(tmp_path / "docs", texts)
    result = run_shard(ShardConfig(shard_tokens=1024), corpus(0.5), docs, tokenizer, tmp_path / "s", "fp", corpus_field=FIELD)
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    for split, n_docs in (("train", 3), ("val", 17)):
        ts = TokenSplit(Path(result.out_dir), split)
        tokens = ts.window(0, ts.num_tokens)
        assert int((tokens == ts.eot_id).sum()) == ts.num_documents == n_docs
        assert EOT in tok.decode(tokens[: int(np.argmax(tokens == ts.eot_id))].tolist())


# --- readers fail clearly ------------------------------------------------------------------------


def test_readers_reject_bad_directories(tmp_path: Path, shards: StageResult, tokenizer: StageResult, docs: StageResult) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        read_manifest(tmp_path)

    copy = tmp_path / "copy"
    shutil.copytree(shards.out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    with pytest.raises(ValueError, match=r"split 'test' is not in .*; it has \['train', 'val'\]"):
        TokenSplit(copy, "test")

    victim = copy / manifest["splits"]["train"]["shards"][2]["file"]
    victim.write_bytes(b"XXXXXXXX" + victim.read_bytes()[8:])
    with pytest.raises(ValueError, match=re.escape(victim.name)):
        TokenSplit(copy, "train")
    TokenSplit(copy, "val")  # the other split is untouched

    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(copy)

    tampered = tmp_path / "tok"
    shutil.copytree(tokenizer.out_dir, tampered)
    (tampered / "tokenizer.json").write_text((tampered / "tokenizer.json").read_text() + " ")
    bad_tok = tokenizer.model_copy(update={"out_dir": str(tampered)})
    with pytest.raises(ValueError, match="its metadata records"):
        run_shard(ShardConfig(), corpus(), docs, bad_tok, tmp_path / "s", "fp", corpus_field=FIELD)
