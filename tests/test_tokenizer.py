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

from lmpipe.config import EOT, TokenizerConfig
from lmpipe.stage import StageResult
from lmpipe.tokenizer import (
    eot_id,
    load_tokenizer,
    run_train_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
)

DATA = Path(__file__).resolve().parents[1] / "data"
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


def write_documents(out_dir: Path, texts: list[str]) -> StageResult:
    """A clean-stage result holding texts as documents.parquet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"doc-{i:05d}" for i in range(len(texts))], "text": texts, "source": ["test"] * len(texts)})
    pq.write_table(table, out_dir / "documents.parquet")
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
    # 256 byte symbols + <|endoftext|> + the 6 pairs seen at least min_frequency=2 times.
    merges = json.loads(result.path("tokenizer.json").read_text())["model"]["merges"]
    assert merges == [["a", "t"], ["h", "e"], ["t", "he"], ["c", "at"], ["Ġ", "the"], ["Ġ", "cat"]]
    assert meta["vocab_size"] == 263
    assert meta["vocab_shortfall"] == 1000 - 263
    assert result.metrics["vocab_shortfall"] == 737.0
    assert load_tokenizer(result.path("tokenizer.json")).get_vocab_size() == 263


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
        "import sys, pyarrow.parquet as pq\n"
        "from lmpipe.config import TokenizerConfig\n"
        "from lmpipe.tokenizer import train_tokenizer\n"
        "texts = pq.read_table(sys.argv[1]).column('text').to_pylist()\n"
        "cfg = TokenizerConfig.model_validate_json(sys.argv[2])\n"
        "train_tokenizer(texts, cfg).save(sys.argv[3])\n"
    )
    out = tmp_path / "one_thread.json"
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(docs.path("documents.parquet")), CFG.model_dump_json(), str(out)],
        check=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.read_bytes() == trained.path("tokenizer.json").read_bytes()


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    empty = StageResult(stage="clean", fingerprint="x", out_dir=str(tmp_path / "nodocs"))
    with pytest.raises(FileNotFoundError, match="documents.parquet"):
        run_train_tokenizer(CFG, empty, tmp_path / "tok", "fp")
    (tmp_path / "wrong").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "wrong" / "documents.parquet")
    wrong = StageResult(stage="clean", fingerprint="x", out_dir=str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]; it has \['id', 'body'\]"):
        run_train_tokenizer(CFG, wrong, tmp_path / "tokw", "fp")
    no_docs = write_documents(tmp_path / "zero", [])
    with pytest.raises(ValueError, match="holds no documents"):
        run_train_tokenizer(CFG, no_docs, tmp_path / "tok0", "fp")
