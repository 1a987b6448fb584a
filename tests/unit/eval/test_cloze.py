"""The held-out cloze benchmark: items from documents a source leaves unread, the demo's file, and the proof
that the demo never reads a byte of what its items come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from lmpipe.config.base import DEMO_HELD_OUT_AT
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.data.documents import iter_document_batches
from lmpipe.eval.benchmark_files import load_benchmark
from lmpipe.eval.cloze import held_out_documents, make_cloze
from lmpipe.stages.download import run_download
from tests.conftest import DATA, REPO

SHAKESPEARE = DATA / "tinyshakespeare.txt"
DEMO_FILE = REPO / "data" / "benchmarks" / "shakespeare-cloze.jsonl"

TEXT = """A:
one
the first third line

B:
two
second third line here

C:
too short
tiny

D:
four
the fourth third line
and more

E:
five
fifth and last third line
"""


def test_items_are_the_first_two_lines_and_the_third_among_others() -> None:
    first, docs = held_out_documents(TEXT, "blank_line", max_bytes=len("A:\none\nthe first third line"))
    assert first == 1 and len(docs) == 5  # document A is read (exactly max_bytes); B onwards are not
    items = make_cloze(docs[first:], n_items=3, n_endings=3, seed=0, first_index=first)
    # C's third line is too short; three of B, D, E are chosen, in document order.
    assert [item["doc"] for item in items] == [1, 3, 4]
    assert [item["ctx"] for item in items] == ["B:\ntwo", "D:\nfour", "E:\nfive"]
    for item, gold in zip(items, ["second third line here", "the fourth third line", "fifth and last third line"]):
        assert item["endings"][item["label"]] == gold
        assert len(set(item["endings"])) == 3
        assert set(item["endings"]) <= {"second third line here", "the fourth third line", "fifth and last third line"}
    assert make_cloze(docs[first:], n_items=3, n_endings=3, seed=0, first_index=first) == items
    assert [i["label"] for i in make_cloze(docs, n_items=4, n_endings=2, seed=0)] != [
        i["label"] for i in make_cloze(docs, n_items=4, n_endings=2, seed=1)]


def test_too_few_documents_is_an_error_naming_the_counts() -> None:
    _, docs = held_out_documents(TEXT, "blank_line", max_bytes=1)
    with pytest.raises(ValueError, match=r"^4 documents qualify .* with 4 distinct endings; 5 items of 4 endings"):
        make_cloze(docs, n_items=5, seed=0)


def test_max_bytes_reading_every_document_names_the_option_its_value_and_the_size() -> None:
    docs_bytes = len(TEXT.rstrip("\n")) - 4 * len("\n\n")  # five documents, without the blank lines between them
    for max_bytes in (docs_bytes, 10**6):
        with pytest.raises(ValueError) as err:
            held_out_documents(TEXT, "blank_line", max_bytes, source="t.txt")
        assert str(err.value) == (f"--max-bytes {max_bytes} reads every document of t.txt (5 documents, "
                                  f"{docs_bytes} bytes of its {len(TEXT)}): none is left unread to make items from; "
                                  f"give the max_bytes of a source that stops before the end (below {docs_bytes})")
    assert held_out_documents(TEXT, "blank_line", docs_bytes - 1)[0] == 4  # one byte less: E is held out


def test_held_out_documents_start_where_the_download_stage_stops(tmp_path: Path) -> None:
    corpus = PipelineConfig().data.finetune
    assert corpus.sources[0].max_bytes == DEMO_HELD_OUT_AT
    result = run_download(corpus.model_copy(update={"sources": [corpus.sources[0].model_copy(
        update={"uri": str(SHAKESPEARE)})]}), tmp_path / "dl", "fp", field="data.finetune", chunk_bytes=1 << 24)
    read = [t for batch in iter_document_batches(result.out_dir, 4096) for t in batch["text"]]
    first, docs = held_out_documents(SHAKESPEARE.read_text(encoding="utf-8"), "blank_line", DEMO_HELD_OUT_AT)
    assert read == docs[:first]  # the demo's fine-tuning reads exactly the documents before the held-out ones
    assert first < len(docs)


def test_the_demo_benchmark_is_the_documented_command_and_held_out(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    bench = PipelineConfig().eval.benchmarks
    assert [(b.name, b.kind, b.path) for b in bench] == [
        ("shakespeare_cloze", "hellaswag", "data/benchmarks/shakespeare-cloze.jsonl")]
    out = tmp_path / "cloze.jsonl"
    assert main(["make-cloze", str(SHAKESPEARE), "--max-bytes", str(DEMO_HELD_OUT_AT), "--items", "200",
                 "--seed", "0", "--out", str(out)]) == 0
    assert "200 items of 4 endings from documents 6280..7221" in capsys.readouterr().out
    assert out.read_bytes() == DEMO_FILE.read_bytes()
    examples, bad = load_benchmark(DEMO_FILE, "hellaswag")
    assert len(examples) == 200 and bad.count == 0
    first, _ = held_out_documents(SHAKESPEARE.read_text(encoding="utf-8"), "blank_line", DEMO_HELD_OUT_AT)
    items = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()]
    assert min(item["doc"] for item in items) >= first == 6280


def test_make_cloze_command_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["make-cloze", str(tmp_path / "nope.txt"), "--max-bytes", "10", "--out", str(tmp_path / "o")]) == 1
    assert "lmpipe make-cloze: " in capsys.readouterr().err and not (tmp_path / "o").exists()
