"""What a continual run trains on: the documents of a corpus that no earlier run trained on.

A registered model carries a record of the pretraining corpus's files it was trained on
(``TrainedOn``: each file's name, size and sha256, per source, and the documents read).
Against the files there now, a file is

- unchanged (same sha256): nothing new;
- new (a name the record lacks, e.g. a new file matching a source's glob): new from its start;
- grown (larger, and its first ``bytes`` still hash to the recorded sha256: lines or records
  were appended): new from the recorded size on;
- changed otherwise (edited, truncated, or a compressed file that grew): read again whole,
  and said so.

The new parts are copied into a content-addressed folder (``materialize``), which becomes a
corpus of its own with the source's reading settings: the data stages then clean and encode
just those bytes. So is the ``origin``, the files as the first model of the line saw them: its
validation split is the fixed held-out set every continual model is scored on, and its train
split the pool that replay draws from. Copies, not hard links: a file appended to in place
would change a link's content too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.artifacts import fsync_path
from lmpipe.config.data import CorpusConfig
from lmpipe.data.sources import COPY_BYTES, expand_local, source_kind

RECORD_FORMAT = 1
RECORD_FILE = "trained_on.json"
VIEW_MANIFEST = "view.json"  # written last into a materialized folder: the folder is whole
COMPRESSED = (".gz", ".zst")


@dataclass(frozen=True)
class FileState:
    name: str  # as the source names it (its glob match, relative or file:// as written)
    bytes: int
    sha256: str


@dataclass
class TrainedOn:
    """The files of a corpus a model was trained on, per source, and what the line of models has seen."""

    corpus: str
    origin: list[list[FileState]]  # the files the line's first model was trained on: held-out set, replay pool
    trained: list[list[FileState]]  # every file (part) trained on so far, as of the last run that trained
    documents: int  # documents read from them so far (before cleaning)
    bytes: int
    runs: int = 1  # training runs of the line: the first pipeline run, then one per continual run with new data

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> TrainedOn:
        if obj.get("format_version") != RECORD_FORMAT:
            raise ValueError(f"{where}: {RECORD_FILE} has format_version {obj.get('format_version')!r}, this "
                             f"lmpipe reads {RECORD_FORMAT}")
        files = [[FileState(**f) for f in source] for source in obj["trained"]]
        origin = [[FileState(**f) for f in source] for source in obj["origin"]]
        return cls(obj["corpus"], origin, files, int(obj["documents"]), int(obj["bytes"]), int(obj.get("runs", 1)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode("utf-8")).hexdigest()

    def files(self) -> int:
        return sum(len(s) for s in self.trained)


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of a file of source ``source``: what is new in it (or, for the origin, what was seen)."""

    source: int
    name: str
    path: str
    start: int
    end: int
    why: str  # "new", "appended", "changed" (read whole), "origin"


@dataclass
class Delta:
    parts: list[Part] = field(default_factory=list)
    state: list[list[FileState]] = field(default_factory=list)  # the files as they are now

    @property
    def new_bytes(self) -> int:
        return sum(p.end - p.start for p in self.parts)

    def describe(self) -> list[dict[str, Any]]:
        return [{"source": p.source, "file": p.name, "why": p.why, "from_byte": p.start, "bytes": p.end - p.start}
                for p in self.parts]


def check_watchable(corpus: CorpusConfig, field: str) -> None:
    """Continual runs watch local files: URLs and Hub datasets name fixed content, and a read limit would make
    "what was trained on" a part of a file the record cannot describe."""
    for i, source in enumerate(corpus.sources):
        f = f"{field}.sources[{i}]"
        if source_kind(source.uri) not in ("path", "file"):
            raise ValueError(f"{f}.uri: {source.uri!r} is not a local file or glob; continual runs watch local "
                             "files for new documents (new files matching a glob, or lines appended)")
        for limit in ("max_documents", "max_bytes"):
            if getattr(source, limit) is not None:
                raise ValueError(f"{f}.{limit}={getattr(source, limit)}: continual runs train on whole files; "
                                 f"remove {limit} from the pretraining corpus's sources")


def scan(corpus: CorpusConfig, field: str, sha256: Callable[[Path], str]) -> list[list[FileState]]:
    """The files each (local) source names now, with their sizes and digests."""
    check_watchable(corpus, field)
    return [[FileState(name, path.stat().st_size, sha256(path)) for name, path in
             expand_local(source, f"{field}.sources[{i}]")] for i, source in enumerate(corpus.sources)]


def _paths(corpus: CorpusConfig, field: str) -> dict[tuple[int, str], Path]:
    return {(i, name): path for i, source in enumerate(corpus.sources)
            for name, path in expand_local(source, f"{field}.sources[{i}]")}


def _prefix_sha256(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (block := f.read(min(COPY_BYTES, left))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def new_parts(record: TrainedOn, corpus: CorpusConfig, field: str, sha256: Callable[[Path], str]) -> Delta:
    """What the sources hold now that ``record`` has not trained on."""
    state = scan(corpus, field, sha256)
    paths = _paths(corpus, field)
    delta = Delta(state=state)
    for i, files in enumerate(state):
        seen = {f.name: f for f in (record.trained[i] if i < len(record.trained) else [])}
        for f in files:
            old, path = seen.get(f.name), paths[(i, f.name)]
            if old is not None and old.sha256 == f.sha256:
                continue
            if old is None:
                delta.parts.append(Part(i, f.name, str(path), 0, f.bytes, "new"))
            elif (f.bytes > old.bytes and not f.name.endswith(COMPRESSED)
                  and _prefix_sha256(path, old.bytes) == old.sha256):
                delta.parts.append(Part(i, f.name, str(path), old.bytes, f.bytes, "appended"))
            else:
                delta.parts.append(Part(i, f.name, str(path), 0, f.bytes, "changed"))
    return delta


def origin_parts(record: TrainedOn, corpus: CorpusConfig, field: str) -> list[Part]:
    """The origin's bytes in today's files: each origin file must still begin with what was trained on."""
    paths = _paths(corpus, field)
    parts = []
    for i, files in enumerate(record.origin):
        for f in files:
            path = paths.get((i, f.name))
            if path is None or path.stat().st_size < f.bytes or _prefix_sha256(path, f.bytes) != f.sha256:
                what = "is gone" if path is None else "no longer begins with the bytes it was trained on"
                raise ValueError(
                    f"{field}.sources[{i}]: {f.name} {what}: the first model of this line was trained and scored on "
                    f"it ({f.bytes} bytes, sha256 {f.sha256}), so the fixed held-out set cannot be rebuilt; restore "
                    "the file, or run lmpipe-pipeline to start a new line of models")
            parts.append(Part(i, f.name, str(path), 0, f.bytes, "origin"))
    return parts


def materialize(parts: list[Part], corpus: CorpusConfig, name: str, root: Path) -> CorpusConfig:
    """The parts copied into ``root/<digest>/<source>/`` (file order kept), as a corpus read like ``corpus``.

    The folder is named by what it holds, built aside and renamed into place, so a run killed while
    copying leaves nothing a later run would take for whole; an existing folder is used as it is.
    Sources without a part are left out.
    """
    key = hashlib.sha256(json.dumps([[p.source, p.name, p.start, p.end] for p in parts] + [
        corpus.model_dump(mode="json")], sort_keys=True).encode("utf-8")).hexdigest()[:16]
    dest = Path(root) / f"{name}-{key}"
    if not (dest / VIEW_MANIFEST).is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for k, p in enumerate(parts):
                out = tmp / str(p.source) / f"{k:06d}-{Path(p.path).name}"
                out.parent.mkdir(exist_ok=True)
                with open(p.path, "rb") as src, open(out, "wb") as dst:
                    src.seek(p.start)
                    left = p.end - p.start
                    while left > 0 and (block := src.read(min(COPY_BYTES, left))):
                        dst.write(block)
                        left -= len(block)
                    if left:
                        raise ValueError(f"{p.path} is shorter than {p.end} bytes: it changed while being read")
                fsync_path(out)
            (tmp / VIEW_MANIFEST).write_text(json.dumps([asdict(p) for p in parts], indent=1), encoding="utf-8")
            fsync_path(tmp / VIEW_MANIFEST)
            try:
                os.rename(tmp, dest)
            except OSError:  # another run made it meanwhile: the same bytes, by its name
                if not (dest / VIEW_MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    used = sorted({p.source for p in parts})
    sources = [corpus.sources[i].model_copy(update={"uri": str(dest / str(i) / "*"), "sha256": None})
               for i in used]
    return corpus.model_copy(update={"name": corpus.name, "sources": sources})


def first_record(corpus: CorpusConfig, state: list[list[FileState]], documents: int) -> TrainedOn:
    """The record of a model trained from scratch on the corpus as it is (``state``)."""
    return TrainedOn(corpus.name, state, state, documents, sum(f.bytes for s in state for f in s))


def next_record(record: TrainedOn, delta: Delta, documents: int) -> TrainedOn:
    """The record after a continual run trained on ``delta`` (``documents``: the new documents it read)."""
    return TrainedOn(record.corpus, record.origin, delta.state, record.documents + documents,
                     record.bytes + delta.new_bytes, record.runs + 1)
