"""The work directory's own MLflow store, ``sqlite:///<workdir>/mlflow.db``: it only ever appears complete.

MLflow creates a SQLite store in place, on first use, by running its schema migrations
one after the other. A process killed in the middle leaves a file that no later run can
open (``duplicate column name``, ``table ... already exists``, naming no file), and two
processes creating the same store at once collide in the migrations. So lmpipe builds
the store aside, in a temporary file of the same directory that MLflow migrates fully,
and moves it into place with a hard link, which fails if another process put its store
there first: the loser removes its copy and uses the winner's.

A store that is there already is checked: at this MLflow's schema revision, or a
``StoreError`` naming the file and saying what to do. A store given as ``tracking.uri``
is the user's and is used as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import sqlite3
from pathlib import Path

from lmpipe.artifacts import fsync_path
from lmpipe.processes import probe, process_start

STORE_FILE = "mlflow.db"


class StoreError(RuntimeError):
    """The work directory's MLflow store cannot be used as it is; the message names it and says what to do."""


def _start_digest(start: str | None) -> str:
    return hashlib.sha256(start.encode()).hexdigest()[:12] if start else "unknown"


def _temp_name(db: Path) -> Path:
    """Unique per process, and naming it (host, pid, start time) so a copy left by a killed process is known."""
    return db.with_name(f".{db.name}.{socket.gethostname()}.{os.getpid()}.{_start_digest(process_start())}."
                        f"{secrets.token_hex(4)}.tmp")


def _remove_stale_temps(db: Path) -> None:
    """Remove the temporary stores (and their journals) of this host's processes that are gone."""
    pattern = re.compile(rf"^\.{re.escape(db.name)}\.(.+)\.(\d+)\.([0-9a-f]+|unknown)\.[0-9a-f]+\.tmp(-journal)?$")
    for path in db.parent.glob(f".{db.name}.*.tmp*"):
        m = pattern.match(path.name)
        if m is None or m.group(1) != socket.gethostname():
            continue  # another host's: it may still be building
        alive, start = probe(int(m.group(2)))
        if not alive or (start is not None and m.group(3) != "unknown" and _start_digest(start) != m.group(3)):
            path.unlink(missing_ok=True)


def _migrate(path: Path, artifact_uri: str) -> None:
    """Open ``path`` with MLflow's SQLAlchemy store: every table, the schema at MLflow's head revision, the
    Default experiment (its artifacts under ``artifact_uri``). Then close it again."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{path.as_posix()}"
    try:
        SqlAlchemyStore(uri, artifact_uri)
    finally:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)  # no connection to a removed file
        if engine is not None:
            engine.dispose()


def _build(db: Path, artifact_uri: str) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(db)
    tmp = _temp_name(db)
    try:
        _migrate(tmp, artifact_uri)
        fsync_path(tmp)
        try:
            os.link(tmp, db)  # atomic, and never replaces a store another process put there first
        except FileExistsError:
            pass  # it did: that one is used, ours is removed below
        except OSError:  # a file system without hard links: rename if absent (a concurrent creator may win twice)
            if not db.exists():
                os.rename(tmp, db)
        fsync_path(db.parent)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _revisions() -> tuple[str, set[str]] | None:
    """MLflow's head schema revision and every revision it knows, or None if its migrations cannot be read."""
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        script = ScriptDirectory.from_config(_get_alembic_config(""))
        heads = script.get_heads()
        return (heads[0], {r.revision for r in script.walk_revisions()}) if len(heads) == 1 else None
    except Exception:  # an MLflow whose internals moved: MLflow's own checks still apply when it opens the store
        return None


def check_store(db: Path) -> None:
    """Raise ``StoreError`` unless ``db`` is a complete MLflow store at this MLflow's schema revision."""
    db = Path(db)
    try:
        # read-write, not read-only: a store killed while writing has a hot journal that SQLite must roll back
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=60)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = con.execute("SELECT version_num FROM alembic_version").fetchone() if (
                "alembic_version" in tables) else None
            counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
                      for t in ("runs", "registered_models") if t in tables}
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"the MLflow store {db} cannot be read ({err}): it is not an MLflow database, or it is "
                         f"damaged. Move it aside (the runs in it are lost to this work directory) and run again: "
                         f"a new store is created.") from None
    revision = row[0] if row else None
    known = _revisions()
    if known is None or revision == known[0]:
        return
    head, revisions = known
    if revision is not None and revision not in revisions:
        raise StoreError(f"the MLflow store {db} is at schema revision {revision}, which {_mlflow_version()} does "
                         "not know: a newer MLflow made it. Use that MLflow version, or another work directory.")
    state = ("it has no schema revision" if revision is None
             else f"it is at schema revision {revision}, not at {_mlflow_version()}'s {head}")
    if not any(counts.values()):
        raise StoreError(f"the MLflow store {db} is incomplete: {state}, and holds no runs and no registered "
                         "models: its creation was interrupted (a run killed while MLflow created its tables). "
                         "Delete it (or move it aside) and run again: a new store is created.")
    raise StoreError(f"the MLflow store {db} is incomplete: {state}, and holds {counts.get('runs', 0)} runs and "
                     f"{counts.get('registered_models', 0)} registered models. If an older MLflow made it, back it "
                     f"up and run `mlflow db upgrade sqlite:///{db.resolve().as_posix()}`; if that fails (its "
                     "schema change was interrupted), move it aside and run again: a new store is created, and the "
                     "runs and models in the old one are no longer this work directory's.")


def _mlflow_version() -> str:
    import mlflow

    return f"MLflow {mlflow.__version__}"


def default_store(db: Path, artifact_uri: str) -> None:
    """Make ``db`` (``<workdir>/mlflow.db``) a complete MLflow store: built aside if missing, else checked.

    ``artifact_uri``: where the Default experiment MLflow creates with the store keeps its artifacts.
    """
    db = Path(db)
    if not db.exists():
        _build(db, artifact_uri)
    check_store(db)
