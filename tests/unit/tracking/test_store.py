"""The work directory's MLflow store only ever appears complete: real processes SIGKILLed while they create it,
two creating it at once, and stores left half-built by MLflow's own in-place creation."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401 - imported before any fork

from lmpipe.config.evaluation import TrackingConfig
from lmpipe.tracking.runs import open_pipeline_run
from lmpipe.tracking.store import STORE_FILE, StoreError, check_store, default_store


def fork(child: Callable[[], None]) -> int:
    """A real child process running ``child`` (this process's imports already loaded: it starts at once)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            child()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or minus the signal that killed it."""
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def leftovers(workdir: Path) -> list[str]:
    names = [p.name for p in workdir.iterdir()] if workdir.is_dir() else []
    return sorted(n for n in names if n not in (STORE_FILE, "mlartifacts"))


def test_a_kill_while_the_store_is_created_never_leaves_a_store_later_runs_cannot_open(tmp_path):
    killed_mid_build = []
    for i, delay in enumerate([0.0, 0.05, 0.2, 0.5, 0.9]):
        workdir = tmp_path / str(i)
        db = workdir / STORE_FILE
        pid = fork(lambda db=db: default_store(db, (db.parent / "mlartifacts").as_uri()))
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        if db.exists():  # the child got as far as moving its store into place: then it is complete
            check_store(db)
            assert [e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()] == ["Default"]
        elif leftovers(workdir):  # killed while MLflow migrated its temporary copy
            killed_mid_build.append(workdir)
    # Most kills land while MLflow builds the store (it takes a second or more); they leave only a hidden copy.
    assert killed_mid_build
    for workdir in killed_mid_build:
        assert all(name.startswith(".mlflow.db.") and ".tmp" in name for name in leftovers(workdir))
    # The next run creates the store, and removes the copy of the killed process.
    workdir = killed_mid_build[0]
    ctx = open_pipeline_run(TrackingConfig(), workdir, "next", {}, {})
    assert MlflowClient(ctx.uri).get_run(ctx.parent_run_id).info.status == "RUNNING"
    assert leftovers(workdir) == []
    check_store(workdir / STORE_FILE)


def test_two_processes_creating_the_store_at_once_both_use_one_store(tmp_path):
    db = tmp_path / STORE_FILE
    go_read, go_write = os.pipe()

    def create(name: str) -> None:
        os.read(go_read, 1)  # both start building at the same moment
        default_store(db, (tmp_path / "mlartifacts").as_uri())
        MlflowClient(f"sqlite:///{db}").create_experiment(name)

    pids = [fork(lambda n=n: create(n)) for n in ("first", "second")]
    os.write(go_write, b"gg")
    assert [wait(pid) for pid in pids] == [0, 0]
    assert sorted(e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()) == [
        "Default", "first", "second"]
    assert leftovers(tmp_path) == []


def _half_built(db: Path, until: str | None) -> None:
    """A store as MLflow's own in-place creation leaves it when killed: its first tables only (``until`` None),
    or migrated up to revision ``until``."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    if until is not None:
        with engine.begin() as connection:
            config = _get_alembic_config(str(engine.url))
            config.attributes["connection"] = connection
            command.upgrade(config, until)
    engine.dispose()


def test_a_half_built_store_is_reported_naming_the_file_and_what_to_do(tmp_path):
    import mlflow
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(""))
    head = script.get_current_head()
    older = script.get_revision(head).down_revision
    version = f"MLflow {mlflow.__version__}"

    def opened(workdir: Path) -> str:
        with pytest.raises(StoreError) as err:
            open_pipeline_run(TrackingConfig(), workdir, "r", {}, {})
        return str(err.value)

    # Killed after MLflow created its first tables, before the schema revisions.
    (tmp_path / "a").mkdir()
    _half_built(tmp_path / "a" / STORE_FILE, None)
    assert opened(tmp_path / "a") == (
        f"the MLflow store {tmp_path / 'a' / STORE_FILE} is incomplete: it has no schema revision, and holds no "
        "runs and no registered models: its creation was interrupted (a run killed while MLflow created its "
        "tables). Delete it (or move it aside) and run again: a new store is created.")

    # Killed in the middle of the migrations: the raw error MLflow gives is "table ... already exists".
    (tmp_path / "b").mkdir()
    _half_built(tmp_path / "b" / STORE_FILE, "0584bdc529eb")
    assert opened(tmp_path / "b") == (
        f"the MLflow store {tmp_path / 'b' / STORE_FILE} is incomplete: it is at schema revision 0584bdc529eb, not "
        f"at {version}'s {head}, and holds no runs and no registered models: its creation was interrupted (a run "
        "killed while MLflow created its tables). Delete it (or move it aside) and run again: a new store is "
        "created.")

    # A store with runs at an older revision: upgrade it, or move it aside.
    ctx = open_pipeline_run(TrackingConfig(), tmp_path / "c", "r", {}, {})
    with sqlite3.connect(tmp_path / "c" / STORE_FILE) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (older,))
    store = tmp_path / "c" / STORE_FILE
    assert opened(tmp_path / "c") == (
        f"the MLflow store {store} is incomplete: it is at schema revision {older}, not at {version}'s {head}, "
        f"and holds 1 runs and 0 registered models. If an older MLflow made it, back it up and run `mlflow db "
        f"upgrade sqlite:///{store.as_posix()}`; if that fails (its schema change was interrupted), move it aside "
        "and run again: a new store is created, and the runs and models in the old one are no longer this work "
        "directory's.")
    assert ctx.uri == f"sqlite:///{store.as_posix()}"

    # A newer MLflow's store, and a file that is no database at all.
    with sqlite3.connect(store) as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    assert opened(tmp_path / "c") == (
        f"the MLflow store {store} is at schema revision f00dfeedbeef, which {version} does not know: a newer "
        "MLflow made it. Use that MLflow version, or another work directory.")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / STORE_FILE).write_bytes(b"not a database, " * 100)
    assert opened(tmp_path / "d") == (
        f"the MLflow store {tmp_path / 'd' / STORE_FILE} cannot be read (file is not a database): it is not an "
        "MLflow database, or it is damaged. Move it aside (the runs in it are lost to this work directory) and "
        "run again: a new store is created.")


def test_a_configured_tracking_uri_is_used_as_given(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mine.db'}"
    ctx = open_pipeline_run(TrackingConfig(uri=uri), tmp_path / "w", "r", {}, {})
    assert ctx.uri == uri and (tmp_path / "mine.db").is_file()
    assert not (tmp_path / "w" / STORE_FILE).exists() and leftovers(tmp_path / "w") == []
