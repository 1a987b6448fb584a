"""Token shards: binary format, train/val split, encode_chunk + shard on real WikiText, TokenSplit windows,
the document index, chunking invariance and resuming an interrupted merge."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmpipe.artifacts import CorruptArtifactError, StageResult
from lmpipe.config.base import EOT
from lmpipe.config.data import CorpusConfig, ShardConfig, SourceConfig, TokenizerConfig
from lmpipe.data.documents import chunk_paths
from lmpipe.data.shards import HEADER_BYTES, MAGIC, TokenSplit, is_validation, read_manifest, read_shard, write_shard
from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.stages.shard import run_encode_chunk, run_shard
from lmpipe.stages.tokenizer import run_train_tokenizer
from tests.unit.data.test_tokenizer import wikitext_documents, write_documents

FIELD = "data.pretrain"
SHARD_TOKENS = 16_384
CHUNK_BYTES = 100_000  # ~11 chunks of WikiText-2 valid


def corpus(val_fraction: float = 0.1) -> CorpusConfig:
    return CorpusConfig(name="wikitext2", sources=[SourceConfig(uri="data/wikitext2-valid.txt")],
                        val_fraction=val_fraction)


def encode_chunks(docs: StageResult, tokenizer: StageResult, root: Path, val_fraction: float,
                  encode_batch_size: int = 256, workers: int = 1) -> list[StageResult]:
    """run_encode_chunk on every chunk of a document set, in a thread pool as the Prefect threads runner does."""
    paths = chunk_paths(docs.out_dir)

    def encode(i: int) -> StageResult:
        return run_encode_chunk(paths[i], tokenizer, val_fraction, encode_batch_size, root / f"enc-{i:06d}", f"e{i}")

    with ThreadPoolExecutor(workers) as pool:
        # Submitted last-first: completion order must not matter, only the list order given to run_shard.
        futures = {i: pool.submit(encode, i) for i in reversed(range(len(paths)))}
        return [futures[i].result() for i in range(len(paths))]


def encode_and_shard(cfg: ShardConfig, corpus: CorpusConfig, docs: StageResult, tokenizer: StageResult, root: Path,
                     *, corpus_field: str, workers: int = 1, fingerprint: str = "fp-shard") -> StageResult:
    """The two data stages in one call: every chunk through encode_chunk, then the shard stage."""
    encoded = encode_chunks(docs, tokenizer, root / "encoded", corpus.val_fraction, cfg.encode_batch_size, workers)
    return run_shard(cfg, corpus, encoded, tokenizer, root / "shards", fingerprint, corpus_field=corpus_field)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return wikitext_documents()


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> StageResult:
    return write_documents(tmp_path_factory.mktemp("docs"), texts, CHUNK_BYTES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, docs: StageResult) -> StageResult:
    return run_train_tokenizer(TokenizerConfig(vocab_size=1024), docs, tmp_path_factory.mktemp("tok") / "out", "fp-tok")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, docs: StageResult, tokenizer: StageResult) -> list[StageResult]:
    # Batches that do not divide the chunks' document counts.
    return encode_chunks(docs, tokenizer, tmp_path_factory.mktemp("encoded"), 0.1, encode_batch_size=7, workers=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, encoded: list[StageResult], tokenizer: StageResult) -> StageResult:
    cfg = ShardConfig(shard_tokens=SHARD_TOKENS)
    return run_shard(cfg, corpus(), encoded, tokenizer, tmp_path_factory.mktemp("shards") / "out", "fp-shard",
                     corpus_field=FIELD)


def doc_ids(split: str, n: int = 60) -> list[int]:
    return [i for i in range(n) if is_validation(f"doc-{i:05d}", 0.1) == (split == "val")]


def expected_stream(tokenizer: StageResult, texts: list[str], split: str) -> np.ndarray:
    """The split's tokens computed independently: each document's ids, then the eot id (0)."""
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    out: list[int] = []
    for i in doc_ids(split, len(texts)):
        out += tok.encode(texts[i], add_special_tokens=False).ids + [0]
    return np.array(out, dtype=np.int64)


# --- the binary format ---------------------------------------------------------------------------


def test_write_shard_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 4096, size=n).astype("<u2") for n in (100, 0, 37, 1)]
    entry = write_shard(tmp_path / "train_000000.bin", pieces, documents=3)
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert entry == {"file": "train_000000.bin", "sha256": hashlib.sha256(raw).hexdigest(), "tokens": 138,
                     "documents": 3}
    assert raw[:8] == MAGIC
    assert struct.unpack_from("<IIQQ", raw, 8) == (1, 2, 138, 3)
    assert raw[32:HEADER_BYTES] == bytes(HEADER_BYTES - 32)
    assert len(raw) == HEADER_BYTES + 2 * 138
    tokens = read_shard(tmp_path / "train_000000.bin")
    assert tokens.dtype == np.uint16
    assert np.array_equal(tokens, np.concatenate(pieces))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000000.bin"]  # no .tmp left


def test_uint32_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", [np.array([65_535, 65_536, 69_999, 0], dtype="<u4")], documents=1)
    tokens = read_shard(tmp_path / "s.bin")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [65_535, 65_536, 69_999, 0]
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 4 * 4


def test_write_shard_refuses_empty_or_mixed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"empty\.bin' would hold no tokens"):
        write_shard(tmp_path / "empty.bin", [np.zeros(0, dtype="<u2")], documents=0)
    with pytest.raises(ValueError, match=r"mixed\.bin': pieces have dtype\(s\) \['uint16', 'uint32'\]"):
        write_shard(tmp_path / "mixed.bin", [np.zeros(2, dtype="<u2"), np.zeros(2, dtype="<u4")], documents=0)
    assert list(tmp_path.iterdir()) == []


def test_header_is_checked(tmp_path: Path) -> None:
    write_shard(tmp_path / "train_000000.bin", [np.full(101, 5, dtype="<u2")], documents=1)
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


# --- encode_chunk -----------------------------------------------------------------------------------


def test_encode_chunk_outputs(encoded: list[StageResult], tokenizer: StageResult, docs: StageResult) -> None:
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    assert len(encoded) == len(chunk_paths(docs.out_dir)) == 11
    first = encoded[0]
    assert sorted(first.files) == ["docs.parquet", "train.tokens", "val.tokens"]
    chunk = pq.read_table(chunk_paths(docs.out_dir)[0]).to_pydict()
    rows = pq.read_table(first.path("docs.parquet")).to_pydict()
    assert list(rows) == ["id", "split", "tokens", "bytes"]
    assert rows["id"] == chunk["id"]
    assert rows["split"] == ["val" if is_validation(i, 0.1) else "train" for i in chunk["id"]]
    assert rows["bytes"] == [len(t.encode("utf-8")) for t in chunk["text"]]
    for split in ("train", "val"):
        texts = [t for t, s in zip(chunk["text"], rows["split"]) if s == split]
        stream = [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids + [0]]
        raw = np.fromfile(first.path(f"{split}.tokens"), dtype="<u2")  # no header: raw little-endian tokens
        assert raw.tolist() == stream
        assert first.metrics[f"{split}_tokens"] == len(stream)
        assert first.metrics[f"{split}_documents"] == len(texts)
        assert sum(n for n, s in zip(rows["tokens"], rows["split"]) if s == split) == len(stream)
    assert first.metrics["encode_seconds"] > 0
    assert first.meta == {"chunk": "part-000000.parquet", "tokenizer_fingerprint": tokenizer.files["tokenizer.json"],
                          "dtype": "uint16", "val_fraction": 0.1, "val_split": "documents"}


# --- the shard stage on real text ----------------------------------------------------------------


def test_manifest_is_consistent(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    m = read_manifest(Path(shards.out_dir))
    assert (m["format_version"], m["vocab_size"], m["eot_id"], m["dtype"]) == (1, 1024, 0, "uint16")
    assert (m["doc_index"], m["chunks"]) == ("doc_index.parquet", 11)
    assert m["tokenizer_fingerprint"] == tokenizer.files["tokenizer.json"]
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (51, 9)
    files = {"manifest.json", "doc_index.parquet"}
    for split, entry in m["splits"].items():
        in_split = [texts[i] for i in doc_ids(split)]
        assert entry["bytes"] == sum(len(t.encode("utf-8")) for t in in_split)
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        assert entry["documents"] == sum(s["documents"] for s in entry["shards"]) == len(in_split)
        assert [s["file"] for s in entry["shards"]] == [f"{split}_{i:06d}.bin" for i in range(len(entry["shards"]))]
        assert [s["tokens"] for s in entry["shards"][:-1]] == [SHARD_TOKENS] * (len(entry["shards"]) - 1)
        assert 0 < entry["shards"][-1]["tokens"] <= SHARD_TOKENS
        for s in entry["shards"]:
            path = Path(shards.out_dir) / s["file"]
            tokens = read_shard(path)
            assert len(tokens) == s["tokens"]
            assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == shards.files[s["file"]]
            assert struct.unpack_from("<Q", path.read_bytes(), 24)[0] == s["documents"]
            # A document is counted in the shard holding its end-of-text token.
            assert int((tokens == 0).sum()) == s["documents"]
            files.add(s["file"])
        assert shards.metrics[f"{split}_tokens"] == entry["tokens"]
        assert shards.metrics[f"{split}_documents"] == entry["documents"]
    assert set(shards.files) == files  # no sidecars or scratch files published
    # Same text, same tokenizer: the shard stage's compression equals the tokenizer stage's.
    assert shards.metrics["bytes_per_token"] == pytest.approx(tokenizer.metrics["bytes_per_token"], rel=1e-12)
    assert shards.metrics["tokens_per_second"] > 0


def test_token_split_equals_independent_encoding(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    for split in ("train", "val"):
        ts = TokenSplit(Path(shards.out_dir), split)
        expected = expected_stream(tokenizer, texts, split)
        assert len(ts) == ts.num_tokens == len(expected)
        whole = ts.window(0, ts.num_tokens)
        assert whole.dtype == np.int64
        assert np.array_equal(whole, expected)
        assert ts.num_bytes == read_manifest(Path(shards.out_dir))["splits"][split]["bytes"]


def test_doc_index_locates_every_document(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    index = pq.read_table(Path(shards.out_dir) / "doc_index.parquet").to_pydict()
    assert list(index) == ["split", "id", "start", "tokens", "bytes", "shard"]
    order = [("train", i) for i in doc_ids("train")] + [("val", i) for i in doc_ids("val")]
    assert list(zip(index["split"], index["id"])) == [(s, f"doc-{i:05d}") for s, i in order]
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    splits = {s: TokenSplit(Path(shards.out_dir), s) for s in ("train", "val")}
    offsets = {"train": 0, "val": 0}
    for row, (split, i) in enumerate(order):
        start, n = index["start"][row], index["tokens"][row]
        assert start == offsets[split]  # global offset within the split, documents back to back
        offsets[split] += n
        assert index["shard"][row] == start // SHARD_TOKENS
        assert index["bytes"][row] == len(texts[i].encode("utf-8"))
        window = splits[split].window(start, n)
        assert window[-1] == 0 and tok.decode(window[:-1].tolist()) == texts[i]
    assert offsets == {s: ts.num_tokens for s, ts in splits.items()}
    assert max(index["shard"]) == 20  # observed: the last train article starts in shard 20 of 22


def test_windows_cross_shard_boundaries(shards: StageResult, tokenizer: StageResult, texts: list[str]) -> None:
    ts = TokenSplit(Path(shards.out_dir), "train")
    expected = expected_stream(tokenizer, texts, "train")
    n = ts.num_tokens
    assert n > 3 * SHARD_TOKENS
    cases = [(SHARD_TOKENS - 5, 10), (SHARD_TOKENS, 1), (SHARD_TOKENS - 1, 2 * SHARD_TOKENS + 2), (0, 1), (n - 7, 7),
             (n, 0)]
    for start, length in cases:
        assert np.array_equal(ts.window(start, length), expected[start : start + length]), (start, length)
    for start, length in [(n - 1, 2), (-1, 1), (0, -1), (n + 1, 0)]:
        with pytest.raises(IndexError, match=rf"start={start} length={length} is outside split 'train' of {n} tokens"):
            ts.window(start, length)


def test_first_train_document_decodes_to_its_text(shards: StageResult, tokenizer: StageResult,
                                                   texts: list[str]) -> None:
    ts = TokenSplit(Path(shards.out_dir), "train")
    head = ts.window(0, 20_000)
    first = head[: int(np.argmax(head == ts.eot_id))]
    assert load_tokenizer(tokenizer.path("tokenizer.json")).decode(first.tolist()) == texts[doc_ids("train")[0]]


def published(result: StageResult) -> dict[str, bytes]:
    return {name: result.path(name).read_bytes() for name in result.files}


def test_run_shard_is_byte_identical(tmp_path: Path, shards: StageResult, docs: StageResult,
                                     tokenizer: StageResult) -> None:
    cfg = ShardConfig(shard_tokens=SHARD_TOKENS, encode_batch_size=256)  # batching must not matter either
    again = encode_and_shard(cfg, corpus(), docs, tokenizer, tmp_path, corpus_field=FIELD, workers=1)
    assert again.files == shards.files  # sha256 of every .bin, doc_index.parquet and manifest.json
    assert published(again) == published(shards)


def test_one_chunk_or_many_give_the_same_shards(tmp_path: Path, shards: StageResult, texts: list[str],
                                                 tokenizer: StageResult) -> None:
    one = write_documents(tmp_path / "one", texts)  # a single chunk
    assert len(chunk_paths(one.out_dir)) == 1
    result = encode_and_shard(ShardConfig(shard_tokens=SHARD_TOKENS), corpus(), one, tokenizer, tmp_path,
                              corpus_field=FIELD)
    a, b = published(result), published(shards)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name
    m1, m11 = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert (m1.pop("chunks"), m11.pop("chunks")) == (1, 11)
    assert m1 == m11


def shard_files(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each shard file: unchanged iff the file was not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.bin"))}


def test_interrupted_merge_resumes_without_rewriting_finished_shards(
    tmp_path: Path, encoded: list[StageResult], tokenizer: StageResult, shards: StageResult
) -> None:
    cfg = ShardConfig(shard_tokens=SHARD_TOKENS)
    # The first encoded chunk whose train tokens start after train shard 2: shards 0-2 never read it.
    starts = np.cumsum([0] + [e.metrics["train_tokens"] for e in encoded])
    victim = encoded[int(np.argmax(starts >= 3 * SHARD_TOKENS))].path("train.tokens")
    hidden = tmp_path / "hidden.tokens"
    shutil.move(victim, hidden)
    out = tmp_path / "shards"
    try:
        with pytest.raises(ValueError, match=rf"encoded token file '{re.escape(str(victim))}' is missing, expected "
                                             r"\d+ uint16 tokens .* re-run encode_chunk for it"):
            run_shard(cfg, corpus(), encoded, tokenizer, out, "fp-shard", corpus_field=FIELD)
    finally:
        shutil.move(hidden, victim)
    partial = tmp_path / "shards.partial"
    assert not out.exists() and partial.is_dir()
    done = shard_files(partial)
    assert len(done) >= 3 and set(done) >= {"train_000000.bin", "train_000001.bin", "train_000002.bin"}
    assert {p.name for p in partial.glob("*.bin.json")} == {f"{name}.json" for name in done}
    # A finished shard damaged after the interruption is not trusted: it is rewritten.
    damaged = partial / "train_000001.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2] + b"\xff\xff")
    done = shard_files(partial)

    result = run_shard(cfg, corpus(), encoded, tokenizer, out, "fp-shard", corpus_field=FIELD)
    after = shard_files(out)
    assert {n: after[n] for n in done if n != damaged.name} == {n: v for n, v in done.items() if n != damaged.name}
    assert after[damaged.name] != done[damaged.name]
    assert not partial.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == [
        "doc_index.parquet", "manifest.json", "stage_result.json"]  # sidecars removed before publishing
    assert result.files == shards.files
    assert published(result) == published(shards)


def test_empty_val_split_names_the_field(tmp_path: Path, docs: StageResult, tokenizer: StageResult) -> None:
    encoded = encode_chunks(docs, tokenizer, tmp_path / "enc", 0.001)
    with pytest.raises(ValueError, match=r"data\.pretrain\.val_fraction=0\.001 leaves the val split empty "
                                         r"\(60 documents in 11 encoded chunk\(s\)\)"):
        run_shard(ShardConfig(shard_tokens=SHARD_TOKENS), corpus(0.001), encoded, tokenizer, tmp_path / "s", "fp",
                  corpus_field=FIELD)
    assert not (tmp_path / "s").exists() and not list((tmp_path / "s.partial").glob("*.bin"))


def test_encoded_chunks_must_match_tokenizer_and_fraction(tmp_path: Path, encoded: list[StageResult],
                                                           tokenizer: StageResult) -> None:
    with pytest.raises(ValueError, match=r"encoded chunk 0 .* was split with val_fraction 0\.1, "
                                         r"data\.pretrain\.val_fraction is 0\.2; re-run encode_chunk"):
        run_shard(ShardConfig(), corpus(0.2), encoded, tokenizer, tmp_path / "a", "fp", corpus_field=FIELD)
    foreign = encoded[1].model_copy(update={"meta": {**encoded[1].meta, "tokenizer_fingerprint": "0" * 64}})
    other = [encoded[0], foreign]
    with pytest.raises(ValueError, match=r"encoded chunk 1 .* was encoded with tokenizer 0{64}, the shard stage got "
                                         r"tokenizer [0-9a-f]{64}; re-run encode_chunk with this tokenizer"):
        run_shard(ShardConfig(), corpus(), other, tokenizer, tmp_path / "b", "fp", corpus_field=FIELD)
    with pytest.raises(ValueError, match=r"data\.pretrain: the shard stage got no encoded chunks"):
        run_shard(ShardConfig(), corpus(), [], tokenizer, tmp_path / "c", "fp", corpus_field=FIELD)


def test_literal_eot_text_is_not_a_document_boundary(tmp_path: Path, tokenizer: StageResult) -> None:
    texts = [f"document {i} mentions {EOT} in its text" for i in range(20)]
    docs = write_documents(tmp_path / "docs", texts, chunk_bytes=300)
    result = encode_and_shard(ShardConfig(shard_tokens=1024), corpus(0.5), docs, tokenizer, tmp_path,
                              corpus_field=FIELD)
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    for split, n_docs in (("train", 3), ("val", 17)):
        ts = TokenSplit(Path(result.out_dir), split)
        tokens = ts.window(0, ts.num_tokens)
        assert int((tokens == ts.eot_id).sum()) == ts.num_documents == n_docs
        assert EOT in tok.decode(tokens[: int(np.argmax(tokens == ts.eot_id))].tolist())


# --- readers fail clearly ------------------------------------------------------------------------


def test_a_flipped_byte_in_a_shard_is_refused_when_opened(tmp_path: Path, shards: StageResult) -> None:
    """A shard is checked against its manifest sha256 as it is opened: a changed byte that the header
    checks cannot see fails before any token is read, naming the file, both hashes and the fix."""
    copy = tmp_path / "copy"
    shutil.copytree(shards.out_dir, copy)
    entry = read_manifest(copy)["splits"]["val"]["shards"][0]
    victim = copy / entry["file"]
    original = TokenSplit(copy, "val").window(0, 1000)
    data = bytearray(victim.read_bytes())
    data[HEADER_BYTES + 2 * 500] ^= 0x01  # the low byte of token 500
    victim.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    assert read_shard(victim)[500] != original[500]  # the header is intact: only the hash tells

    with pytest.raises(CorruptArtifactError) as err:
        TokenSplit(copy, "val")
    assert err.value.path == victim
    assert str(err.value) == (
        f"{str(victim)!r} is corrupt: sha256 {entry['sha256']}, recorded in manifest.json, but the file has "
        f"sha256 {actual} ({len(data)} bytes). It is not used. Delete the stage directory {str(copy)!r} or run "
        "`lmpipe verify --repair` (it moves damaged stage directories aside), and the next run rebuilds it")
    with pytest.raises(CorruptArtifactError, match=f"sha256 {actual}"):
        read_shard(victim, entry["sha256"])
    # A truncated shard is the same error, before the header's size check.
    victim.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptArtifactError, match=rf"sha256 {hashlib.sha256(data[:-2]).hexdigest()} "
                                                   rf"\({len(data) - 2} bytes\)"):
        TokenSplit(copy, "val")
    # Put back byte for byte, it opens again; the other split never was affected.
    data[HEADER_BYTES + 2 * 500] ^= 0x01
    victim.write_bytes(bytes(data))
    assert np.array_equal(TokenSplit(copy, "val").window(0, 1000), original)
    train = TokenSplit(copy, "train")
    assert np.array_equal(train.window(0, train.num_tokens), TokenSplit(Path(shards.out_dir), "train")
                          .window(0, train.num_tokens))


def test_readers_reject_bad_directories(tmp_path: Path, shards: StageResult, tokenizer: StageResult,
                                        encoded: list[StageResult]) -> None:
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
        run_shard(ShardConfig(), corpus(), encoded, bad_tok, tmp_path / "s", "fp", corpus_field=FIELD)
    with pytest.raises(ValueError, match="its metadata records"):
        run_encode_chunk(Path("unused.parquet"), bad_tok, 0.1, 256, tmp_path / "e", "fp")
