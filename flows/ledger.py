"""What a flow needs around its tasks: the MLflow parent run and a ledger of stage outcomes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from lmpipe.config import PipelineConfig
from lmpipe.stage import StageResult, load_completed
from lmpipe.tracking import TrackingContext, close_run, open_pipeline_run, set_parent_summary


@dataclass
class StageOutcome:
    stage: str
    label: str
    fingerprint: str
    status: str  # "ran", "cached" (Prefect's cache) or "reused" (ran, found its finished files on disk)
    seconds: float
    out_dir: str


@dataclass
class Ledger:
    """Runs stage tasks, notes for each whether it ran or came from cache, and how long it took."""

    outcomes: list[StageOutcome] = field(default_factory=list)
    results: dict[str, StageResult] = field(default_factory=dict)

    def run(self, stage_task: Any, label: str | None = None, **params: Any) -> StageResult:
        start = time.perf_counter()
        state = stage_task(**params, return_state=True)
        result: StageResult = state.result()  # raises the stage's error: the flow fails with it
        cached = state.name == "Cached"
        if cached and load_completed(Path(result.out_dir)) is None:
            # The cache remembers a result whose files are gone (workdir cleaned): compute it again.
            state = stage_task.with_options(refresh_cache=True)(**params, return_state=True)
            result, cached = state.result(), False
        label = label or result.stage
        status = "cached" if cached else "reused" if result.meta.get("reused") else "ran"
        self.outcomes.append(StageOutcome(result.stage, label, result.fingerprint, status,
                                          time.perf_counter() - start, result.out_dir))
        self.results[label] = result
        get_run_logger().info("%-26s %-6s %6.1fs  %s", label, status, self.outcomes[-1].seconds, result.out_dir)
        return result

    def summary(self, ctx: TrackingContext) -> dict[str, Any]:
        """What the run produced and where: returned by the flow and printed by the CLI."""
        return {
            "tracking_uri": ctx.uri,
            "experiment_id": ctx.experiment_id,
            "mlflow_run_id": ctx.parent_run_id,
            "workdir": ctx.workdir,
            "stages": [o.__dict__ for o in self.outcomes],
            "metrics": {label: r.metrics for label, r in self.results.items()},
            "registered": self.results["register"].meta if "register" in self.results else None,
        }


@contextmanager
def tracked_flow(config: PipelineConfig, flow_name: str) -> Iterator[tuple[TrackingContext, Ledger]]:
    """The flow's MLflow parent run: FINISHED if the flow body succeeds, FAILED if it raises."""
    tags = {"lmpipe.flow": flow_name, "lmpipe.config_name": config.name}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_url"] = str(flow_run.ui_url or "")
    ctx = open_pipeline_run(config.tracking, config.workdir, run_name=f"{flow_name}-{flow_run.name or 'local'}",
                            params=config.model_dump(mode="json"), tags=tags,
                            flow_run_id=str(flow_run.id) if flow_run.id else None)
    ledger = Ledger()
    status = "FAILED"
    try:
        yield ctx, ledger
        status = "FINISHED"
    finally:
        try:
            set_parent_summary(ctx, ledger.results, [o.__dict__ for o in ledger.outcomes])
        finally:
            close_run(ctx, ctx.parent_run_id, status)
