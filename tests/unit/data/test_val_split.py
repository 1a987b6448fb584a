"""The validation split of a corpus a split by document cannot serve (one book, one document): taken inside the
documents, at a paragraph break, the same bytes every time."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmpipe.artifacts import StageResult
from lmpipe.config.data import CorpusConfig, ShardConfig, SourceConfig, TokenizerConfig
from lmpipe.data.shards import (
    DOC_INDEX_FILE,
    VAL_BY_DOCUMENT,
    VAL_INSIDE,
    TokenSplit,
    document_split_is_one_sided,
    held_out_cut,
    is_validation,
    read_manifest,
)
from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.stages.shard import choose_val_split, run_encode_chunk, run_shard
from lmpipe.stages.tokenizer import run_train_tokenizer
from tests.unit.data.test_tokenizer import write_documents

FIELD = "data.pretrain"
BOOK = Path(__file__).resolve().parents[2] / "fixtures" / "books" / "pg11.txt"
_RAW = BOOK.read_bytes()
# The book between its Project Gutenberg markers (what the download stage keeps of it).
BODY = _RAW[_RAW.index(b"\n", _RAW.index(b"*** START OF THE PROJECT")) + 1:_RAW.index(b"*** END OF THE PROJECT")].decode()


def test_the_cut_is_at_the_paragraph_break_nearest_the_last_tenth():
    text = "\n\n".join(f"p{i:02d} xxxxx" for i in range(20))  # 218 characters; the last tenth starts at 196
    assert held_out_cut(text, 0.1) == (196, 198)
    assert (text[:196].splitlines()[-1], text[198:]) == ("p17 xxxxx", "p18 xxxxx\n\np19 xxxxx")


def test_without_a_paragraph_break_in_reach_a_line_end_then_a_space_then_the_point_itself():
    lines = "\n".join(f"l{i:02d} yyyyy" for i in range(20))  # 199 characters: target 179, l18 starts at 180
    assert held_out_cut(lines, 0.1) == (179, 180)
    # a paragraph break far from the target (at 15 of 216) does not move the cut there
    assert held_out_cut("first paragraph\n\n" + lines, 0.1) == (196, 197)
    words = " ".join(f"w{i:02d}" for i in range(20))  # 79 characters
    assert held_out_cut(words, 0.1) == (71, 72) and words[72:] == "w18 w19"
    assert held_out_cut("abcdefghij", 0.1) == (9, 9)
    assert held_out_cut("ab", 0.1) is None  # 10% of 2 characters rounds to none: it all trains


def test_the_book_is_cut_before_a_paragraph_at_its_last_tenth():
    cut = held_out_cut(BODY, 0.1)
    assert cut == (130_080, 130_082) and len(BODY) == 144_604
    assert BODY[cut[0]:cut[1]] == "\n\n"
    assert BODY[:cut[0]].endswith("“You’re a _very_ poor _speaker_,” said the King.")
    assert BODY[cut[1]:].startswith("Here one of the guinea-pigs cheered, and was immediately suppressed by\n")


def test_a_document_split_is_one_sided_for_one_document_or_none():
    assert document_split_is_one_sided(["book/0/0"], 0.1)
    assert document_split_is_one_sided([], 0.1)
    assert not document_split_is_one_sided([f"doc-{i:05d}" for i in range(40)], 0.1)


def shard_book(root: Path, docs: StageResult, tokenizer: StageResult, val_split: str) -> StageResult:
    corpus = CorpusConfig(name="book", sources=[SourceConfig(uri=str(BOOK), doc_boundary="file")])
    encoded = [run_encode_chunk(Path(docs.out_dir) / "documents" / "part-000000.parquet", tokenizer, 0.1, 64,
                                root / "enc", "e", val_split=val_split)]
    return run_shard(ShardConfig(shard_tokens=4096), corpus, encoded, tokenizer, root / "shards", "s",
                     corpus_field=FIELD, val_split=val_split)


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> tuple[StageResult, StageResult]:
    root = tmp_path_factory.mktemp("book")
    docs = write_documents(root / "docs", [BODY], ids=["book/0/0"])
    return docs, run_train_tokenizer(TokenizerConfig(vocab_size=512), docs, root / "tok", "t")


def test_one_book_is_split_inside_its_text_and_says_so(book, tmp_path, caplog):
    docs, tokenizer = book
    assert choose_val_split(docs, 0.1) == VAL_INSIDE
    assert choose_val_split(docs, 0.1, may_be_empty=("train", "val")) == VAL_BY_DOCUMENT  # a continual increment
    with caplog.at_level(logging.WARNING, logger="lmpipe"):
        result = shard_book(tmp_path / "a", docs, tokenizer, VAL_INSIDE)
    manifest = read_manifest(result.out_dir)
    assert manifest["val_split"] == result.meta["val_split"] == VAL_INSIDE
    assert {s: manifest["splits"][s]["documents"] for s in ("train", "val")} == {"train": 1, "val": 1}
    tok = load_tokenizer(tokenizer.path("tokenizer.json"))
    cut = held_out_cut(BODY, 0.1)
    assert cut is not None
    for split, expected in (("train", BODY[:cut[0]]), ("val", BODY[cut[1]:])):
        tokens = TokenSplit(Path(result.out_dir), split).window(0, manifest["splits"][split]["tokens"])
        assert tokens[-1] == 0 and 0 not in tokens[:-1]  # one piece, closed by the end-of-text token
        assert tok.decode(tokens[:-1].tolist(), skip_special_tokens=False) == expected
    index = pq.read_table(Path(result.out_dir) / DOC_INDEX_FILE).to_pydict()
    assert (index["split"], index["id"]) == (["train", "val"], ["book/0/0", "book/0/0"])
    assert index["bytes"] == [len(BODY[:cut[0]].encode()), len(BODY[cut[1]:].encode())]
    [line] = [r.getMessage() for r in caplog.records if "validation split is" in r.getMessage()]
    assert line.startswith(f"{FIELD}: val_fraction=0.1 by document would leave a split empty (1 document(s)), so the "
                           "validation split is the last 0.1 of each document, cut at a paragraph break: ")


def test_the_split_inside_documents_is_byte_identical_on_a_rerun(book, tmp_path):
    docs, tokenizer = book
    runs = [shard_book(tmp_path / name, docs, tokenizer, VAL_INSIDE) for name in ("a", "b")]
    files = [{p.name: p.read_bytes() for p in sorted(Path(r.out_dir).iterdir()) if p.suffix in (".bin", ".parquet")}
             for r in runs]
    manifest = read_manifest(runs[0].out_dir)
    assert set(files[0]) == {DOC_INDEX_FILE} | {e["file"] for s in ("train", "val") for e in manifest["splits"][s]["shards"]}
    assert {s: len(manifest["splits"][s]["shards"]) for s in ("train", "val")} == {"train": 15, "val": 2}
    assert files[0] == files[1]


def test_by_document_one_book_still_leaves_the_val_split_empty(book, tmp_path):
    docs, tokenizer = book
    with pytest.raises(ValueError, match=r"val_fraction=0.1 leaves the val split empty \(1 documents in 1 encoded"):
        shard_book(tmp_path, docs, tokenizer, VAL_BY_DOCUMENT)


def test_many_documents_are_split_by_document(tmp_path):
    docs = write_documents(tmp_path, [f"text {i}" for i in range(40)])
    assert choose_val_split(docs, 0.1) == VAL_BY_DOCUMENT
    # at 0.001 every one of the 40 ids hashes to train: the split is taken inside them
    assert not any(is_validation(f"doc-{i:05d}", 0.001) for i in range(40))
    assert choose_val_split(docs, 0.001) == VAL_INSIDE


def test_a_break_cut_short_by_the_search_window_keeps_all_its_whitespace_out_of_both_parts():
    # The blank line's run of spaces reaches past the window the break is searched in: the whole run is the break.
    text = "a" * 90 + "\n\n" + " " * 30 + "b" * 10
    assert held_out_cut(text, 0.3) == (90, 122)
    assert text[:90] == "a" * 90 and text[122:] == "b" * 10
