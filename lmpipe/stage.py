"""The contract every stage follows: build into a temporary directory, rename into place.

A stage's output directory is ``<workdir>/<stage>/<fingerprint>``. It only ever
appears complete: the stage writes into a sibling ``.partial`` directory and
renames it when done, with ``stage_result.json`` (file hashes and metrics)
written last. A later run trusts a directory only if that file is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

RESULT_FILE = "stage_result.json"


class StageResult(BaseModel):
    """What a stage produced: where, with which hashes, and the stage's summary metrics."""

    stage: str
    fingerprint: str
    out_dir: str
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    metrics: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    def path(self, name: str) -> Path:
        return Path(self.out_dir) / name


class BuildOutput(BaseModel):
    metrics: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by POSIX relative path, sorted."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != RESULT_FILE
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an fsync'd rename, so readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_versioned_json(path: Path, version: int, what: str, remedy: str) -> dict[str, Any]:
    """Read a stage's JSON metadata file, refusing a missing file or another format version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist ({remedy})")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format_version") != version:
        raise ValueError(f"{what} {str(path)!r} has format_version {data.get('format_version')!r}, "
                         f"this code reads {version}; {remedy}")
    return data


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


def markdown_cell(text: str) -> str:
    """Text for a cell of a stage report's markdown table: a literal | would end the cell."""
    return text.replace("|", "\\|")
