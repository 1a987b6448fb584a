"""The training stages' share of the machine: slots of Prefect's global concurrency limit ``gpu``.

A run started from the UI and the scheduled run would otherwise train on the same
devices at once. A training task takes as many slots as the processes it trains
with (at most the whole limit) before it opens its MLflow run, and gives them back
when it ends, so the second run's training waits in the queue (its log says so).

The limit is the Prefect server's: when the first training task finds none, it
creates ``gpu`` with one slot per device it sees (its CUDA devices, or 1 without
any); ``prefect gcl create gpu --limit N`` beforehand (or ``prefect gcl update``)
sets another size. With the ephemeral API of a plain ``lmpipe run`` there is no
server that runs share, and slots a killed run held would never be given back
(nothing reaps an ephemeral API's leases), so no slot is taken there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import task_run
from prefect.settings import get_current_settings

GPU_LIMIT = "gpu"
WAIT_NOTICE_S = 2.0  # a wait longer than this is logged


def default_slots() -> int:
    """One slot per device of this machine: its CUDA devices, or 1 without any."""
    import torch

    return max(1, torch.cuda.device_count())


def ensure_limit(name: str = GPU_LIMIT) -> int:
    """The size of global concurrency limit ``name``, created with ``default_slots()`` if there is none."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        slots = default_slots()
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:  # another run created it meanwhile
            return client.read_global_concurrency_limit_by_name(name).limit
    get_run_logger().info("created Prefect's global concurrency limit %r with %d slot(s), one per device "
                          "(`prefect gcl update %s --limit N` to change it)", name, slots, name)
    return slots


@contextmanager
def device_slots(devices: int, name: str = GPU_LIMIT) -> Iterator[None]:
    """Hold ``devices`` slots (at most the whole limit) of ``name`` while training; waits for them if taken."""
    if get_current_settings().api.url is None:  # the ephemeral API: nothing shared to queue on
        yield
        return
    size = ensure_limit(name)
    occupy = min(devices, size)
    if occupy < 1:  # a limit of 0 slots would never grant one: say so instead of waiting forever
        raise ValueError(f"Prefect's global concurrency limit {name!r} has 0 slots; "
                         f"`prefect gcl update {name} --limit N` to let training run")
    logger = get_run_logger()
    start = time.monotonic()
    # Said only when the slots are taken (a quiet log otherwise): another run is training.
    waiting = threading.Timer(WAIT_NOTICE_S, logger.info, args=(
        "waiting for %d of the %d slot(s) of Prefect's concurrency limit %r: another run is training",
        occupy, size, name))
    waiting.start()
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None
    try:
        with concurrency(name, occupy=occupy, holder=holder):
            waiting.cancel()
            if time.monotonic() - start >= WAIT_NOTICE_S:
                logger.info("got %d slot(s) of %r after %.0f s", occupy, name, time.monotonic() - start)
            yield
    finally:
        waiting.cancel()
