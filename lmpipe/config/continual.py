"""Continual runs (the lmpipe-continual flow): what is trained when new documents reach the pretraining corpus."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lmpipe.config.training import Training


class ContinualConfig(Training):
    """Continued pretraining of the @champion on the documents no earlier run trained on, mixed with replayed
    earlier data; then fine-tuning, evaluation and the champion gate as configured for the pipeline.

    The number of steps follows the new data: ``epochs`` passes over the new training tokens and their replay
    share, at most ``max_steps`` and at least ``min_steps``."""

    SECTION: ClassVar[str] = "continual"

    replay_fraction: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="Share of the continued pretraining's tokens taken from earlier data (the corpus the first "
                    "model was trained on), against forgetting; 0 trains on the new documents alone.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the new training tokens (with their replay "
                                                   "share) that set the number of steps.")
    min_steps: int = Field(10, ge=1, description="Fewest optimizer steps of a continual run with new data.")
    max_steps: int = Field(300, ge=1, description="Most optimizer steps of a continual run, however much is new.")
    learning_rate: float = Field(6e-4, gt=0.0, description="Peak learning rate (lower than pretraining's: the "
                                                           "weights are trained already).")
    min_lr: float = Field(6e-5, ge=0.0, description="Where the cosine decay ends, at the last step.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warm-up from 0 to learning_rate.")
    min_new_documents: int = Field(1, ge=1, description="Fewer new documents than this: the run reports them and "
                                                        "trains nothing (they wait for the next run).")
