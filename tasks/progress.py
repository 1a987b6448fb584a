"""A Prefect progress artifact that training updates as it goes (the terminal gets a tqdm bar)."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class PrefectProgress:
    """Callable `(done, total)`: shows a stage's percentage in the Prefect UI."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.artifact_id: Any = None  # the progress artifact, created on the first call
        self.last = -1.0

    def __call__(self, done: int, total: int) -> None:
        percent = round(100.0 * done / max(total, 1), 1)
        if percent == self.last:
            return
        description = f"{self.stage}: step {done} of {total}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=f"{self.stage}-progress", description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)
        self.last = percent
