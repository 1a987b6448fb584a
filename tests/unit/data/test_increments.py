"""What counts as new in a corpus's files against the record of what a model was trained on. The first record is
built from what a real download stage read, as the pipeline builds it."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from lmpipe.artifacts import umask
from lmpipe.config.data import CleanConfig, CorpusConfig, SourceConfig
from lmpipe.data.increments import (
    VIEW_MANIFEST,
    TrainedOn,
    check_settings,
    check_watchable,
    first_record,
    materialize,
    new_parts,
    next_record,
    origin_parts,
)
from lmpipe.stages.download import run_download


def _corpus(src: Path, pattern: str = "*.txt", **source: object) -> CorpusConfig:
    return CorpusConfig(name="c", sources=[SourceConfig(uri=f"{src}/{pattern}", doc_boundary="line", **source)])


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo\n")
    (d / "b.txt").write_text("three\n")
    return d


def _record(corpus: CorpusConfig, tmp: Path) -> TrainedOn:
    read = run_download(corpus, tmp / "download" / "fp", "fp", field="data.pretrain", chunk_bytes=1 << 20)
    return first_record(corpus, CleanConfig(), read.meta, int(read.metrics["documents"]))


def _parts(record: TrainedOn, corpus: CorpusConfig) -> list[tuple[str, str, int, int]]:
    return [(Path(p.name).name, p.why, p.start, p.end) for p in new_parts(record, corpus, "data.pretrain").parts]


def test_the_first_record_is_what_the_download_stage_read(src, tmp_path):
    (src / "empty.txt").write_bytes(b"")
    record = _record(_corpus(src), tmp_path)
    assert [(Path(f.name).name, f.bytes) for f in record.trained[0]] == [("a.txt", 8), ("b.txt", 6), ("empty.txt", 0)]
    assert record.trained[0][0].sha256 == hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert record.trained[0][2].sha256 == hashlib.sha256(b"").hexdigest()  # an empty file is hashed too
    assert (record.documents, record.bytes, record.runs, record.origin) == (3, 14, 1, record.trained)
    assert _parts(record, _corpus(src)) == []  # unchanged files, the empty one included, are nothing new


def test_appended_lines_and_new_files_are_new_from_where_they_start(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    with open(src / "a.txt", "a") as f:
        f.write("four\n")
    (src / "c.txt").write_text("five\n")
    (src / "d.txt").write_bytes(b"")  # a new empty file is nothing to train on
    delta = new_parts(record, corpus, "data.pretrain")
    assert [(Path(p.name).name, p.why, p.start, p.end) for p in delta.parts] == [
        ("a.txt", "appended", 8, 13), ("c.txt", "new", 0, 5)]
    assert delta.parts[0].sha256 == hashlib.sha256(b"four\n").hexdigest()
    assert delta.new_bytes == 10
    after = next_record(record, delta, documents=2)
    assert (after.documents, after.bytes, after.runs, after.origin) == (5, 24, 2, record.origin)
    assert after.settings == record.settings
    assert _parts(after, corpus) == []


def test_a_line_still_being_written_waits_for_the_next_run(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    with open(src / "a.txt", "a") as f:
        f.write("four\nfi")  # "fi" has no line end yet
    delta = new_parts(record, corpus, "data.pretrain")
    assert [(p.why, p.start, p.end) for p in delta.parts] == [("appended", 8, 13)]
    after = next_record(record, delta, documents=1)
    assert [f.bytes for f in after.trained[0]][0] == 13  # trained up to the line end
    with open(src / "a.txt", "a") as f:
        f.write("ve\n")
    assert _parts(after, corpus) == [("a.txt", "appended", 13, 18)]


def test_a_file_without_a_last_line_end_is_unchanged_when_nothing_follows(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo")
    corpus = _corpus(d)
    record = _record(corpus, tmp_path)
    assert _parts(record, corpus) == []
    with open(d / "a.txt", "a") as f:
        f.write(" more\nthree\n")
    assert _parts(record, corpus) == [("a.txt", "appended", 7, 19)]


def test_an_edited_file_is_read_again_whole(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    (src / "a.txt").write_text("ONE\ntwo\nthree\n")  # grew, but its first bytes changed
    delta = new_parts(record, corpus, "data.pretrain")
    assert [(p.why, p.start, p.end) for p in delta.parts] == [("changed", 0, 14)]
    assert delta.parts[0].sha256 == hashlib.sha256(b"ONE\ntwo\nthree\n").hexdigest()


def test_an_edited_file_without_a_last_line_end_is_copied_whole(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    (src / "a.txt").write_text("ONE\ntwo\nthree")  # edited; its last line has no line end
    delta = new_parts(record, corpus, "data.pretrain")
    assert [(p.why, p.start, p.end) for p in delta.parts] == [("changed", 0, 13)]
    assert next_record(record, delta, documents=3).trained[0][0].bytes == 13
    view = materialize(delta.parts, corpus, "new", tmp_path / "views")
    assert (Path(view.sources[0].uri).parent / "000000-a.txt").read_text() == "ONE\ntwo\nthree"


@pytest.mark.parametrize(("name", "content", "grown", "source"), [
    ("a.txt.gz", gzip.compress(b"one\n"), gzip.compress(b"two\n"), {}),  # a second gzip member: no tail alone
    ("a.txt", b"one\n", b"two\n", {"doc_boundary": "file"}),  # one document: a tail is no document
])
def test_a_grown_file_whose_tail_is_no_document_is_read_again_whole(tmp_path, name, content, grown, source):
    d = tmp_path / "src"
    d.mkdir()
    (d / name).write_bytes(content)
    corpus = CorpusConfig(name="c", sources=[SourceConfig(**{"uri": f"{d}/*", "doc_boundary": "line", **source})])
    record = _record(corpus, tmp_path)
    with open(d / name, "ab") as f:
        f.write(grown)
    assert [p.why for p in new_parts(record, corpus, "data.pretrain").parts] == ["changed"]


def test_materialized_parts_are_a_corpus_of_just_those_bytes(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    with open(src / "a.txt", "a") as f:
        f.write("four\n")
    delta = new_parts(record, corpus, "data.pretrain")
    view = materialize(delta.parts, corpus, "new", tmp_path / "views")
    [source] = view.sources
    folder = Path(source.uri).parent
    assert source.doc_boundary == "line" and source.sha256 is None and source.uri.endswith("/0/*")
    assert sorted(p.name for p in folder.iterdir()) == ["000000-a.txt"]
    assert (folder / "000000-a.txt").read_text() == "four\n"
    assert (folder.parent / VIEW_MANIFEST).is_file()
    # Built in a temporary folder (mkdtemp: 0700), it ends as mkdir makes folders under the umask.
    assert folder.parent.stat().st_mode & 0o777 == folder.stat().st_mode & 0o777 == 0o777 & ~umask()
    # The same parts again: the folder that is there is used; nothing half-built is left beside it.
    assert materialize(delta.parts, corpus, "new", tmp_path / "views") == view
    assert [p.name for p in (tmp_path / "views").iterdir()] == [folder.parent.name]


def test_bytes_that_changed_since_they_were_read_are_not_copied(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    (src / "c.txt").write_text("AAAA\n")
    delta = new_parts(record, corpus, "data.pretrain")
    (src / "c.txt").write_text("BBBB\n")  # same name, same size, other bytes
    with pytest.raises(ValueError, match=r"c.txt: bytes 0..5 changed since they were read .*run again"):
        materialize(delta.parts, corpus, "new", tmp_path / "views")
    assert list((tmp_path / "views").iterdir()) == []
    # Read again, the other bytes are another folder: a folder of the old bytes is never taken for them.
    materialize(new_parts(record, corpus, "data.pretrain").parts, corpus, "new", tmp_path / "views")
    (src / "c.txt").write_text("CCCC\n")
    again = materialize(new_parts(record, corpus, "data.pretrain").parts, corpus, "new", tmp_path / "views")
    assert (Path(again.sources[0].uri).parent / "000000-c.txt").read_text() == "CCCC\n"


def test_the_origin_is_the_first_bytes_of_todays_files(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    with open(src / "b.txt", "a") as f:
        f.write("more\n")
    view = materialize(origin_parts(record, corpus, "data.pretrain"), corpus, "origin", tmp_path / "views")
    folder = Path(view.sources[0].uri).parent
    assert [(p.name, p.read_text()) for p in sorted(folder.iterdir())] == [
        ("000000-a.txt", "one\ntwo\n"), ("000001-b.txt", "three\n")]


def test_an_origin_file_that_changed_cannot_give_the_held_out_set(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    (src / "b.txt").write_text("THREE\n")
    with pytest.raises(ValueError, match=r"data.pretrain.sources\[0\]: .*b.txt no longer begins with the bytes it "
                                         r"was trained on: .*run lmpipe-pipeline to start a new line"):
        origin_parts(record, corpus, "data.pretrain")
    (src / "b.txt").unlink()
    with pytest.raises(ValueError, match=r"b.txt is gone"):
        origin_parts(record, corpus, "data.pretrain")


def test_reading_the_corpus_otherwise_than_the_lines_first_run_is_refused(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus, tmp_path)
    check_settings(record, corpus, CleanConfig(), "data.pretrain", "m version 1")
    pinned = corpus.model_copy(update={"sources": [corpus.sources[0].model_copy(update={"sha256": "0" * 64})]})
    check_settings(record, pinned, CleanConfig(), "data.pretrain", "m version 1")  # a pin changes no document
    with pytest.raises(ValueError, match=r"data.pretrain is read, split or cleaned otherwise than when m version 1 "
                                         r"began its line, .*val_fraction: 0.1 then, 0.2 now; clean: .*run "
                                         r"lmpipe-pipeline to start a new line"):
        check_settings(record, corpus.model_copy(update={"val_fraction": 0.2}), CleanConfig(min_chars=5),
                       "data.pretrain", "m version 1")


def test_the_record_round_trips_and_names_a_wrong_format(src, tmp_path):
    record = _record(_corpus(src), tmp_path)
    assert TrainedOn.from_json(json.loads(json.dumps(record.to_json())), "x") == record
    assert record.digest() == hashlib.sha256(json.dumps(record.to_json(), sort_keys=True).encode()).hexdigest()
    with pytest.raises(ValueError, match="models:/m/1: trained_on.json has format_version 9"):
        TrainedOn.from_json(record.to_json() | {"format_version": 9}, "models:/m/1")


@pytest.mark.parametrize(("source", "message"), [
    ({"uri": "https://example.org/a.txt"}, r"sources\[0\].uri: 'https://example.org/a.txt' is not a local file"),
    ({"uri": "hf:wikitext"}, r"is not a local file or glob"),
    ({"uri": "x.txt", "max_bytes": 10}, r"sources\[0\].max_bytes=10: continual runs train on whole files"),
])
def test_only_whole_local_files_can_be_watched(source, message):
    with pytest.raises(ValueError, match=message):
        check_watchable(CorpusConfig(name="c", sources=[SourceConfig(**source)]), "data.pretrain")
