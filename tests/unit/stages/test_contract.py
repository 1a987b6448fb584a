import hashlib
import shutil

import pytest

from lmpipe.artifacts import RESULT_FILE, BuildOutput, CorruptArtifactError
from lmpipe.stages.contract import SMALL_FILE_BYTES, file_problems, load_completed, partial_dir, reuse, run_stage


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


HELLO = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # sha256 of "hello"


def _two_files(tmp):
    (tmp / "a.txt").write_text("hello", encoding="utf-8")
    (tmp / "big.bin").write_bytes(b"\0" * (SMALL_FILE_BYTES + 1))
    return BuildOutput()


def _fix(out):
    return (f"Delete the stage directory {str(out)!r} or run `lmpipe verify --repair` (it moves damaged stage "
            "directories aside), and the next run rebuilds it")


def test_reuse_checks_every_size_and_the_hash_of_small_files(tmp_path):
    out = tmp_path / "stage" / "fp1"
    first = run_stage("s", "fp1", out, _two_files)
    assert first.sizes == {"a.txt": 5, "big.bin": SMALL_FILE_BYTES + 1}
    (out / "a.txt").write_text("jello", encoding="utf-8")  # same size, other bytes
    with pytest.raises(CorruptArtifactError) as err:
        reuse(out)
    found = "sha256 " + hashlib.sha256(b"jello").hexdigest()
    assert str(err.value) == (f"{str(out / 'a.txt')!r} is corrupt: sha256 {HELLO}, recorded in stage_result.json, "
                              f"but the file has {found}. It is not used. " + _fix(out))
    with pytest.raises(CorruptArtifactError, match="a.txt.* is corrupt"):  # run_stage reuses through this check
        run_stage("s", "fp1", out, lambda tmp: pytest.fail("never"))
    (out / "a.txt").write_text("hello", encoding="utf-8")
    with open(out / "big.bin", "r+b") as f:  # a flipped byte in a large file: left to its reader's check
        f.seek(100)
        f.write(b"\1")
    assert reuse(out).meta["reused"] is True
    assert [(p.name, e) for p, e, _ in file_problems(load_completed(out), full=True)] == [
        ("big.bin", f"sha256 {first.files['big.bin']}")]
    with open(out / "big.bin", "r+b") as f:  # truncated: its size gives it away at once
        f.truncate(1000)
    with pytest.raises(CorruptArtifactError) as err:
        reuse(out)
    assert str(err.value).startswith(f"{str(out / 'big.bin')!r} is corrupt: {SMALL_FILE_BYTES + 1} bytes, recorded "
                                     "in stage_result.json, but the file has 1000 bytes.")
    (out / "big.bin").unlink()
    assert file_problems(load_completed(out)) == [(out / "big.bin", f"{SMALL_FILE_BYTES + 1} bytes", "no such file")]
