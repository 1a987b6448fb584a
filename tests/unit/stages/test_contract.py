import shutil

import pytest

from lmpipe.artifacts import RESULT_FILE, BuildOutput
from lmpipe.stages.contract import load_completed, partial_dir, run_stage


def _build(tmp):
    (tmp / "a.txt").write_text("hello", encoding="utf-8")
    return BuildOutput(metrics={"n": 1.0})


def test_publishes_atomically_and_reuses(tmp_path):
    out = tmp_path / "stage" / "fp1"
    first = run_stage("s", "fp1", out, _build)
    assert first.files == {"a.txt": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert (out / RESULT_FILE).is_file() and not partial_dir(out).exists()
    again = run_stage("s", "fp1", out, lambda tmp: pytest.fail("a finished stage must not be rebuilt"))
    assert again.meta["reused"] is True and again.files == first.files


def test_failed_build_leaves_nothing_trusted(tmp_path):
    out = tmp_path / "stage" / "fp1"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage("s", "fp1", out, broken)
    assert not out.exists() and not partial_dir(out).exists()
    with pytest.raises(RuntimeError):
        run_stage("s", "fp1", out, broken, keep_partial=True)
    assert not out.exists() and (partial_dir(out) / "half.bin").exists()  # kept to resume from, not trusted
    out.mkdir()  # a directory without a result file is rebuilt, not trusted
    assert run_stage("s", "fp1", out, _build).meta == {}


def test_a_moved_output_reports_where_it_is_now(tmp_path):
    run_stage("s", "fp1", tmp_path / "a" / "fp1", _build)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = load_completed(tmp_path / "b" / "fp1")
    assert moved.out_dir == str(tmp_path / "b" / "fp1")
    assert moved.path("a.txt").read_text(encoding="utf-8") == "hello"
