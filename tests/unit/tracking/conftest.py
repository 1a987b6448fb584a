"""A complete MLflow store built once per session; a test's work directory starts with a copy of it (building
one takes seconds: MLflow runs every schema migration)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmpipe.tracking.store import STORE_FILE, default_store

    root = tmp_path_factory.mktemp("store-template")
    default_store(root / STORE_FILE, (root / "mlartifacts").as_uri())
    return root / STORE_FILE


@pytest.fixture
def workdir(tmp_path: Path, store_template: Path) -> Path:
    """A work directory whose mlflow.db is a fresh copy of a complete, empty store."""
    shutil.copyfile(store_template, tmp_path / store_template.name)
    return tmp_path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.messages.append(record.getMessage())


@pytest.fixture
def lmpipe_warnings() -> Iterator[list[str]]:
    """The warnings lmpipe logs during the test, whatever handlers Prefect's logging set-up installed."""
    handler = _Records()
    logger = logging.getLogger("lmpipe")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
