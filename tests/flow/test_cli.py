import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import TEMPORARY_API_LOCK, format_summary, main
from tests.conftest import REPO


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--config", str(REPO / "configs" / "tiny.yaml"), "pretrain.max_steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["max_steps"] == 3
    assert printed["model"]["n_layer"] == 2


def test_bad_config_exits_2_naming_the_field_before_prefect_starts(capsys):
    assert main(["run", "tokenizer.vocab_size=200"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size: 200 is too small" in err and "needs at least 261" in err


def test_summary_table_lists_stages_evaluation_and_where_to_look():
    summary = {
        "stages": [{"label": "pretrain", "status": "reused", "seconds": 0.04, "out_dir": "w/pretrain/abc"}],
        "metrics": {"evaluate": {"base.wiki.loss": 2.0, "base.wiki.perplexity": 7.389, "base.wiki.bits_per_byte": 1.25,
                                 "base.cloze.acc": 0.25, "base.cloze.acc_norm": 0.3125, "base.cloze.n": 16.0}},
        "registered": {"model_uri": "models:/m@candidate", "version": "3"},
        "tracking_uri": "sqlite:///w/mlflow.db", "workdir": "w", "mlflow_run_id": "r1", "experiment_id": "1",
    }
    text = format_summary(summary, 12.0)
    assert "pretrain                    reused        0.0  w/pretrain/abc" in text
    assert "base        wiki                   2.000       7.4      1.250" in text
    assert "model       benchmark                acc  acc_norm\nbase        cloze                  0.250     0.312" in text
    assert "registered model: models:/m@candidate (version 3)" in text
    # The run's page in MLflow's "Model training" view, once the UI runs on the store.
    assert ("MLflow UI:   http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning\n"
            "             (start it first: mlflow ui --backend-store-uri sqlite:///w/mlflow.db --port 5000)") in text
    assert "classifier" not in text and "champion gate" not in text


def test_summary_names_the_classifier_scores_and_the_champion_decision():
    summary = {
        "stages": [], "metrics": {"classify": {"accuracy": 0.975, "macro_f1": 0.97494}},
        "registered": {"model_uri": "models:/m@candidate", "version": "4",
                       "promotion": {"promoted": False, "alias": "champion",
                                     "reason": "finetuned.wiki.bits_per_byte 1.3 is not better than 1.25 (version 3)"}},
        "tracking_uri": "sqlite:///w/mlflow.db", "workdir": "w", "mlflow_run_id": "r1", "experiment_id": "1",
    }
    text = format_summary(summary, 1.0)
    assert "classifier: accuracy 0.975, macro-F1 0.975 on the held-out examples" in text
    assert ("champion gate:    not promoted to @champion: finetuned.wiki.bits_per_byte 1.3 is not better than 1.25 "
            "(version 3)") in text


def test_why_names_the_step_and_reason_that_removed_a_document(tmp_path, capsys):
    from lmpipe.config.data import CleanConfig
    from lmpipe.data.documents import ChunkWriter, chunk_paths
    from lmpipe.stages.clean import run_clean, run_clean_chunk

    with ChunkWriter(tmp_path / "download", chunk_bytes=1 << 20) as w:
        w.add_many(["c/0/0", "c/0/1", "c/0/2"], ["A long enough first document.", "x", "A long enough first document."],
                   ["a.txt"] * 3)
    cfg = CleanConfig(min_chars=2)
    chunk = run_clean_chunk(cfg, chunk_paths(tmp_path / "download")[0], tmp_path / "w" / "clean_chunk" / "k", "k")
    run_clean(cfg, [chunk], tmp_path / "w" / "clean" / "f", "f", corpus_field="data.pretrain")

    assert main(["why", "c/0/1", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "c/0/1: removed by min_chars" in out and "reason:  min_chars: 1 chars < 2" in out
    assert out.count("removed by") == 1  # from the clean stage only, though its chunk stage holds the row too
    assert main(["why", "c/0/2", "--workdir", str(tmp_path / "w")]) == 0
    assert "reason:  dedup: same text as c/0/0" in capsys.readouterr().out
    assert main(["why", "c/0/0", "--workdir", str(tmp_path / "w")]) == 1
    assert "c/0/0: not removed by any finished clean stage" in capsys.readouterr().out
    # The run's preset says where its work directory is; --workdir wins over it.
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"workdir: {tmp_path / 'w'}\n", encoding="utf-8")
    assert main(["why", "c/0/1", "-c", str(preset)]) == 0
    assert "reason:  min_chars: 1 chars < 2" in capsys.readouterr().out
    assert main(["why", "c/0/1", "-c", str(preset), "--workdir", str(tmp_path / "elsewhere")]) == 1
    assert "c/0/1: not removed by any finished clean stage" in capsys.readouterr().out


def test_why_answers_from_the_chunk_stage_after_the_clean_stage_failed(tmp_path, capsys):
    import pytest

    from lmpipe.config.data import C4Config, CleanConfig
    from lmpipe.data.documents import ChunkWriter, chunk_paths
    from lmpipe.stages.clean import EmptyCorpusError, run_clean, run_clean_chunk

    with ChunkWriter(tmp_path / "download", chunk_bytes=1 << 20) as w:
        w.add_many(["c/0/0", "c/0/1"], ["Le chat dort sur le canap\u00e9", "Pisica doarme pe canapea"], ["a.txt"] * 2)
    cfg = CleanConfig(c4=C4Config(enabled=True, min_sentences=0))  # C4 removes every line: nothing is left
    chunk_dir = tmp_path / "w" / "clean_chunk" / "k"
    chunk = run_clean_chunk(cfg, chunk_paths(tmp_path / "download")[0], chunk_dir, "k")
    with pytest.raises(EmptyCorpusError, match="c4 removed the most: 51 of the 51 bytes"):
        run_clean(cfg, [chunk], tmp_path / "w" / "clean" / "f", "f", corpus_field="data.pretrain")

    assert main(["why", "c/0/1", "--workdir", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out == (
        f"c/0/1: removed by c4 in the clean_chunk stage {chunk_dir} (chunk part-000000.parquet; no finished clean "
        "stage combined it, so the answer comes from this chunk stage)\n"
        "  reason:  c4: emptied the document (had 24 chars)\n"
        "  source:  a.txt (24 bytes)\n"
        "  excerpt: 'Pisica doarme pe canapea'\n")
    assert main(["why", "c/0/9", "--workdir", str(tmp_path / "w")]) == 1
    assert capsys.readouterr().out == (
        f"c/0/9: not removed by any finished clean stage under {tmp_path / 'w'}, nor by the per-document steps of "
        "1 clean_chunk stage(s) that no finished clean stage combined (a failed or unfinished run): whether it is "
        "kept is not known until their clean stage runs (de-duplication), and it may be in a chunk that was not "
        "cleaned\n")


def test_model_commands_check_options_and_device_before_fetching_the_model(tmp_path, capsys, monkeypatch):
    import torch

    base = ["generate", "models:/nope@x", "--workdir", str(tmp_path), "-p", "x"]  # never looked up
    for option, message in [
        (["--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 0, got -3"),
        (["--top-p", "0"], "--top-p must be in (0, 1] (or left out: no nucleus filtering), got 0.0"),
        (["--top-k", "0"], "--top-k must be an integer >= 1 (or left out: no top-k filtering), got 0"),
        (["--temperature", "-1"], "--temperature must be a number >= 0 (0: greedy), got -1.0"),
    ]:
        assert main([*base, *option]) == 1
        assert capsys.readouterr().err == f"lmpipe generate: {message}\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--device", "cuda"]) == 1
    assert capsys.readouterr().err == (f"lmpipe generate: --device 'cuda': CUDA is not available on this machine "
                                       f"(torch {torch.__version__}); use --device cpu\n")
    assert main(["evaluate", "models:/nope@x", "--workdir", str(tmp_path), "-t", __file__, "--device", "gpu"]) == 1
    assert capsys.readouterr().err == ("lmpipe evaluate: --device 'gpu' is not a device: expected cpu, cuda, "
                                       "cuda:<index> or mps\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_benchmark_is_given_as_its_format_and_a_wrong_one_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    base = ["evaluate", "models:/nope@x", "--workdir", str(tmp_path)]  # refused before the model is looked up
    assert main([*base, "-b", "arc-easy=ARC-Easy-Test.jsonl"]) == 1
    assert capsys.readouterr().err == (
        "lmpipe evaluate: --benchmark 'arc-easy=ARC-Easy-Test.jsonl': 'arc-easy' is not a benchmark format; "
        "FORMAT=PATH names the shape of the file's lines, one of hellaswag, arc, piqa (e.g. -b piqa=ARC-Easy-Test.jsonl)\n")
    for spec in ("piqa-valid.jsonl", "piqa="):
        assert main([*base, "--benchmark", spec]) == 1
        assert capsys.readouterr().err == (f"lmpipe evaluate: --benchmark {spec!r}: expected FORMAT=PATH, FORMAT one of "
                                           "hellaswag, arc, piqa (e.g. -b arc=ARC-Easy-Test.jsonl)\n")
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--benchmark FORMAT=PATH, -b FORMAT=PATH a local JSONL benchmark file and the shape of its lines, FORMAT "
            "one of hellaswag, arc, piqa (the dataset it comes from, not a name): -b arc=ARC-Easy-Test.jsonl (repeat "
            "for several)") in text


@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
def test_model_commands_say_that_options_win_over_the_config(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal's width, in words and after hyphens
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--config YAML, -c YAML the run's preset: its workdir and tracking.uri say where the model's files are; "
            "--workdir and --tracking-uri, when given, win over it") in text
    assert "--workdir WORKDIR the run's work directory (default: the --config's workdir, else .lmpipe)" in text


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for a file lock (a ``->`` line of /proc/locks)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_run_starts_its_temporary_prefect_api_only_while_no_other_run_of_its_home_does(tmp_path: Path):
    # Two runs of one work directory share a Prefect home; their servers must not migrate its database at once.
    home = tmp_path / "prefect"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    code = "from flows.cli import _start_temporary_api; _start_temporary_api(); print('answering')"
    with open(home / TEMPORARY_API_LOCK, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX)  # another run is starting its server on this home
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not _blocked_on_a_lock(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _blocked_on_a_lock(proc.pid), proc.poll()
        assert not (home / "prefect.db").exists()  # it waits before its server touches the database
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "answering" in out, out
    assert (home / "prefect.db").exists()
