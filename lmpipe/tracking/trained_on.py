"""What a registered model was trained on, kept in MLflow: it outlives the work directory.

The register stage logs the record (``lmpipe.data.increments.TrainedOn``) as ``trained_on.json`` in the
version's run and puts its figures on the version as tags; a continual run reads it back from the
``@champion`` to know which documents are new."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from lmpipe.data.increments import RECORD_FILE, TrainedOn
from lmpipe.tracking.registry import alias_holder, missing_store
from lmpipe.tracking.runs import client_for

TAG = "lmpipe.trained_on"  # + ".documents", ".bytes", ".files", ".runs", ".sha256": the record's figures


def record_trained_on(client: MlflowClient, run_id: str, name: str, version: str, record: TrainedOn) -> None:
    """The record as ``trained_on.json`` of the version's run, and its figures as tags of the version."""
    client.log_dict(run_id, record.to_json(), RECORD_FILE)
    for key, value in (("corpus", record.corpus), ("documents", record.documents), ("bytes", record.bytes),
                       ("files", record.files()), ("runs", record.runs), ("sha256", record.digest())):
        client.set_model_version_tag(name, version, f"{TAG}.{key}", str(value))


def champion_trained_on(uri: str, name: str, alias: str) -> tuple[Any, TrainedOn | None] | None:
    """The version ``name@alias`` points at and its record (None if it was registered without one); None when
    there is no such version (or no store yet)."""
    if missing_store(uri) is not None:
        return None
    client = client_for(uri)
    version = alias_holder(client, name, alias)
    if version is None:
        return None
    if f"{TAG}.sha256" not in version.tags or not version.run_id:
        return version, None
    where = f"models:/{name}/{version.version} (run {version.run_id})"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=RECORD_FILE,
                                                        dst_path=tmp, tracking_uri=uri)
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(f"{where}: its {RECORD_FILE} could not be read: {err.message}") from None
        record = TrainedOn.from_json(json.loads(Path(local).read_text(encoding="utf-8")), where)
    if record.digest() != version.tags[f"{TAG}.sha256"]:
        raise ValueError(f"{where}: {RECORD_FILE} has sha256 {record.digest()}, the version's tag "
                         f"{TAG}.sha256 says {version.tags[f'{TAG}.sha256']}")
    return version, record
