"""Early stopping: the best validation loss so far, its step, and whether the run has stopped."""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """Stop after ``patience`` validations (``eval_interval`` steps apart) without a better val loss.

    The record (best val loss, best step, stopped) goes into every regular
    checkpoint, so a resumed run continues it and a run that stopped early stays
    stopped. ``recorded_best`` is the best step the newest regular checkpoint
    records: its best/ checkpoint must outlive newer bests, since a resume replays
    from there and (on a GPU, not bit for bit) may not find the newer best again.
    ``patience=None``: never stops, records nothing better.
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0, eval_interval: int = 1,
                 state: dict[str, Any] | None = None) -> None:
        self.patience, self.min_delta, self.eval_interval = patience, min_delta, eval_interval
        state = state or {"best_val_loss": None, "best_step": None, "stopped": False}
        self.best_val_loss: float | None = state["best_val_loss"]
        self.best_step: int | None = state["best_step"]
        self.stopped: bool = state["stopped"]
        self.recorded_best: int | None = self.best_step

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    def update(self, step: int, val_loss: float) -> bool:
        """Take the validation loss of ``step``; True when it is the new best (its weights are to be kept)."""
        if self.patience is None:
            return False
        if self.best_val_loss is None or val_loss < self.best_val_loss - self.min_delta:
            self.best_val_loss, self.best_step = val_loss, step
            return True
        assert self.best_step is not None
        if (step - self.best_step) // self.eval_interval >= self.patience:
            self.stopped = True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step, "stopped": self.stopped}

    def mark_recorded(self) -> None:
        """A regular checkpoint now holds the record: older bests are out of any resume's reach."""
        self.recorded_best = self.best_step
