"""One Project Gutenberg book, read as one document, is the whole pretraining corpus: the real pipeline cuts its
header and licence before anything else sees the file, holds out the book's last tenth, and trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmpipe.data.documents import iter_document_batches
from lmpipe.data.shards import VAL_INSIDE, TokenSplit, held_out_cut, read_manifest
from lmpipe.data.tokenizer import load_tokenizer
from tests.conftest import REPO, flow_run_logs, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

BOOK = REPO / "tests" / "fixtures" / "books" / "pg11.txt"


def test_one_gutenberg_book_as_one_document_trains_without_its_boilerplate(tmp_path):
    from flows.pipeline import pipeline

    cfg = tiny_config(tmp_path, "data.pretrain.name=alice",
                      f"data.pretrain.sources=[{{uri: '{BOOK}', doc_boundary: file}}]",
                      "data.clean.gutenberg_boilerplate=true")
    summary = pipeline(config=cfg)
    out = {s["label"]: Path(s["out_dir"]) for s in summary["stages"]}
    assert {s["status"] for s in summary["stages"]} == {"ran"}

    # The cleaned corpus is the book alone: one document from its first line to "THE END".
    [text] = [t for b in iter_document_batches(out["clean/alice"], 16, ("text",)) for t in b["text"]]
    assert text.startswith("[Illustration]\n\nAlice’s Adventures in Wonderland\n\nby Lewis Carroll\n")
    assert text.endswith("and the happy summer\ndays.\n\nTHE END")
    assert "gutenberg" not in text.lower() and "license" not in text.lower()
    report = json.loads((out["clean/alice"] / "clean_report.json").read_text())
    assert report["steps"][0] == {"step": "gutenberg_boilerplate", "docs_in": 1, "docs_out": 1,
                                  "bytes_in": 170_593, "bytes_out": 151_099}
    [cut] = report["before_split"][0]["files"]
    assert (cut["file"], cut["header_bytes"], cut["licence_bytes"]) == (str(BOOK), 811, 18_683)

    # Validation is the book's last tenth, cut at a paragraph break; training is the rest.
    manifest = read_manifest(out["shard/alice"])
    assert manifest["val_split"] == VAL_INSIDE
    tok = load_tokenizer(out["train_tokenizer"] / "tokenizer.json")
    cut_at = held_out_cut(text, 0.1)
    assert cut_at is not None and text[cut_at[0]:cut_at[1]] == "\n\n"
    for split, expected in (("train", text[:cut_at[0]]), ("val", text[cut_at[1]:])):
        tokens = TokenSplit(out["shard/alice"], split).window(0, manifest["splits"][split]["tokens"])
        assert tok.decode(tokens[:-1].tolist(), skip_special_tokens=False) == expected
    logs = [log.message for log in flow_run_logs(summary["flow_run_id"])]
    assert any(m.startswith("data.pretrain: val_fraction=0.1 by document would leave a split empty (1 document(s)), "
                            "so the validation split is the last 0.1 of each document") for m in logs)

    # and the model trains and is scored on that held-out tenth
    assert math.isfinite(summary["metrics"]["pretrain"]["final_val_loss"])
    assert summary["metrics"]["evaluate"]["base.alice.bits_per_byte"] > 0
