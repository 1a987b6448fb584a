"""The Prefect task runner that runs the per-chunk data tasks, chosen by ``data.runner``.

The flows themselves keep Prefect's default runner; only the mapped chunk tasks
(clean_chunk, encode_chunk) go through this one, started once per flow run and
shut down when the flow ends. Every chunk task writes its own fingerprinted
directory and the reducing stage reads them in chunk order, so the output is
byte-identical whichever runner computed the chunks.
"""

from __future__ import annotations

import logging
import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from lmpipe.config.data import RunnerConfig


def chunk_runner(cfg: RunnerConfig) -> TaskRunner:
    """A fresh, not yet started task runner for ``cfg``."""
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner  # only needed, and only imported, for Dask

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    # One single-threaded worker process per slot: the tokenizer and the filters release no GIL worth sharing.
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "silence_logs": logging.WARNING})
