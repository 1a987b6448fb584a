"""Training in several processes: torchrun with the gloo backend on CPU, 2 processes.

The global batch is split between the ranks (``lmpipe.training.loader.sequence_range``), so
a 2-process run and a single process with twice the gradient accumulation train on
the same sequences and must give the same losses, up to float summation order.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lmpipe.artifacts import RESULT_FILE
from lmpipe.config.training import ModelConfig, Qwen3ModelConfig
from lmpipe.model.checkpoint import latest_checkpoint, read_state
from lmpipe.stages.pretrain import run_pretrain
from lmpipe.training.launch import DistributedTrainingError, launch
from lmpipe.training.loop import Reporters
from tests.conftest import flow_run_logs, tiny_config
from tests.unit.training.test_train import STAGE_MODEL, config


def two_procs(strategy: str = "ddp", **overrides: object):
    return config(max_steps=6, batch_size=2, grad_accum_steps=1, checkpoint_interval=3, log_interval=1,
                  distributed={"nproc_per_node": 2, "strategy": strategy}, **overrides)


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text(encoding="utf-8").splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


# Qwen3's block (untied head, grouped-query attention): the workers build it from the spec's model section, and
# FSDP shards its blocks as GPT-2's.
QWEN3_STAGE_MODEL = Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, n_kv_head=1,
                                     tie_embeddings=False)


@pytest.mark.parametrize(("strategy", "model"), [("ddp", STAGE_MODEL), ("fsdp", STAGE_MODEL),
                                                 ("ddp", QWEN3_STAGE_MODEL), ("fsdp", QWEN3_STAGE_MODEL)],
                         ids=["ddp", "fsdp", "ddp-qwen3", "fsdp-qwen3"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, stages, strategy: str,
                                                            model: ModelConfig) -> None:
    tok, shards = stages
    lines: list[str] = []
    progress: list[tuple[int, int]] = []
    multi = run_pretrain(model, two_procs(strategy), shards, tok, tmp_path / "multi", "fp",
                         report=Reporters(lines=lines.append, progress=lambda d, t: progress.append((d, t))))
    single = run_pretrain(model, config(max_steps=6, batch_size=2, grad_accum_steps=2, checkpoint_interval=3,
                                        log_interval=1), shards, tok, tmp_path / "single", "fp")
    assert losses(multi.path("metrics.jsonl")) == pytest.approx(losses(single.path("metrics.jsonl")), rel=1e-5)
    assert multi.metrics["final_val_loss"] == pytest.approx(single.metrics["final_val_loss"], rel=1e-5)
    w_multi, w_single = weights(multi.path("model")), weights(single.path("model"))
    assert w_multi.keys() == w_single.keys()
    for k in w_single:
        torch.testing.assert_close(w_multi[k], w_single[k], rtol=1e-4, atol=1e-5)
    assert progress == [(s, 6) for s in range(1, 7)]
    assert any(line.startswith("pretrain step 6/6 loss") for line in lines)  # rank 0's log reached on_log
    # The hand-over files of the launcher are not part of the published stage.
    assert sorted(multi.files) == ["metrics.jsonl", "model/model.safetensors", "model/state.json"]
    assert read_state(multi.path("model"))["model"].get("arch", "gpt2") == model.arch


def _spec(stages, work: Path, **train: object) -> dict:
    tok, shards = stages
    from lmpipe.stages.training import tokenizer_info

    _, tok_fp, vocab = tokenizer_info(tok)
    return {"model": STAGE_MODEL.model_dump(mode="json"), "train": two_procs(**train).model_dump(mode="json"),
            "vocab_size": vocab, "shards": str(shards.out_dir), "tokenizer_fingerprint": tok_fp,
            "work_dir": str(work)}


def test_a_ddp_run_resumes_exactly_from_its_checkpoint(tmp_path: Path, stages) -> None:
    full = launch(_spec(stages, tmp_path / "full"),
                  tmp_path / "full", 2, on_line=lambda _: None)
    work = tmp_path / "resumed"
    first = launch(_spec(stages, work) | {"stop_after": 4}, work, 2, on_line=lambda _: None)
    assert first["steps"] == 4 and latest_checkpoint(work / "checkpoints").name == "step-0000004"
    state = read_state(work / "checkpoints" / "step-0000004")
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG states
    last = launch(_spec(stages, work), work, 2, on_line=lambda _: None)
    assert last["resumed_from"] == 4
    assert (work / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert last["final_val_loss"] == full["final_val_loss"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_muon_in_two_processes_trains_as_one_and_resumes_exactly(tmp_path: Path, stages, strategy: str) -> None:
    """Under DDP every rank applies Muon to the same all-reduced gradients; under FSDP2 Muon's Newton-Schulz
    iterations run on the sharded matrices (DTensors), orthogonalizing each whole matrix through collectives.
    Either trains as one process does, up to the rounding of those bf16 iterations, and resumes bit for bit."""
    tok, shards = stages
    full = launch(_spec(stages, tmp_path / "full", strategy=strategy, optimizer="muon"), tmp_path / "full", 2,
                  on_line=lambda _: None)
    single = run_pretrain(STAGE_MODEL, config(max_steps=6, batch_size=2, grad_accum_steps=2, checkpoint_interval=3,
                                              log_interval=1, optimizer="muon"), shards, tok, tmp_path / "single", "fp")
    assert losses(tmp_path / "full" / "metrics.jsonl") == pytest.approx(
        losses(single.path("metrics.jsonl")), rel=1e-3)
    w_multi, w_single = weights(Path(full["checkpoint"])), weights(single.path("model"))
    for k in w_single:
        torch.testing.assert_close(w_multi[k], w_single[k], rtol=0, atol=2e-3)

    work = tmp_path / "resumed"
    launch(_spec(stages, work, strategy=strategy, optimizer="muon") | {"stop_after": 4}, work, 2,
           on_line=lambda _: None)
    last = launch(_spec(stages, work, strategy=strategy, optimizer="muon"), work, 2, on_line=lambda _: None)
    assert last["resumed_from"] == 4
    assert (work / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert last["final_val_loss"] == full["final_val_loss"]


def test_a_failing_rank_fails_the_launch_with_its_error(tmp_path: Path, stages) -> None:
    spec = _spec(stages, tmp_path) | {"shards": str(tmp_path / "missing")}
    seen: list[str] = []
    with pytest.raises(DistributedTrainingError, match=r"torchrun with 2 processes exited with code 1") as err:
        launch(spec, tmp_path, 2, on_line=seen.append)
    # Each rank's own error, in one line, heads the message; the full output went to on_line. torchrun stops
    # the other rank at the first failure, so the other may or may not have reported its own before.
    fatal = re.findall(r"\n  rank (\d) fatal: (\w+): ", str(err.value))
    assert fatal and {error for _, error in fatal} == {"FileNotFoundError"}
    assert {rank for rank, _ in fatal} <= {"0", "1"} and len(fatal) == len({rank for rank, _ in fatal})
    assert err.value.retryable is False  # missing data: a retry would fail again
    assert str(tmp_path / "missing") in str(err.value)
    assert any("Traceback" in line for line in seen)
    assert not (tmp_path / "distributed_summary.json").exists()


def _kill_rank_at_checkpoint(workdir: Path, rank: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the torchrun worker of `rank` once the pretrain stage's first checkpoint exists."""
    while not stop.is_set():
        if list(workdir.glob("pretrain/*.partial/checkpoints/step-*")):
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if "lmpipe.stages.torchrun_worker" in " ".join(proc.info["cmdline"] or []) and \
                            proc.environ().get("RANK") == rank and "torch.distributed.run" not in proc.info["cmdline"]:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        time.sleep(0.01)


@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_runs_torchrun_and_a_killed_rank_is_retried_from_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    cfg = tiny_config(tmp_path, "pretrain.distributed.nproc_per_node=2", "pretrain.max_steps=300",
                      "pretrain.checkpoint_interval=20", "pretrain.log_interval=5", "pretrain.eval_interval=300",
                      "finetune.max_steps=2")
    stop, killed = threading.Event(), []
    task_logger = logging.getLogger("prefect.task_runs")  # the suite logs WARNING and up (conftest)
    monkeypatch.setattr(task_logger, "level", logging.INFO)
    killer = threading.Thread(target=_kill_rank_at_checkpoint, args=(tmp_path, "1", stop, killed), daemon=True)
    killer.start()
    try:
        summary = pipeline(config=cfg)
    finally:
        stop.set()
        killer.join()
    assert killed, "rank 1 was never killed"
    pretrain = next(s for s in summary["stages"] if s["label"] == "pretrain")
    assert pretrain["status"] == "ran"
    result = json.loads((Path(pretrain["out_dir"]) / RESULT_FILE).read_text())
    assert result["meta"]["resumed_from_step"] >= 20  # the retry resumed, it did not start over
    assert result["metrics"]["steps"] == 300

    # Each attempt has its MLflow run (the killed one FAILED); rank 0 logged into the attempt's own run.
    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([summary["experiment_id"]], "tags.`lmpipe.stage` = 'pretrain'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    killed_steps, resumed_steps = ([m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
                                   for r in runs)
    assert killed_steps and max(killed_steps) < 300
    assert resumed_steps[0] > result["meta"]["resumed_from_step"] and resumed_steps[-1] == 300
    # The workers' lines reached the Prefect log of the flow run.
    flow_run_id = client.get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    logs = flow_run_logs(flow_run_id)
    assert any(log.message.startswith("pretrain step 300/300 loss") for log in logs)
