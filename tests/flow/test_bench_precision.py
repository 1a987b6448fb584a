"""bench/precision.py end to end on the tiny preset: variants and thread counts, the table, --full's val losses."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bench.precision import COLUMNS, FULL_COLUMNS, Variant, main
from tests.conftest import REPO


def test_bench_precision_tiny(tmp_path: Path, monkeypatch, capsys) -> None:
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    rows = main(["--config", str(REPO / "configs" / "tiny.yaml"), "--variants", "fp32,bf16", "--threads", "1,2",
                 "--steps", "4", "--warmup", "2", "--full", "pretrain.device=cpu", "pretrain.max_steps=8"])

    assert [(r.threads, str(r.variant)) for r in rows] == [(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]
    assert all(len(r.runs) == 1 and r.runs[0].seconds > 0 and r.runs[0].startup > 0 for r in rows)
    # --full trains the first thread count's variants only, to the preset's max_steps
    assert [r.val_loss is not None for r in rows] == [True, True, False, False]
    assert rows[1].val_loss == pytest.approx(rows[0].val_loss, abs=0.02)
    assert rows[1].val_loss != rows[0].val_loss  # bf16 autocast was on
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("threads"))
    assert out[header].split() == " ".join(COLUMNS + FULL_COLUMNS).split()
    table = [line.split() for line in out[header + 1 : header + 5]]
    assert [c[:3] for c in table] == [["1", "fp32", "off"], ["1", "bf16", "off"], ["2", "fp32", "off"],
                                      ["2", "bf16", "off"]]
    assert table[0][5] == table[2][5] == "1.00x"  # each thread count against its own fp32 row
    assert table[0][9] == "+0.0000" and table[2][8:] == ["-"] * 4
    assert "bf16 matmuls: " in out[0] and list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_variants_parse_and_refuse_unknown_names() -> None:
    assert Variant.parse("bf16+compile") == Variant("bf16", True) and str(Variant("fp32", False)) == "fp32"
    for bad in ("fp16", "bf16+fast", "bf16+"):
        with pytest.raises(ValueError) as err:
            Variant.parse(bad)
        assert str(err.value) == f"variant {bad!r}: expected <precision>[+compile], precision one of auto, fp32, bf16"
