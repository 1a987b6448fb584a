"""Where a person opens an MLflow run, experiment or model version, and the runs' descriptions that link back.

No MLflow import: only the UI's routes. A tracking URI ``http(s)://...`` is a server, and its
UI is that same address. Any other store (a SQLite file, a database URL) has no server: the UI
is what ``mlflow ui --backend-store-uri <uri> --port 5000`` serves at 127.0.0.1:5000, and the
links carry that command (``MlflowUI.command``) so a reader can start it.

MLflow 3 opens an experiment on its GenAI pages (traces, evaluations), where the runs and the
model registry are hidden; ``?workflowType=machine_learning`` opens the "Model training" view.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from pydantic import BaseModel

LOCAL_UI = "http://127.0.0.1:5000"
WORKFLOW = "?workflowType=machine_learning"  # the classic runs view and the registry in MLflow 3's UI
NOTE_TAG = "mlflow.note.content"  # a run's description: the MLflow UI renders it as markdown


@dataclass(frozen=True)
class MlflowUI:
    """The MLflow UI for one tracking URI: ``base`` (no trailing slash) and, where no server serves the
    store, the ``command`` that starts one on it."""

    base: str
    command: str | None = None

    def experiment(self, experiment_id: str) -> str:
        """The experiment's runs (MLflow 3: the "Model training" view, not the GenAI traces page)."""
        return f"{self.base}/#/experiments/{experiment_id}{WORKFLOW}"

    def run(self, experiment_id: str, run_id: str) -> str:
        return f"{self.base}/{run_page(experiment_id, run_id)}"

    def model_version(self, name: str, version: str) -> str:
        return f"{self.base}/#/models/{quote(name, safe='')}/versions/{version}{WORKFLOW}"

    def where(self, url: str) -> str:
        """``url`` as a reader can use it: with the command that starts the UI first, when there is no server."""
        return url if self.command is None else f"{url} (start the UI first: `{self.command}`)"


def run_page(experiment_id: str, run_id: str) -> str:
    """A run's page relative to the UI's address: what a link inside the MLflow UI (a run's description) uses, so it
    works whatever address or port the UI was opened at."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{WORKFLOW}"


def mlflow_ui(tracking_uri: str) -> MlflowUI:
    """The UI that shows ``tracking_uri``'s runs: the server itself, or ``mlflow ui`` started on the store."""
    if tracking_uri.startswith(("http://", "https://")):
        return MlflowUI(tracking_uri.rstrip("/"))
    return MlflowUI(LOCAL_UI, f"mlflow ui --backend-store-uri {tracking_uri} --port 5000")


def link(text: str, url: str | None) -> str:
    """A markdown link, or the text in backticks when there is no URL."""
    return f"[{text}]({url})" if url else f"`{text}`"


class FlowRunRef(BaseModel):
    """The orchestrator's run that opened the MLflow runs: id, name, UI page (None on a temporary API, which has
    no UI) and, without a page, where to see it (``hint``)."""

    id: str
    name: str | None = None
    url: str | None = None
    hint: str | None = None

    def tags(self) -> dict[str, str]:
        return {"prefect.flow_run_id": self.id, **({"prefect.flow_run_url": self.url} if self.url else {})}

    def note(self) -> str:
        """The sentence that names the flow run in an MLflow run's description (markdown)."""
        name = self.name or self.id
        if self.url:
            return f"Prefect flow run {link(name, self.url)} (id `{self.id}`)."
        return (f"Prefect flow run `{name}` (id `{self.id}`), on a temporary Prefect API with no UI"
                + (f": {self.hint}." if self.hint else "."))
