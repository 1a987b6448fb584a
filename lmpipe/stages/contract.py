"""The contract every stage follows: one builder at a time, build aside, rename into place, verify on reuse.

A stage's output directory is ``<workdir>/<stage>/<fingerprint>``; it is the only
cache (the orchestrator keeps no second copy of results). It only ever appears
complete: the stage writes into a sibling ``.partial`` directory and renames it
when done, with ``stage_result.json`` (each file's size and sha256, the metrics)
written last. A later run trusts a directory only if that file is there and the
files still match it (``reuse``): sizes always, the sha256 of files up to
``SMALL_FILE_BYTES`` (metadata, tokenizer, configs); larger files (token shards,
weights) are checked against their own records when they are read for work.

While building, the process holds a lease on the fingerprint
(``lmpipe.stages.lease``): a second run of the same stage waits for it and then
reuses the output, and a lease whose holder died is taken over (training then
resumes from the ``.partial`` directory's newest valid checkpoint).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lmpipe.artifacts import (
    RESULT_FILE,
    BuildOutput,
    CorruptArtifactError,
    StageResult,
    hash_tree,
    sha256_file,
    size_tree,
    write_json_atomic,
)
from lmpipe.stages.lease import Lease, discard_dead_lease

# Files up to this size are hashed whenever their stage is reused; larger ones are checked when read.
SMALL_FILE_BYTES = 16 << 20


def stage_dir(workdir: str | Path, stage: str, fingerprint: str) -> Path:
    return Path(workdir) / stage / fingerprint


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def load_completed(out_dir: Path) -> StageResult | None:
    """The stage's result if out_dir holds a finished stage, else None."""
    f = Path(out_dir) / RESULT_FILE
    if not f.is_file():
        return None
    result = StageResult.model_validate_json(f.read_text(encoding="utf-8"))
    # The directory may have moved with its project since it was built: trust where it is now.
    return result.model_copy(update={"out_dir": str(Path(out_dir))})


def file_problems(result: StageResult, *, full: bool = False) -> list[tuple[Path, str, str]]:
    """The files of a finished stage that do not match its record: (path, expected, found).

    Sizes always; the sha256 of files up to SMALL_FILE_BYTES, or of every file with ``full``.
    """
    root = Path(result.out_dir)
    problems: list[tuple[Path, str, str]] = []
    for name, digest in result.files.items():
        path = root / name
        size = result.sizes.get(name)
        if not path.is_file():
            problems.append((path, f"{size} bytes" if size is not None else "a file", "no such file"))
            continue
        actual = path.stat().st_size
        if size is not None and actual != size:
            problems.append((path, f"{size} bytes", f"{actual} bytes"))
        elif full or actual <= SMALL_FILE_BYTES:
            found = sha256_file(path)
            if found != digest:
                problems.append((path, f"sha256 {digest}", f"sha256 {found}"))
    return problems


def reuse(out_dir: str | Path) -> StageResult | None:
    """The finished stage in out_dir, checked against its record (CorruptArtifactError if it does not match),
    marked ``reused``; None if out_dir holds no finished stage."""
    done = load_completed(Path(out_dir))
    if done is None:
        return None
    problems = file_problems(done)
    if problems:
        path, expected, found = problems[0]
        raise CorruptArtifactError(path, expected, found)
    discard_dead_lease(Path(out_dir))
    return done.model_copy(update={"meta": {**done.meta, "reused": True}})


def run_stage(
    stage: str,
    fingerprint: str,
    out_dir: str | Path,
    build: Callable[[Path], BuildOutput],
    *,
    keep_partial: bool = False,
) -> StageResult:
    """Run ``build(tmp_dir)`` unless out_dir is already complete; publish atomically, under the stage's lease.

    keep_partial: leave the ``.partial`` directory after a failure so the next
    attempt can resume from what it holds (training checkpoints). Other stages
    start clean each time.
    """
    out_dir = Path(out_dir)
    done = reuse(out_dir)
    if done is not None:
        return done
    with Lease(out_dir) as lease:
        done = reuse(out_dir)  # built by the run this one waited for
        if done is not None:
            return done
        if out_dir.exists():  # a directory without a result file is not trusted
            shutil.rmtree(out_dir)
        tmp = partial_dir(out_dir)
        if tmp.exists() and not keep_partial:
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            built = build(tmp)
        except BaseException:
            if not keep_partial:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        result = StageResult(stage=stage, fingerprint=fingerprint, out_dir=str(out_dir), files=hash_tree(tmp),
                             sizes=size_tree(tmp), metrics=built.metrics, meta=built.meta)
        write_json_atomic(tmp / RESULT_FILE, result.model_dump(mode="json"))
        lease.check()
        os.replace(tmp, out_dir)
    return result
