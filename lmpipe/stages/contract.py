"""The contract every stage follows: build into a temporary directory, rename into place.

A stage's output directory is ``<workdir>/<stage>/<fingerprint>``. It only ever
appears complete: the stage writes into a sibling ``.partial`` directory and
renames it when done, with ``stage_result.json`` (file hashes and metrics)
written last. A later run trusts a directory only if that file is there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lmpipe.artifacts import RESULT_FILE, BuildOutput, StageResult, hash_tree, write_json_atomic


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


def run_stage(
    stage: str,
    fingerprint: str,
    out_dir: str | Path,
    build: Callable[[Path], BuildOutput],
    *,
    keep_partial: bool = False,
) -> StageResult:
    """Run ``build(tmp_dir)`` unless out_dir is already complete; publish atomically.

    keep_partial: leave the ``.partial`` directory after a failure so the next
    attempt can resume from what it holds (training checkpoints). Other stages
    start clean each time.
    """
    out_dir = Path(out_dir)
    done = load_completed(out_dir)
    if done is not None:
        return done.model_copy(update={"meta": {**done.meta, "reused": True}})
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
    result = StageResult(
        stage=stage,
        fingerprint=fingerprint,
        out_dir=str(out_dir),
        files=hash_tree(tmp),
        metrics=built.metrics,
        meta=built.meta,
    )
    write_json_atomic(tmp / RESULT_FILE, result.model_dump(mode="json"))
    os.replace(tmp, out_dir)
    return result
