"""Metric logging of a training run: metrics.jsonl (one row per step), interval averages, tokens/s, MFU."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from lmpipe.artifacts import fsync_path
from lmpipe.data.jsonl import parse_jsonl_line, read_jsonl_objects
from lmpipe.training.device import mfu

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a finished run's metrics.jsonl ([] when there is none); a bad line, the last one too,
    is a ValueError naming the file and the line."""
    if not path.is_file():
        return []
    return read_jsonl_objects(path, "metrics file")


def truncate_metrics(path: Path, through_step: int) -> list[dict[str, Any]]:
    """Keep the rows of steps <= through_step: after a resume the file equals an uninterrupted run's.

    A run killed while appending leaves its last line cut off (no newline, or not
    JSON): that line is dropped with a warning that names the file and the bytes
    dropped. Its row is past the checkpoint resumed from (rows are flushed
    before a checkpoint is written), so nothing the resumed run keeps is lost. A
    bad line before the last is not what a kill leaves: a ValueError naming the
    file and the line.
    """
    data = path.read_bytes() if path.is_file() else b""
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline, b"" unless the last line was cut off
    if tail:
        _drop_cut_off(path, tail, "has no newline")
    elif lines and isinstance(parse_jsonl_line(lines[-1], first=len(lines) == 1), str):
        _drop_cut_off(path, lines.pop() + b"\n", "is not JSON")
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        record = parse_jsonl_line(raw, first=lineno == 1)
        if isinstance(record, str):
            raise ValueError(
                f"metrics file {path}:{lineno}: {record}. Only a run killed mid-append leaves a bad line, and only "
                f"as the last one: the file is damaged. Delete {path.parent} to train this run afresh")
        if record is not None and record["step"] <= through_step:
            rows.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def _drop_cut_off(path: Path, line: bytes, why: str) -> None:
    log.warning("%s: dropped its last line, %d bytes cut off by an interrupted run (it %s): %r", path, len(line),
                why, line[:80])


class MetricLogger:
    """Rows of metrics.jsonl, and the averages over each log interval that go to the tracker.

    Per-step values stay on the device until ``flush``: reading them is a GPU sync,
    so all pending steps are read at once. ``path`` is written by the main rank only
    (``write``; None: rows are kept, not written); a run resumed at ``start`` continues the file and the interval it
    stopped in, so it logs exactly what an unbroken run logs. ``tokens_per_step``
    None (batches of varying size: the classifier): loss and lr only, no gradient
    norm, tokens/s or MFU. ``echo``: a label to print each logged interval with
    (torchrun workers, whose progress bar is off).
    """

    def __init__(self, path: Path | None, *, write: bool = True, log_interval: int, start: int = 0,
                 tokens_per_step: int | None = None, flops_per_token: int = 0, peak_flops: float | None = None,
                 world_size: int = 1, echo: str | None = None) -> None:
        self.path, self.write, self.log_interval = path, write and path is not None, log_interval
        self.tokens_per_step, self.flops_per_token, self.peak, self.world_size = (
            tokens_per_step, flops_per_token, peak_flops, world_size)
        self.echo = echo
        self.rows = truncate_metrics(path, start) if path is not None and self.write else []
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad_norm)
        self.extras: dict[int, dict[str, float]] = {}  # more values for a pending step's row
        # Since the last log; after a resume mid-interval, the interval's earlier steps.
        self.interval_losses = [r["loss"] for r in self.rows if r["step"] > start - start % log_interval]
        self.last_grad_norm = self.rows[-1].get("grad_norm", math.nan) if self.rows else math.nan
        self.train_seconds = 0.0  # time in steps only, for tokens/s
        self.interval_seconds, self.interval_tokens = 0.0, 0

    def record(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor, seconds: float) -> None:
        """A finished optimizer step (1-based ``step``): its values stay on the device until ``flush``."""
        self.pending.append((step, lr, loss, grad_norm))
        self.train_seconds += seconds
        self.interval_seconds += seconds
        self.interval_tokens += self.tokens_per_step or 0

    def add_to_row(self, step: int, values: dict[str, float]) -> None:
        """Put more values (validation scores) into the row of the pending step ``step``."""
        self.extras[step] = values

    def flush(self, durable: bool = False) -> None:
        """Write pending steps to metrics.jsonl (one device sync for all of them). ``durable``: also fsync the
        file, before a checkpoint of the last step is sealed: a power loss must not keep a checkpoint whose
        rows are lost (a resume keeps the rows up to its step)."""
        if self.pending:
            self._write_pending()
        if durable and self.write and self.path is not None and self.path.exists():
            fsync_path(self.path)
            fsync_path(self.path.parent)  # and its directory entry (the file's creation)

    def _write_pending(self) -> None:
        values = torch.stack([torch.stack([p[2].float(), p[3].float()]) for p in self.pending]).tolist()  # (n, 2)
        self.last_grad_norm = values[-1][1]
        new_rows = [{"step": s, "loss": loss, "lr": lr, "grad_norm": norm} | self.extras.pop(s, {})
                    for (s, lr, _, _), (loss, norm) in zip(self.pending, values, strict=True)]
        if self.write and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new_rows)
        self.rows.extend(new_rows)
        self.interval_losses.extend(row["loss"] for row in new_rows)
        self.pending.clear()

    def interval(self, step: int, lr: float, max_steps: int) -> dict[str, float]:
        """The averages of the interval ending at ``step`` (flushed), for the tracker; starts the next interval."""
        logged = {"train/loss": sum(self.interval_losses) / len(self.interval_losses), "train/lr": lr}
        if self.tokens_per_step is not None:
            tok_s = self.interval_tokens / max(self.interval_seconds, 1e-9)
            logged |= {"train/grad_norm": self.last_grad_norm, "train/tokens_per_sec": tok_s}
            if self.peak is not None:
                logged["train/mfu"] = mfu(self.flops_per_token, tok_s, self.peak, self.world_size)
            if self.echo is not None:
                print(f"{self.echo} step {step}/{max_steps} loss {logged['train/loss']:.4f} tokens/s {tok_s:,.0f}",
                      flush=True)
        self.interval_losses.clear()
        self.interval_seconds, self.interval_tokens = 0.0, 0
        return logged

    def final_train_loss(self) -> float:
        """Mean loss of the last log_interval steps (one step is noisy); nan when metrics.jsonl was removed."""
        tail = [r["loss"] for r in self.rows[-self.log_interval :]] or [math.nan]
        return sum(tail) / len(tail)
