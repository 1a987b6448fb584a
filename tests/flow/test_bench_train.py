"""bench/train.py end to end on the tiny preset: the table, the ratio, bitwise-equal losses, no files left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.train import COLUMNS, main
from tests.conftest import REPO

REPO = REPO


def test_bench_train_tiny(tmp_path: Path, monkeypatch, capsys) -> None:
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where the bench's temporary directory goes

    rows = main(["--config", str(REPO / "configs" / "tiny.yaml"), "--steps", "4", "--warmup", "2",
                 "--repeats", "1", "pretrain.device=cpu", "pretrain.checkpoint_interval=100"])

    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if "micro x accum" in line)
    assert out[header].split() == " ".join(COLUMNS).split()  # no CUDA memory column on CPU
    cells = out[header + 1].split()  # "8 x 1" is three words: 14 in all
    assert cells[:7] == ["tiny", "cpu", "off", "8", "x", "1", "256"] and len(cells) == 14
    assert len(rows) == 1 and (rows[0].micro, rows[0].accum, len(rows[0].full), len(rows[0].bare)) == (8, 1, 1, 1)
    assert cells[11] == "-"  # no peak FLOP/s known for a CPU: no MFU
    assert float(cells[12]) > 0  # the ratio
    assert cells[13] == "0"  # same initial weights, batches and arithmetic: identical losses on CPU
    text = "\n".join(out)
    assert ("2 metric flushes (log_interval 2, preset 5), 1 checkpoint(s) (checkpoint_interval 6, preset 100)"
            in text)
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
