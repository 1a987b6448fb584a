"""The team set-up of the README, for real: PostgreSQL on loopback, `mlflow server` on it serving the artifacts,
and the tiny pipeline with ``tracking.uri`` pointing at the server.

The servers start once per session (``team``). PostgreSQL is the system's package: without it these tests
fail, naming what to install (``tests.servers.INSTALL_HINT``); CI installs it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import psycopg2
import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_config
from tests.flow.test_pipeline_flow import CHUNK_STAGES, STAGES
from tests.servers import MlflowServer, Postgres, free_port, mlflow_server, postgres, postgres_bindir

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="session")
def team(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL cluster and an mlflow server using it as its backend store, artifacts served by the server."""
    with postgres() as pg, mlflow_server(pg.url, tmp_path_factory.mktemp("mlflow-server")) as server:
        yield pg, server


def _timed(config: Any) -> tuple[dict, float]:
    from flows.pipeline import pipeline

    start = time.perf_counter()
    summary = pipeline(config=config)
    return summary, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(team: tuple[Postgres, MlflowServer], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny pipeline against the server, then again (every stage reused); the same two runs on the default
    SQLite store, for the timings."""
    _, server = team
    cfg = tiny_config(tmp_path_factory.mktemp("team-a"), f"tracking.uri={server.url}")
    local = tiny_config(tmp_path_factory.mktemp("sqlite"))
    # SQLite first: the module's first flow also pays for what a process does once (it is not the store's cost).
    local_first, local_first_s = _timed(local)
    first, first_s = _timed(cfg)
    again, again_s = _timed(cfg)
    local_again, local_again_s = _timed(local)
    return {"cfg": cfg, "first": first, "again": again, "local_first": local_first, "local_again": local_again,
            "seconds": {"server": (first_s, again_s), "sqlite": (local_first_s, local_again_s)}}


def test_postgresql_is_installed():
    """Named on its own: without the system's PostgreSQL this fails with what to install (never a skip)."""
    assert all((postgres_bindir() / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def _pg_rows(pg: Postgres, query: str, *args: Any) -> list[tuple]:
    con = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname=pg.database)
    try:
        with con.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())
    finally:
        con.close()


def test_runs_metrics_and_artifacts_live_on_the_server(team, runs, tmp_path):
    pg, server = team
    first, again = runs["first"], runs["again"]
    assert first["tracking_uri"] == server.url
    assert [s["label"] for s in first["stages"]] == STAGES and {s["status"] for s in first["stages"]} == {"ran"}
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name("lmpipe")
    assert exp.experiment_id == first["experiment_id"]
    # The server keeps the artifacts (--serve-artifacts): the experiment points at its proxy, not at a path here.
    assert exp.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}"
    found = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_id for r in parents) == sorted([first["mlflow_run_id"], again["mlflow_run_id"]])
    assert {r.info.status for r in found} == {"FINISHED"}
    # Stage runs come from the first run only: the second reused every stage.
    assert sorted(r.info.run_name for r in children) == sorted(label for label in STAGES if label not in CHUNK_STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {first["mlflow_run_id"]}
    by_name = {r.info.run_name: r for r in children}
    history = client.get_metric_history(by_name["pretrain"].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]
    assert by_name["pretrain"].data.params["pretrain.max_steps"] == "30"

    # Artifacts go up to the server and come back down through it, byte for byte.
    evaluate = by_name["evaluate"].info.run_id
    assert {"report.json", "report.md", "samples.json", "held_out_table.json"} <= {
        a.path for a in client.list_artifacts(evaluate)}
    local = Path(next(s["out_dir"] for s in first["stages"] if s["label"] == "evaluate")) / "report.json"
    fetched = mlflow.artifacts.download_artifacts(run_id=evaluate, artifact_path="report.json",
                                                  dst_path=str(tmp_path), tracking_uri=server.url)
    assert Path(fetched).read_bytes() == local.read_bytes()
    stored = server.artifacts / exp.experiment_id / evaluate / "artifacts" / "report.json"
    assert stored.read_bytes() == local.read_bytes()  # where --artifacts-destination says
    workdir = Path(runs["cfg"].workdir)
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()

    # And the runs are rows of the PostgreSQL database the server was started on.
    assert _pg_rows(pg, "SELECT count(*) FROM runs WHERE experiment_id = %s", int(exp.experiment_id)) == [
        (len(found),)]
    assert _pg_rows(pg, "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'train/loss'",
                    by_name["pretrain"].info.run_id) == [(max(history, key=lambda m: m.step).value,)]


def test_the_registry_and_its_aliases_live_on_the_server(team, runs, capsys):
    pg, server = team
    reg = runs["first"]["registered"]
    assert (reg["name"], reg["version"], reg["alias"], reg["existing"]) == ("lmpipe-gpt", "1", "candidate", False)
    assert reg["promotion"]["promoted"] and reg["promotion"]["reason"] == "no @champion yet"
    assert reg["aliases_now"] == {"candidate": "1", "champion": "1"}
    client = MlflowClient(tracking_uri=server.url)
    assert [v.version for v in client.search_model_versions("name='lmpipe-gpt'")] == ["1"]
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias("lmpipe-gpt", alias).version) == "1"
    version = client.get_model_version("lmpipe-gpt", "1")
    finetune = next(s["fingerprint"] for s in runs["first"]["stages"] if s["label"] == "finetune")
    assert version.tags["lmpipe.finetune_fingerprint"] == finetune
    assert version.tags["lmpipe.promotion"] == "promoted: no @champion yet"
    assert sorted(_pg_rows(pg, "SELECT alias, version FROM registered_model_aliases WHERE name = 'lmpipe-gpt'")) == [
        ("candidate", 1), ("champion", 1)]
    # The served model loads from the registry through the server and generates what the checkpoint it was
    # registered from generates.
    from flows.cli import main

    mlflow.set_tracking_uri(server.url)
    served = mlflow.pyfunc.load_model("models:/lmpipe-gpt@champion")
    out = served.predict(["ROMEO:"], params={"max_new_tokens": 4, "seed": 1})
    finetuned = Path(next(s["out_dir"] for s in runs["first"]["stages"] if s["label"] == "finetune")) / "model"
    assert main(["generate", str(finetuned), "--workdir", runs["cfg"].workdir, "-p", "ROMEO:", "--max-new-tokens", "4",
                 "--seed", "1"]) == 0
    assert ["ROMEO:" + out[0] + "\n"] == [capsys.readouterr().out]


def test_a_second_run_against_the_server_reuses_every_stage(team, runs):
    _, server = team
    first, again = runs["first"], runs["again"]
    assert [s["status"] for s in again["stages"]] == ["reused"] * len(STAGES)
    assert [s["fingerprint"] for s in again["stages"]] == [s["fingerprint"] for s in first["stages"]]
    assert again["metrics"] == first["metrics"]
    assert again["registered"]["version"] == "1" and again["registered"]["aliases_now"] == {
        "candidate": "1", "champion": "1"}
    parent = MlflowClient(tracking_uri=server.url).get_run(again["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lmpipe.stage.register"] == f"reused {first['stages'][-1]['fingerprint']}"
    assert "evaluate.finetuned.tinyshakespeare.bits_per_byte" in parent.data.metrics
    # The run's summary links to the run on the server, which is its own UI.
    from flows.summary import format_summary

    assert (f"MLflow UI:   {server.url}/#/experiments/{again['experiment_id']}/runs/{again['mlflow_run_id']}"
            "?workflowType=machine_learning" in format_summary(again, 1.0).splitlines())


def test_a_teammates_run_of_the_same_config_registers_no_second_version(team, runs, tmp_path, capfd):
    """Another work directory (another machine's) on the same server: every stage runs, the same weights come out,
    and the registry recognises them: still version 1, compared with nothing (it was the first)."""
    _, server = team
    theirs, _ = _timed(tiny_config(tmp_path / "team-b", f"tracking.uri={server.url}"))
    assert "View run" not in capfd.readouterr().out  # MLflow's line per ended run is off: the summary has the link
    assert {s["status"] for s in theirs["stages"]} == {"ran"}
    assert theirs["metrics"]["evaluate"] == runs["first"]["metrics"]["evaluate"]  # the same model (timings differ)
    assert theirs["registered"]["version"] == "1" and theirs["registered"]["existing"] is True
    assert theirs["registered"]["promotion"]["reason"] == "no @champion yet"
    client = MlflowClient(tracking_uri=server.url)
    assert [v.version for v in client.search_model_versions("name='lmpipe-gpt'")] == ["1"]


def test_model_commands_take_the_server(team, runs, tmp_path, capsys):
    from flows.cli import main

    _, server = team
    cfg, first = runs["cfg"], runs["first"]
    finetuned = Path(next(s["out_dir"] for s in first["stages"] if s["label"] == "finetune")) / "model"
    remote = ["--tracking-uri", server.url, "--workdir", str(tmp_path)]  # no store here: the server's registry
    args = ["-p", "ROMEO:", "--max-new-tokens", "6", "--top-k", "5", "--seed", "2"]
    assert main(["generate", "models:/lmpipe-gpt@champion", *remote, *args]) == 0
    from_server = capsys.readouterr().out
    assert main(["generate", str(finetuned), "--workdir", cfg.workdir, *args]) == 0
    assert capsys.readouterr().out == from_server
    assert main(["export", "models:/lmpipe-gpt/1", *remote, str(tmp_path / "hf")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"exported models:/lmpipe-gpt/1 to {tmp_path / 'hf'}\n")
    assert out.err == ""  # no progress bars (downloads, writing the weights) where stderr is not a terminal
    assert main(["export", str(finetuned), "--workdir", cfg.workdir, str(tmp_path / "hf-local")]) == 0
    capsys.readouterr()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf-local" / name).read_bytes()
    speech = tmp_path / "speech.txt"
    speech.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n", encoding="utf-8")
    assert main(["evaluate", "models:/lmpipe-gpt@candidate", *remote, "-t", str(speech), "--eval-tokens", "9"]) == 0
    from_server = capsys.readouterr().out
    assert main(["evaluate", str(finetuned), "--workdir", cfg.workdir, "-t", str(speech), "--eval-tokens", "9"]) == 0
    assert capsys.readouterr().out == from_server

    assert main(["generate", "models:/nope@x", *remote, "-p", "x"]) == 1
    assert f"model 'models:/nope@x' could not be found in {server.url}: " in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    assert main(["generate", "models:/lmpipe-gpt@champion", "--tracking-uri", dead, "-p", "x"]) == 1
    assert capsys.readouterr().err.startswith(
        f"lmpipe generate: --tracking-uri='{dead}': no MLflow tracking server answers at {dead}/health (")
    assert time.perf_counter() - start < 60  # not MLflow's minutes of retries
    assert not Path("mlflow.db").exists()


def test_verify_finds_every_stage_of_a_run_on_the_server(runs):
    from flows.verify import verify

    rows, sound = verify(runs["cfg"])
    assert sound and [r.label for r in rows] == STAGES and all(r.built for r in rows)


def test_a_server_that_does_not_answer_fails_the_run_before_any_stage(tmp_path):
    from flows.pipeline import pipeline

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config(tmp_path / "work", f"tracking.uri={dead}")
    with pytest.raises(ConnectionError) as err:
        pipeline(config=cfg)
    assert str(err.value).startswith(f"tracking.uri='{dead}': no MLflow tracking server answers at {dead}/health (")
    assert not (tmp_path / "work").exists()  # no stage started


def test_a_database_uri_keeps_artifacts_in_the_work_directory(team, tmp_path):
    """``tracking.uri`` may be the database itself (no server): its artifacts then go under the work directory,
    not into the current directory."""
    from lmpipe.config.evaluation import TrackingConfig
    from lmpipe.tracking.runs import close_run, open_pipeline_run

    pg, _ = team
    con = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname=pg.database)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute('CREATE DATABASE "direct"')
    con.close()
    uri = f"postgresql://{pg.user}@127.0.0.1:{pg.port}/direct"
    ctx = open_pipeline_run(TrackingConfig(uri=uri), tmp_path, run_name="direct", params={"x": 1}, tags={})
    close_run(ctx, ctx.parent_run_id, "FINISHED")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(ctx.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert client.get_run(ctx.parent_run_id).data.params == {"x": "1"}


def test_flow_time_on_the_server_against_sqlite(runs, capsys):
    """The timings, printed (not asserted): the same tiny runs on the server and on the default SQLite store."""
    (server_cold, server_cached), (sqlite_cold, sqlite_cached) = runs["seconds"]["server"], runs["seconds"]["sqlite"]
    assert runs["local_first"]["tracking_uri"].startswith("sqlite:///")
    assert runs["local_first"]["metrics"]["evaluate"] == runs["first"]["metrics"]["evaluate"]  # only the store differs
    assert [s["status"] for s in runs["local_again"]["stages"]] == ["reused"] * len(STAGES)
    def stages(summary: dict) -> str:  # the stages' own time, and registration's (where the store counts most)
        seconds = {s["label"]: s["seconds"] for s in summary["stages"]}
        return f"stages {sum(seconds.values()):.1f} s, register {seconds['register']:.1f} s"

    with capsys.disabled():
        print(f"\ntiny pipeline, flow time: mlflow server on PostgreSQL {server_cold:.1f} s cold "
              f"({stages(runs['first'])}), {server_cached:.1f} s cached; SQLite store {sqlite_cold:.1f} s cold "
              f"({stages(runs['local_first'])}), {sqlite_cached:.1f} s cached")
