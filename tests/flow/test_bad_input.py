"""Every bad input fails the flow early, names the field or file, marks both runs failed, and
leaves nothing a later run would trust."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import DATA, tiny_config
from tests.flow.test_pipeline_flow import _prefect_artifacts, _untrusted_outputs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket closes


def _run_failing(cfg):
    from flows.pipeline import pipeline

    state = pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as err:
        state.result()
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)  # none left RUNNING
    assert _untrusted_outputs(Path(cfg.workdir)) == []
    # The flow run's summary artifact says it failed and where its MLflow run is.
    summary = _prefect_artifacts(str(state.state_details.flow_run_id))[0]
    assert summary.key == "pipeline-run-summary"
    assert summary.data.splitlines()[0] == f"# lmpipe pipeline: failed ({type(err.value).__name__}; the flow run's log " \
                                           "says why)"
    assert f"MLflow run [{parent[0].info.run_id}](" in summary.data
    return str(err.value), runs


def test_missing_file_fails_before_any_stage(tmp_path):
    message, runs = _run_failing(tiny_config(tmp_path, f"data.finetune.sources=[{{uri: '{tmp_path}/nope.txt'}}]"))
    assert "data.finetune.sources[0]" in message and "nope.txt" in message
    assert len(runs) == 1  # the parent only: preflight stopped it before the first stage


def test_unreachable_url_is_retried_then_fails(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/corpus.txt"
    message, runs = _run_failing(tiny_config(tmp_path, f"data.pretrain.sources=[{{uri: '{url}'}}]",
                                             "data.download_retries=1", "data.download_retry_delay_s=0"))
    assert url in message
    downloads = [r for r in runs if r.info.run_name == "download/wikitext2"]
    assert [r.info.status for r in downloads] == ["FAILED", "FAILED"]  # the first try and one retry


def test_checksum_mismatch(tmp_path):
    wrong = "0" * 64
    message, _ = _run_failing(tiny_config(
        tmp_path, f"data.pretrain.sources=[{{uri: '{DATA / 'wikitext2-valid.txt'}', sha256: '{wrong}'}}]"))
    assert "data.pretrain.sources[0]" in message and wrong in message
    assert "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8" in message


def test_corpus_empty_after_cleaning(tmp_path):
    message, _ = _run_failing(tiny_config(tmp_path, "data.clean.min_chars=100000000"))
    assert "data.pretrain" in message and "data.clean.min_chars" in message


def test_corpus_emptied_by_a_line_filter_fails_at_cleaning_naming_the_step(tmp_path):
    """C4's line rules (min_sentences 0, as FineWeb runs them) remove every line of nine non-English
    lines: the run stops at cleaning, naming C4 and the bytes it removed, before a tokenizer trains."""
    from tests.unit.data.test_clean import NON_ENGLISH

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(NON_ENGLISH) + "\n", encoding="utf-8")
    message, runs = _run_failing(tiny_config(
        tmp_path / "w", f"data.pretrain.sources=[{{uri: '{lines}', doc_boundary: line}}]",
        "data.pretrain.clean={c4: {enabled: true, min_sentences: 0}}"))
    assert ("data.pretrain: no document survived cleaning (9 documents, 270 bytes in). c4 removed the most: 270 "
            "of the 270 bytes (9 of the 9 documents)") in message
    assert "Relax data.pretrain.clean.c4 (now enabled)" in message
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["clean/wikitext2"] == "FAILED" and "train_tokenizer" not in status


def test_bytes_that_are_not_utf8_fail_in_strict_mode(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    message, _ = _run_failing(tiny_config(tmp_path, f"data.pretrain.sources=[{{uri: '{bad}'}}]", "data.strict=true"))
    assert "data.pretrain.sources[0].uri" in message and "latin1.txt" in message
    assert "not valid UTF-8: byte 0xe9 at offset 3" in message
    assert "set data.strict=false to skip bad records" in message


def test_bad_records_are_counted_and_skipped_without_stopping_the_run(tmp_path):
    """Lenient mode (the default): a glob of files, some broken in every way, gives the good documents."""
    import gzip
    import json

    from flows.pipeline import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": f"Document {i}. " + (DATA / "tinyshakespeare.txt").read_text()[i * 3000:(i + 1) * 3000]})
            for i in range(60)]
    (corpus / "a.jsonl").write_text("\n".join(good[:30]) + "\n{not json\n" + json.dumps({"txt": "x"}) + "\n",
                                    encoding="utf-8")
    (corpus / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' + "\n".join(good[30:]).encode() + b"\n")
    (corpus / "c.jsonl").write_bytes(b"")
    (corpus / "d.jsonl").write_bytes(b"\x00\x01binary\x00" * 100)
    packed = gzip.compress("\n".join(good).encode())
    (corpus / "e.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # cut off mid-stream
    cfg = tiny_config(tmp_path / "w", f"data.pretrain.sources=[{{uri: '{corpus}/*.jsonl*'}}]")
    summary = prepare_data(config=cfg)
    download = summary["metrics"]["download/wikitext2"]
    assert {k: v for k, v in download.items() if k.startswith("bad_records")} == {
        "bad_records": 6.0, "bad_records.bad_json": 1.0, "bad_records.missing_field": 1.0,
        "bad_records.invalid_utf8": 1.0, "bad_records.empty_file": 1.0, "bad_records.binary_file": 1.0,
        "bad_records.truncated": 1.0}
    # Every good line of a.jsonl and b.jsonl, and the lines of the cut gzip file before the cut.
    assert 60 < download["documents"] < 120
    report = json.loads((Path(summary["stages"][0]["out_dir"]) / "read_report.json").read_text())
    assert {e["kind"] for e in report["examples"]} == {"bad_json", "missing_field", "invalid_utf8", "empty_file",
                                                        "binary_file", "truncated"}


def test_context_longer_than_validation_split(tmp_path):
    message, runs = _run_failing(tiny_config(tmp_path, "model.block_size=200000"))
    assert "model.block_size=200000 is longer than the val split of corpus 'wikitext2' (67552 tokens)" in message
    assert "pretrain" not in {r.info.run_name for r in runs}  # found once the shards exist, before training


def test_context_longer_than_the_finetune_validation_split_fails_before_pretraining(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Speech {i}." for i in range(20)), encoding="utf-8")
    message, runs = _run_failing(tiny_config(tmp_path / "w", f"data.finetune.sources=[{{uri: '{short}', doc_boundary: blank_line}}]",
                                             "data.finetune.val_fraction=0.1"))
    assert "model.block_size=32 is longer than the val split of corpus 'tinyshakespeare'" in message, message
    assert "pretrain" not in {r.info.run_name for r in runs}


def test_a_benchmark_choice_longer_than_the_context_fails_before_pretraining(tmp_path):
    import json

    bench = tmp_path / "long.jsonl"
    rows = [{"ctx": "To be, or not to be", "endings": ["that is the question.", "a cat."], "label": 0},
            {"ctx": "Now is the winter", "endings": ["of our discontent.", " ".join(["glorious summer"] * 40)],
             "label": 0}]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    message, runs = _run_failing(tiny_config(
        tmp_path / "w", f"eval.benchmarks=[{{name: long, kind: hellaswag, path: '{bench}'}}]"))
    assert f"eval.benchmarks.0 (long) file '{bench}': line 2 (example 1) choice 1 ('glorious summer" in message
    assert "scoring needs 1..32 (model block_size)" in message
    assert "pretrain" not in {r.info.run_name for r in runs}  # found once the tokenizer exists, before training


def test_an_sft_example_longer_than_the_context_fails_before_pretraining(tmp_path):
    import json

    chats = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": "Short."} for i in range(12)]
    rows[4]["completion"] = " ".join(["a long answer"] * 30)
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    message, runs = _run_failing(tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={chats}"))
    assert f"finetune.sft_path: {chats}:5: the example is " in message and "model.block_size=32" in message
    assert "pretrain" not in {r.info.run_name for r in runs}  # found once the tokenizer exists, before training


def test_sft_without_the_chat_tokens_fails_before_any_stage(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"prompt": "Hi?", "completion": "Hello."}\n' * 12, encoding="utf-8")
    message, runs = _run_failing(tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={chats}",
                                             "tokenizer.special_tokens=['<|endoftext|>', '<|pad|>']"))
    assert "tokenizer.special_tokens=['<|endoftext|>', '<|pad|>'] lacks ['<|system|>', '<|user|>', " in message
    assert len(runs) == 1  # only the flow's own run: no stage started


def test_a_classification_label_seen_only_in_the_held_out_split_fails_before_pretraining(tmp_path):
    data = tmp_path / "cls.csv"
    rows = [f"text {i},{'good' if i % 2 else 'bad'}" for i in range(20)]
    rows[4] = "text 4,ugly"  # every fifth example is held out: line 6 (example 4) is a validation example
    data.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    message, runs = _run_failing(tiny_config(tmp_path / "w", f"classify={{path: '{data}', max_steps: 2}}"))
    assert "label 'ugly' does not occur in the training split" in message, message
    assert "pretrain" not in {r.info.run_name for r in runs}


def test_finetune_checkpoint_that_does_not_match_the_model(tmp_path):
    from lmpipe.config.training import ModelConfig
    from lmpipe.model.gpt import GPT, GPTConfig
    from lmpipe.training.checkpoint import save_checkpoint  # a real checkpoint of another architecture

    other = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = GPT(GPTConfig.from_config(other, vocab_size=512))
    import torch
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "ckpts", 0, model, opt,
                           {"tokenizer_fingerprint": "x"})
    message, runs = _run_failing(tiny_config(tmp_path / "w", f"finetune.init_checkpoint={ckpt}"))
    assert "finetune.init_checkpoint" in message
    assert "model.n_layer: checkpoint has 1, config has 2" in message
    assert len(runs) == 1
