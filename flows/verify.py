"""`lmpipe verify`: hash every stage directory a config's run would reuse, and say which ones are damaged.

The flows' own code walks the DAG (``flows.pipeline``), handed a plan instead of
the ledger: each stage is located from its declaration (``tasks.stages.SPECS``)
and read from disk, nothing runs. The walk stops at the first stage that is not
built (what follows it depends on it). Every file is hashed against its stage's
``stage_result.json``; ``--repair`` moves a damaged stage directory aside, to
``<workdir>/damaged/<stage>/<fingerprint>-<time>`` (out of every stage folder, so
nothing that looks for finished stages finds it), and the next run rebuilds it.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmpipe.artifacts import StageResult
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.eval.benchmark_files import resolve_benchmarks
from lmpipe.stages.contract import file_problems, load_completed
from lmpipe.tracking.runs import TrackingContext, resolve_uri


class NotBuilt(Exception):
    """The walk reached a stage with no finished directory: what follows is not located."""


@dataclass
class Checked:
    label: str
    out_dirs: list[Path]
    problems: list[tuple[Path, str, str]]
    files: int
    size: int
    seconds: float
    built: bool = True
    moved: list[Path] = field(default_factory=list)


@dataclass
class Plan:
    """A StageRunner that locates each stage, hashes its files and returns its recorded result."""

    rows: list[Checked] = field(default_factory=list)

    def run(self, stage_task: Any, label: str | None = None, **params: Any) -> StageResult:
        return self._check(stage_task, label or stage_task.name, [params])[0]

    def map(self, chunk_task: Any, label: str, chunks: Sequence[str], **params: Any) -> list[StageResult]:
        return self._check(chunk_task, label, [{**params, "chunk": chunk} for chunk in chunks])

    def _check(self, stage_task: Any, label: str, calls: list[dict[str, Any]]) -> list[StageResult]:
        from tasks.stages import SPECS  # imports prefect: only for a walk

        spec = SPECS[stage_task.name]
        start = time.perf_counter()
        results, problems, out_dirs = [], [], []
        files = size = 0
        for params in calls:
            bound = inspect.signature(stage_task.fn).bind_partial(**params)
            bound.apply_defaults()
            _, out_dir = spec.locate(bound.arguments)
            done = load_completed(out_dir)
            if done is None:
                self.rows.append(Checked(label, [out_dir], [], 0, 0, time.perf_counter() - start, built=False))
                raise NotBuilt(label)
            out_dirs.append(out_dir)
            problems += file_problems(done, full=True)
            files += len(done.files)
            size += sum(done.sizes.values())
            results.append(done)
        self.rows.append(Checked(label, out_dirs, problems, files, size, time.perf_counter() - start))
        return results


DAMAGED_DIR = "damaged"


def verify(config: PipelineConfig, *, repair: bool = False, data_only: bool = False) -> tuple[list[Checked], bool]:
    """Check the stages of ``config``'s run (its data stages with ``data_only``); (rows, whether all are sound)."""
    from flows.pipeline import _prepare, _train_and_register

    ctx = TrackingContext(uri=resolve_uri(config.tracking, config.workdir), experiment_id="", parent_run_id="",
                          workdir=str(Path(config.workdir).resolve()))
    plan = Plan()
    try:
        tokenizer, corpora, trained_on = _prepare(config, ctx, plan)
        if not data_only:
            bench_files = resolve_benchmarks(config.eval.benchmarks, Path(ctx.workdir) / "benchmarks")
            _train_and_register(config, ctx, plan, tokenizer, corpora, bench_files, trained_on)
    except NotBuilt:
        pass
    sound = not any(row.problems for row in plan.rows)
    if repair:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for row in plan.rows:
            for out_dir in sorted({_stage_of(path, row.out_dirs) for path, _, _ in row.problems}):
                aside = Path(ctx.workdir) / DAMAGED_DIR / out_dir.parent.name / f"{out_dir.name}-{stamp}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(out_dir, aside)
                row.moved.append(aside)
    return plan.rows, sound


def _stage_of(path: Path, out_dirs: list[Path]) -> Path:
    return next(d for d in out_dirs if d == path or d in path.parents)


def format_report(rows: list[Checked], workdir: str) -> str:
    """The table `lmpipe verify` prints: one row per stage (chunk stages: one row for all their chunks)."""
    width = max([24, *(len(r.label) + 2 for r in rows)])
    lines = [f"{'stage':<{width}}{'status':<12}{'files':>7}{'MB':>10}{'seconds':>9}  output",
             "-" * (width + 70)]
    for r in rows:
        status = "not built" if not r.built else "DAMAGED" if r.problems else "ok"
        where = str(r.out_dirs[0]) if len(r.out_dirs) == 1 else f"{len(r.out_dirs)} chunks in {r.out_dirs[0].parent}"
        lines.append(f"{r.label:<{width}}{status:<12}{r.files:>7}{r.size / 1e6:>10.1f}{r.seconds:>9.2f}  {where}")
        lines += [f"    {path}: expected {expected}, found {found}" for path, expected, found in r.problems]
        lines += [f"    moved aside to {aside}: the next run rebuilds it" for aside in r.moved]
    if rows and not rows[-1].built:
        lines.append(f"(the walk stops at {rows[-1].label}: the next run builds it and what depends on it)")
    total = sum(r.size for r in rows)
    lines.append(f"{sum(r.files for r in rows)} files, {total / 1e6:.1f} MB hashed in "
                 f"{sum(r.seconds for r in rows):.2f} s under {workdir}")
    return "\n".join(lines)
