"""Starting a torchrun job from a stage: one process per device, their output streamed, their errors classed.

No training process outlives the stage that started it. When the launching process is told to
stop (Prefect cancelling the flow run signals its process group with SIGTERM, which the engine
raises in the task; Ctrl-C), ``stop`` ends torchrun and everything under it: SIGTERM (torchrun
then stops its ranks), SIGKILL to whatever is left after a grace period. torchrun runs in a
session of its own, so such a signal reaches the launcher alone and the shutdown keeps that
order. When the launcher dies without a word (SIGKILL, after Prefect's grace period), the
kernel tells the rest on Linux: torchrun is started through this module (``python -m
lmpipe.training.launch``), which asks for SIGTERM when its parent dies (prctl
PR_SET_PDEATHSIG) before it runs torchrun in-process, and each rank asks for SIGKILL when
torchrun dies (``die_with_parent``). A rank has nobody to hand its work to once torchrun is
gone; the next attempt resumes from the last checkpoint. Elsewhere only ``stop`` applies.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
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
TORCHRUN_PID_ENV = "LMPIPE_TORCHRUN_PID"  # the ranks' parent, whose death ends them
STOP_GRACE_S = 15.0  # how long torchrun gets to stop its ranks before everything left is killed
_PR_SET_PDEATHSIG = 1


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
    cmd = [sys.executable, "-m", __name__, str(os.getpid()), "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmpipe.stages.torchrun_worker", str(spec_path)]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS":
                 os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1, env=child_env, start_new_session=True) as proc:
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
            stop(proc)
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


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """End torchrun and every process under it: SIGTERM first (torchrun stops its ranks, which flush their
    metrics), SIGKILL to each one still there after ``grace`` seconds. The ranks are in sessions of their
    own (torchrun puts them there), so they are found by descent, not by process group."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait()


def die_with_parent(sig: int, parent: int) -> None:
    """Have this process sent ``sig`` when ``parent``, the process that started it, dies (Linux); at once if
    it already has. Elsewhere only the second part: the kernel offers no such request."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # it died before the request: nobody would send the signal
        os.kill(os.getpid(), sig)


def _torchrun(parent: int, args: list[str]) -> None:
    """torchrun in this process, bound to die with ``parent`` (the launcher), its ranks bound to it in turn."""
    die_with_parent(signal.SIGTERM, parent)  # SIGTERM: torchrun stops its ranks on it
    os.environ[TORCHRUN_PID_ENV] = str(os.getpid())  # the ranks inherit it (torchrun copies its environment)
    sys.argv = ["torchrun", *args]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _torchrun(int(sys.argv[1]), sys.argv[2:])
