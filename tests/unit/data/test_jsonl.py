"""The JSON array reader: the records json.load gives, at their lines, in chunks of any size and in bounded memory,
and each malformed file's error at its line."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from lmpipe.data.jsonl import JSONArrayError, json_array_records, starts_with_array
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "sft"


@pytest.mark.parametrize("name", ["identity30.json", "sharegpt12.json"])
@pytest.mark.parametrize("chunk_chars", [1, 7, 4096, 1 << 20])
def test_records_are_json_loads_at_the_line_each_starts_on(name: str, chunk_chars: int) -> None:
    path = FIXTURES / name
    lines = path.read_text(encoding="utf-8").splitlines()
    read = list(json_array_records(path, chunk_chars=chunk_chars))
    assert [obj for _, _, obj in read] == json.loads(path.read_text(encoding="utf-8"))
    assert [n for _, n, _ in read] == list(range(1, len(read) + 1))
    assert all(lines[line - 1] == "  {" and lines[line - 2].strip() in ("[", "},") for line, _, _ in read)


def test_a_record_that_is_not_an_object_is_a_problem_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('\ufeff[\n {"a": 1},\n 7,\n ["x"],\n {"b": "\\ud83d"},\n {"c": 12345}\n]\n', encoding="utf-8")
    assert list(json_array_records(path, "a record", chunk_chars=3)) == [
        (2, 1, {"a": 1}), (3, 2, "expected a record, got int"), (4, 3, "expected a record, got list"),
        (5, 4, "a string holds a lone surrogate escape (\\ud83d), not text"), (6, 5, {"c": 12345})]
    path.write_text(" [ ] \n", encoding="utf-8")
    assert list(json_array_records(path)) == []


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('{"a": 1}', 1, "expected a JSON array of records ('[' first)"),
        ("", 1, "expected a JSON array of records ('[' first)"),
        ('[\n{"a": 1},\n]', 3, "not valid JSON (Expecting value at column 1)"),
        ('[\n{"a": 1} {"b": 2}]', 2, "not valid JSON (expected ',' or ']' after record 1 at column 10)"),
        ('[\n{"a": 1},\n{"a" 2}]', 3, "not valid JSON (Expecting ':' delimiter at column 6)"),
        ('[\n{"a": 1},\n{"a": 2}', 3, "the file ends inside the array (no closing ']')"),
        ('[\n{"a": 1}\n]\n{"b": 2}', 4, "not valid JSON (data after the array's closing ']' at column 1)"),
        ('[{"a": "x\n"}]', 1, "not valid JSON (Invalid control character at at column 10)"),
    ],
    ids=["object", "empty", "trailing-comma", "no-comma", "bad-object", "unclosed", "trailing-data", "control"],
)
@pytest.mark.parametrize("chunk_chars", [1, 5, 1 << 20])
def test_a_malformed_array_is_an_error_at_its_line(tmp_path: Path, text: str, line: int, problem: str,
                                                   chunk_chars: int) -> None:
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JSONArrayError) as err:
        list(json_array_records(path, chunk_chars=chunk_chars))
    assert (err.value.line, err.value.problem) == (line, problem)


def test_an_undecodable_byte_is_an_error_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"a": 1},\n{"a": "\xff"}]')
    for chunk_chars in (2, 1 << 20):
        with pytest.raises(JSONArrayError) as err:
            list(json_array_records(path, chunk_chars=chunk_chars))
        assert (err.value.line, err.value.problem) == (3, "not valid UTF-8 (byte 19 of the file)")


def test_a_large_array_is_read_in_memory_bounded_by_its_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    record = {"instruction": "Say it.", "input": "", "output": "x" * 2000}
    path.write_text(json.dumps([record] * 4000), encoding="utf-8")  # 8.1 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _, _, obj in json_array_records(path, chunk_chars=1 << 18) if obj == record)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4000
    # Observed: about 1 MB (a 256 K-character chunk, its decoded copy, one record); the whole text is 8.1 MB.
    assert peak < size / 4


def test_an_array_is_told_by_its_first_character(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for text, is_array in [("[]", True), ("\ufeff \n\t[{}]", True), ('{"a": 1}\n', False), ("", False),
                           (" " * 5000 + "[", True)]:
        path.write_text(text, encoding="utf-8")
        assert starts_with_array(path) is is_array, text[:10]
