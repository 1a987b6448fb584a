"""The evaluation report's layout where it is read: tables no wider than four figures, images inside the text."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from lmpipe.eval.report import embed_images, render_markdown


def _held_out(model: str, corpus: str, loss: float) -> dict:
    return {"model": model, "corpus": corpus, "loss": loss, "perplexity": 2 * loss, "bits_per_byte": loss / 2,
            "tokens": 10, "bytes": 40}


def _choice(model: str, bench: str, acc: float) -> dict:
    return {"model": model, "benchmark": bench, "kind": "piqa", "n": 4, "acc": acc, "acc_norm": acc / 2}


def test_wide_tables_split_into_tables_of_at_most_four_figures():
    corpora = ["a", "b", "c"]
    results = [_held_out(m, c, 1.0 + i + (m == "finetuned")) for m in ("base", "finetuned")
               for i, c in enumerate(corpora)]
    benches = ["p", "q", "r", "s"]
    choice = [_choice(m, b, 0.25 + (m == "finetuned") / 4) for m in ("base", "finetuned") for b in benches]
    reference = {"name": "m", "alias": "champion", "version": "3", "run_id": "r1",
                 "metrics": {"finetuned.c.loss": 2.5, "finetuned.c.tokens": 10.0}}
    lines = render_markdown(results, {}, eval_tokens=10, choice=choice, reference=reference).splitlines()
    tables: list[list[str]] = []
    for line in lines:
        if line.startswith("| model |"):
            tables.append([])
        if line.startswith("| ") and tables:
            tables[-1].append(line)
    assert [t[0] for t in tables] == [
        "| model | a loss | a ppl | a bpb |",
        "| model | b loss | b ppl | b bpb |",
        "| model | c loss | c ppl | c bpb |",
        "| model | p acc | p acc_norm | q acc | q acc_norm |",
        "| model | r acc | r acc_norm | s acc | s acc_norm |",
    ]
    # Every table keeps its models, its delta row and, where the champion has figures, its rows.
    assert tables[0][1:] == ["| base | 1.0000 | 2.00 | 0.5000 |", "| finetuned | 2.0000 | 4.00 | 1.0000 |",
                             "| Δ finetuned − base | +1.0000 | +2.00 | +0.5000 |"]
    assert tables[2][1:] == ["| base | 3.0000 | 6.00 | 1.5000 |", "| finetuned | 4.0000 | 8.00 | 2.0000 |",
                             "| Δ finetuned − base | +1.0000 | +2.00 | +0.5000 |",
                             "| champion v3 | 2.5000 |  |  |", "| Δ finetuned − champion v3 | +1.5000 |  |  |"]
    assert tables[4][1:] == ["| base | 0.2500 | 0.1250 | 0.2500 | 0.1250 |",
                             "| finetuned | 0.5000 | 0.2500 | 0.5000 | 0.2500 |",
                             "| Δ finetuned − base | +0.2500 | +0.1250 | +0.2500 | +0.1250 |"]
    assert all(line.count(" | ") <= 4 for t in tables for line in t)


def test_images_beside_the_report_are_carried_inside_it(tmp_path: Path):
    png = b"\x89PNG\r\n\x1a\n fake image bytes"
    (tmp_path / "loss_curves.png").write_bytes(png)
    markdown = ("# Report\n\n![training loss](loss_curves.png)\n\n![logo](https://example.org/logo.png)\n"
                "![inline](data:image/png;base64,AAAA)\n")
    assert embed_images(markdown, tmp_path) == (
        f"# Report\n\n![training loss](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
        "![logo](https://example.org/logo.png)\n![inline](data:image/png;base64,AAAA)\n")
    with pytest.raises(FileNotFoundError, match=r"image 'gone.png' in the report: .*gone.png does not exist"):
        embed_images("![x](gone.png)", tmp_path)
    with pytest.raises(ValueError, match=r"image 'notes.txt' in the report: not one of"):
        embed_images("![x](notes.txt)", tmp_path)
