"""The continual flow on the tiny config: the first model, a run with nothing new, new files and appended
articles, and a lost work directory (the record of what was trained on lives in MLflow)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmpipe.data.increments import TrainedOn
from tests.conftest import DATA, tiny_config
from tests.flow.test_pipeline_flow import _prefect_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TITLE = re.compile(r"^ = [^=].* = $")


def _articles() -> list[str]:
    """WikiText-2 validation cut into its articles (each starts at a " = Title = " line)."""
    lines = (DATA / "wikitext2-valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if TITLE.match(line.rstrip("\n"))] + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Sources, a config on them, and an MLflow store and artifact store outside the work directory."""
    root = tmp_path_factory.mktemp("continual")
    src, store, artifacts = root / "src", root / "store", root / "artifacts"
    src.mkdir()
    store.mkdir()
    articles = _articles()
    (src / "a.txt").write_text("".join(articles[:30]), encoding="utf-8")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("lmpipe", artifact_location=artifacts.as_uri())  # a team's server would
    cfg = tiny_config(root / "work", f"data.pretrain.sources=[{{uri: '{src}/*.txt', doc_boundary: wikitext_title}}]",
                      f"tracking.uri={uri}", "continual.max_steps=20", "continual.min_steps=4")
    return cfg, src, articles


def _version_record(uri: str, version: str) -> tuple[dict, TrainedOn]:
    client = MlflowClient(uri)
    v = client.get_model_version("lmpipe-gpt", version)
    local = client.download_artifacts(v.run_id, "trained_on.json")
    return v.tags, TrainedOn.from_json(json.loads(Path(local).read_text()), "test")


def _parent(uri: str, run_id: str):
    return MlflowClient(uri).get_run(run_id).data


def _report(summary: dict) -> list[str]:
    """The lines of the flow run's continual-report artifact (one per run)."""
    [report] = [a for a in _prefect_artifacts(summary["flow_run_id"]) if a.key == "continual-report"]
    return report.data.splitlines()


def _champion(uri: str) -> str:
    return str(MlflowClient(uri).get_model_version_by_alias("lmpipe-gpt", "champion").version)


def _held_out(summary: dict) -> tuple[dict, dict]:
    """The origin's validation split as sharded (tokens, documents, bytes, each shard's sha256), and how much of
    each corpus the evaluation scored."""
    shard = next(s["out_dir"] for s in summary["stages"] if s["label"] == "shard/wikitext2")
    manifest = json.loads((Path(shard) / "manifest.json").read_text())
    scored = {k: v for k, v in summary["metrics"]["evaluate"].items() if k.endswith(".tokens")}
    return manifest["splits"]["val"], scored


def test_continual_line(line):
    from flows.continual import continual

    cfg, src, articles = line
    uri = cfg.tracking.uri
    # 1. No champion yet: the first model of the line, from scratch, with the record of what it read.
    clock = time.perf_counter()
    first = continual(config=cfg)
    seconds = {"first": time.perf_counter() - clock}
    labels = [s["label"] for s in first["stages"]]
    assert "pretrain" in labels and "continue" not in labels
    assert first["registered"]["promotion"]["promoted"] is True
    tags, record = _version_record(uri, first["registered"]["version"])
    a_bytes = (src / "a.txt").stat().st_size
    assert [[f.name for f in s] for s in record.trained] == [[str(src / "a.txt")]]
    assert record.trained[0][0].bytes == a_bytes and record.origin == record.trained
    assert record.documents == 30 and record.runs == 1
    assert tags["lmpipe.trained_on.documents"] == "30" and tags["lmpipe.trained_on.sha256"] == record.digest()
    held_out = _held_out(first)
    assert held_out[0]["documents"] > 0 and set(held_out[1]) == {
        f"{model}.{corpus}.tokens" for model in ("base", "finetuned") for corpus in ("wikitext2", "tinyshakespeare")}
    champion_before = (f"Champion before: version 1, trained on 1 files, 30 documents, {a_bytes:,} bytes in 1 "
                       "training run(s).")

    # 2. Nothing new: no stage runs, a report that says so, the figures on the parent run.
    clock = time.perf_counter()
    quiet = continual(config=cfg)
    seconds["nothing new"] = time.perf_counter() - clock
    assert quiet["stages"] == [] and quiet["registered"] is None
    data = _parent(uri, quiet["mlflow_run_id"])
    assert data.tags["lmpipe.continual.outcome"] == "nothing new"
    assert data.metrics["continual.new_bytes"] == 0.0 and data.metrics["continual.steps"] == 0.0
    assert _report(quiet) == ["# Continual run: nothing new", "", champion_before, "",
                              "Nothing new in the pretraining files since then: nothing was trained."]

    # 3a. A new file whose only document cleaning removes (control characters, which strip_control takes out):
    # no document left, reported with the clean stage's account, nothing trained, the run succeeds.
    (src / "junk.txt").write_bytes(b"\x01\x02\x03\n")
    cleaned = continual(config=cfg)
    assert [s["label"] for s in cleaned["stages"]] == [
        "champion/lmpipe-gpt", "download/wikitext2.new", "clean_chunk/wikitext2.new", "clean/wikitext2.new"]
    assert cleaned["registered"] is None and _champion(uri) == "1"
    assert _parent(uri, cleaned["mlflow_run_id"]).tags["lmpipe.continual.outcome"] == "too little new"
    assert _report(cleaned) == [
        "# Continual run: too little new", "", champion_before, "",
        "Only 0 new documents after cleaning (continual.min_new_documents is more): nothing was trained; they "
        "count again next run.", "",
        "No new document survived cleaning: data.pretrain: no document survived cleaning (1 documents, 4 bytes "
        "in). strip_control removed the most: 4 of the 4 bytes (1 of the 1 documents); documents removed per "
        "step: strip_control 1 (4 bytes). Relax data.clean.strip_control (now True), or check that "
        "data.pretrain.sources hold the text you expect.", "",
        "| source | file | what | from byte | bytes |", "|---|---|---|---:|---:|",
        f"| 0 | {src / 'junk.txt'} | new | 0 | 4 |"]
    (src / "junk.txt").unlink()  # never recorded as trained on: the next runs do not miss it

    # 3. One new article, with continual.min_new_documents=5: reported, not trained on; it counts next time.
    with open(src / "a.txt", "a", encoding="utf-8") as f:
        f.write(articles[30])
    patient = cfg.model_copy(update={"continual": cfg.continual.model_copy(update={"min_new_documents": 5})})
    waiting = continual(config=patient)
    assert [s["label"] for s in waiting["stages"]] == [
        "champion/lmpipe-gpt", "download/wikitext2.new", "clean_chunk/wikitext2.new", "clean/wikitext2.new"]
    assert waiting["registered"] is None
    data = _parent(uri, waiting["mlflow_run_id"])
    assert data.tags["lmpipe.continual.outcome"] == "too little new"
    assert data.metrics["continual.new_documents"] == 1.0 and data.metrics["continual.steps"] == 0.0

    # 4. Ten more articles appended to a.txt and a new file of five: only the sixteen new ones are encoded, and
    # trained on with replay.
    with open(src / "a.txt", "a", encoding="utf-8") as f:
        f.write("".join(articles[31:41]))
    (src / "b.txt").write_text("".join(articles[41:46]), encoding="utf-8")
    clock = time.perf_counter()
    grown = continual(config=cfg)
    seconds["new data"] = time.perf_counter() - clock
    labels = [s["label"] for s in grown["stages"]]
    assert labels[:2] == ["champion/lmpipe-gpt", "download/wikitext2.new"]
    assert {"continue", "finetune", "evaluate", "register"} <= set(labels) and "pretrain" not in labels
    assert "train_tokenizer" not in labels  # the champion's tokenizer encodes the new documents
    new = next(s for s in grown["stages"] if s["label"] == "download/wikitext2.new")
    assert grown["metrics"]["download/wikitext2.new"]["documents"] == 16.0, new
    trained = grown["metrics"]["continue"]
    assert 4 <= trained["steps"] <= 20 and trained["replay_tokens"] > 0
    assert trained["replay_share"] == pytest.approx(0.25, abs=0.01)
    data = _parent(uri, grown["mlflow_run_id"])
    assert data.tags["lmpipe.continual.outcome"] == "trained"
    assert data.metrics["continual.new_files"] == 2.0
    assert data.metrics["continual.new_bytes"] == (src / "a.txt").stat().st_size - a_bytes + (
        src / "b.txt").stat().st_size
    assert data.metrics["continual.new_documents"] == 16.0
    version = grown["registered"]["version"]
    assert version == "2"
    decision = grown["registered"]["promotion"]
    report = _report(grown)
    appended, b_bytes = (src / "a.txt").stat().st_size - a_bytes, (src / "b.txt").stat().st_size
    assert report[:3] == ["# Continual run: trained", "", champion_before]
    table = report.index("| source | file | what | from byte | bytes |")
    assert report[table + 2:table + 4] == [f"| 0 | {src / 'a.txt'} | appended | {a_bytes:,} | {appended:,} |",
                                           f"| 0 | {src / 'b.txt'} | new | 0 | {b_bytes:,} |"]
    assert report[table + 4:] == [
        "", f"Trained {trained['steps']:.0f} steps on {trained['new_tokens']:,.0f} new tokens (16 new documents) "
            f"and {trained['replay_tokens']:,.0f} replayed tokens (replay share {trained['replay_share']:.2f}).", "",
        f"**lmpipe-gpt version 2: {'promoted to' if decision['promoted'] else 'not promoted to'} @champion** "
        f"({decision['reason']})"]
    # The alias follows the recorded decision: the new version if promoted, else still the first.
    tag = MlflowClient(uri).get_model_version("lmpipe-gpt", "2").tags["lmpipe.promotion"]
    assert tag.startswith("promoted: " if decision["promoted"] else "not promoted: ")
    assert _champion(uri) == ("2" if decision["promoted"] else "1")
    assert _held_out(grown) == held_out  # the same held-out set, scored on as much
    _, after = _version_record(uri, version)
    assert after.runs == 2 and after.documents == 46 and after.origin == record.origin
    assert sorted(f.name for f in after.trained[0]) == [str(src / "a.txt"), str(src / "b.txt")]
    promoted = grown["registered"]["promotion"]["promoted"]

    # 5. The work directory lost, and five more articles: the record comes from MLflow, the champion's files are
    # downloaded, the origin (held-out set, replay pool) rebuilt from the first bytes of today's files.
    shutil.rmtree(cfg.workdir)
    (src / "c.txt").write_text("".join(articles[46:51]), encoding="utf-8")
    clock = time.perf_counter()
    again = continual(config=cfg)
    seconds["work dir lost"] = time.perf_counter() - clock
    print("continual flow seconds:", {k: round(v, 1) for k, v in seconds.items()}, "promoted:", promoted)
    status = {s["label"]: s["status"] for s in again["stages"]}
    assert {status[k] for k in ("champion/lmpipe-gpt", "shard/wikitext2", "continue", "register")} == {"ran"}
    assert again["metrics"]["download/wikitext2.new"]["documents"] == (5.0 if promoted else 21.0)
    assert _parent(uri, again["mlflow_run_id"]).tags["lmpipe.continual.outcome"] == "trained"
    _, last = _version_record(uri, again["registered"]["version"])
    assert last.origin == record.origin and str(src / "c.txt") in [f.name for f in last.trained[0]]
    assert _held_out(again) == held_out
    # One experiment, one parent run per flow run: the runs line up in MLflow's charts.
    runs = [first, quiet, cleaned, waiting, grown, again]
    client = MlflowClient(uri)
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    parents = [r for r in everywhere if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_id for r in parents) == sorted(s["mlflow_run_id"] for s in runs)
    assert {r.info.experiment_id for r in parents} == {s["experiment_id"] for s in runs} == {
        client.get_experiment_by_name("lmpipe").experiment_id}
    assert len({s["flow_run_id"] for s in runs}) == len(runs)

    # 6. A config whose model is not the champion's shape fails before anything is encoded or trained.
    with open(src / "c.txt", "a", encoding="utf-8") as f:
        f.write(articles[51])
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_layer": 3})})
    with pytest.raises(Exception, match=r"(?s)^model \(against lmpipe-gpt@champion\): .*model.n_layer: checkpoint has 2, config has 3"):
        continual(config=other)
    assert not list((Path(cfg.workdir) / "download").glob("*.partial"))
    # the origin, the five articles of step 5, the fine-tuning corpus: nothing of this run
    assert len(list((Path(cfg.workdir) / "download").iterdir())) == 3
