"""What a flow needs around its tasks: the MLflow parent run and a ledger of stage outcomes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast
from uuid import UUID

from prefect import get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.task_runners import TaskRunner

from flows.runners import chunk_runner
from flows.summary import prefect_server_command, summary_markdown
from lmpipe.artifacts import StageResult
from lmpipe.config.data import RunnerConfig
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.stages.lease import STALE_ENV
from lmpipe.tracking.links import FlowRunRef
from lmpipe.tracking.registry import current_aliases
from lmpipe.tracking.runs import (
    TrackingContext,
    close_run,
    open_pipeline_run,
    record_failure,
    set_parent_summary,
    stage_run_that_built,
)


class StageRunner(Protocol):
    """What the flows hand their stages to: the Ledger (runs them), or lmpipe verify's plan (locates them)."""

    def run(self, stage_task: Any, label: str | None = None, **params: Any) -> StageResult: ...

    def map(self, chunk_task: Any, label: str, chunks: Sequence[str], **params: Any) -> list[StageResult]: ...


@dataclass
class StageOutcome:
    stage: str
    label: str
    fingerprint: str
    status: str  # "ran", or "reused": its finished directory was there (or another run built it meanwhile)
    seconds: float
    out_dir: str


@dataclass
class Ledger:
    """Runs stage tasks, notes for each whether it ran or came from cache, and how long it took."""

    outcomes: list[StageOutcome] = field(default_factory=list)
    results: dict[str, StageResult] = field(default_factory=dict)
    runner_cfg: RunnerConfig = field(default_factory=RunnerConfig)
    _stack: ExitStack = field(default_factory=ExitStack)
    _runner: TaskRunner | None = None

    def run(self, stage_task: Any, label: str | None = None, **params: Any) -> StageResult:
        start = time.perf_counter()
        label = label or stage_task.name
        # The flow's label names the task run and the stage's MLflow run: which corpus a data stage is for.
        result, status = _settle(stage_task.with_options(task_run_name=label)(**params, label=label,
                                                                                 return_state=True))
        self.outcomes.append(StageOutcome(result.stage, label, result.fingerprint, status,
                                          time.perf_counter() - start, result.out_dir))
        self.results[label] = result
        get_run_logger().info("%-26s %-6s %6.1fs  %s", label, status, self.outcomes[-1].seconds, result.out_dir)
        return result

    def map(self, chunk_task: Any, label: str, chunks: Sequence[str], **params: Any) -> list[StageResult]:
        """Run ``chunk_task`` once per chunk on the chunk runner; results in chunk order.

        Every chunk runs to its end before the first failure (if any) fails the stage, so a resumed run
        only does the chunks that are missing: the others are reused from their finished directories.
        """
        start = time.perf_counter()
        named = chunk_task.with_options(task_run_name=f"{label} {{chunk}}")  # e.g. clean_chunk/wikitext2 part-...
        futures = self._chunk_runner().map(named, {"chunk": list(chunks),
                                                        **{k: unmapped(v) for k, v in params.items()}})
        futures.wait()
        results: list[StageResult] = []
        counts = {"ran": 0, "reused": 0}
        for future in futures:
            result, status = _settle(future.state)
            counts[status] += 1
            results.append(result)
        seen = [k for k, v in counts.items() if v]
        # One word when every chunk fared the same, like a single stage; else the mix, e.g. "1 ran, 5 reused".
        status = seen[0] if len(seen) == 1 else ", ".join(f"{counts[k]} {k}" for k in seen)
        seconds = time.perf_counter() - start
        chunks_done = f"{len(results)} chunk{'' if len(results) == 1 else 's'}"
        self.outcomes.append(StageOutcome(chunk_task.name, label, chunks_done, status, seconds,
                                          str(Path(results[0].out_dir).parent) if results else ""))
        get_run_logger().info("%-26s %-6s %6.1fs  %d chunks on %s", label, status, seconds, len(results),
                              self.runner_cfg.kind)
        return results

    def _chunk_runner(self) -> TaskRunner:
        if self._runner is None:
            self._runner = self._stack.enter_context(chunk_runner(self.runner_cfg))
        return self._runner

    def close(self) -> None:
        """Shut the chunk runner down (a Dask cluster's processes with it)."""
        self._stack.close()
        self._runner = None

    def summary(self, ctx: TrackingContext) -> dict[str, Any]:
        """What the run produced and where: returned by the flow and printed by the CLI."""
        return {
            "tracking_uri": ctx.uri,
            "experiment_id": ctx.experiment_id,
            "mlflow_run_id": ctx.parent_run_id,
            "flow_run_id": ctx.flow_run.id if ctx.flow_run else None,
            "workdir": ctx.workdir,
            "stages": [o.__dict__ for o in self.outcomes],
            "metrics": {label: r.metrics for label, r in self.results.items()},
            "registered": registered_now(ctx, self.results.get("register")),
        }


def registered_now(ctx: TrackingContext, result: StageResult | None) -> dict[str, Any] | None:
    """The register stage's outcome, and the version each of its aliases points at now (``aliases_now``).

    A reused register stage's outcome is that of its first run: the aliases may have moved since.
    """
    if result is None:
        return None
    meta = result.meta
    aliases = (meta["alias"],) + ((meta["promotion"]["alias"],) if meta.get("promotion") else ())
    return {**meta, "aliases_now": current_aliases(ctx.uri, meta["name"], tuple(dict.fromkeys(aliases)))}


def _settle(state: Any) -> tuple[StageResult, str]:
    """A finished task's result and whether it "ran" or was "reused" from its finished directory.

    Raises the task's error, so the flow fails with it.
    """
    result: StageResult = state.result()
    return result, "reused" if result.meta.get("reused") else "ran"


@contextmanager
def _library_logs_to_prefect() -> Iterator[None]:
    """The ``lmpipe`` logger's lines into the flow run's log while the flow runs, as PREFECT_LOGGING_EXTRA_LOGGERS
    does when it is set before prefect is first imported (the CLI and the deployments set it; a flow called
    from Python may not)."""
    library = logging.getLogger("lmpipe")
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in library.handlers] if flow_run.id else []
    level = library.level
    for handler in added:
        library.addHandler(handler)
    if level == logging.NOTSET:
        library.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            library.removeHandler(handler)
        library.setLevel(level)


def _this_flow_run() -> FlowRunRef | None:
    """The Prefect flow run this code runs in (None outside one), with its UI page when the API has a UI: a
    temporary API (``lmpipe run`` without PREFECT_API_URL) has none, and its runs are seen by starting a server on
    the same PREFECT_HOME."""
    if not flow_run.id:
        return None
    has_ui = PREFECT_UI_URL.value() is not None
    return FlowRunRef(id=str(flow_run.id), name=flow_run.name, url=flow_run.ui_url if has_ui else None,
                      hint=None if has_ui else f"`{prefect_server_command()}` shows it at "
                                                     f"http://127.0.0.1:4200/flow-runs/flow-run/{flow_run.id}")


@dataclass
class SummaryArtifact:
    """The flow run's first artifact (markdown, ``summary_markdown``): where its MLflow runs are, published as the
    flow starts and completed in place when it ends (stages, the run that built each, the registered version)."""

    flow_name: str
    artifact_id: UUID | None = None

    def publish(self, ctx: TrackingContext, ledger: Ledger, status: str) -> None:
        if ctx.flow_run is None:
            return
        summary = ledger.summary(ctx)
        runs = {o.label: stage_run_that_built(ctx.uri, ctx.experiment_id, o.fingerprint)
                for o in ledger.outcomes if o.label in ledger.results}  # chunk tasks have no run of their own
        markdown = summary_markdown(summary, self.flow_name, status, runs)
        if self.artifact_id is None:
            created = create_markdown_artifact(
                markdown=markdown, key=f"{self.flow_name}-run-summary",
                description="Where this run's records are: its MLflow run, each stage's, the registered version")
            self.artifact_id = cast(UUID, created)  # called from a flow's (synchronous) body: not a coroutine
        else:
            with get_client(sync_client=True) as client:
                client.update_artifact(self.artifact_id, ArtifactUpdate(data=markdown))


@contextmanager
def tracked_flow(config: PipelineConfig, flow_name: str) -> Iterator[tuple[TrackingContext, Ledger]]:
    """The flow's MLflow parent run: FINISHED if the flow body succeeds, FAILED if it raises; and, in a Prefect
    flow run, its summary artifact (``SummaryArtifact``), the run's first, completed when the body ends.

    When the body raises, its error is the one that propagates: closing the chunk runner and
    recording the summary and the FAILED status go as far as they can, and what fails among them
    is logged as a warning (``record_failure``), since the store may fail for the body's reason
    (a full disk). After a successful body their errors are raised.
    """
    with _library_logs_to_prefect():
        # Every process of this run (chunk workers, torchrun ranks) inherits how long a silent lease stands.
        os.environ[STALE_ENV] = repr(config.lease_stale_s)
        # Against a tracking server MLflow prints "View run ... at: <url>" for every run it ends (the CLI's
        # output, the worker's log): the summary has the run's link.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        tags = {"lmpipe.flow": flow_name, "lmpipe.config_name": config.name}
        ctx = open_pipeline_run(config.tracking, config.workdir, run_name=f"{flow_name}-{flow_run.name or 'local'}",
                                params=config.model_dump(mode="json"), tags=tags, flow_run=_this_flow_run())
        ledger = Ledger(runner_cfg=config.data.runner)
        summary = SummaryArtifact(flow_name)
        summary.publish(ctx, ledger, "running")
        try:
            yield ctx, ledger
        except BaseException as err:
            failed = f"failed ({type(err).__name__}; the flow run's log says why)"
            record_failure("shut the chunk runner down", ledger.close)
            record_failure(f"put the stage summary on MLflow run {ctx.parent_run_id}",
                           lambda: set_parent_summary(ctx, ledger.results, [o.__dict__ for o in ledger.outcomes]))
            record_failure(f"mark MLflow run {ctx.parent_run_id} FAILED",
                           lambda: close_run(ctx, ctx.parent_run_id, "FAILED"))
            record_failure("complete the run's summary artifact",
                           lambda: summary.publish(ctx, ledger, failed))
            raise
        try:
            ledger.close()
            set_parent_summary(ctx, ledger.results, [o.__dict__ for o in ledger.outcomes])
        finally:
            close_run(ctx, ctx.parent_run_id, "FINISHED")
        summary.publish(ctx, ledger, "finished")
