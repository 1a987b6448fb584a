"""The forms of an MLflow model URI that lmpipe resolves, and which tracking URIs are servers (nothing heavy
imported: the CLI's help and its summary use them)."""

from __future__ import annotations

from urllib.parse import urlsplit

MODEL_URI_FORMS = ("models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
                   "models:/m-<model id>, runs:/<run id>/model")


def is_model_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def is_server_uri(uri: str | None) -> bool:
    """Whether ``uri`` names an MLflow tracking server (``http://host:port``), which keeps the artifacts."""
    return bool(uri) and urlsplit(str(uri)).scheme in ("http", "https")
