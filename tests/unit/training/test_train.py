"""Training: loss goes down, runs are deterministic, resume is exact, bad inputs fail clearly.

The model is tiny (2 layers, 32 wide, context 32) and the data real: the bytes of
Tiny Shakespeare as token ids (vocabulary 256), so no other stage is needed.
The stage tests at the end run the real tokenizer and shard stages first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmpipe.config.training import ContinueFinetuneConfig, ModelConfig, Qwen3ModelConfig, TrainConfig
from lmpipe.data.shards import ArraySource
from lmpipe.eval.report import plot_loss_curves
from lmpipe.model.checkpoint import (
    CheckpointMismatchError,
    latest_checkpoint,
    load_model,
    read_state,
    verify_checkpoint,
)
from lmpipe.model.gpt import GPT, IGNORE_INDEX, GPTConfig
from lmpipe.stages.contract import partial_dir
from lmpipe.stages.finetune import run_finetune
from lmpipe.stages.pretrain import run_pretrain
from lmpipe.training.checkpoint import save_checkpoint
from lmpipe.training.data import TrainData
from lmpipe.training.device import activation_bytes, find_micro_batch
from lmpipe.training.distributed import DistContext
from lmpipe.training.loop import Reporters, train
from lmpipe.training.metrics import read_metrics
from lmpipe.training.schedule import Schedule, lr_at
from lmpipe.training.step import TrainingDivergedError, TrainStep
from lmpipe.training.validation import eval_offsets, get_batch
from tests.conftest import REPO

DATA = REPO / "data"
_BYTES = np.frombuffer((DATA / "tinyshakespeare.txt").read_bytes(), dtype=np.uint8).astype(np.int64)
TRAIN = ArraySource(_BYTES[:200_000])
VAL = ArraySource(_BYTES[-20_000:])
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
FP = "bytes-as-tokens"
# Dropout on: runs draw from the torch RNG, which a resume must restore to match.
DROPOUT_MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)
# Qwen3's block with its own output head and grouped-query attention.
QWEN3_MODEL = Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, n_kv_head=1, tie_embeddings=False)
DROPOUT_QWEN3 = QWEN3_MODEL.model_copy(update={"dropout": 0.1})


def config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(  # AdamW, as nanoGPT (the default is Muon): the numbers these tests know
        optimizer="adamw", max_steps=12, batch_size=4, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2,
        eval_interval=5, eval_batches=2, log_interval=5, checkpoint_interval=100, device="cpu",
    )
    return TrainConfig(**(base | overrides))


def run(work: Path, cfg: TrainConfig, model: ModelConfig = MODEL, **kw: object):
    return train(model, cfg, 256, TrainData(TRAIN, VAL), work, tokenizer_fingerprint=FP, **kw)


def metrics_text(work: Path) -> str:
    return (work / "metrics.jsonl").read_text(encoding="utf-8")


def losses(work: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_text(work).splitlines()]


# ---------------------------------------------------------------- schedule and batches


def test_lr_schedule_warmup_then_cosine_to_min_lr() -> None:
    cfg = config(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    sched = Schedule(max_lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=cfg.max_steps)
    assert sched.lr(0) == lr_at(0, max_lr=1e-3, min_lr=1e-4, warmup=10, total=100) == pytest.approx(1e-3 / 11)
    assert sched.lr(9) == pytest.approx(1e-3 * 10 / 11)
    assert sched.lr(10) == pytest.approx(1e-3)
    assert sched.lr(55) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert sched.lr(100) == pytest.approx(1e-4)
    decay = [sched.lr(s) for s in range(10, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_eval_windows_span_the_split() -> None:
    assert eval_offsets(100, 32, 5).tolist() == [0, 16, 33, 50, 67]
    assert eval_offsets(33, 32, 3).tolist() == [0, 0, 0]


def test_get_batch_shifts_targets_and_applies_mask() -> None:
    src = ArraySource(np.arange(10))
    mask = ArraySource(np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1]))
    x, y = get_batch(src, np.array([0, 4]), 4, torch.device("cpu"), mask)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[-1, -1, 3, 4], [5, -1, -1, 8]]  # target t+1 counts iff mask[t+1] == 1
    assert IGNORE_INDEX == -1
    # One window: masking the targets must not write into the inputs (y was a view of x's buffer).
    x1, y1 = get_batch(src, np.array([0]), 4, torch.device("cpu"), mask)
    assert x1.tolist() == [[0, 1, 2, 3]] and y1.tolist() == [[-1, -1, 3, 4]]


class _Batches:
    """A loader that hands out given (x, y) micro-batches in order."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = list(batches)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.pop(0)


def test_masked_step_is_the_mean_over_the_global_batch_however_it_is_split() -> None:
    """SFT micro-batches hold different numbers of targets: 8 x 1, 2 x 4 and 1 x 8 give one loss and gradient."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    for row, kept in enumerate((16, 1, 3, 0, 9, 2, 16, 5)):  # targets counted per sequence, very uneven
        y[row, kept:] = IGNORE_INDEX
    flat = torch.cat([y[r][y[r] != IGNORE_INDEX] for r in range(8)])
    results = []
    for micro in (8, 2, 1):
        model.zero_grad()
        batches = [(x[i : i + micro], y[i : i + micro]) for i in range(0, 8, micro)]
        step = TrainStep(model, opt, Schedule(0.0, 0.0, 0, 1), _Batches(batches).next, accum=8 // micro,
                         grad_clip=1e9, autocast=contextlib.nullcontext(), dist_ctx=DistContext(), per_token=True)
        loss, _ = step.forward_backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    full = torch.nn.functional.cross_entropy(model(x, y)[0].view(-1, 64), y.view(-1), ignore_index=IGNORE_INDEX)
    assert flat.numel() == 52
    for loss, grads in results:
        assert loss == pytest.approx(full.item(), rel=1e-6)
        for g, ref in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- training


def test_loss_decreases(tmp_path: Path) -> None:
    cfg = config(max_steps=30, batch_size=8, learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=30)
    summary = run(tmp_path, cfg)
    first = losses(tmp_path)[0]
    assert abs(first - math.log(256)) < 0.05  # starts at a uniform guess over bytes
    # Observed: 5.52 -> 3.48 (train, last 5 steps), 3.50 (val): byte frequencies learned.
    assert summary.final_train_loss < first - 1.9
    assert summary.final_val_loss is not None and summary.final_val_loss < first - 1.9
    assert summary.steps == 30 and summary.tokens_seen == 30 * 8 * 32
    assert summary.params == 33664  # as in test_model: position embeddings are not counted
    assert summary.device == "cpu" and summary.tokens_per_sec > 0


def test_two_fresh_runs_are_identical(tmp_path: Path) -> None:
    cfg = config()
    run(tmp_path / "a", cfg, DROPOUT_MODEL)
    run(tmp_path / "b", cfg, DROPOUT_MODEL)
    assert len(losses(tmp_path / "a")) == 12
    assert metrics_text(tmp_path / "a") == metrics_text(tmp_path / "b")
    wa = (tmp_path / "a/checkpoints/step-0000012/model.safetensors").read_bytes()
    wb = (tmp_path / "b/checkpoints/step-0000012/model.safetensors").read_bytes()
    assert wa == wb
    # A different seed draws different batches.
    run(tmp_path / "c", config(seed=1), DROPOUT_MODEL)
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_metrics_reach_the_disk_before_each_checkpoint_is_written(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss must not keep a checkpoint of step k and lose metrics.jsonl's rows up to k."""
    import lmpipe.training.checkpoint as checkpoint_module
    import lmpipe.training.metrics as metrics_module

    events: list[tuple[str, int]] = []
    real_fsync, real_write = metrics_module.fsync_path, checkpoint_module.write_checkpoint

    def fsync_path(path: Path) -> None:  # the real fsync, recording the last step the file holds then
        real_fsync(path)
        metrics = Path(path) if Path(path).is_file() else Path(path) / "metrics.jsonl"
        what = "fsync metrics" if Path(path).is_file() else "fsync its directory"
        events.append((what, json.loads(metrics.read_text().splitlines()[-1])["step"]))

    def write_checkpoint(root: Path, step: int, *args: object, **kwargs: object) -> Path:
        events.append(("checkpoint", step))
        return real_write(root, step, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "fsync_path", fsync_path)
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_checkpoint)
    run(tmp_path, config(checkpoint_interval=4, log_interval=3))  # checkpoints at 4, 8, 12; logs at 3, 6, 9, 12
    assert events == [e for k in (4, 8, 12) for e in (("fsync metrics", k), ("fsync its directory", k),
                                                      ("checkpoint", k))]


@pytest.mark.parametrize("model", [DROPOUT_MODEL, DROPOUT_QWEN3], ids=["gpt2", "qwen3"])
@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path: Path, accum: int, model: ModelConfig) -> None:
    cfg = config(grad_accum_steps=accum)
    logged_full: dict[int, dict[str, float]] = {}
    full = run(tmp_path / "full", cfg, model, log_metrics=lambda m, s: logged_full.update({s: m}))

    work = tmp_path / "resumed"
    logged: dict[int, dict[str, float]] = {}
    first = run(work, cfg, model, stop_after=4, log_metrics=lambda m, s: logged.update({s: m}))
    assert first.steps == 4 and first.final_val_loss is None
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["step-0000004"]
    second = run(work, cfg, model, stop_after=9, log_metrics=lambda m, s: logged.update({s: m}))
    assert second.resumed_from == 4
    # A crash after metrics were written but before the next checkpoint leaves extra rows.
    with open(work / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "loss": 9.9, "lr": 0.0, "grad_norm": 0.0}) + "\n")
    last = run(work, cfg, model, log_metrics=lambda m, s: logged.update({s: m}))
    assert last.resumed_from == 9
    # Resumed inside a log interval (steps 1-5, 6-10): the logged means and gradient norms still cover
    # the whole interval, as in the run that never stopped.
    for step in (5, 10, 12):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert logged[step][key] == logged_full[step][key], (step, key)

    assert len(losses(work)) == 12
    assert metrics_text(work) == metrics_text(tmp_path / "full")  # bitwise equal losses
    assert last.final_val_loss == full.final_val_loss
    assert last.final_train_loss == full.final_train_loss
    w_full = load_file(full.checkpoint / "model.safetensors")
    w_res = load_file(last.checkpoint / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


@pytest.mark.parametrize("tail", [
    b'{"step": 10, "loss": 2.71',  # cut off mid-row
    b'{"step": 10, "loss": 2.7, "lr": 0.001, "grad_norm": 0.5}',  # cut off just before its newline
    b"\0" * 37 + b"\n",  # a tail the file system filled with zeros
])
def test_a_cut_off_last_metrics_line_is_dropped_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        tail: bytes) -> None:
    """A run killed while appending to metrics.jsonl leaves its last line cut off: the resume drops that line
    with a warning naming the file and the bytes, and ends as the run that never stopped."""
    cfg = config()
    full = run(tmp_path / "full", cfg, DROPOUT_MODEL)
    work = tmp_path / "killed"
    run(work, cfg, DROPOUT_MODEL, stop_after=9)
    with open(work / "metrics.jsonl", "ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING, logger="lmpipe.training.metrics"):
        last = run(work, cfg, DROPOUT_MODEL)
    why = "is not JSON" if tail.endswith(b"\n") else "has no newline"
    assert [r.getMessage() for r in caplog.records] == [
        f"{work / 'metrics.jsonl'}: dropped its last line, {len(tail)} bytes cut off by an interrupted run "
        f"(it {why}): {tail[:80]!r}"]
    assert last.resumed_from == 9
    assert metrics_text(work) == metrics_text(tmp_path / "full")
    assert last.final_val_loss == full.final_val_loss and last.final_train_loss == full.final_train_loss
    w_full, w_res = load_file(full.checkpoint / "model.safetensors"), load_file(last.checkpoint / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    """Only the last line can be a kill's trace; a bad line before it is damage, on resume and when a
    finished run's file is read."""
    work = tmp_path / "run"
    run(work, config(), stop_after=4)
    path = work / "metrics.jsonl"
    rows = path.read_bytes().split(b"\n")
    rows[1] = rows[1][:20]  # line 2 of 4 cut short
    path.write_bytes(b"\n".join(rows))
    with pytest.raises(ValueError, match=rf"^metrics file {re.escape(str(path))}:2: not valid JSON "
                                         r"\(Expecting value at column 21\)\. Only a run killed mid-append leaves a bad "
                                         rf"line, and only as the last one: the file is damaged\. "
                                         rf"Delete {re.escape(str(work))} to train this run afresh$"):
        run(work, config())
    assert path.read_bytes() == b"\n".join(rows)  # left as it was
    # A finished run's file is read strictly: its last line is no exception.
    path.write_bytes(b"\n".join(rows[:1] + rows[2:]))
    assert [r["step"] for r in read_metrics(path)] == [1, 3, 4]
    path.write_bytes(b"\n".join(rows[:1] + rows[2:-2] + [rows[-2][:20]]))
    with pytest.raises(ValueError, match=rf"^metrics file {re.escape(str(path))}:3: not valid JSON .*damaged$"):
        read_metrics(path)
    with pytest.raises(ValueError, match=rf"metrics file {re.escape(str(path))}:3: not valid JSON"):
        plot_loss_curves({"pretrain": path}, tmp_path / "curves.png")


def test_resume_across_epoch_boundaries_twice_is_exact(tmp_path: Path) -> None:
    small = ArraySource(_BYTES[:2_000])  # 62 windows of 32 + 1 tokens: an epoch is under 8 steps of 8
    cfg = config(batch_size=8)

    def go(work: Path, **kw: object):
        return train(DROPOUT_MODEL, cfg, 256, TrainData(small, VAL), work, tokenizer_fingerprint=FP, **kw)

    full = go(tmp_path / "full")
    work = tmp_path / "resumed"
    go(work, stop_after=7)
    assert read_state(work / "checkpoints" / "step-0000007")["data"] == {
        "seed": 1337, "next_step": 7, "tokens_seen": 7 * 8 * 32, "epoch": 0, "index": 56, "sequences_seen": 56}
    go(work, stop_after=9)  # epoch 1 began inside step 8
    assert read_state(work / "checkpoints" / "step-0000009")["data"]["epoch"] == 1
    last = go(work)
    assert last.resumed_from == 9 and read_state(last.checkpoint)["data"]["epoch"] == 1
    assert metrics_text(work) == metrics_text(tmp_path / "full")
    assert last.final_val_loss == full.final_val_loss


def test_auto_micro_batch_is_the_largest_divisor_that_fits() -> None:
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    weights = 16 * model.num_params(non_embedding=False)
    cpu = torch.device("cpu")
    per_seq = activation_bytes(model.config, 1)
    assert activation_bytes(model.config, 6) == 6 * per_seq
    # Half the memory is the budget: room for 5 sequences -> 4, the largest divisor of 12 that fits.
    assert find_micro_batch(model, 12, cpu, contextlib.nullcontext(), 2 * (weights + 5 * per_seq)) == 4
    assert find_micro_batch(model, 12, cpu, contextlib.nullcontext(), 2 * (weights + 12 * per_seq)) == 12
    assert find_micro_batch(model, 12, cpu, contextlib.nullcontext(), 0) == 1


def test_auto_micro_batch_of_a_packed_run_counts_the_attention_mask() -> None:
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    weights = 16 * model.num_params(non_embedding=False)
    cpu = torch.device("cpu")
    per_seq = activation_bytes(model.config, 1)
    # 4 * (L*s*h*(34 + 5*a*s/h) + 3*s*V) = 4 * (2*32*32*44 + 3*32*256)
    assert per_seq == 458752
    # + the (1, 1, s, s) bool mask and each layer's float copy of it: s*s*(4*L + 1) = 32*32*9
    assert activation_bytes(model.config, 1, packed=True) == 458752 + 9216
    assert activation_bytes(model.config, 6, packed=True) == 6 * (458752 + 9216)
    budget = 2 * (weights + 12 * per_seq)  # exactly 12 unpacked sequences
    assert find_micro_batch(model, 12, cpu, contextlib.nullcontext(), budget) == 12
    assert find_micro_batch(model, 12, cpu, contextlib.nullcontext(), budget, doc_sep=0) == 6


def test_batch_tokens_with_auto_micro_batch_trains_the_same_global_batch(tmp_path: Path) -> None:
    auto = run(tmp_path / "auto", config(batch_size="auto", batch_tokens=8 * 32))
    fixed = run(tmp_path / "fixed", config(batch_size=8))
    assert auto.tokens_seen == fixed.tokens_seen == 12 * 8 * 32
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "fixed"), rel=1e-5)


@pytest.mark.parametrize("model", [MODEL, QWEN3_MODEL], ids=["gpt2", "qwen3"])
def test_compile_switch_trains_the_same_model(tmp_path: Path, model: ModelConfig) -> None:
    """torch.compile (on by default on CUDA only) is switchable; on CPU it runs inductor's C++ kernels (~30 s)."""
    compiled = run(tmp_path / "compiled", config(compile=True, max_steps=4), model)
    eager = run(tmp_path / "eager", config(compile=False, max_steps=4), model)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-5)
    # Compiled in place: the checkpoint has the plain model's names, loadable without compile.
    assert (load_file(compiled.checkpoint / "model.safetensors").keys()
            == load_file(eager.checkpoint / "model.safetensors").keys())


def test_resume_at_the_end_trains_nothing(tmp_path: Path) -> None:
    first = run(tmp_path, config())
    again = run(tmp_path, config())
    assert again.resumed_from == 12 and again.steps == 12
    assert again.final_val_loss == first.final_val_loss and again.final_train_loss == first.final_train_loss


def test_resume_with_different_training_settings_is_refused(tmp_path: Path) -> None:
    run(tmp_path, config(), stop_after=3)
    with pytest.raises(CheckpointMismatchError,
                       match=r"train\.learning_rate: checkpoint has 0\.003, config has 0\.001"):
        run(tmp_path, config(learning_rate=1e-3, min_lr=1e-4))
    run(tmp_path, config(log_interval=2, eval_interval=3))  # bookkeeping settings may change


def test_logs_once_per_interval_and_reports_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    progress: list[tuple[int, int]] = []
    run(tmp_path, config(), log_metrics=lambda m, s: calls.append((s, m)),
        on_progress=lambda d, t: progress.append((d, t)))
    assert [s for s, _ in calls] == [5, 10, 12]
    assert set(calls[0][1]) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss"}
    assert "train/mfu" not in calls[0][1]  # CPU: no known peak
    rows = [json.loads(line) for line in metrics_text(tmp_path).splitlines()]
    assert calls[0][1]["train/loss"] == pytest.approx(sum(r["loss"] for r in rows[:5]) / 5)
    assert calls[2][1]["train/lr"] == rows[11]["lr"]
    assert progress == [(5, 12), (10, 12), (12, 12)]


def test_mfu_is_logged_against_a_configured_peak(tmp_path: Path) -> None:
    calls: list[dict[str, float]] = []
    summary = run(tmp_path, config(peak_flops=1e12), log_metrics=lambda m, s: calls.append(m))
    for m in calls:
        assert m["train/mfu"] == pytest.approx(summary.flops_per_token * m["train/tokens_per_sec"] / 1e12, rel=1e-12)


# ---------------------------------------------------------------- bad input


def test_context_longer_than_val_split_names_block_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.block_size=32 is longer than the validation split \(20 tokens"):
        train(MODEL, config(), 256, TrainData(TRAIN, ArraySource(_BYTES[:20])), tmp_path, tokenizer_fingerprint=FP)
    with pytest.raises(ValueError,
                       match=r"model\.block_size=32 needs more than 33 tokens in the train split, which has 33"):
        train(MODEL, config(), 256, TrainData(ArraySource(_BYTES[:33]), VAL), tmp_path, tokenizer_fingerprint=FP)
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step's loss
                loss = loss * math.inf
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDivergedError,
                       match=r"step 3: loss inf .* not finite .* last good checkpoint is .*step-0000002"):
        run(tmp_path, config(checkpoint_interval=1))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000002"
    assert [json.loads(line)["step"] for line in metrics_text(tmp_path).splitlines()] == [1, 2]


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path: Path) -> None:
    cfg = config(learning_rate=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0, checkpoint_interval=1)
    with pytest.raises(TrainingDivergedError, match=r"step 2: .* Lower pretrain\.learning_rate=1e\+30"):
        run(tmp_path, cfg)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000001"


def test_init_from_mismatched_model_names_the_field(tmp_path: Path) -> None:
    base = run(tmp_path / "base", config(max_steps=2))
    other = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=32)
    with pytest.raises(CheckpointMismatchError) as err:
        run(tmp_path / "ft", config(), other, init_from=base.checkpoint)
    msg = str(err.value)
    assert "init_from" in msg and str(base.checkpoint / "state.json") in msg
    assert "model.n_layer: checkpoint has 2, config has 3" in msg
    assert "n_embd" not in msg  # only the fields that differ
    with pytest.raises(CheckpointMismatchError,
                       match="tokenizer_fingerprint: checkpoint has 'bytes-as-tokens', tokenizer has 'other'"):
        train(MODEL, config(), 256, TrainData(TRAIN, VAL), tmp_path / "ft2", tokenizer_fingerprint="other",
              init_from=base.checkpoint)


def test_a_checkpoint_of_another_format_version_is_refused_not_skipped(tmp_path: Path) -> None:
    run(tmp_path / "run", config(), stop_after=3)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000003"
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(state | {"format_version": 1}))
    msg = r"step-0000003/state\.json: format_version is 1, this code reads 2"
    with pytest.raises(CheckpointMismatchError, match=msg):  # resuming: not silently started afresh
        run(tmp_path / "run", config())
    with pytest.raises(CheckpointMismatchError,
                       match=r"init_from: .*\n  format_version: checkpoint has 1, this code reads 2"):
        run(tmp_path / "ft", config(), init_from=ckpt)
    assert latest_checkpoint(tmp_path / "ft" / "checkpoints") is None


def test_init_from_loads_weights_only(tmp_path: Path) -> None:
    base = run(tmp_path / "base", config(max_steps=6))
    steps: list[float] = []
    ft = run(tmp_path / "ft", config(max_steps=1, learning_rate=1e-9, min_lr=0.0, warmup_steps=0),
             init_from=base.checkpoint, log_metrics=lambda m, s: steps.append(m["val/loss"]))
    assert ft.resumed_from == 0 and ft.steps == 1
    assert abs(steps[0] - base.final_val_loss) < 1e-4  # same weights (lr ~0), not a fresh init


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_keeps_tied_weights(tmp_path: Path) -> None:
    summary = run(tmp_path, config(max_steps=3))
    model = load_model(summary.checkpoint)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.training
    stored = load_file(summary.checkpoint / "model.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    state = read_state(summary.checkpoint)
    assert state["step"] == 3 and state["vocab_size"] == 256 and state["tokenizer_fingerprint"] == FP
    assert state["model"] == {"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
                              "dropout": 0.0, "bias": True}
    # 12 sequences of the 6,249 windows of 32 + 1 tokens in epoch 0
    assert state["data"] == {"seed": 1337, "next_step": 3, "tokens_seen": 3 * 4 * 32, "epoch": 0, "index": 12,
                             "sequences_seen": 12}
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}  # one per rank
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt"}


def test_a_qwen3_checkpoint_keeps_its_arch_and_its_own_head(tmp_path: Path) -> None:
    summary = run(tmp_path / "run", config(max_steps=3), QWEN3_MODEL)
    model = load_model(summary.checkpoint)
    assert model.config == GPTConfig.from_config(QWEN3_MODEL, 256) and not model.tied
    stored = load_file(summary.checkpoint / "model.safetensors")
    assert not torch.equal(stored["lm_head.weight"], stored["transformer.wte.weight"])  # both stored, both trained
    assert read_state(summary.checkpoint)["model"] == {
        "vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, "bias": False,
        "arch": "qwen3", "n_kv_head": 1, "intermediate_size": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_embeddings": False}
    # Starting another model from it names what differs: the arch, or a qwen3 field.
    for other, diff in ((MODEL, "model.arch: checkpoint has 'qwen3', config has 'gpt2'"),
                        (QWEN3_MODEL.model_copy(update={"rope_theta": 500.0}),
                         "model.rope_theta: checkpoint has 10000.0, config has 500.0"),
                        (QWEN3_MODEL.model_copy(update={"n_kv_head": None}),
                         "model.n_kv_head: checkpoint has 1, config has 2")):
        with pytest.raises(CheckpointMismatchError) as err:
            run(tmp_path / "ft", config(), other, init_from=summary.checkpoint)
        assert diff in str(err.value)


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    run(tmp_path, config(checkpoint_interval=3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000009", "step-0000012"]


def test_latest_checkpoint_ignores_temp_and_corrupted_dirs(tmp_path: Path) -> None:
    cfg = config(checkpoint_interval=5, max_steps=10)
    run(tmp_path / "full", cfg)
    work = tmp_path / "work"
    run(work, cfg)
    root = work / "checkpoints"
    assert latest_checkpoint(root).name == "step-0000010"
    # A newer save that crashed half-way leaves its temporary directory.
    shutil.copytree(root / "step-0000010", root / ".step-0000015.tmp")
    (root / ".step-0000015.tmp" / "state.json").unlink()
    # A newer directory without state.json, and the newest complete one corrupted.
    (root / "step-0000020").mkdir()
    weights = root / "step-0000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(root).name == "step-0000005"
    # Training resumes from step 5 and ends where the uninterrupted run did.
    assert run(work, cfg).resumed_from == 5
    assert metrics_text(work) == metrics_text(tmp_path / "full")
    assert latest_checkpoint(root).name == "step-0000010"
    verify_checkpoint(root / "step-0000010")
    # The resume set the damaged checkpoints aside; the next save cleared the temporary directory.
    assert sorted(p.name for p in root.iterdir()) == [".step-0000010.damaged", ".step-0000020.damaged",
                                                      "step-0000005", "step-0000010"]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def _damage(ckpt: Path, how: str) -> None:
    weights = ckpt / "model.safetensors"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
    elif how == "missing optimizer state":
        (ckpt / "optimizer.pt").unlink()
    else:  # "unreadable state.json"
        (ckpt / "state.json").write_text('{"step": 9, "files": {', encoding="utf-8")


@pytest.mark.parametrize("how", ["truncated weights", "flipped byte", "missing optimizer state",
                                 "unreadable state.json"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   how: str) -> None:
    """The newest checkpoint fails verification: the run resumes from the one before, with warnings saying which
    was skipped and why, sets the damaged one aside, and ends bit for bit as the run that never stopped."""
    cfg = config(checkpoint_interval=4)
    full = run(tmp_path / "full", cfg, DROPOUT_MODEL)
    work = tmp_path / "damaged"
    run(work, cfg, DROPOUT_MODEL, stop_after=9)
    root = work / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000008", "step-0000009"]  # two are kept
    _damage(root / "step-0000009", how)
    with caplog.at_level(logging.WARNING, logger="lmpipe.training.checkpoint"):
        last = run(work, cfg, DROPOUT_MODEL)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"checkpoint {root / 'step-0000009'} fails verification, so it is not resumed from "
                                  "(moved aside to .step-0000009.damaged): ")
    why = {"truncated weights": "model.safetensors does not match the sha256 recorded in state.json",
           "flipped byte": "model.safetensors does not match the sha256 recorded in state.json",
           "missing optimizer state": "optimizer.pt is missing",
           "unreadable state.json": "state.json is not valid JSON"}[how]
    assert why in messages[0]
    assert messages[1] == f"resuming from {root / 'step-0000008'}, the newest checkpoint that verifies " \
                          "(skipped: step-0000009)"
    assert last.resumed_from == 8
    assert metrics_text(work) == metrics_text(tmp_path / "full")  # truncated to step 8, then the same steps
    assert last.final_val_loss == full.final_val_loss and last.final_train_loss == full.final_train_loss
    w_full, w_res = load_file(full.checkpoint / "model.safetensors"), load_file(last.checkpoint / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # Set aside, not counted among the two kept, not tried again.
    assert sorted(p.name for p in root.iterdir()) == [".step-0000009.damaged", "step-0000008", "step-0000012"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmpipe.training.checkpoint"):
        assert run(work, cfg, DROPOUT_MODEL).resumed_from == 12
    assert caplog.records == []


def test_no_checkpoint_that_verifies_starts_afresh_with_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(checkpoint_interval=4)
    full = run(tmp_path / "full", cfg, DROPOUT_MODEL)
    work = tmp_path / "damaged"
    run(work, cfg, DROPOUT_MODEL, stop_after=9)
    root = work / "checkpoints"
    _damage(root / "step-0000009", "flipped byte")
    _damage(root / "step-0000008", "truncated weights")
    with caplog.at_level(logging.WARNING, logger="lmpipe.training.checkpoint"):
        last = run(work, cfg, DROPOUT_MODEL)
    assert [r.getMessage() for r in caplog.records][2:] == [
        f"no checkpoint under {root} verifies (skipped: step-0000009, step-0000008): training starts from scratch"]
    assert last.resumed_from == 0
    assert metrics_text(work) == metrics_text(tmp_path / "full")
    w_full, w_res = load_file(full.checkpoint / "model.safetensors"), load_file(last.checkpoint / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_save_checkpoint_replaces_a_leftover_temp_dir(tmp_path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=8))
    opt = model.configure_optimizer(0.0, 1e-3, (0.9, 0.95), "cpu")
    (tmp_path / ".step-0000001.tmp").mkdir()
    (tmp_path / ".step-0000001.tmp" / "junk").write_text("x")
    out = save_checkpoint(tmp_path, 1, model, opt, {"tokenizer_fingerprint": FP})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]


# ---------------------------------------------------------------- stages


STAGE_MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def test_run_pretrain_publishes_model_and_resumes_after_interruption(tmp_path: Path, stages) -> None:
    tok, shards = stages
    cfg = config(max_steps=10, checkpoint_interval=4, log_interval=2)
    full = run_pretrain(STAGE_MODEL, cfg, shards, tok, tmp_path / "full", "fp")
    assert sorted(full.files) == ["metrics.jsonl", "model/model.safetensors", "model/state.json"]
    assert set(full.metrics) == {"final_train_loss", "final_val_loss", "tokens_per_sec", "params", "steps", "seconds"}
    assert full.metrics["steps"] == 10
    model = load_model(full.path("model"))
    assert model.config.vocab_size == 512
    assert read_state(full.path("model"))["files"].keys() == {"model.safetensors"}  # optimizer state dropped

    class Interrupt(Exception):
        pass

    def interrupt_at_6(metrics: dict[str, float], step: int) -> None:
        if step == 6:
            raise Interrupt

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run_pretrain(STAGE_MODEL, cfg, shards, tok, out, "fp", report=Reporters(metrics=interrupt_at_6))
    assert not out.exists() and latest_checkpoint(partial_dir(out) / "checkpoints").name == "step-0000004"
    resumed = run_pretrain(STAGE_MODEL, cfg, shards, tok, out, "fp")
    assert resumed.meta["resumed_from_step"] == 4
    assert resumed.files == full.files  # byte-identical model and metrics.jsonl
    assert run_pretrain(STAGE_MODEL, cfg, shards, tok, out, "fp").meta["reused"] is True


def test_run_finetune_continue_and_mismatch(tmp_path: Path, stages) -> None:
    tok, shards = stages
    base = run_pretrain(STAGE_MODEL, config(max_steps=4), shards, tok, tmp_path / "pre", "fp")
    ft_cfg = ContinueFinetuneConfig(max_steps=3, batch_size=4, eval_batches=2, device="cpu")
    ft = run_finetune(ft_cfg, STAGE_MODEL, base.path("model"), shards, tok, tmp_path / "ft", "fp")
    assert ft.metrics["steps"] == 3 and ft.meta["init_checkpoint"] == str(base.path("model"))
    assert read_state(ft.path("model"))["train"]["learning_rate"] == ft_cfg.learning_rate

    wider = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
    with pytest.raises(CheckpointMismatchError,
                       match=r"finetune\.init_checkpoint: .*\n  model\.n_embd: checkpoint has 32, config has 64"):
        run_finetune(ft_cfg, wider, base.path("model"), shards, tok, tmp_path / "ft2", "fp")
    with pytest.raises(FileNotFoundError, match="finetune.init_checkpoint"):
        run_finetune(ft_cfg, STAGE_MODEL, tmp_path / "nope", shards, tok, tmp_path / "ft3", "fp")


def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(tmp_path: Path) -> None:
    # A learning rate that makes the val loss climb after a few steps, validated every step.
    cfg = config(max_steps=40, learning_rate=5e-2, min_lr=5e-2, warmup_steps=0, eval_interval=1,
                 early_stopping_patience=3, checkpoint_interval=100)
    vals: dict[int, float] = {}
    summary = run(tmp_path, cfg, log_metrics=lambda m, s: vals.update({s: m["val/loss"]}) if "val/loss" in m else None)
    assert summary.stopped_early and summary.steps < 40
    best = min(vals, key=vals.get)  # the first step of the lowest val loss
    assert summary.best_step == best and summary.best_val_loss == vals[best]
    assert summary.steps == best + 3  # three validations without improvement
    assert summary.final_val_loss == vals[best] != vals[summary.steps]  # the published model's, not the last step's
    assert summary.checkpoint == tmp_path / "best" / f"step-{best:07d}"
    assert read_state(summary.checkpoint)["val_loss"] == vals[best]
    # The weights that go forward are the best step's, not the last.
    assert not torch.equal(load_file(summary.checkpoint / "model.safetensors")["transformer.wte.weight"],
                           load_file(latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors")
                           ["transformer.wte.weight"])
    # Running again (a retry, a resume) does not train on past the stop.
    again = run(tmp_path, cfg)
    assert again.stopped_early and again.steps == summary.steps and again.checkpoint == summary.checkpoint
    assert len(losses(tmp_path)) == summary.steps



def _run_and_find_bests(work: Path, cfg):
    """An uninterrupted run with its val losses by step, its final best step and the best step before it."""
    vals: dict[int, float] = {}
    full = run(work, cfg, log_metrics=lambda m, s: vals.update({s: m["val/loss"]}) if "val/loss" in m else None)
    bests = [s for s in sorted(vals) if vals[s] < min([vals[t] for t in vals if t < s], default=math.inf)]
    return full, vals, bests[-1], bests[-2]


def test_a_resume_that_does_not_find_the_newer_best_again_publishes_the_recorded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after a new best but before the next regular checkpoint: the resume replays from that checkpoint,
    and on a GPU (not bit for bit) the replay may not find the newer best again. The best checkpoint the regular
    checkpoint records must still be there to publish."""
    import lmpipe.training.checkpoint as ckpt_mod
    import lmpipe.training.loop as train_mod

    cfg = config(max_steps=40, learning_rate=5e-2, min_lr=5e-2, warmup_steps=0, eval_interval=1,
                 early_stopping_patience=3, checkpoint_interval=100)
    full, vals, last, before = _run_and_find_bests(tmp_path / "full", cfg)
    assert last == full.best_step

    work = tmp_path / "crashed"
    run(work, cfg, stop_after=before)  # a regular checkpoint that records `before` as the best
    real_write = ckpt_mod.write_checkpoint

    def crash_at_last(root, step, *args, **kwargs):
        if Path(root).name == "checkpoints" and step == last:
            raise RuntimeError("killed")  # after save_best(last), before the regular checkpoint
        return real_write(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "write_checkpoint", crash_at_last)
    with pytest.raises(RuntimeError, match="killed"):
        run(work, cfg, stop_after=last)
    monkeypatch.setattr(ckpt_mod, "write_checkpoint", real_write)
    assert sorted(p.name for p in (work / "best").iterdir()) == [f"step-{before:07d}", f"step-{last:07d}"]

    real_eval = train_mod.evaluate_loss
    calls = iter(range(before + 1, 10_000))  # the resumed run validates every step from before + 1

    def replay_misses_the_newer_best(*args, **kwargs):
        value = real_eval(*args, **kwargs)
        return value + 10.0 if next(calls) >= last else value

    monkeypatch.setattr(train_mod, "evaluate_loss", replay_misses_the_newer_best)
    resumed = run(work, cfg)
    assert resumed.stopped_early and resumed.best_step == before and resumed.steps == before + 3
    assert resumed.checkpoint == work / "best" / f"step-{before:07d}" and resumed.checkpoint.is_dir()
    assert resumed.final_val_loss == vals[before]
    # The final regular checkpoint records `before`: the other best is out of any resume's reach, and gone.
    assert [p.name for p in (work / "best").iterdir()] == [f"step-{before:07d}"]


def test_the_best_checkpoint_of_the_previous_regular_one_is_kept_for_a_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With early stopping, the regular checkpoint before the newest may record an older best. A resume that
    falls back to it (the newest damaged) must find that best still there, since a replay that is not bit for
    bit (a GPU) may not find the newer best again; on CPU it does, and the run ends as the one that never
    stopped."""
    # Validated every other step, checkpointed every step: the checkpoint of step last - 1 records `before`.
    cfg = config(max_steps=40, learning_rate=2e-2, min_lr=2e-2, warmup_steps=0, eval_interval=2,
                 early_stopping_patience=3, checkpoint_interval=1)
    full, vals, last, before = _run_and_find_bests(tmp_path / "full", cfg)
    assert (before, last, full.stopped_early) == (last - 2, full.best_step, True)

    work = tmp_path / "damaged"
    run(work, cfg, stop_after=last)
    root = work / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step-{last - 1:07d}", f"step-{last:07d}"]
    assert read_state(root / f"step-{last - 1:07d}")["early_stopping"]["best_step"] == before
    assert sorted(p.name for p in (work / "best").iterdir()) == [f"step-{before:07d}", f"step-{last:07d}"]
    _damage(root / f"step-{last:07d}", "flipped byte")
    with caplog.at_level(logging.WARNING, logger="lmpipe.training.checkpoint"):
        resumed = run(work, cfg)
    assert resumed.resumed_from == last - 1 and len(caplog.records) == 2
    assert (resumed.steps, resumed.best_step, resumed.best_val_loss) == (full.steps, full.best_step,
                                                                         full.best_val_loss)
    assert metrics_text(work) == metrics_text(tmp_path / "full")
    w_full, w_res = load_file(full.checkpoint / "model.safetensors"), load_file(resumed.checkpoint /
                                                                                  "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # Both regular checkpoints kept now record the final best: the older best is out of reach, and gone.
    assert [p.name for p in (work / "best").iterdir()] == [f"step-{last:07d}"]


def test_an_early_stop_between_logs_flushes_every_step_before_its_checkpoint(tmp_path: Path) -> None:
    """The stop may come on a step that is neither a log nor a checkpoint step: its final checkpoint must
    still come after every step's row (a resume finds nothing left to train, so rows missing then stay
    missing), and final_train_loss is of the last steps, not nan."""
    cfg = config(max_steps=60, learning_rate=5e-2, min_lr=5e-2, warmup_steps=0, eval_interval=1, log_interval=7,
                 early_stopping_patience=2, checkpoint_interval=100)
    summary = run(tmp_path, cfg)
    rows = [json.loads(line) for line in metrics_text(tmp_path).splitlines()]
    assert summary.stopped_early and summary.steps % 7 != 0
    assert [r["step"] for r in rows] == list(range(1, summary.steps + 1))
    tail = [r["loss"] for r in rows[-7:]]
    assert summary.final_train_loss == sum(tail) / len(tail)


def test_early_stopping_resumes_its_record(tmp_path: Path) -> None:
    cfg = config(max_steps=40, learning_rate=5e-2, min_lr=5e-2, warmup_steps=0, eval_interval=1,
                 early_stopping_patience=3, checkpoint_interval=100)
    full = run(tmp_path / "full", cfg)
    run(tmp_path / "resumed", cfg, stop_after=full.best_step + 1)  # interrupted after the best, before the stop
    resumed = run(tmp_path / "resumed", cfg)
    assert (resumed.steps, resumed.best_step, resumed.best_val_loss) == (full.steps, full.best_step, full.best_val_loss)
