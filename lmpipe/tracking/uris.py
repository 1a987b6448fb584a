"""The forms of an MLflow model URI that lmpipe resolves (nothing heavy imported: the CLI's help shows them)."""

from __future__ import annotations

MODEL_URI_FORMS = ("models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
                   "models:/m-<model id>, runs:/<run id>/model")


def is_model_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))
