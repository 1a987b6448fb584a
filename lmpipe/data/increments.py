"""What a continual run trains on: the documents of a corpus that no earlier run trained on.

A registered model carries a record of the pretraining corpus's files it was trained on
(``TrainedOn``: each file's name, size and sha256, per source, and the documents read).
Against the files there now, a file is

- unchanged (its first ``bytes`` hash to the recorded sha256, and nothing whole follows): nothing new;
- new (a name the record lacks, e.g. a new file matching a source's glob): new from its start;
- grown (its first ``bytes`` still hash to the recorded sha256, and lines or records follow):
  new from the recorded size on;
- changed otherwise (edited, truncated; or grown, but a compressed, parquet or one-document
  file, where a tail is no document): read again whole, and said so.

Bytes appended to a plain-text or JSONL file count up to their last line end: a line still being
written waits for the next run. Each file is read once, from one open, up to the size it had then: its size and
sha256 describe the same bytes however fast it grows.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.artifacts import follow_umask, fsync_path
from lmpipe.config.data import CleanConfig, CorpusConfig, SourceConfig
from lmpipe.data.reader import file_compression, file_format
from lmpipe.data.sources import COPY_BYTES, expand_local, source_kind

RECORD_FORMAT = 1
RECORD_FILE = "trained_on.json"
VIEW_MANIFEST = "view.json"  # written last into a materialized folder: the folder is whole


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
    settings: dict[str, Any] = field(default_factory=dict)  # how the corpus is read, split and cleaned (``settings``)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> TrainedOn:
        if obj.get("format_version") != RECORD_FORMAT:
            raise ValueError(f"{where}: {RECORD_FILE} has format_version {obj.get('format_version')!r}, this "
                             f"lmpipe reads {RECORD_FORMAT}")
        files = [[FileState(**f) for f in source] for source in obj["trained"]]
        origin = [[FileState(**f) for f in source] for source in obj["origin"]]
        return cls(obj["corpus"], origin, files, int(obj["documents"]), int(obj["bytes"]), int(obj.get("runs", 1)),
                   dict(obj.get("settings", {})))

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
    sha256: str  # of bytes [start, end): what materialize must copy


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


def settings(corpus: CorpusConfig, clean: CleanConfig) -> dict[str, Any]:
    """What decides which documents a corpus's files give and which of them are held out: a continual run must
    read the origin as the line's first run did, or its held-out set would not be the one the champion was
    scored on."""
    return {"name": corpus.name, "val_fraction": corpus.val_fraction,
            "sources": [s.model_dump(mode="json", exclude={"sha256"}) for s in corpus.sources],
            "clean": clean.model_dump(mode="json")}


def check_settings(record: TrainedOn, corpus: CorpusConfig, clean: CleanConfig, field: str, where: str) -> None:
    """Fail, naming each difference, if the corpus is read, split or cleaned otherwise than the line's first run
    did."""
    now = settings(corpus, clean)
    diffs = [f"{key}: {json.dumps(record.settings.get(key))} then, {json.dumps(now[key])} now"
             for key in now if record.settings.get(key) != now[key]]
    if diffs:
        raise ValueError(f"{field} is read, split or cleaned otherwise than when {where} began its line, so the "
                         "held-out set would not be the one its models were scored on: " + "; ".join(diffs)
                         + ". Put the settings back, or run lmpipe-pipeline to start a new line of models")


def _appendable(source: SourceConfig, name: str) -> bool:
    """Whether bytes appended to a file of ``source`` are documents of their own: lines or records of an
    uncompressed text or JSONL file (not a one-document file)."""
    fmt = file_format(source, name)
    return (file_compression(source, name) == "none" and fmt in ("text", "jsonl")
            and not (fmt == "text" and source.doc_boundary == "file"))


def _line_end(f: Any, size: int) -> int:
    """Where the file's last whole line ends (0: no line end in it)."""
    at = size
    while at > 0:
        step = min(COPY_BYTES, at)
        f.seek(at - step)
        block = f.read(step)
        k = block.rfind(b"\n")
        if k >= 0:
            return at - step + k + 1
        at -= step
    return 0


@dataclass(frozen=True)
class _Read:
    state: FileState  # the file up to ``state.bytes``, which is what training would take
    prefix_sha256: str | None  # of its first ``known`` bytes (None: it is shorter)
    tail_sha256: str  # of bytes [known, state.bytes)


def _read(path: Path, appendable: bool, known: int, name: str) -> _Read:
    """One pass over the file, from one open: the sha256 of [0, end) with the state at ``known`` on the way."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # Appended bytes count up to their last line end (a line still being written waits), never less than what
        # was trained on already; a file read from its start counts whole.
        end = max(_line_end(f, size), min(known, size)) if appendable and known > 0 else size
        f.seek(0)
        whole, tail = hashlib.sha256(), hashlib.sha256()
        prefix = hashlib.sha256().hexdigest() if known == 0 else None
        at = 0
        while at < end:
            block = f.read(min(COPY_BYTES, end - at, known - at if at < known else COPY_BYTES))
            if not block:
                raise ValueError(f"{path} got shorter while it was read")
            whole.update(block)
            if at >= known:
                tail.update(block)
            at += len(block)
            if at == known:
                prefix = whole.hexdigest()
    return _Read(FileState(name, end, whole.hexdigest()), prefix, tail.hexdigest())


def new_parts(record: TrainedOn, corpus: CorpusConfig, field: str) -> Delta:
    """What the sources hold now that ``record`` has not trained on; ``state``: the record's files after training
    on it (each file up to what the part takes)."""
    delta = Delta()
    for i, source in enumerate(corpus.sources):
        seen = {f.name: f for f in (record.trained[i] if i < len(record.trained) else [])}
        files: list[FileState] = []
        for name, path in expand_local(source, f"{field}.sources[{i}]"):
            old, appendable = seen.get(name), _appendable(source, name)
            read = _read(path, appendable, old.bytes if old is not None else 0, name)
            now = read.state
            if old is not None and read.prefix_sha256 == old.sha256 and (appendable or now.bytes == old.bytes):
                if now.bytes > old.bytes:
                    delta.parts.append(Part(i, name, str(path), old.bytes, now.bytes, "appended", read.tail_sha256))
                files.append(now)
                continue
            if old is not None and now.sha256 == old.sha256:  # the same bytes (a one-document file, say)
                files.append(now)
                continue
            if old is not None:  # changed: read again from its start, whole (its part and its state from that read)
                read = _read(path, appendable, 0, name)
                now = read.state
            if now.bytes > 0:
                delta.parts.append(Part(i, name, str(path), 0, now.bytes, "new" if old is None else "changed",
                                        read.tail_sha256))
            files.append(now)
        delta.state.append(files)
    return delta


def origin_parts(record: TrainedOn, corpus: CorpusConfig, field: str) -> list[Part]:
    """The origin's bytes in today's files: each origin file must still begin with what was trained on."""
    paths = {(i, name): path for i, source in enumerate(corpus.sources)
             for name, path in expand_local(source, f"{field}.sources[{i}]")}
    parts = []
    for i, files in enumerate(record.origin):
        for f in files:
            path = paths.get((i, f.name))
            read = _read(path, False, f.bytes, f.name) if path is not None else None
            if read is None or read.prefix_sha256 != f.sha256:
                what = "is gone" if path is None else "no longer begins with the bytes it was trained on"
                raise ValueError(
                    f"{field}.sources[{i}]: {f.name} {what}: the first model of this line was trained and scored on "
                    f"it ({f.bytes} bytes, sha256 {f.sha256}), so the fixed held-out set cannot be rebuilt; restore "
                    "the file, or run lmpipe-pipeline to start a new line of models")
            if f.bytes:
                parts.append(Part(i, f.name, str(path), 0, f.bytes, "origin", f.sha256))
    return parts


def materialize(parts: list[Part], corpus: CorpusConfig, name: str, root: Path) -> CorpusConfig:
    """The parts copied into ``root/<digest>/<source>/`` (file order kept), as a corpus read like ``corpus``.

    The folder is named by what it holds (each part's bytes by their sha256), built aside and renamed into place,
    so a run killed while copying leaves nothing a later run would take for whole; an existing folder is used as
    it is. The bytes copied must hash to what the part says (the file did not change since it was read).
    Sources without a part are left out.
    """
    key = hashlib.sha256(json.dumps([[p.source, p.name, p.start, p.end, p.sha256] for p in parts] + [
        corpus.model_dump(mode="json")], sort_keys=True).encode("utf-8")).hexdigest()[:16]
    dest = Path(root) / f"{name}-{key}"
    if not (dest / VIEW_MANIFEST).is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for k, p in enumerate(parts):
                out = tmp / str(p.source) / f"{k:06d}-{Path(p.path).name}"
                out.parent.mkdir(exist_ok=True)
                copied = hashlib.sha256()
                with open(p.path, "rb") as src, open(out, "wb") as dst:
                    src.seek(p.start)
                    left = p.end - p.start
                    while left > 0 and (block := src.read(min(COPY_BYTES, left))):
                        dst.write(block)
                        copied.update(block)
                        left -= len(block)
                if left or copied.hexdigest() != p.sha256:
                    raise ValueError(f"{p.path}: bytes {p.start}..{p.end} changed since they were read (sha256 "
                                     f"{copied.hexdigest()}, read as {p.sha256}); run again")
                fsync_path(out)
            (tmp / VIEW_MANIFEST).write_text(json.dumps([asdict(p) for p in parts], indent=1), encoding="utf-8")
            fsync_path(tmp / VIEW_MANIFEST)
            follow_umask(tmp)  # mkdtemp's 0700: the work dir's other folders are as the umask makes them
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


def first_record(corpus: CorpusConfig, clean: CleanConfig, downloaded: dict[str, Any],
                 documents: int) -> TrainedOn:
    """The record of a model trained from scratch on what the download stage read (``downloaded``: its meta,
    each file's size and sha256 as read), cleaned with ``clean``."""
    state = [[FileState(f["path"], f["bytes"], f["sha256"]) for f in source["files"]]
             for source in downloaded["sources"]]
    unhashed = [f.name for files in state for f in files if f.sha256 is None or f.bytes is None]
    if unhashed:
        raise ValueError(f"the download stage recorded no size or sha256 for {unhashed}: not local files?")
    return TrainedOn(corpus.name, state, state, documents, sum(f.bytes for s in state for f in s),
                     settings=settings(corpus, clean))


def next_record(record: TrainedOn, delta: Delta, documents: int) -> TrainedOn:
    """The record after a continual run trained on ``delta`` (``documents``: the new documents it read)."""
    return TrainedOn(record.corpus, record.origin, delta.state, record.documents + documents,
                     record.bytes + delta.new_bytes, record.runs + 1, record.settings)
