"""The whole flow on the tiny config, under the session's Prefect harness and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lmpipe.artifacts import RESULT_FILE
from tests.conftest import DATA, REPO, flow_run_logs, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

STAGES = ["download/wikitext2", "clean_chunk/wikitext2", "clean/wikitext2", "train_tokenizer",
          "encode_chunk/wikitext2", "shard/wikitext2",
          "download/tinyshakespeare", "clean_chunk/tinyshakespeare", "clean/tinyshakespeare",
          "encode_chunk/tinyshakespeare", "shard/tinyshakespeare",
          "pretrain", "finetune", "evaluate", "register"]
CHUNK_STAGES = {label for label in STAGES if label.split("/")[0] in ("clean_chunk", "encode_chunk")}
MODEL_STAGES = {"pretrain", "finetune", "evaluate", "register"}


def _runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _untrusted_outputs(workdir: Path) -> list[Path]:
    """Stage directories a later run would trust although they are incomplete (must be none)."""
    bad = []
    for stage_root in workdir.iterdir():
        if not stage_root.is_dir() or stage_root.name in ("prefect", "mlartifacts"):
            continue
        for d in stage_root.iterdir():
            if d.is_dir() and not d.name.endswith(".partial") and not (d / RESULT_FILE).is_file():
                bad.append(d)
    return bad


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(workdir)
    summary = pipeline(config=cfg)
    return cfg, summary


def test_every_stage_runs_and_is_tracked(first_run):
    cfg, summary = first_run
    assert [s["label"] for s in summary["stages"]] == STAGES
    assert {s["status"] for s in summary["stages"]} == {"ran"}

    parents, children = _runs(summary["tracking_uri"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow_run_id"]
    assert parent.data.params["model.n_layer"] == "2"
    assert parent.data.tags["prefect.flow_run_id"]
    assert len(parent.data.tags["lmpipe.git_commit"]) in (40, len("unknown"))
    # Named as the flow labels the stages: a data stage's run says which corpus it is for.
    assert sorted(r.info.run_name for r in children) == sorted(label for label in STAGES if label not in CHUNK_STAGES)
    assert sorted(r.data.tags["lmpipe.stage"] for r in children) == sorted(
        ["download", "download", "clean", "clean", "train_tokenizer", "shard", "shard",
         "pretrain", "finetune", "evaluate", "register"])
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["prefect.flow_run_id"] for r in children} == {parent.data.tags["prefect.flow_run_id"]}
    assert {r.data.tags["lmpipe.git_commit"] for r in children} == {parent.data.tags["lmpipe.git_commit"]}
    by_name = {r.info.run_name: r for r in children}

    # Every stage's run carries the fingerprint that names its output directory; chunk tasks report how many
    # chunks they did (the demo's corpora fit in one chunk each) and where their directories are.
    for stage in summary["stages"]:
        if stage["label"] in CHUNK_STAGES:
            assert stage["fingerprint"] == "1 chunk" and Path(stage["out_dir"]).name == stage["stage"]
        else:
            assert Path(stage["out_dir"]).name == stage["fingerprint"]
    assert by_name["pretrain"].data.params["pretrain.max_steps"] == "30"
    assert by_name["train_tokenizer"].data.params["tokenizer.vocab_size"] == "512"

    # Training metrics are logged with their step, every log_interval steps.
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    history = client.get_metric_history(by_name["pretrain"].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]
    val = client.get_metric_history(by_name["pretrain"].info.run_id, "val/loss")
    assert sorted(m.step for m in val) == [15, 30]

    artifacts = {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id)}
    assert {"report.json", "report.md", "samples.json", "held_out_table.json"} <= artifacts
    assert "benchmarks_table.json" not in artifacts  # the tiny config scores no benchmark
    mlflow.set_tracking_uri(summary["tracking_uri"])
    table = mlflow.artifacts.load_dict(f"runs:/{by_name['evaluate'].info.run_id}/held_out_table.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["model"], r["corpus"]) for r in rows] == [
        (m, c) for m in ("base", "finetuned") for c in ("wikitext2", "tinyshakespeare")]
    bpb = summary["metrics"]["evaluate"]["finetuned.tinyshakespeare.bits_per_byte"]
    assert rows[3]["bits_per_byte"] == round(bpb, 10)  # MLflow writes tables with pandas' to_json: 10 decimals
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(by_name["train_tokenizer"].info.run_id)}
    assert "manifest.json" in {a.path for a in client.list_artifacts(by_name["shard/wikitext2"].info.run_id)}
    clean_runs = [r for r in children if r.data.tags["lmpipe.stage"] == "clean"]
    for run in clean_runs:  # the report, every removed document with its reason, and the per-step table
        assert {"clean_report.json", "removed.parquet", "clean_report_table.json"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)}
    assert {a.path for a in client.list_artifacts(by_name["finetune"].info.run_id, "model")} == {
        "model/model.safetensors", "model/state.json"}

    # The parent run holds every stage's summary metrics, so runs compare in the MLflow UI.
    assert "evaluate.finetuned.tinyshakespeare.bits_per_byte" in parent.data.metrics
    # Nothing was registered before this run: the report says so.
    report = Path(next(s["out_dir"] for s in summary["stages"] if s["label"] == "evaluate")) / "report.md"
    assert ("No earlier registered model to compare with: there was no champion when this model was first "
            "evaluated.") in report.read_text(encoding="utf-8").splitlines()
    assert parent.data.tags["lmpipe.stage.pretrain"].startswith("ran ")


def _prefect_artifacts(flow_run_id: str) -> list:
    """The flow run's artifacts, first created first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return sorted(found, key=lambda a: a.created)


def _stage_run_ids(uri: str, parent_run_id: str) -> dict[str, str]:
    """Run name (the stage's label) -> run id of the stage runs under a parent run."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    return {r.info.run_name: r.info.run_id for r in runs}


def _loss_curves_uri(summary: dict) -> str:
    import base64

    evaluate = Path(next(s["out_dir"] for s in summary["stages"] if s["label"] == "evaluate"))
    return "data:image/png;base64," + base64.b64encode((evaluate / "loss_curves.png").read_bytes()).decode()


def test_prefect_and_mlflow_point_at_each_other(first_run):
    """The flow run's first artifact is its summary, linking its MLflow runs and the registered version; each stage
    task logs its MLflow run; every MLflow run's description links the Prefect flow run; the evaluation report
    carries its loss curves inside it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL

    from lmpipe.tracking.links import mlflow_ui

    _, summary = first_run
    uri, exp, parent = summary["tracking_uri"], summary["experiment_id"], summary["mlflow_run_id"]
    ui = mlflow_ui(uri)
    assert ui.command == f"mlflow ui --backend-store-uri {uri} --port 5000"  # a SQLite store: no server
    runs = _stage_run_ids(uri, parent)
    flow_run_id = summary["flow_run_id"]

    artifacts = _prefect_artifacts(flow_run_id)
    first = artifacts[0]
    assert first.key == "pipeline-run-summary" and first.type == "markdown" and first.task_run_id is None
    assert [a.key for a in artifacts].count("pipeline-run-summary") == 1  # completed in place, not a second one
    lines = first.data.splitlines()
    assert lines[0] == "# lmpipe pipeline: finished"
    assert lines[2] == (f"MLflow run [{parent}](http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent}"
                        f"?workflowType=machine_learning) in experiment [{exp}](http://127.0.0.1:5000/#/experiments/"
                        f"{exp}?workflowType=machine_learning) (tracking URI `{uri}`); work directory "
                        f"`{summary['workdir']}`.")
    assert lines[4] == f"No MLflow server serves this store: start the UI with `{ui.command}`, then the links open."
    assert lines[6] == ("Registered [lmpipe-gpt version 1](http://127.0.0.1:5000/#/models/lmpipe-gpt/versions/1"
                        "?workflowType=machine_learning) (`models:/lmpipe-gpt@candidate`).")
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ")}
    for label in STAGES:
        if label in CHUNK_STAGES:
            assert rows[label].endswith(" | – |")
        else:
            assert rows[label].endswith(f" | [{runs[label]}]({ui.run(exp, runs[label])}) |")
            assert f"| {label} | ran | " in rows[label]

    report = next(a for a in artifacts if a.key == "evaluation-report")
    assert _loss_curves_uri(summary) in report.data and "](loss_curves.png)" not in report.data
    assert report.data.endswith(f"Built by MLflow run [{runs['evaluate']}]({ui.run(exp, runs['evaluate'])}) in "
                                f"`{next(s['out_dir'] for s in summary['stages'] if s['label'] == 'evaluate')}`.\n")

    # Each MLflow run's description links the Prefect flow run; a stage's also links its parent run.
    with get_client(sync_client=True) as prefect:
        name = prefect.read_flow_run(flow_run_id).name
    logs = flow_run_logs(flow_run_id)
    flow_link = f"Prefect flow run [{name}]({PREFECT_UI_URL.value()}/flow-runs/flow-run/{flow_run_id}) (id `{flow_run_id}`)."
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(parent).data.tags["mlflow.note.content"].startswith(flow_link + "\n\n")
    assert client.get_run(parent).data.tags["prefect.flow_run_url"] == f"{PREFECT_UI_URL.value()}/flow-runs/flow-run/{flow_run_id}"
    for label, run_id in runs.items():
        tags = client.get_run(run_id).data.tags
        fingerprint = tags["lmpipe.fingerprint"]
        assert tags["mlflow.note.content"] == (
            f"Stage `{label}` (fingerprint `{fingerprint}`) of the lmpipe run [{parent}](#/experiments/{exp}/runs/"
            f"{parent}?workflowType=machine_learning). {flow_link}")
        # The stage task's log names its run: id and where to open it.
        said = [log for log in logs if log.message == f"{label}: MLflow run {run_id}, {ui.run(exp, run_id)}"]
        assert len(said) == 1 and said[0].task_run_id is not None


def test_lineage_walks_from_the_champion_back_to_config_data_and_code(first_run):
    """models:/lmpipe-gpt@champion -> its version's tags (fingerprints, git) -> its run -> the parent run's
    config.yaml, and the training runs' dataset inputs (the shard manifests' digests) by fingerprint."""
    import hashlib

    import yaml

    from lmpipe.tracking.runs import git_commit

    cfg, summary = first_run
    fingerprints = {s["label"]: s["fingerprint"] for s in summary["stages"]}
    out_dirs = {s["label"]: s["out_dir"] for s in summary["stages"]}
    client = MlflowClient(tracking_uri=summary["tracking_uri"])

    version = client.get_model_version_by_alias("lmpipe-gpt", "champion")  # 1
    tags = version.tags
    assert tags["lmpipe.git_commit"] == git_commit() and tags["lmpipe.git_dirty"] in ("true", "false")
    assert {k: v for k, v in tags.items() if k.endswith("_fingerprint") or ".data_fingerprint." in k} == {
        "lmpipe.data_fingerprint.wikitext2": fingerprints["shard/wikitext2"],
        "lmpipe.data_fingerprint.tinyshakespeare": fingerprints["shard/tinyshakespeare"],
        "lmpipe.tokenizer_fingerprint": fingerprints["train_tokenizer"],
        "lmpipe.pretrain_fingerprint": fingerprints["pretrain"],
        "lmpipe.finetune_fingerprint": fingerprints["finetune"]}
    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]  # 2
    mlflow.set_tracking_uri(summary["tracking_uri"])
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{parent}/config.yaml"))  # 3
    assert config == cfg.model_dump(mode="json")
    for corpus, field in (("wikitext2", "lmpipe.pretrain_fingerprint"),
                          ("tinyshakespeare", "lmpipe.finetune_fingerprint")):
        # 4, 5: the training runs, by the fingerprints on the version
        [run] = client.search_runs([summary["experiment_id"]], f"tags.`lmpipe.fingerprint` = '{tags[field]}'")
        [used] = run.inputs.dataset_inputs
        shards = Path(out_dirs[f"shard/{corpus}"])
        sha256 = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
        manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
        assert (used.dataset.name, used.dataset.digest, json.loads(used.dataset.source)) == (
            corpus, sha256[:32], {"uri": str(shards)})
        assert json.loads(used.dataset.profile) == {
            "train_tokens": manifest["splits"]["train"]["tokens"], "train_documents": manifest["splits"]["train"]["documents"],
            "val_tokens": manifest["splits"]["val"]["tokens"], "val_documents": manifest["splits"]["val"]["documents"],
            "manifest_sha256": sha256, "shard_fingerprint": fingerprints[f"shard/{corpus}"],
            "tokenizer_fingerprint": manifest["tokenizer_fingerprint"]}
        assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "train")]


def _assert_published_pointing_at(first: dict, again: dict) -> None:
    """A cached re-run (``again``: every stage reused) still publishes its summary and the evaluation report, pointing
    at the MLflow runs of ``first``, which built the stages."""
    from lmpipe.tracking.links import mlflow_ui

    built = _stage_run_ids(first["tracking_uri"], first["mlflow_run_id"])
    assert _stage_run_ids(again["tracking_uri"], again["mlflow_run_id"]) == {}
    ui, exp = mlflow_ui(again["tracking_uri"]), again["experiment_id"]
    artifacts = _prefect_artifacts(again["flow_run_id"])
    assert artifacts[0].key == "pipeline-run-summary"
    rows = [line for line in artifacts[0].data.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == STAGES
    for label, row in zip(STAGES, rows, strict=True):
        where = "–" if label in CHUNK_STAGES else f"[{built[label]}]({ui.run(exp, built[label])})"
        assert row.startswith(f"| {label} | reused | ") and row.endswith(f" | {where} |")
    assert "Registered [lmpipe-gpt version 1]" in artifacts[0].data
    [report] = [a for a in artifacts if a.key == "evaluation-report"]
    out_dir = next(s["out_dir"] for s in again["stages"] if s["label"] == "evaluate")
    assert report.data.endswith(f"Built by MLflow run [{built['evaluate']}]({ui.run(exp, built['evaluate'])}) in "
                                f"`{out_dir}` (reused by this flow run).\n")
    assert _loss_curves_uri(again) in report.data


def test_finetuning_helps_on_its_own_domain(first_run):
    _, summary = first_run
    ev = summary["metrics"]["evaluate"]
    assert ev["finetuned.tinyshakespeare.loss"] < ev["base.tinyshakespeare.loss"]
    assert ev["finetuned.tinyshakespeare.perplexity"] == pytest.approx(
        2.718281828459045 ** ev["finetuned.tinyshakespeare.loss"], rel=1e-9)


def test_registered_model_serves_text(first_run):
    cfg, summary = first_run
    reg = summary["registered"]
    assert reg["name"] == "lmpipe-gpt" and reg["version"] == "1" and reg["alias"] == "candidate"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    assert str(client.get_model_version_by_alias("lmpipe-gpt", "candidate").version) == "1"
    # The first version is the champion: there was none to beat. The decision is on the version and the stage.
    evaluation = summary["metrics"]["evaluate"]
    assert reg["promotion"] == {"metric": "finetuned.tinyshakespeare.bits_per_byte", "mode": "min",
                                "alias": "champion", "value": evaluation[reg["promotion"]["metric"]],
                                "champion_version": None, "champion_value": None,
                                "scored": evaluation["finetuned.tinyshakespeare.tokens"], "champion_scored": None,
                                "decided": True, "promoted": True, "reason": "no @champion yet"}
    assert str(client.get_model_version_by_alias("lmpipe-gpt", "champion").version) == "1"
    assert client.get_model_version("lmpipe-gpt", "1").tags["lmpipe.promotion"] == "promoted: no @champion yet"
    finetuned = next(s["fingerprint"] for s in summary["stages"] if s["label"] == "finetune")
    assert client.get_model_version("lmpipe-gpt", "1").tags["lmpipe.finetune_fingerprint"] == finetuned
    assert client.get_model_version("lmpipe-gpt", "1").tags["lmpipe.champion_before"] == "none"
    # How much its figure was scored on, for the next gate to compare only like with like.
    assert client.get_model_version("lmpipe-gpt", "1").tags["lmpipe.metric.finetuned.tinyshakespeare.tokens"] == \
        str(int(evaluation['finetuned.tinyshakespeare.tokens']))
    mlflow.set_tracking_uri(summary["tracking_uri"])
    served = mlflow.pyfunc.load_model("models:/lmpipe-gpt@candidate")
    out = served.predict(["ROMEO:", "The"], params={"max_new_tokens": 5, "seed": 3})
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert out == served.predict(["ROMEO:", "The"], params={"max_new_tokens": 5, "seed": 3})


def test_model_commands_take_a_registry_uri_or_a_checkpoint_directory(first_run, tmp_path, capsys):
    from flows.cli import main
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.eval.samples import generate_samples
    from lmpipe.model.checkpoint import load_model

    cfg, summary = first_run
    workdir = ["--workdir", cfg.workdir]
    finetuned = next(s["out_dir"] for s in summary["stages"] if s["label"] == "finetune")
    tokenizer = next(s["out_dir"] for s in summary["stages"] if s["label"] == "train_tokenizer")

    # generate: the registered model (downloaded from the registry) and its checkpoint directory
    # (tokenizer found by fingerprint) give exactly what generate_samples gives.
    args = ["-p", "ROMEO:", "--max-new-tokens", "6", "--top-k", "5", "--seed", "2"]
    assert main(["generate", "models:/lmpipe-gpt@candidate", *workdir, *args]) == 0
    from_registry = capsys.readouterr().out
    assert main(["generate", str(Path(finetuned) / "model"), *workdir, *args]) == 0
    assert capsys.readouterr().out == from_registry
    [sample] = generate_samples(load_model(Path(finetuned) / "model"), load_tokenizer(Path(tokenizer) / "tokenizer.json"),
                                ["ROMEO:"], max_new_tokens=6, temperature=0.8, top_k=5, seed=2, device="cpu")
    assert from_registry == "ROMEO:" + sample["completion"] + "\n"
    # --chat: the prompt as a user turn of the chat template (default only for chat SFT models)
    assert main(["generate", str(Path(finetuned) / "model"), *workdir, *args, "--chat"]) == 0
    [chat] = generate_samples(load_model(Path(finetuned) / "model"), load_tokenizer(Path(tokenizer) / "tokenizer.json"),
                              ["ROMEO:"], max_new_tokens=6, temperature=0.8, top_k=5, seed=2, device="cpu", chat=True)
    assert capsys.readouterr().out == "ROMEO:" + chat["completion"] + "\n"

    # evaluate: acc / acc_norm per benchmark file
    bench = tmp_path / "short-piqa.jsonl"  # choices short enough for the tiny model's 32-token context
    bench.write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b, "label": 0}) + "\n" for g, a, b in
                             [("Open a jar", "twist the lid", "eat the lid"), ("Dry hands", "use a towel", "use water"),
                              ("Light a room", "turn on a lamp", "close the door"), ("Cut bread", "a knife", "a spoon")]))
    assert main(["evaluate", "models:/lmpipe-gpt/1", *workdir, "-b", f"piqa={bench}", "--limit", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["benchmark", "n", "acc", "acc_norm"]
    assert out[1].split()[:3] == ["piqa", "short-piqa.jsonl", "3"]
    # --text: held-out loss / perplexity / bits per byte of a file, as lmpipe.eval.heldout.score_text gives them
    from lmpipe.eval.heldout import score_text

    speech = tmp_path / "speech.txt"
    speech.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n", encoding="utf-8")
    assert main(["evaluate", str(Path(finetuned) / "model"), *workdir, "-t", str(speech), "--eval-tokens", "9"]) == 0
    out = capsys.readouterr().out.splitlines()
    r = score_text(load_model(Path(finetuned) / "model"), load_tokenizer(Path(tokenizer) / "tokenizer.json"),
                   speech.read_text(encoding="utf-8"), start_id=0, eval_tokens=9, batch_size=16, device="cpu")
    assert out[0].split() == ["text", "tokens", "bytes", "loss", "ppl", "bits/byte"]
    assert out[1].split() == ["speech.txt", "9", f"{r['bytes']:,.0f}", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}",
                              f"{r['bits_per_byte']:.4f}"]
    assert main(["evaluate", "models:/lmpipe-gpt/1", *workdir]) == 1
    assert "nothing to score: give --text FILE and/or --benchmark FORMAT=PATH" in capsys.readouterr().err
    # Bad files fail before the model is looked up (this model does not exist)
    bad = tmp_path / "bad-piqa.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "label": 0}\n', encoding="utf-8")
    assert main(["evaluate", "models:/nope@x", *workdir, "-b", f"piqa={bad}"]) == 1
    assert capsys.readouterr().err == (f"lmpipe evaluate: --benchmark 'piqa={bad}': {bad}:1: field 'sol2': missing "
                                       "(keys: ['goal', 'label', 'sol1'])\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert main(["evaluate", "models:/nope@x", *workdir, "-t", str(tmp_path / "latin1.txt")]) == 1
    assert capsys.readouterr().err == f"lmpipe evaluate: --text '{tmp_path / 'latin1.txt'}': not UTF-8 text (byte 3)\n"

    # export: a transformers directory from the registry
    assert main(["export", "models:/lmpipe-gpt@candidate", *workdir, str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert f"lm_eval --model hf --model_args pretrained={tmp_path / 'hf'}" in capsys.readouterr().out

    # bad names exit 1 with the reason, and nothing is created in the working directory
    assert main(["generate", "models:/nope@x", *workdir, "-p", "x"]) == 1
    assert "model 'models:/nope@x' could not be found" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), *workdir, "-p", "x"]) == 1
    assert "is neither a checkpoint directory" in capsys.readouterr().err
    assert main(["evaluate", str(Path(finetuned) / "model"), "--workdir", str(tmp_path), "-b", f"piqa={bench}"]) == 1
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    assert not Path("mlflow.db").exists()


def test_rerun_reuses_every_stage_and_a_model_change_reruns_only_training(first_run):
    from flows.pipeline import pipeline

    cfg, first = first_run
    # Version 1, registered by the first run, is the champion now. It is this very model, registered when there
    # was no champion: its report keeps no reference, the evaluation's inputs are unchanged, all is reused.
    again = pipeline(config=cfg)
    assert [s["status"] for s in again["stages"]] == ["reused"] * len(STAGES)
    assert [s["fingerprint"] for s in again["stages"]] == [s["fingerprint"] for s in first["stages"]]
    assert again["metrics"] == first["metrics"]
    _assert_published_pointing_at(first, again)

    changed = pipeline(config=cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_embd": 48})}))
    status = {s["label"]: s["status"] for s in changed["stages"]}
    assert status == {label: ("ran" if label in MODEL_STAGES else "reused") for label in STAGES}
    assert changed["registered"]["version"] == "2"
    # The new model's report compares it with the champion, version 1, by the figures its registration logged.
    out = Path(next(s["out_dir"] for s in changed["stages"] if s["label"] == "evaluate"))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    was, now = first["metrics"]["evaluate"], changed["metrics"]["evaluate"]
    assert {k: report["reference"][k] for k in ("name", "alias", "version")} == {
        "name": "lmpipe-gpt", "alias": "champion", "version": "1"}
    assert report["reference"]["metrics"] == {k: v for k, v in was.items() if k.startswith("finetuned.")}
    bpb = "finetuned.tinyshakespeare.bits_per_byte"
    row = next(r for r in report["compared_with_reference"] if r["metric"] == bpb)
    assert row["comparable"] and row["delta"] == now[bpb] - was[bpb]
    lines = (out / "report.md").read_text(encoding="utf-8").splitlines()
    # A table per corpus, wikitext2's first: tinyshakespeare's rows come second; their last cell is its bpb.
    assert [line for line in lines if line.startswith("| champion v1 |")][1].split(" | ")[-1] == f"{was[bpb]:.4f} |"
    delta = [line for line in lines if line.startswith("| Δ finetuned − champion v1 |")][1]
    assert delta.split(" | ")[-1] == f"{now[bpb] - was[bpb]:+.4f} |"

    parents, children = _runs(first["tracking_uri"])
    assert len(parents) == 3 and {p.info.status for p in parents} == {"FINISHED"}
    # Reused stages open no run of their own, and chunk tasks none at all.
    assert len(children) == len(STAGES) - len(CHUNK_STAGES) + len(MODEL_STAGES)
    assert _untrusted_outputs(Path(cfg.workdir)) == []


def test_deleted_outputs_are_rebuilt(first_run):
    import shutil

    from flows.pipeline import prepare_data

    cfg, first = first_run
    tok_dir = Path(next(s["out_dir"] for s in first["stages"] if s["label"] == "train_tokenizer"))
    before = (tok_dir / "tokenizer.json").read_bytes()
    shutil.rmtree(tok_dir)
    summary = prepare_data(config=cfg)
    status = {s["label"]: s["status"] for s in summary["stages"]}
    assert status["train_tokenizer"] == "ran"
    assert status["download/wikitext2"] == "reused"
    assert (tok_dir / "tokenizer.json").read_bytes() == before


def test_same_config_gives_byte_identical_tokenizer_and_shards(tmp_path):
    from flows.pipeline import prepare_data

    outputs = []
    for name in ("a", "b"):
        summary = prepare_data(config=tiny_config(tmp_path / name))
        files = {}
        for s in summary["stages"]:
            if s["label"] in ("train_tokenizer", "shard/wikitext2", "shard/tinyshakespeare"):
                out = Path(s["out_dir"])
                files.update({f"{s['label']}/{p.name}": p.read_bytes() for p in sorted(out.iterdir())
                              if p.suffix in (".json", ".bin") and p.name != RESULT_FILE})
        outputs.append(files)
    assert any(k.endswith(".bin") for k in outputs[0]) and any(k.endswith("tokenizer.json") for k in outputs[0])
    assert outputs[0] == outputs[1]


def test_sft_finetuning_and_classification_through_the_flow(tmp_path):
    """mode=sft: prompt/response JSONL instead of the fine-tuning corpus; editing the file re-runs it. A classify
    stage beside it, with its own report: it neither depends on the fine-tuning nor feeds the language model's
    evaluation and registration."""
    import json

    from flows.pipeline import pipeline

    lines = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    pairs = [(a, b) for a, b in zip(lines[0::2], lines[1::2]) if a.strip() and b.strip()][:400]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": a + "\n", "response": b}) + "\n" for a, b in pairs), encoding="utf-8")
    # Most of these pairs do not fit the tiny model's 32-token context: those are skipped and counted.
    labelled = REPO / "tests" / "fixtures" / "classify" / "corpus.csv"
    cfg = tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={sft}", "finetune.sft_skip_long=true",
                      f"classify={{path: '{labelled}', max_steps: 20, eval_interval: 10}}")
    summary = pipeline(config=cfg)
    stages = {s["label"]: s for s in summary["stages"]}
    assert [s["label"] for s in summary["stages"]][-4:] == ["finetune", "classify", "evaluate", "register"]
    assert stages["finetune"]["status"] == stages["classify"]["status"] == "ran"
    assert summary["registered"]["version"] == "1"
    # The files' content is recorded: on the stage runs that read them, and (SFT) on the registered version.
    import hashlib

    _, children = _runs(summary["tracking_uri"])
    tags = {r.data.tags["lmpipe.stage"]: r.data.tags for r in children}
    assert tags["finetune"]["lmpipe.sft_sha256"] == hashlib.sha256(sft.read_bytes()).hexdigest()
    assert tags["classify"]["lmpipe.classify_sha256"] == hashlib.sha256(labelled.read_bytes()).hexdigest()
    version = MlflowClient(tracking_uri=summary["tracking_uri"]).get_model_version("lmpipe-gpt", "1")
    assert version.tags["lmpipe.sft_sha256"] == tags["finetune"]["lmpipe.sft_sha256"]
    clf = summary["metrics"]["classify"]
    assert not any(k.startswith("classifier") for k in summary["metrics"]["evaluate"])
    report = (Path(stages["classify"]["out_dir"]) / "report.md").read_text(encoding="utf-8")
    assert (f"`{labelled}`: 40 held-out examples (160 trained on). Accuracy **{clf['accuracy']:.4f}**, "
            f"macro-F1 **{clf['macro_f1']:.4f}**.") in report
    assert "| shakespeare |" in report and "| wikitext |" in report
    # The served SFT model answers in its chat template, exactly as generate_samples' chat mode.
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.eval.samples import generate_samples
    from lmpipe.model.checkpoint import load_model

    mlflow.set_tracking_uri(summary["tracking_uri"])
    served = mlflow.pyfunc.load_model("models:/lmpipe-gpt@candidate")
    tok = load_tokenizer(Path(stages["train_tokenizer"]["out_dir"]) / "tokenizer.json")
    # The served defaults are lmpipe generate's (GENERATION_DEFAULTS): temperature 0.8, no top-k, no top-p.
    want = generate_samples(load_model(Path(stages["finetune"]["out_dir"]) / "model"), tok, ["ROMEO:"],
                            max_new_tokens=6, temperature=0.8, top_k=None, top_p=None, seed=3, device="cpu",
                            chat=True)
    assert served.predict(["ROMEO:"], params={"max_new_tokens": 6, "seed": 3}) == [want[0]["completion"]]
    assert want[0]["completion"] != generate_samples(
        load_model(Path(stages["finetune"]["out_dir"]) / "model"), tok, ["ROMEO:"], max_new_tokens=6,
        temperature=0.8, top_k=None, top_p=None, seed=3, device="cpu")[0]["completion"]

    with sft.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "Q\n", "response": "A"}) + "\n")
    again = {s["label"]: s["status"] for s in pipeline(config=cfg)["stages"]}
    assert again["pretrain"] == "reused" and again["finetune"] == "ran" and again["evaluate"] == "ran"
    assert again["classify"] == "reused"
    # A classify-only change trains a new classifier and leaves the language model's report and version alone.
    cfg = tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={sft}", "finetune.sft_skip_long=true",
                      f"classify={{path: '{labelled}', max_steps: 21, eval_interval: 10}}")
    third = pipeline(config=cfg)
    statuses = {s["label"]: s["status"] for s in third["stages"]}
    assert statuses == {label: "ran" if label == "classify" else "reused" for label in statuses}
    assert third["registered"]["version"] == "2"  # the SFT edit above registered version 2; nothing new here


def test_settings_that_cannot_change_outputs_rerun_nothing(first_run):
    from flows.pipeline import pipeline

    # Whichever version is the champion now (the n_embd=48 model may have taken it), the first model's
    # evaluation keeps the reference it had: nothing re-runs, nothing is registered again.
    cfg, _ = first_run
    quiet = cfg.model_copy(deep=True)
    quiet.pretrain.log_interval = 10
    quiet.pretrain.threads = 1
    quiet.pretrain.eval_interval += 1  # no early stopping: validations decide nothing
    quiet.data.shard.encode_batch_size = 7
    assert {s["status"] for s in pipeline(config=quiet)["stages"]} == {"reused"}

    resplit = cfg.model_copy(deep=True)
    resplit.data.pretrain.val_fraction = 0.2
    status = {s["label"]: s["status"] for s in pipeline(config=resplit)["stages"]}
    assert status["download/wikitext2"] == status["clean/wikitext2"] == status["train_tokenizer"] == "reused"
    assert status["shard/wikitext2"] == "ran" and status["pretrain"] == "ran"


def test_validation_cadence_reruns_pretraining_only_with_early_stopping(first_run):
    from flows.pipeline import pipeline

    # With early stopping the patience counts validations and the model is the best validated checkpoint, so
    # eval_interval decides the model (without it, it decides nothing: the test above).
    cfg, _ = first_run
    stopping = cfg.model_copy(deep=True)
    stopping.pretrain.early_stopping_patience = 5
    assert {s["label"]: s["status"] for s in pipeline(config=stopping)["stages"]}["pretrain"] == "ran"
    stopping.pretrain.eval_interval += 1
    status = {s["label"]: s["status"] for s in pipeline(config=stopping)["stages"]}
    assert status["pretrain"] == status["finetune"] == "ran" and status["train_tokenizer"] == "reused"
    stopping.pretrain.log_interval += 1  # still nothing
    assert {s["status"] for s in pipeline(config=stopping)["stages"]} == {"reused"}


def test_editing_a_local_corpus_in_place_reruns_the_data_stages(tmp_path):
    from flows.pipeline import prepare_data

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((DATA / "tinyshakespeare.txt").read_bytes())
    cfg = tiny_config(tmp_path / "w", f"data.finetune.sources=[{{uri: '{corpus}', doc_boundary: blank_line}}]")
    prepare_data(config=cfg)
    with corpus.open("a", encoding="utf-8") as f:
        f.write("\n\nFIRST CITIZEN:\nOne speech more.\n")
    status = {s["label"]: s["status"] for s in prepare_data(config=cfg)["stages"]}
    assert status["download/tinyshakespeare"] == "ran" and status["shard/tinyshakespeare"] == "ran"
    assert status["download/wikitext2"] == "reused" and status["train_tokenizer"] == "reused"


def test_promotion_gate_moves_champion_only_to_a_better_model(tmp_path):
    from lmpipe.tracking.registry import DECISION_TAG, METRIC_TAG, promote_if_better

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=str(tmp_path)).version) for _ in range(5)]
    metric = "finetuned.shakespeare.bits_per_byte"

    def gate(i: int, value: float, mode: str = "min") -> dict:
        return promote_if_better(client, "m", versions[i], metric, value, mode=mode, alias="champion")

    first = gate(0, 2.5)
    assert first["promoted"] and first["reason"] == "no @champion yet"
    worse = gate(1, 2.6)
    assert not worse["promoted"] and worse["champion_version"] == versions[0] and worse["champion_value"] == 2.5
    assert worse["reason"] == f"{metric} 2.6 >= 2.5 of version {versions[0]} (min wins)"
    assert str(client.get_model_version_by_alias("m", "champion").version) == versions[0]
    assert gate(2, float("nan"))["promoted"] is False  # never a non-finite figure
    better = gate(3, 2.4)
    assert better["promoted"] and str(client.get_model_version_by_alias("m", "champion").version) == versions[3]
    # Each version records its figure and the decision.
    tags = client.get_model_version("m", versions[1]).tags
    assert tags[METRIC_TAG + metric] == "2.6" and tags[DECISION_TAG].startswith("not promoted: ")
    # 'max' for accuracies: higher wins.
    assert not gate(4, 2.3, mode="max")["promoted"]


def test_promotion_gate_compares_only_figures_scored_on_as_much_data(tmp_path):
    from lmpipe.tracking.registry import DECISION_TAG, METRIC_TAG, promote_if_better

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", source=str(tmp_path)).version) for _ in range(5)]
    metric, key = "finetuned.shake.bits_per_byte", "finetuned.shake.tokens"

    def gate(i: int, value: float, tokens: float | None) -> dict:
        return promote_if_better(client, "m", versions[i], metric, value, mode="min", alias="champion",
                                 scored=None if tokens is None else (key, tokens))

    assert gate(0, 2.5, 2048)["promoted"]
    assert client.get_model_version("m", versions[0]).tags[METRIC_TAG + key] == "2048"
    # A better-looking figure on 32 tokens is not compared with one on 2,048: the champion stays.
    fewer = gate(1, 2.0, 32)
    reason = (f"not comparable: {metric} 2 vs 2.5 of version {versions[0]}, scored on 2,048 tokens then, 32 now "
              "(the champion is kept; evaluate both on as much to compare)")
    assert fewer == {"metric": metric, "mode": "min", "alias": "champion", "value": 2.0,
                     "champion_version": versions[0], "champion_value": 2.5, "scored": 32.0,
                     "champion_scored": 2048.0, "decided": True, "promoted": False, "reason": reason}
    assert client.get_model_version("m", versions[1]).tags[DECISION_TAG] == "not promoted: " + reason
    assert str(client.get_model_version_by_alias("m", "champion").version) == versions[0]
    same = gate(2, 2.4, 2048)
    assert same["promoted"] and same["reason"] == f"{metric} 2.4 < 2.5 of version {versions[0]} (min wins)"
    # A champion whose amount was never logged (the gate was not told it) compares with nothing scored.
    assert gate(3, 2.3, None)["promoted"]
    legacy = gate(4, 1.0, 2048)
    assert not legacy["promoted"] and legacy["reason"] == (
        f"not comparable: {metric} 1 vs 2.3 of version {versions[3]}, scored on an unlogged number of tokens then, "
        "2,048 now (the champion is kept; evaluate both on as much to compare)")
    # Amounts are tagged exactly: a count past six digits still compares equal to itself.
    client.create_registered_model("big")
    big = [str(client.create_model_version("big", source=str(tmp_path)).version) for _ in range(2)]
    for v, value in zip(big, (2.5, 2.4)):
        assert promote_if_better(client, "big", v, metric, value, mode="min", alias="champion",
                                 scored=(key, 1_048_577))["promoted"]
    assert client.get_model_version("big", big[0]).tags[METRIC_TAG + key] == "1048577"


def test_promotion_gate_reads_a_champion_figure_from_its_registration_run_when_untagged(tmp_path):
    """A champion promoted under another tracking.promote_metric has no tag for this one: its registration run
    logged every evaluation figure, which the gate compares with; only without one is the champion replaced."""
    from lmpipe.tracking.registry import promote_if_better

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    metric, key = "finetuned.shake.bits_per_byte", "finetuned.shake.tokens"
    run = client.create_run(exp).info.run_id
    client.log_metric(run, metric, 2.5)
    client.log_metric(run, key, 2048)
    v1 = str(client.create_model_version("m", source=str(tmp_path), run_id=run).version)
    assert promote_if_better(client, "m", v1, "finetuned.shake.loss", 1.7, mode="min", alias="champion")["promoted"]
    v2, v3, v4 = (str(client.create_model_version("m", source=str(tmp_path)).version) for _ in range(3))

    worse = promote_if_better(client, "m", v2, metric, 2.6, mode="min", alias="champion", scored=(key, 2048))
    assert not worse["promoted"] and worse["champion_value"] == 2.5 and worse["champion_scored"] == 2048.0
    assert worse["reason"] == f"{metric} 2.6 >= 2.5 of version {v1} (min wins)"
    fewer = promote_if_better(client, "m", v2, metric, 2.0, mode="min", alias="champion", scored=(key, 64))
    assert not fewer["promoted"] and fewer["reason"].startswith("not comparable: ")
    better = promote_if_better(client, "m", v3, metric, 2.4, mode="min", alias="champion", scored=(key, 2048))
    assert better["promoted"] and better["reason"] == f"{metric} 2.4 < 2.5 of version {v1} (min wins)"
    # Without the tag and without a registration run (v3 has none), there is no figure: the champion is replaced.
    client.delete_model_version_tag("m", v3, "lmpipe.metric." + metric)
    none = promote_if_better(client, "m", v4, metric, 3.0, mode="min", alias="champion", scored=(key, 2048))
    assert none["promoted"] and none["champion_value"] is None
    assert none["reason"] == (f"@champion (version {v3}) has no {metric} to compare: neither a lmpipe.metric.{metric} "
                              "tag nor a figure logged in its registration run")


def test_register_stage_tells_the_gate_how_much_its_figure_was_scored_on(tmp_path, tokenizer):
    import torch

    from lmpipe.artifacts import StageResult
    from lmpipe.config.evaluation import TrackingConfig
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.model.checkpoint import export_model
    from lmpipe.model.gpt import GPT, GPTConfig
    from lmpipe.stages.register import run_register
    from lmpipe.tracking.registry import METRIC_TAG, promote_if_better
    from lmpipe.tracking.runs import StageRun, TrackingContext
    from lmpipe.training.checkpoint import save_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    ctx = TrackingContext(uri=uri, experiment_id=exp, parent_run_id=client.create_run(exp).info.run_id,
                          workdir=str(tmp_path))
    model = GPT(GPTConfig(vocab_size=load_tokenizer(tokenizer.path("tokenizer.json")).get_vocab_size(),
                          block_size=16, n_layer=1, n_head=2, n_embd=16))
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model, torch.optim.AdamW(model.parameters()),
                           {"tokenizer_fingerprint": "tok"})
    export_model(ckpt, tmp_path / "ft" / "model")
    cfg = TrackingConfig(registered_model="m", promote_mode="max", min_held_out_examples=16)
    metric, key = "finetuned.shake.acc_norm", "finetuned.shake.n"
    client.create_registered_model("m")
    v1 = str(client.create_model_version("m", source=str(tmp_path)).version)
    promote_if_better(client, "m", v1, metric, 0.30, mode="max", alias=cfg.champion_alias, scored=(key, 200))

    run = StageRun(uri, client.create_run(exp).info.run_id)
    result = run_register(cfg, ctx, run,
                          StageResult(stage="finetune", fingerprint="ft", out_dir=str(tmp_path / "ft")), tokenizer,
                          tmp_path / "register", "reg-fp", metric=metric,
                          evaluation={metric: 0.5, key: 16.0, "finetuned.shake.acc": 0.5})
    decision = result.meta["promotion"]
    assert decision["reason"] == (f"not comparable: {metric} 0.5 vs 0.3 of version {v1}, scored on 200 examples "
                                  "then, 16 now (the champion is kept; evaluate both on as much to compare)")
    assert not decision["promoted"] and decision["scored"] == 16.0 and decision["champion_scored"] == 200.0
    assert client.get_model_version("m", result.meta["version"]).tags[METRIC_TAG + key] == "16"


def test_champion_metrics_are_those_logged_in_its_registration_run(tmp_path):
    from lmpipe.tracking.registry import CHAMPION_BEFORE_TAG, FINETUNE_TAG, champion_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert champion_metrics(uri, "m", "champion") is None  # no such model
    client.create_registered_model("m")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())

    def register(bpb: float, finetune: str, before: str) -> tuple[str, str]:
        """A version as the register stage leaves it: its figures in its run, where it came from, what it faced."""
        run = client.create_run(exp).info.run_id
        client.log_metric(run, "finetuned.shake.bits_per_byte", bpb)
        client.log_metric(run, "finetuned.shake.tokens", 300)
        client.log_metric(run, "version", 1)  # not an evaluation figure: left out
        version = str(client.create_model_version("m", source=str(tmp_path), run_id=run).version)
        client.set_model_version_tag("m", version, FINETUNE_TAG, finetune)
        client.set_model_version_tag("m", version, CHAMPION_BEFORE_TAG, before)
        return version, run

    v1, run1 = register(1.25, "ft1", "none")
    assert champion_metrics(uri, "m", "champion") is None  # no alias yet
    client.set_registered_model_alias("m", "champion", v1)
    one = {"name": "m", "alias": "champion", "version": v1, "run_id": run1,
           "metrics": {"finetuned.shake.bits_per_byte": 1.25, "finetuned.shake.tokens": 300.0}}
    assert champion_metrics(uri, "m", "champion") == one
    assert champion_metrics(uri, "m", "champion", finetune="ft2") == one  # a new model faces the champion
    # ft1 itself was registered when there was no champion: it is not compared with itself.
    assert champion_metrics(uri, "m", "champion", finetune="ft1") is None

    v2, _ = register(1.0, "ft2", v1)
    client.set_registered_model_alias("m", "champion", v2)
    assert champion_metrics(uri, "m", "champion")["version"] == v2
    # Once registered, a model keeps the reference it was first evaluated against, whoever is champion now.
    assert champion_metrics(uri, "m", "champion", finetune="ft2") == one
    assert champion_metrics(uri, "m", "champion", finetune="ft1") is None


def test_a_failed_champion_alias_move_leaves_the_version_fully_tagged(tmp_path, tokenizer, monkeypatch):
    """The register stage tags the new version (origin, figure, reference, decision) before any alias moves."""
    import torch

    from lmpipe.artifacts import StageResult
    from lmpipe.config.evaluation import TrackingConfig
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.model.checkpoint import export_model
    from lmpipe.model.gpt import GPT, GPTConfig
    from lmpipe.stages.register import run_register
    from lmpipe.tracking.registry import (
        CHAMPION_BEFORE_TAG,
        DECISION_TAG,
        FINETUNE_TAG,
        METRIC_TAG,
        champion_metrics,
        promote_if_better,
    )
    from lmpipe.tracking.runs import StageRun, TrackingContext
    from lmpipe.training.checkpoint import save_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    run = StageRun(uri, client.create_run(exp).info.run_id)
    ctx = TrackingContext(uri=uri, experiment_id=exp, parent_run_id=parent, workdir=str(tmp_path))
    model = GPT(GPTConfig(vocab_size=load_tokenizer(tokenizer.path("tokenizer.json")).get_vocab_size(),
                          block_size=16, n_layer=1, n_head=2, n_embd=16))
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model, torch.optim.AdamW(model.parameters()),
                           {"tokenizer_fingerprint": "tok"})
    export_model(ckpt, tmp_path / "ft" / "model")
    finetuned = StageResult(stage="finetune", fingerprint="ft-fp", out_dir=str(tmp_path / "ft"))
    cfg = TrackingConfig(registered_model="m")
    metric = "finetuned.shake.bits_per_byte"
    real_move = run.client.set_registered_model_alias
    moved = []

    def move(name: str, alias: str, version: str) -> None:  # the registry fails on the champion alias only
        if alias == cfg.champion_alias:
            raise RuntimeError("registry down")
        moved.append(alias)
        real_move(name, alias, version)

    monkeypatch.setattr(run.client, "set_registered_model_alias", move)
    with pytest.raises(RuntimeError, match="registry down"):
        run_register(cfg, ctx, run, finetuned, tokenizer, tmp_path / "register", "reg-fp", metric=metric,
                     evaluation={metric: 2.5})
    tags = client.get_model_version("m", "1").tags
    assert tags[FINETUNE_TAG] == "ft-fp" and tags[METRIC_TAG + metric] == "2.5"
    assert tags[CHAMPION_BEFORE_TAG] == "none" and tags[DECISION_TAG] == "promoted: no @champion yet"
    assert moved == [cfg.alias]  # every tag first, then the aliases: the champion's move was the last step
    assert champion_metrics(uri, "m", cfg.champion_alias, finetune="ft-fp") is None  # its reference is recorded
    assert champion_metrics(uri, "m", cfg.champion_alias) is None  # and no alias points at it

    # The gate alone, against a champion: the version records whom it beat although the alias stayed.
    monkeypatch.undo()
    v2, v3 = (str(client.create_model_version("m", source=str(tmp_path)).version) for _ in range(2))
    promote_if_better(client, "m", v2, metric, 2.4, mode="min", alias="champion")
    monkeypatch.setattr(client, "set_registered_model_alias", move)
    with pytest.raises(RuntimeError, match="registry down"):
        promote_if_better(client, "m", v3, metric, 2.0, mode="min", alias="champion", tags={FINETUNE_TAG: "ft3"})
    tags = client.get_model_version("m", v3).tags
    assert tags[FINETUNE_TAG] == "ft3" and tags[CHAMPION_BEFORE_TAG] == v2 and tags[METRIC_TAG + metric] == "2.0"
    assert tags[DECISION_TAG] == f"promoted: {metric} 2 < 2.4 of version {v2} (min wins)"
    assert str(client.get_model_version_by_alias("m", "champion").version) == v2


def test_an_alpaca_json_array_fine_tunes_and_too_few_held_out_examples_decide_nothing(tmp_path):
    """A published instruction file as it is (one JSON array of Alpaca records, English and Chinese) fine-tunes
    through the pipeline, its format reported; its 30 records hold out too few examples for the champion gate, so
    the version is registered undecided, and no @champion is made of it."""
    from flows.pipeline import pipeline
    from lmpipe.stages.contract import load_completed
    from lmpipe.tracking.registry import DECISION_TAG

    sft = REPO / "tests" / "fixtures" / "sft" / "identity30.json"
    cfg = tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={sft}", "finetune.sft_skip_long=true",
                      "model.block_size=64")
    summary = pipeline(config=cfg)
    stages = {s["label"]: s for s in summary["stages"]}
    meta = load_completed(Path(stages["finetune"]["out_dir"])).meta
    assert (meta["sft_format"], meta["sft_shapes"]) == ("alpaca records, JSON array", {"alpaca": 30})
    assert meta["sft_train_examples"] + meta["sft_val_examples"] + meta["sft_skipped_long"] == 30
    assert meta["sft_train_examples"] > 0 and meta["sft_val_examples"] < 30
    report = json.loads((Path(stages["evaluate"]["out_dir"]) / "report.json").read_text(encoding="utf-8"))
    assert report["sft"]["sft_format"] == "alpaca records, JSON array"

    decision = summary["registered"]["promotion"]
    n = meta["sft_val_examples"]
    assert (decision["promoted"], decision["decided"]) == (False, False)
    assert decision["reason"] == (
        f"not decided: finetuned.sft/val.bits_per_byte was scored on {n} held-out example{'s' * (n != 1)} "
        "(finetuned.sft/val.examples), fewer than tracking.min_held_out_examples=30: too few to tell the models apart "
        "(the champion is kept; score on more held-out data, or lower tracking.min_held_out_examples)")
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    version = client.get_model_version("lmpipe-gpt", summary["registered"]["version"])
    assert version.tags[DECISION_TAG] == decision["reason"] and version.aliases == ["candidate"]


def test_sft_held_out_examples_are_scored_reported_logged_and_gate_the_champion(tmp_path):
    """mode=sft: both models are also scored on the SFT file's held-out examples (sft/val, assistant targets only,
    here packed), beside the corpora: in the stage's metrics, the report's held-out table with its delta row, the
    evaluate and register runs, and as the champion gate's default metric."""
    from flows.pipeline import pipeline
    from lmpipe.stages.contract import load_completed

    lines = [" ".join(line.split()[:3]) for line in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
             .splitlines() if line.strip()]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n"
                           for a, b in zip(lines[0:400:2], lines[1:400:2])), encoding="utf-8")
    # Every 10th of these short pairs is 20 examples of ~140 reply tokens: too few for the gate, so the split holds
    # out more, up to the gate's minimums (30 examples, here 300 tokens).
    cfg = tiny_config(tmp_path / "w", "finetune.mode=sft", f"finetune.sft_path={sft}", "finetune.sft_layout=packed",
                      "finetune.sft_skip_long=true", "tracking.min_held_out_tokens=300")
    summary = pipeline(config=cfg)
    stages = {s["label"]: s for s in summary["stages"]}
    evaluation = summary["metrics"]["evaluate"]
    meta = load_completed(Path(stages["finetune"]["out_dir"])).meta
    val_examples = meta["sft_val_examples"]
    assert val_examples >= 30 and evaluation["finetuned.sft/val.tokens"] >= 300
    assert meta["sft_format"] == "prompt/completion records, JSON lines" and meta["sft_shapes"] == {
        "prompt/completion": val_examples + meta["sft_train_examples"]}
    for model in ("base", "finetuned"):
        assert evaluation[f"{model}.sft/val.examples"] == val_examples
        assert evaluation[f"{model}.sft/val.tokens"] > 0
        assert {f"{model}.sft/val.{s}" for s in ("loss", "perplexity", "bits_per_byte")} <= evaluation.keys()
        assert f"{model}.tinyshakespeare.bits_per_byte" in evaluation  # the corpora are still scored

    report = (Path(stages["evaluate"]["out_dir"]) / "report.md").read_text(encoding="utf-8").splitlines()
    # A table per corpus: a wider one would be clipped in Prefect's UI.
    assert [line for line in report if line.startswith("| model |")] == [
        "| model | wikitext2 loss | wikitext2 ppl | wikitext2 bpb |",
        "| model | tinyshakespeare loss | tinyshakespeare ppl | tinyshakespeare bpb |",
        "| model | sft/val loss | sft/val ppl | sft/val bpb |"]
    rows = {line.split(" | ")[0]: line.rstrip(" |").split(" | ")[-3:] for line in report if line.startswith("| ")}
    for model in ("base", "finetuned"):
        assert rows[f"| {model}"] == [f"{evaluation[f'{model}.sft/val.loss']:.4f}",
                                      f"{evaluation[f'{model}.sft/val.perplexity']:.2f}",
                                      f"{evaluation[f'{model}.sft/val.bits_per_byte']:.4f}"]
    delta = evaluation["finetuned.sft/val.bits_per_byte"] - evaluation["base.sft/val.bits_per_byte"]
    assert rows["| Δ finetuned − base"][-1] == f"{delta:+.4f}"

    # The champion gate compared the SFT figure, scored on as many targets; MLflow holds it under the same name.
    decision = summary["registered"]["promotion"]
    assert decision["metric"] == "finetuned.sft/val.bits_per_byte" and decision["promoted"] and decision["decided"]
    assert decision["value"] == evaluation["finetuned.sft/val.bits_per_byte"]
    assert decision["scored"] == evaluation["finetuned.sft/val.tokens"]
    _, children = _runs(summary["tracking_uri"])
    logged = {r.data.tags["lmpipe.stage"]: r.data.metrics for r in children}
    assert logged["evaluate"]["base.sft/val.bits_per_byte"] == evaluation["base.sft/val.bits_per_byte"]
    assert logged["register"]["finetuned.sft/val.tokens"] == evaluation["finetuned.sft/val.tokens"]
    tags = MlflowClient(tracking_uri=summary["tracking_uri"]).get_model_version("lmpipe-gpt", "1").tags
    assert float(tags["lmpipe.metric.finetuned.sft/val.bits_per_byte"]) == decision["value"]
