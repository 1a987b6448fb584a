"""Stage register: log the fine-tuned model, register it, move the aliases through the champion gate."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmpipe.artifacts import StageResult
from lmpipe.config.evaluation import TrackingConfig
from lmpipe.data.increments import TrainedOn
from lmpipe.tracking.registry import (
    DECISION_TAG,
    FINETUNE_TAG,
    held_out_shortfall,
    promote_if_better,
    recorded_decision,
    register_model,
    scored_key,
)
from lmpipe.tracking.runs import StageRun, TrackingContext
from lmpipe.tracking.serving import served_requirements
from lmpipe.tracking.trained_on import record_trained_on


def run_register(cfg: TrackingConfig, ctx: TrackingContext, run: StageRun, finetuned: StageResult,
                 tokenizer: StageResult, out_dir: Path, fingerprint: str, *, metric: str,
                 evaluation: dict[str, float], trained_on: dict[str, Any] | None = None,
                 lineage: Mapping[str, str] | None = None) -> StageResult:
    """The register stage: the fine-tuned model logged, registered and aliased, the promotion gate
    applied to ``evaluation[metric]``; the outcome on disk and on the stage's run. ``trained_on``: the record of
    the pretraining files the model was trained on (``TrainedOn.to_json``), kept with the version.

    Killed and run again, it completes the registration instead of repeating it: the version these
    weights already are is found (``register_model``), and the gate decides for it unless it did
    already, in which case its recorded decision is returned and the aliases put where it says
    (``recorded_decision``). ``lineage``: what the model was made from, tagged on the version
    (``lmpipe.tracking.registry.lineage_tags``).
    """
    from lmpipe.artifacts import BuildOutput, write_json_atomic
    from lmpipe.stages.contract import run_stage

    if metric not in evaluation:
        raise ValueError(f"tracking.promote_metric={metric!r} is not in the evaluation ({sorted(evaluation)})")
    key = scored_key(metric)
    # How much the figure was scored on, for the gate to compare it only with a figure scored on as much.
    scored = (key, evaluation[key]) if key is not None and key in evaluation else None
    too_little = held_out_shortfall(metric, evaluation, min_examples=cfg.min_held_out_examples,
                                    min_tokens=cfg.min_held_out_tokens)

    def build(tmp: Path) -> BuildOutput:
        # The evaluation figures the caller logged are in the run before a version points at it: champion_metrics
        # reads them from the version's run, which may be this one even if this stage is killed.
        run.flush()
        info = register_model(run, cfg, finetuned.path("model"), Path(tokenizer.out_dir), served_requirements(),
                              finetune=finetuned.fingerprint, lineage=lineage)
        if trained_on is not None:  # before the gate moves an alias: a continual run reads it from the @champion
            record_trained_on(run.client, run.run_id, cfg.registered_model, info["version"],
                              TrainedOn.from_json(trained_on, "trained_on"))
        decision = recorded_decision(run.client, cfg.registered_model, info["version"], alias=cfg.champion_alias,
                                     aliases=(cfg.alias,))
        if decision is None:
            # Where the version came from (and, tagged by the gate, what it was up against): champion_metrics finds
            # its reference again. Every tag is written before cfg.alias and the champion alias move.
            decision = promote_if_better(run.client, cfg.registered_model, info["version"], metric,
                                         evaluation[metric], mode=cfg.promote_mode, alias=cfg.champion_alias,
                                         tags={FINETUNE_TAG: finetuned.fingerprint}, aliases=(cfg.alias,),
                                         scored=scored, too_little=too_little)
        info["promotion"] = decision
        run.set_tags({DECISION_TAG: info["promotion"]["reason"],
                      DECISION_TAG + ".promoted": info["promotion"]["promoted"],
                      DECISION_TAG + ".decided": info["promotion"].get("decided", True)})
        write_json_atomic(tmp / "registration.json", {**info, "tracking_uri": ctx.uri})
        return BuildOutput(metrics={"version": float(info["version"]),
                                    "promoted": float(info["promotion"]["promoted"]),
                                    "decided": float(info["promotion"].get("decided", True))}, meta=info)

    return run_stage("register", fingerprint, out_dir, build)
