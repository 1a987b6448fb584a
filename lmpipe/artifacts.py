"""What a stage leaves on disk: its result record, file hashes, atomic and versioned JSON.

Every layer reads and writes stage outputs through these; the contract that builds
them (``lmpipe.stages.contract``) sits above.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    sizes: dict[str, int] = Field(default_factory=dict, description="relative path -> size in bytes")
    metrics: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    def path(self, name: str) -> Path:
        return Path(self.out_dir) / name


class CorruptArtifactError(ValueError):
    """A stage's file does not match what was recorded when the stage finished: never trained or evaluated on."""

    def __init__(self, path: Path, expected: str, actual: str, recorded_in: str = RESULT_FILE) -> None:
        self.path = Path(path)
        stage = stage_root(self.path)
        where = f"the stage directory {str(stage)!r}" if stage is not None else "the directory that holds it"
        super().__init__(
            f"{str(self.path)!r} is corrupt: {expected}, recorded in {recorded_in}, but the file has {actual}. "
            f"It is not used. Delete {where} or run `lmpipe verify --repair` (it moves damaged stage "
            "directories aside), and the next run rebuilds it")


def stage_root(path: Path) -> Path | None:
    """The finished stage directory (the one holding RESULT_FILE) that path lies in, or None."""
    for parent in Path(path).parents:
        if (parent / RESULT_FILE).is_file():
            return parent
    return None


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


def size_tree(root: Path) -> dict[str, int]:
    """The size of every file hash_tree hashes, keyed the same way."""
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != RESULT_FILE
    }


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (what makes a rename in it durable), to disk. A directory that
    cannot be opened or fsynced (some systems and file systems refuse) is left as it is; a file is not."""
    directory = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an fsync'd rename, so readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def umask() -> int:
    """The process's file-creation mask. Linux shows it in /proc; elsewhere it is read by setting it and setting it
    back at once, to 0o077 meanwhile, so a file another thread creates in that instant is private, never open."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path``, and everything under it if it is a folder, the mode a plain ``open()`` or ``mkdir`` gives
    under the umask (0644 / 0755 under umask 022), executable bits kept. For what is written through a
    temporary file or folder, which ignores the umask: ``tempfile.mkdtemp`` makes a 0700 folder, and
    safetensors (0.8) writes its files 0600 through a temporary file of its own."""
    mask = umask()
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        p.chmod((0o777 if executable else 0o666) & ~mask)


def save_safetensors(tensors: dict[str, Any], path: Path) -> None:
    """safetensors' ``save_file`` (PyTorch tensors), leaving the file with the mode the umask gives."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    follow_umask(path)


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
