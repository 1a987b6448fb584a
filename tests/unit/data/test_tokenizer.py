"""Tokenizer stage: byte-level BPE round trips, special-token ids, byte lengths, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmpipe.artifacts import StageResult
from lmpipe.config.base import CHAT_TOKENS, EOT
from lmpipe.config.data import TokenizerConfig
from lmpipe.data.documents import ChunkWriter
from lmpipe.data.tokenizer import (
    SAMPLE_SALT,
    eot_id,
    id_fraction,
    load_tokenizer,
    make_pre_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
)
from lmpipe.stages.tokenizer import run_train_tokenizer
from tests.conftest import DATA, REPO

PAD = "<|pad|>"
# EOT second, so the test sees that ids follow config order rather than "eot first".
CFG = TokenizerConfig(special_tokens=[PAD, EOT], eot_token=EOT, vocab_size=1024)


def wikitext_documents(name: str = "wikitext2-valid.txt") -> list[str]:
    """Articles of a WikiText file, cut at ' = Title = ' lines (blank leftovers dropped)."""
    docs: list[list[str]] = [[]]
    for line in (DATA / name).read_text(encoding="utf-8").splitlines(keepends=True):
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")):
            docs.append([])
        docs[-1].append(line)
    return [t for t in ("".join(d) for d in docs) if t.strip()]


def write_documents(out_dir: Path, texts: list[str], chunk_bytes: int = 1 << 30,
                    ids: list[str] | None = None) -> StageResult:
    """A clean-stage result: texts as a document set (ids doc-00000, ...), in chunks of about chunk_bytes."""
    ids = ids if ids is not None else [f"doc-{i:05d}" for i in range(len(texts))]
    with ChunkWriter(out_dir, chunk_bytes) as w:
        w.add_many(ids, texts, ["test"] * len(texts))
    return StageResult(stage="clean", fingerprint="test", out_dir=str(out_dir))


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> StageResult:
    return write_documents(tmp_path_factory.mktemp("docs"), wikitext_documents())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, docs: StageResult) -> StageResult:
    return run_train_tokenizer(CFG, docs, tmp_path_factory.mktemp("tok") / "out", "fp-test")


@pytest.fixture(scope="module")
def tok(trained: StageResult):
    return load_tokenizer(trained.path("tokenizer.json"))


TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "Héllo wörld, café, naïve, Ångström",
    "日本語のテキストと中文",
    "emoji 🌍 family 👩‍👩‍👧 flag 🇫🇷",
    "\n\n\t",
    f"before{EOT}after",
    f"{PAD}{EOT}",
    "a" * 2000,
    " " * 500,
    "\x00\x01\x7f control bytes",
    " = Homarus gammarus = \n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_token_inside_text(tok) -> None:
    """By default the tokenizer matches special-token text; encode_special_tokens=True treats it as plain text."""
    eot = eot_id(tok, EOT)
    assert eot in tok.encode(f"a{EOT}b", add_special_tokens=False).ids
    tok.encode_special_tokens = True
    try:
        ids = tok.encode(f"a{EOT}b", add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False
    assert eot not in ids
    assert tok.decode(ids) == f"a{EOT}b"


def test_special_tokens_take_first_ids_in_config_order(tok, trained: StageResult) -> None:
    assert [tok.token_to_id(t) for t in CFG.special_tokens] == [0, 1]
    assert eot_id(tok, EOT) == 1
    meta = json.loads(trained.path("tokenizer_meta.json").read_text())
    assert meta["special_tokens"] == [{"token": PAD, "id": 0}, {"token": EOT, "id": 1}]
    assert meta["eot_token"] == EOT and meta["eot_id"] == 1


def test_eot_id_missing_token_is_a_clear_error(tok) -> None:
    with pytest.raises(ValueError, match=r"tokenizer.eot_token '<\|missing\|>' is not in the tokenizer"):
        eot_id(tok, "<|missing|>")


def test_vocab_size_reached_and_recorded(tok, trained: StageResult) -> None:
    assert tok.get_vocab_size() == 1024
    meta = json.loads(trained.path("tokenizer_meta.json").read_text())
    assert (meta["vocab_size"], meta["requested_vocab_size"], meta["vocab_shortfall"]) == (1024, 1024, 0)
    assert trained.metrics["vocab_size"] == 1024.0
    assert trained.metrics["vocab_shortfall"] == 0.0
    assert trained.metrics["train_seconds"] > 0


def test_tiny_corpus_records_vocab_shortfall(tmp_path: Path) -> None:
    docs = write_documents(tmp_path / "docs", ["the cat sat on the mat", "the cat ate the rat"])
    result = run_train_tokenizer(TokenizerConfig(vocab_size=1000), docs, tmp_path / "tok", "fp")
    meta = json.loads(result.path("tokenizer_meta.json").read_text())
    # 256 byte symbols + the 5 default special tokens + the 6 pairs seen at least min_frequency=2 times.
    merges = json.loads(result.path("tokenizer.json").read_text())["model"]["merges"]
    assert merges == [["a", "t"], ["h", "e"], ["t", "he"], ["c", "at"], ["Ġ", "the"], ["Ġ", "cat"]]
    assert meta["vocab_size"] == 267
    assert meta["vocab_shortfall"] == 1000 - 267
    assert result.metrics["vocab_shortfall"] == 733.0
    assert load_tokenizer(result.path("tokenizer.json")).get_vocab_size() == 267


def test_token_byte_lengths(tok, docs: StageResult) -> None:
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int64 and lengths.shape == (1024,)
    assert lengths[0] == 0 and lengths[1] == 0  # the two specials
    assert int((lengths == 1).sum()) == 256  # exactly the byte alphabet is one byte long
    texts = [t for t in TRICKY if PAD not in t and EOT not in t] + wikitext_documents()[:10]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text[:40]


def test_fingerprint_is_sha256_of_file(trained: StageResult) -> None:
    path = trained.path("tokenizer.json")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert tokenizer_fingerprint(path) == expected
    assert json.loads(trained.path("tokenizer_meta.json").read_text())["tokenizer_sha256"] == expected
    assert trained.files["tokenizer.json"] == expected


def test_bytes_per_token_on_wikitext(trained: StageResult) -> None:
    meta = json.loads(trained.path("tokenizer_meta.json").read_text())
    # Exact: training and encoding are deterministic (observed values).
    assert meta["training_documents"] == 60
    assert meta["training_bytes"] == 1_121_681 - 2  # the whole file but its leading " \n"
    assert meta["training_tokens"] == 422_373
    assert trained.metrics["bytes_per_token"] == pytest.approx(1_121_679 / 422_373, rel=1e-12)  # 2.656


def test_training_is_byte_identical(tmp_path: Path, docs: StageResult, trained: StageResult) -> None:
    again = run_train_tokenizer(CFG, docs, tmp_path / "again", "fp-test")
    for name in ("tokenizer.json", "tokenizer_meta.json"):
        assert again.path(name).read_bytes() == trained.path(name).read_bytes(), name

    # The trainer parallelises with rayon, whose pool size is fixed per process: train again in a
    # one-thread process to check the result does not depend on thread count (or hash seeds).
    script = (
        "import sys\n"
        "from lmpipe.config import TokenizerConfig\n"
        "from lmpipe.data.documents import iter_document_batches\n"
        "from lmpipe.data.tokenizer import train_tokenizer\n"
        "texts = [t for b in iter_document_batches(sys.argv[1], 1000) for t in b['text']]\n"
        "cfg = TokenizerConfig.model_validate_json(sys.argv[2])\n"
        "train_tokenizer(texts, cfg).save(sys.argv[3])\n"
    )
    out = tmp_path / "one_thread.json"
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", script, docs.out_dir, CFG.model_dump_json(), str(out)],
        check=True, env=env, cwd=REPO,
    )
    assert out.read_bytes() == trained.path("tokenizer.json").read_bytes()


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    empty = StageResult(stage="clean", fingerprint="x", out_dir=str(tmp_path / "nodocs"))
    with pytest.raises(FileNotFoundError, match=r"nodocs/documents\.json' does not exist"):
        run_train_tokenizer(CFG, empty, tmp_path / "tok", "fp")
    wrong = write_documents(tmp_path / "wrong", ["x"])
    chunk = tmp_path / "wrong" / "documents" / "part-000000.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), chunk)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]; it has \['id', 'body'\]"):
        run_train_tokenizer(CFG, wrong, tmp_path / "tokw", "fp")
    no_docs = write_documents(tmp_path / "zero", [])
    with pytest.raises(ValueError, match="holds no documents"):
        run_train_tokenizer(CFG, no_docs, tmp_path / "tok0", "fp")
    assert not (tmp_path / "tok0").exists() and not (tmp_path / "tok0.partial").exists()


# --- GPT-4 pre-tokenizer ----------------------------------------------------------------------------


GPT4_CFG = CFG.model_copy(update={"pretokenizer": "gpt4"})
SPLIT_TEXT = "DON'T stop: 1234567 you're  \n\n x 🌍!!"


@pytest.fixture(scope="module")
def tok_gpt4(tmp_path_factory: pytest.TempPathFactory, docs: StageResult):
    result = run_train_tokenizer(GPT4_CFG, docs, tmp_path_factory.mktemp("tok4") / "out", "fp-gpt4")
    assert json.loads(result.path("tokenizer_meta.json").read_text())["pretokenizer"] == "gpt4"
    return load_tokenizer(result.path("tokenizer.json"))


ROUND_TRIPS = [*TRICKY, "I'm sure they'll say we'd've DON'T YOU'LL", "1234567890 3.14159 2024-01-31 0007",
               "emoji 🧑🏽‍🚀🏳️‍🌈 then digits 12🍕34", "tabs\t\tand\r\nCRLF\r\n\r\n  lines"]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_gpt4_round_trip(tok_gpt4, tok, text: str) -> None:
    for t in (tok_gpt4, tok):
        ids = t.encode(text, add_special_tokens=False).ids
        assert t.decode(ids, skip_special_tokens=False) == text


def test_pre_tokenizer_splits() -> None:
    """cl100k: case-insensitive contractions, digits in groups of at most 3, newlines with their spaces."""
    gpt4 = [p for p, _ in make_pre_tokenizer("gpt4").pre_tokenize_str(SPLIT_TEXT)]
    assert gpt4 == ["DON", "'T", "Ġstop", ":", "Ġ", "123", "456", "7", "Ġyou", "'re", "ĠĠĊĊ", "Ġx", "ĠðŁĮį!!"]
    gpt2 = [p for p, _ in make_pre_tokenizer("gpt2").pre_tokenize_str(SPLIT_TEXT)]
    assert gpt2 == ["DON", "'", "T", "Ġstop", ":", "Ġ1234567", "Ġyou", "'re", "ĠĠĊĊ", "Ġx", "ĠðŁĮį!!"]
    with pytest.raises(ValueError, match="tokenizer.pretokenizer 'gpt5' is unknown"):
        make_pre_tokenizer("gpt5")


def test_gpt4_tokens_never_cross_split_boundaries(tok_gpt4) -> None:
    text = "In 1066, 20000 men; 123456789 then 99. DON'T"
    ids = tok_gpt4.encode(text, add_special_tokens=False).ids
    pieces = [tok_gpt4.decode([i]) for i in ids]
    assert "".join(pieces) == text
    assert max(sum(c.isdigit() for c in p) for p in pieces) == 3
    token_ends = set(np.cumsum([len(p) for p in pieces]).tolist())
    split_ends = {end for _, (_, end) in tok_gpt4.pre_tokenizer.pre_tokenize_str(text)}
    assert {6, 7, 12, 14} <= split_ends <= token_ends  # "106|6", "200|00"


# --- default special tokens ----------------------------------------------------------------------


def test_default_chat_tokens_have_first_ids_and_never_come_from_text(tmp_path: Path) -> None:
    texts = [f"{u} says {v}" for u in ("the user", "an assistant", "the system") for v in ("hi", "bye", "ok")]
    docs = write_documents(tmp_path / "docs", texts * 3)
    result = run_train_tokenizer(TokenizerConfig(vocab_size=300), docs, tmp_path / "tok", "fp")
    tok = load_tokenizer(result.path("tokenizer.json"))
    specials = [EOT, *CHAT_TOKENS]
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    meta = json.loads(result.path("tokenizer_meta.json").read_text())
    assert meta["special_tokens"] == [{"token": t, "id": i} for i, t in enumerate(specials)]
    text = "".join(specials) + " <|user|>hello<|end|>"
    tok.encode_special_tokens = True  # how corpora are encoded
    ids = tok.encode(text, add_special_tokens=False).ids
    assert min(ids) >= 5
    assert tok.decode(ids, skip_special_tokens=False) == text


# --- training on a sample ------------------------------------------------------------------------


def test_sample_is_the_hashed_subset_and_trains_like_it(tmp_path: Path, docs: StageResult) -> None:
    texts = wikitext_documents()
    total = sum(len(t.encode("utf-8")) for t in texts)
    cfg = CFG.model_copy(update={"sample_bytes": 300_000})
    # Several chunks: the sample must not depend on chunking.
    sampled = run_train_tokenizer(cfg, write_documents(tmp_path / "chunked", texts, 100_000), tmp_path / "s", "fp")
    keep = [i for i in range(len(texts)) if id_fraction(f"doc-{i:05d}", SAMPLE_SALT) < 300_000 / total]
    kept = [texts[i] for i in keep]
    meta = json.loads(sampled.path("tokenizer_meta.json").read_text())
    assert (meta["corpus_documents"], meta["corpus_bytes"]) == (60, total)
    assert meta["requested_sample_bytes"] == 300_000 and meta["sample_fraction"] == 300_000 / total
    assert (meta["training_documents"], meta["training_bytes"]) == (len(keep), sum(len(t.encode()) for t in kept))
    assert 5 < len(keep) < 30
    # Exactly the tokenizer trained on the sampled documents alone, compression measured on them only.
    subset = write_documents(tmp_path / "subset", kept, ids=[f"doc-{i:05d}" for i in keep])
    alone = run_train_tokenizer(CFG, subset, tmp_path / "alone", "fp")
    assert sampled.path("tokenizer.json").read_bytes() == alone.path("tokenizer.json").read_bytes()
    assert meta["training_tokens"] == json.loads(alone.path("tokenizer_meta.json").read_text())["training_tokens"]
    assert sampled.metrics["bytes_per_token"] == alone.metrics["bytes_per_token"]
    assert sorted(sampled.files) == ["tokenizer.json", "tokenizer_meta.json"]  # no scratch copy left


def test_sample_larger_than_corpus_is_the_corpus(tmp_path: Path, docs: StageResult, trained: StageResult) -> None:
    cfg = CFG.model_copy(update={"sample_bytes": 10**9})
    result = run_train_tokenizer(cfg, docs, tmp_path / "big", "fp")
    assert result.path("tokenizer.json").read_bytes() == trained.path("tokenizer.json").read_bytes()
    meta = json.loads(result.path("tokenizer_meta.json").read_text())
    assert meta["sample_fraction"] == 1.0 and meta["training_documents"] == 60


def test_sample_selecting_nothing_names_the_field(tmp_path: Path, docs: StageResult) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.sample_bytes=1 selects none of the 60 documents "
                                         r"\(1121679 bytes\) in .*; raise it"):
        run_train_tokenizer(CFG.model_copy(update={"sample_bytes": 1}), docs, tmp_path / "t", "fp")
