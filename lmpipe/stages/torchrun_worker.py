"""What each torchrun process runs: the training loop on its share of every batch; rank 0 logs to MLflow.

Started as ``python -m lmpipe.stages.torchrun_worker SPEC`` by ``lmpipe.training.launch``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from lmpipe.training.distributed import DistContext, shutdown
from lmpipe.training.launch import (
    ERROR_PREFIX,
    FATAL_ERRORS,
    PROGRESS_PREFIX,
    SUMMARY_FILE,
    TORCHRUN_PID_ENV,
    die_with_parent,
)

# ---------------------------------------------------------------- the worker (one per process)


def _worker(spec_path: Path) -> None:
    if TORCHRUN_PID_ENV in os.environ:  # started by lmpipe's launcher: end with torchrun, however it ends
        die_with_parent(signal.SIGKILL, int(os.environ[TORCHRUN_PID_ENV]))
    from lmpipe.config.training import TrainConfig, model_config
    from lmpipe.data.shards import TokenSplit
    from lmpipe.tracking.runs import StageRun
    from lmpipe.training.data import TrainData
    from lmpipe.training.loop import summary_json, train

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    train_cfg = TrainConfig.model_validate(spec["train"])
    ctx = DistContext.from_env(train_cfg.distributed.strategy, train_cfg.distributed.backend)
    run = StageRun.from_env() if ctx.is_main else None

    def progress(done: int, total: int) -> None:
        print(f"{PROGRESS_PREFIX}{done}/{total}", flush=True)

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum} (torchrun stops the other ranks when one fails)")

    # torchrun sends SIGTERM to the surviving ranks: unwind, so rank 0's buffered metrics reach MLflow.
    signal.signal(signal.SIGTERM, terminated)
    try:
        summary = train(
            model_config(spec["model"]), train_cfg, spec["vocab_size"],
            TrainData(TokenSplit(Path(spec["shards"]), "train"), TokenSplit(Path(spec["shards"]), "val")),
            Path(spec["work_dir"]), tokenizer_fingerprint=spec["tokenizer_fingerprint"],
            log_metrics=run.log_metrics if run else None, on_progress=progress if ctx.is_main else None,
            stop_after=spec.get("stop_after"), dist_ctx=ctx,
        )
        if ctx.is_main:
            tmp = spec_path.parent / (SUMMARY_FILE + ".tmp")
            tmp.write_text(json.dumps(summary_json(summary)), encoding="utf-8")
            os.replace(tmp, spec_path.parent / SUMMARY_FILE)
    except BaseException as err:
        from lmpipe.training.step import TrainingDivergedError

        kind = "fatal" if isinstance(err, (*FATAL_ERRORS, TrainingDivergedError)) else "transient"
        print(f"{ERROR_PREFIX}rank {ctx.rank} {kind}: {type(err).__name__}: {' '.join(str(err).split())}",
              flush=True)
        raise
    finally:
        # torchrun's SIGTERM may come while the error unwinds: it must not cut the last metrics' flush short
        # (torchrun waits before it sends SIGKILL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if run is not None:
            try:
                run.flush()
            except Exception as err:  # noqa: BLE001 - never hide the training error behind a tracking one
                print(f"could not send the last metrics to MLflow: {err}", flush=True)
        shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
