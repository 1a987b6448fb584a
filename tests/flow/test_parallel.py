"""The data stages as mapped Prefect tasks: the same bytes on any task runner, and resumable by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpipe.artifacts import RESULT_FILE, hash_tree, sha256_file
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

# WikiText-2 valid (1.1 MB) in ~6 chunks, Tiny Shakespeare (1.1 MB) in ~6.
CHUNKED = ("data.chunk_bytes=200000", "data.clean.minhash.enabled=true")
DATA_STAGES = ("download", "clean_chunk", "clean", "train_tokenizer", "encode_chunk", "shard")


def _stage_outputs(workdir: Path) -> dict[str, dict[str, str]]:
    """stage/fingerprint -> {file: sha256} for every finished data stage directory."""
    out = {}
    for stage in DATA_STAGES:
        for d in sorted((workdir / stage).glob("*")):
            if (d / RESULT_FILE).is_file():
                out[f"{stage}/{d.name}"] = hash_tree(d)
    return out


def _status(summary: dict) -> dict[str, str]:
    return {s["label"]: s["status"] for s in summary["stages"]}


def test_dask_cluster_of_two_workers_gives_byte_identical_data(tmp_path):
    from flows.pipeline import prepare_data

    single = prepare_data(config=tiny_config(tmp_path / "single", *CHUNKED, "data.runner.kind=threads",
                                             "data.runner.workers=1"))
    dask = prepare_data(config=tiny_config(tmp_path / "dask", *CHUNKED, "data.runner.kind=dask",
                                           "data.runner.workers=2"))
    a, b = _stage_outputs(tmp_path / "single"), _stage_outputs(tmp_path / "dask")
    chunks = [k for k in a if k.startswith("clean_chunk/")]
    assert len(chunks) >= 10  # both corpora really were cut into several chunks
    assert len([k for k in a if k.startswith("encode_chunk/")]) >= 10
    assert a == b  # same stage fingerprints, and every file of every stage byte for byte
    assert [s["status"] for s in dask["stages"]] == [s["status"] for s in single["stages"]]
    # The runner is not part of any fingerprint: a threads run of the same config reuses the Dask run's work.
    again = prepare_data(config=tiny_config(tmp_path / "dask", *CHUNKED, "data.runner.kind=processes",
                                            "data.runner.workers=2"))
    assert set(_status(again).values()) == {"reused"}


def test_an_interrupted_run_redoes_only_the_chunks_that_failed(tmp_path):
    from flows.pipeline import prepare_data

    workdir = tmp_path / "w"
    prepare_data(config=tiny_config(workdir, *CHUNKED))
    # Break one downloaded chunk of WikiText: the next run's cleaning (new settings, so nothing to reuse)
    # fails on it while the other chunks finish.
    download = next(d for d in (workdir / "download").iterdir()
                    if "wikitext2-valid" in (d / "sources.json").read_text(encoding="utf-8"))
    n_chunks = len(json.loads((download / "documents.json").read_text())["chunks"])
    chunk = download / "documents" / "part-000002.parquet"
    saved, record = chunk.read_bytes(), (download / RESULT_FILE).read_text()
    chunk.write_bytes(saved[: len(saved) // 2])
    # ... and its record with it, as if the download had written it so: reuse's check passes, reading fails.
    result = json.loads(record)
    result["files"]["documents/part-000002.parquet"] = sha256_file(chunk)
    result["sizes"]["documents/part-000002.parquet"] = chunk.stat().st_size
    (download / RESULT_FILE).write_text(json.dumps(result))
    cfg = tiny_config(workdir, *CHUNKED, "data.clean.min_chars=2")
    with pytest.raises(Exception, match="part-000002"):
        prepare_data(config=cfg)

    chunk.write_bytes(saved)  # the cause is gone (a flaky disk, a killed worker)
    (download / RESULT_FILE).write_text(record)
    status = _status(prepare_data(config=cfg))
    # Every chunk that finished before the failure is taken as it is; only the broken one runs.
    assert status["clean_chunk/wikitext2"] == f"1 ran, {n_chunks - 1} reused"
    assert status["clean/wikitext2"] == "ran"
    assert status["clean_chunk/tinyshakespeare"] == "ran"  # never reached before the failure
