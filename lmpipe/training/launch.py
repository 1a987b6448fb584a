"""Starting a torchrun job from a stage: one process per device, their output streamed, their errors classed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SPEC_FILE = "distributed_spec.json"
SUMMARY_FILE = "distributed_summary.json"
PROGRESS_PREFIX = "lmpipe-progress "  # lines the launcher turns into on_progress calls
ERROR_PREFIX = "lmpipe-error "  # a rank's exception, in one line, for the launcher's error message


class DistributedTrainingError(RuntimeError):
    """torchrun or one of its processes failed; the message holds each rank's error and the last lines.

    ``retryable`` is False when a rank failed on something a retry would meet again
    (bad data or settings, a diverged loss) and True when a process died or lost
    its peers (killed, out of memory, a network or device fault): then a retry
    resumes from the last checkpoint.
    """

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[type, tuple[str, bool]]:  # Prefect persists failed states: keep it picklable
        return type(self), (str(self), self.retryable)


# A rank failing with one of these would fail again on a retry.
FATAL_ERRORS = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError,
          FileNotFoundError, PermissionError)


# ---------------------------------------------------------------- the launcher (parent side)


def launch(spec: dict[str, Any], work_dir: Path, nproc: int, *, on_line: Callable[[str], None],
           on_progress: Callable[[int, int], None] | None = None, env: Mapping[str, str] | None = None,
           ) -> dict[str, Any]:
    """Run ``python -m lmpipe.stages.torchrun_worker`` under torchrun on this node; returns rank 0's summary.

    Every output line of every process goes to ``on_line`` as it arrives (progress
    lines to ``on_progress`` instead). A non-zero exit of torchrun, which follows the
    failure of any rank, raises DistributedTrainingError with the last lines.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    (work_dir / SUMMARY_FILE).unlink(missing_ok=True)  # never trust a summary of an earlier attempt
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmpipe.stages.torchrun_worker", str(spec_path)]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS":
                 os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1, env=child_env) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
                    done, total = line[len(PROGRESS_PREFIX):].split("/")
                    on_progress(int(done), int(total))
                    continue
                if line.startswith(ERROR_PREFIX):
                    errors.append(line[len(ERROR_PREFIX):])
                tail.append(line)
                on_line(line)
        except BaseException:  # a callback failed or the task was cancelled: do not leave training running
            proc.terminate()
            raise
        code = proc.wait()
    summary_path = work_dir / SUMMARY_FILE
    if code != 0 or not summary_path.is_file():
        raise DistributedTrainingError(
            f"torchrun with {nproc} processes exited with code {code}"
            + ("" if code else f" but wrote no {SUMMARY_FILE}") + "".join(f"\n  {e}" for e in errors)
            + "\nlast lines:\n  " + "\n  ".join(tail),
            retryable=not any(" fatal: " in e for e in errors),
        )
    return json.loads(summary_path.read_text(encoding="utf-8"))
