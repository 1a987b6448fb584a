"""What a failed run tells people: which stage failed and why, in one line, and where to read more.

``describe_failure`` finds the failed stage (the flow run's failed task run, as the Prefect
API records it) and the error's first line; the CLI prints it, and ``notify_failure``, the
flows' ``on_failure`` hook, posts it to a webhook: the Prefect Webhook block named by
``LMPIPE_NOTIFY_BLOCK`` (default ``lmpipe-failures``). No such block: nothing is sent. A
notification that cannot be sent is a warning in the run's log, never a second failure.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.logging.loggers import flow_run_logger
from prefect.utilities.urls import url_for

from tasks.stages import one_line

BLOCK_ENV = "LMPIPE_NOTIFY_BLOCK"  # the Webhook block's name; empty: no notifications
DEFAULT_BLOCK = "lmpipe-failures"
# A task run's final state reaches the API shortly after the task ends: how long to wait for one still running.
SETTLE_S = 10.0
_UNFINISHED = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING}


@dataclass(frozen=True)
class Failure:
    """A failed flow run, as a person needs it first."""

    flow_run: str  # its name
    url: str | None  # its page in the Prefect UI, when a UI is known (not with the ephemeral API)
    stage: str | None  # the failed task run's name (``pretrain``, ``clean/wikitext2``); None: before any stage
    error: str  # ``Type: first line of the message``

    def headline(self) -> str:
        return f"{'failed at ' + self.stage if self.stage else 'failed'}: {self.error}"

    def message(self) -> str:
        where = self.url or f"flow run {self.flow_run}"
        return f"lmpipe run {self.flow_run} {self.headline()}\n{where}"


def failed_stage(flow_run_id: UUID | str, settle_s: float = SETTLE_S) -> str | None:
    """The name of the flow run's first failed task run; None when none failed (the flow failed outside a
    stage). Waits up to ``settle_s`` for task runs whose final state the API has not recorded yet."""
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))]))
    deadline = time.monotonic() + settle_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            failed = sorted((r for r in runs if r.state_type in (StateType.FAILED, StateType.CRASHED)),
                            key=lambda r: r.end_time.timestamp() if r.end_time else float("inf"))
            if failed:
                return failed[0].name
            if not any(r.state_type in _UNFINISHED for r in runs) or time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def describe_failure(flow_run: Any, error: BaseException) -> Failure:
    """The Failure of ``flow_run`` (a Prefect FlowRun) that raised ``error``."""
    return Failure(flow_run=flow_run.name, url=url_for(flow_run), stage=failed_stage(flow_run.id),
                   error=one_line(error))


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` hook: post the failure to the configured Webhook block, if there is one."""
    logger = flow_run_logger(flow_run, flow)
    name = os.environ.get(BLOCK_ENV, DEFAULT_BLOCK)
    if not name:
        return
    from prefect.blocks.webhook import Webhook
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        # In a sync hook load() returns the block itself, not a coroutine.
        webhook: Webhook = Webhook.load(name)  # type: ignore[assignment]
    except ValueError:  # no block of that name: notifications are not set up
        logger.debug("no Webhook block %r: no failure notification sent", name)
        return
    try:
        error = state.result(raise_on_failure=False)
        failure = describe_failure(flow_run, error if isinstance(error, BaseException) else
                                   RuntimeError(state.message or state.name))
        payload = {"text": failure.message(), "flow_run": failure.flow_run, "flow_run_id": str(flow_run.id),
                   "url": failure.url, "stage": failure.stage, "error": failure.error}
        response: Any = run_coro_as_sync(webhook.call(payload))
        response.raise_for_status()
    except Exception as err:  # noqa: BLE001 - the run's own failure is what matters; this is a footnote
        logger.warning("could not send the failure notification to Webhook block %r: %s", name, one_line(err))
