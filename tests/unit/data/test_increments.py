"""What counts as new in a corpus's files against the record of what a model was trained on."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from lmpipe.artifacts import sha256_file
from lmpipe.config.data import CorpusConfig, SourceConfig
from lmpipe.data.increments import (
    VIEW_MANIFEST,
    TrainedOn,
    check_watchable,
    first_record,
    materialize,
    new_parts,
    next_record,
    origin_parts,
    scan,
)


def _corpus(src: Path, **source: object) -> CorpusConfig:
    return CorpusConfig(name="c", sources=[SourceConfig(uri=f"{src}/*.txt", doc_boundary="line", **source)])


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo\n")
    (d / "b.txt").write_text("three\n")
    return d


def _record(corpus: CorpusConfig) -> TrainedOn:
    return first_record(corpus, scan(corpus, "data.pretrain", sha256_file), documents=3)


def test_unchanged_files_are_nothing_new(src):
    corpus = _corpus(src)
    assert new_parts(_record(corpus), corpus, "data.pretrain", sha256_file).parts == []


def test_appended_lines_and_new_files_are_new_from_where_they_start(src):
    corpus = _corpus(src)
    record = _record(corpus)
    with open(src / "a.txt", "a") as f:
        f.write("four\n")
    (src / "c.txt").write_text("five\n")
    delta = new_parts(record, corpus, "data.pretrain", sha256_file)
    assert [(Path(p.name).name, p.why, p.start, p.end) for p in delta.parts] == [
        ("a.txt", "appended", 8, 13), ("c.txt", "new", 0, 5)]
    assert delta.new_bytes == 10
    after = next_record(record, delta, documents=2)
    assert (after.documents, after.bytes, after.runs, after.origin) == (5, 14 + 10, 2, record.origin)
    assert new_parts(after, corpus, "data.pretrain", sha256_file).parts == []


def test_an_edited_file_is_read_again_whole(src):
    corpus = _corpus(src)
    record = _record(corpus)
    (src / "a.txt").write_text("ONE\ntwo\nthree\n")  # grew, but its first bytes changed
    assert [(p.why, p.start, p.end) for p in new_parts(record, corpus, "data.pretrain", sha256_file).parts] == [
        ("changed", 0, 14)]


def test_a_grown_compressed_file_is_read_again_whole(tmp_path):
    d = tmp_path / "gz"
    d.mkdir()
    (d / "a.txt.gz").write_bytes(gzip.compress(b"one\n"))
    corpus = CorpusConfig(name="c", sources=[SourceConfig(uri=f"{d}/*.gz", doc_boundary="line")])
    record = _record(corpus)
    with open(d / "a.txt.gz", "ab") as f:  # a second gzip member: still a valid file, but not a tail to read alone
        f.write(gzip.compress(b"two\n"))
    assert [p.why for p in new_parts(record, corpus, "data.pretrain", sha256_file).parts] == ["changed"]


def test_materialized_parts_are_a_corpus_of_just_those_bytes(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus)
    with open(src / "a.txt", "a") as f:
        f.write("four\n")
    delta = new_parts(record, corpus, "data.pretrain", sha256_file)
    view = materialize(delta.parts, corpus, "new", tmp_path / "views")
    [source] = view.sources
    folder = Path(source.uri).parent
    assert source.doc_boundary == "line" and source.sha256 is None and source.uri.endswith("/0/*")
    assert sorted(p.name for p in folder.iterdir()) == ["000000-a.txt"]
    assert (folder / "000000-a.txt").read_text() == "four\n"
    assert (folder.parent / VIEW_MANIFEST).is_file()
    # The same parts again: the folder that is there is used; nothing half-built is left beside it.
    assert materialize(delta.parts, corpus, "new", tmp_path / "views") == view
    assert [p.name for p in (tmp_path / "views").iterdir()] == [folder.parent.name]


def test_the_origin_is_the_first_bytes_of_todays_files(src, tmp_path):
    corpus = _corpus(src)
    record = _record(corpus)
    with open(src / "b.txt", "a") as f:
        f.write("more\n")
    view = materialize(origin_parts(record, corpus, "data.pretrain"), corpus, "origin", tmp_path / "views")
    folder = Path(view.sources[0].uri).parent
    assert [(p.name, p.read_text()) for p in sorted(folder.iterdir())] == [
        ("000000-a.txt", "one\ntwo\n"), ("000001-b.txt", "three\n")]


def test_an_origin_file_that_changed_cannot_give_the_held_out_set(src):
    corpus = _corpus(src)
    record = _record(corpus)
    (src / "b.txt").write_text("THREE\n")
    with pytest.raises(ValueError, match=r"data.pretrain.sources\[0\]: .*b.txt no longer begins with the bytes it "
                                         r"was trained on: .*run lmpipe-pipeline to start a new line"):
        origin_parts(record, corpus, "data.pretrain")
    (src / "b.txt").unlink()
    with pytest.raises(ValueError, match=r"b.txt is gone"):
        origin_parts(record, corpus, "data.pretrain")


def test_the_record_round_trips_and_names_a_wrong_format(src):
    record = _record(_corpus(src))
    assert TrainedOn.from_json(record.to_json(), "x") == record
    assert record.digest() == hashlib.sha256(
        __import__("json").dumps(record.to_json(), sort_keys=True).encode()).hexdigest()
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
