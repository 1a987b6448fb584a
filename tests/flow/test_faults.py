"""`lmpipe run` under kills, concurrent runs, corruption and a full disk: real processes, real SIGKILLs.

Each run is the real command in its own process group (its Prefect server and chunk workers with it), on
the tiny config, with its own ephemeral Prefect and its MLflow store under the work directory. A kill is
a SIGKILL of the whole group at a chosen moment (a stage's lease or partial directory appearing, MLflow
logging that it created a version); the run is then started again, until one finishes. What the
finished work directory holds is compared with an uninterrupted run's, file by file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmpipe.artifacts import RESULT_FILE
from tests.conftest import DATA, REPO

pytestmark = pytest.mark.slow

COMPARED = ("train_tokenizer", "shard", "pretrain", "finetune")  # what must be byte-identical
TINY = [f"data.pretrain.sources=[{{uri: '{DATA / 'wikitext2-valid.txt'}', doc_boundary: wikitext_title}}]",
        f"data.finetune.sources=[{{uri: '{DATA / 'tinyshakespeare.txt'}', doc_boundary: blank_line}}]"]


def _env() -> dict[str, str]:
    """The environment of a user's shell: no Prefect server of the test session's, the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _command(workdir: Path, *overrides: str, command: str = "run") -> list[str]:
    return [sys.executable, "-m", "flows.cli", command, "--config", str(REPO / "configs" / "tiny.yaml"),
            f"workdir={workdir}", *TINY, *overrides]


def _start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env={**_env(), **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(cmd: list[str], log: Path, timeout: float = 600, **env: str) -> None:
    proc = _start(cmd, log, **env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    assert rc == 0, log.read_text(errors="replace")[-4000:]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass(frozen=True)
class Moment:
    """When to kill: ``ready(workdir, output so far)`` turns true."""

    name: str
    ready: Callable[[Path, str], bool]


def _exists(pattern: str) -> Callable[[Path, str], bool]:
    return lambda workdir, _out: any(workdir.glob(pattern))


MOMENTS = [
    Moment("store creation", lambda w, _o: any(w.glob("mlflow.db*"))),
    Moment("reading the corpus", _exists("download/*.lease")),
    Moment("cleaning a chunk", _exists("clean_chunk/*.lease")),
    Moment("combining the cleaned chunks", _exists("clean/*.lease")),
    Moment("training the tokenizer", _exists("train_tokenizer/*.lease")),
    Moment("encoding a chunk", _exists("encode_chunk/*.lease")),
    Moment("sharding", _exists("shard/*.lease")),
    Moment("pretraining, after a checkpoint", _exists("pretrain/*.partial/checkpoints/*/state.json")),
    Moment("fine-tuning", _exists("finetune/*.lease")),
    Moment("evaluating", _exists("evaluate/*.lease")),
    Moment("registering, before the version is created", _exists("register/*.lease")),
    Moment("registering, right after the version was created",
           lambda _w, out: "created lmpipe-gpt version" in out),
]


def _run_with_kills(workdir: Path, log: Path, moments: list[Moment]) -> list[str]:
    """Start the run, SIGKILL it at each moment in turn (restarting it each time), then let it finish.

    Returns the moments at which a kill happened: if a run ends before the next moment comes, the moments
    left are not reached.
    """
    cmd = _command(workdir)
    killed: list[str] = []
    for moment in moments:
        start = log.stat().st_size if log.exists() else 0
        proc = _start(cmd, log)
        while proc.poll() is None and not moment.ready(workdir, log.read_bytes()[start:].decode(errors="replace")):
            time.sleep(0.01)
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
            return killed
        _kill(proc)
        killed.append(moment.name)
    _finish(cmd, log)
    return killed


def _stage_files(workdir: Path) -> dict[str, dict[str, str]]:
    """Every finished stage's file hashes (from its stage_result.json), for the compared stages."""
    files: dict[str, dict[str, str]] = {}
    for stage in COMPARED:
        for result in sorted((workdir / stage).glob(f"*/{RESULT_FILE}")):
            files[f"{stage}/{result.parent.name}"] = json.loads(result.read_text())["files"]
    return files


def _registry(workdir: Path, store: Path | None = None) -> tuple[list, list, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{store or workdir / 'mlflow.db'}")
    versions = client.search_model_versions("name='lmpipe-gpt'")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    logged = client.search_logged_models(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    return versions, runs, logged


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run's work directory."""
    workdir = tmp_path_factory.mktemp("reference")
    _finish(_command(workdir), workdir.parent / "reference.log")
    return workdir


def test_a_run_logs_no_progress_bars_or_mlflow_noise_and_names_each_corpus(reference: Path):
    log = (reference.parent / "reference.log").read_text(errors="replace")
    for noise in ("%|", "Downloading artifacts", "CloudPickle", "WARNING mlflow"):
        assert noise not in log, noise
    # The task runs carry the flow's labels: which corpus a data stage or chunk is for.
    for name in ("download/wikitext2", "clean/tinyshakespeare", "shard/wikitext2",
                 "clean_chunk/wikitext2 documents/part-000000.parquet"):
        assert f"Task run '{name}' - Finished in state Completed()" in log, name


def _assert_like_reference(workdir: Path, reference: Path, store: Path | None = None) -> None:
    assert _stage_files(workdir) == _stage_files(reference)
    versions, runs, logged = _registry(workdir, store)
    assert len(versions) == 1
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED", "KILLED"}
    assert not [m for m in logged if str(m.status).endswith("PENDING")]
    assert not list(workdir.glob("*/*.lease")) and not list(workdir.glob("*/*.partial"))


def test_a_run_killed_at_every_stage_ends_identical_to_an_uninterrupted_one(tmp_path: Path, reference: Path):
    killed = _run_with_kills(tmp_path / "w", tmp_path / "run.log", MOMENTS)
    assert killed == [m.name for m in MOMENTS]
    _assert_like_reference(tmp_path / "w", reference)


@pytest.mark.skipif(not os.environ.get("LMPIPE_SOAK"), reason="the random-moment soak: set LMPIPE_SOAK=<kills>")
def test_a_run_killed_at_random_moments_ends_identical_to_an_uninterrupted_one(tmp_path: Path, reference: Path):
    rng = random.Random(int(os.environ.get("LMPIPE_SOAK_SEED", "0")))
    delays = [rng.uniform(1, 20) for _ in range(int(os.environ["LMPIPE_SOAK"]))]

    def after(seconds: float) -> Moment:
        started: list[float] = []

        def ready(_w: Path, _o: str) -> bool:
            started.append(started[0] if started else time.monotonic())
            return time.monotonic() - started[0] >= seconds

        return Moment(f"{seconds:.1f} s in", ready)

    killed = _run_with_kills(tmp_path / "w", tmp_path / "run.log", [after(d) for d in delays])
    print(f"{len(killed)} of {len(delays)} kills happened before a run finished: {killed}")
    assert killed  # the first run cannot finish within a second
    _assert_like_reference(tmp_path / "w", reference)


def _tails(logs: Iterable[Path]) -> str:
    """The ends of the runs' logs, as text (a list would be shortened in pytest's report), and every error line."""
    texts = [(log, log.read_text(errors="replace")) for log in logs]
    return "\n".join(f"--- {log.name}: error lines\n" + "\n".join(line for line in text.splitlines() if "Error" in line)
                     + f"\n--- {log.name}: last 3000 characters\n{text[-3000:]}" for log, text in texts)


def test_two_runs_of_one_config_started_together_both_finish_with_one_set_of_artifacts(tmp_path: Path,
                                                                                         reference: Path):
    workdir = tmp_path / "w"
    procs = [_start(_command(workdir), tmp_path / f"run{i}.log") for i in (1, 2)]
    rcs = [p.wait(timeout=900) for p in procs]
    assert rcs == [0, 0], _tails(tmp_path / f"run{i}.log" for i in (1, 2))
    _assert_like_reference(workdir, reference)
    logs = [(tmp_path / f"run{i}.log").read_text() for i in (1, 2)]
    assert any("waiting for" in text for text in logs)


def test_two_runs_with_other_models_share_the_data_stages_and_both_finish(tmp_path: Path, reference: Path):
    workdir = tmp_path / "w"
    procs = [_start(_command(workdir, *overrides), tmp_path / f"run{i}.log")
             for i, overrides in enumerate([(), ("model.n_embd=48",)])]
    rcs = [p.wait(timeout=900) for p in procs]
    assert rcs == [0, 0], _tails(tmp_path / f"run{i}.log" for i in (0, 1))
    for stage in ("download", "clean", "train_tokenizer", "shard"):  # built once, for both
        assert sorted(p.name for p in (workdir / stage).iterdir()) == sorted(p.name for p in (reference / stage).iterdir())
    assert len(list((workdir / "pretrain").glob(f"*/{RESULT_FILE}"))) == 2
    versions, runs, _ = _registry(workdir)
    assert len(versions) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_outputs_are_found_named_and_repaired(tmp_path: Path, reference: Path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "prefect"))
    data = _command(workdir, command="data")
    shard = next((workdir / "shard").glob("*/val_*.bin"))
    tokenizer = next((workdir / "train_tokenizer").glob("*/tokenizer.json"))
    weights = next((workdir / "pretrain").glob("*/model/model.safetensors"))
    _flip(shard, 100)
    tokenizer.write_text(tokenizer.read_text().replace('"<|endoftext|>"', '"<|endoftext!>"', 1))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    log = tmp_path / "data.log"
    proc = subprocess.run(data, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert f"{str(tokenizer)!r} is corrupt" in proc.stderr and "lmpipe verify --repair" in proc.stderr, proc.stderr
    # The reason is logged in one line before any traceback.
    first = proc.stderr.index("Task run 'train_tokenizer' - train_tokenizer failed: CorruptArtifactError: ")
    assert first < proc.stderr.index("Traceback")
    verify = subprocess.run(_command(workdir, command="verify"), cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    damaged = [line for line in verify.stdout.splitlines() if line.startswith("    ") and "expected" in line]
    assert sorted(line.split(": expected")[0].strip() for line in damaged) == sorted(
        [str(tokenizer), str(shard), str(weights)])
    repaired = subprocess.run([*_command(workdir, command="verify"), "--repair"], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert repaired.returncode == 0 and repaired.stdout.count("moved aside to") == 3, repaired.stdout
    assert sorted(p.parent.name for p in (workdir / "damaged").glob("*/*")) == ["pretrain", "shard", "train_tokenizer"]
    _finish(_command(workdir), log)
    assert _stage_files(workdir) == _stage_files(reference)


DATA_STAGES = ("downloads", "download", "clean_chunk", "clean", "train_tokenizer", "encode_chunk", "shard")
LOG_KIB = 256  # what the CLI's copy of the run's log takes by the time pretraining starts (tens of KiB), and more


def _kib(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_a_full_disk_fails_with_its_own_error_and_a_rerun_after_freeing_space_completes(tmp_path: Path,
                                                                                         reference: Path):
    # The work directory on a filesystem with room for the data stages, the run's log (<workdir>/logs) and 64 KiB
    # more: pretraining fills it. The MLflow store and Prefect's database are elsewhere, as on a server whose data
    # disk fills up.
    size_kib = sum(_kib(reference / name) for name in DATA_STAGES) + LOG_KIB + 64
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode}): "
                    "the full-disk test needs root or CAP_SYS_ADMIN")
    try:
        workdir, store = disk / "w", tmp_path / "mlflow.db"
        cmd = _command(workdir, f"tracking.uri=sqlite:///{store}")
        env = {"PREFECT_HOME": str(tmp_path / "prefect")}
        proc = subprocess.run(cmd, cwd=REPO, env={**_env(), **env}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1
        # The reason the run gives is the full disk (here safetensors', writing a checkpoint), not a later error.
        reasons = [line for line in proc.stderr.splitlines() if line.startswith("lmpipe: run failed")]
        assert reasons and "No space left on device" in reasons[0], proc.stderr[-5000:]
        assert not any(stage.name == "pretrain" for stage in workdir.iterdir() if any(stage.glob(f"*/{RESULT_FILE}")))
        _, runs, _ = _registry(workdir, store)
        assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}  # the data stages' runs, and the failed ones
        assert {r.data.tags.get("lmpipe.stage") for r in runs if r.info.status == "FAILED"} == {None, "pretrain"}
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)  # space freed
        _finish(cmd, tmp_path / "rerun.log", **env)
        _assert_like_reference(workdir, reference, store)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
