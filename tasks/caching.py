"""Cache keys: a stage's Prefect cache key is its fingerprint (plus where its files live).

The fingerprint hashes the stage's config sections, its upstream stages'
fingerprints and its code version (lmpipe.stages.fingerprint). The work directory is
part of the cache key but not of the fingerprint: the same stage computed in
another work directory has the same fingerprint but other files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmpipe.artifacts import StageResult
from lmpipe.stages.contract import stage_dir
from lmpipe.stages.fingerprint import stage_fingerprint
from lmpipe.tracking.runs import TrackingContext


@dataclass(frozen=True)
class StageSpec:
    """Which task parameters make up a stage's fingerprint."""

    stage: str
    configs: tuple[str, ...]  # parameter names holding config sections
    upstreams: tuple[str, ...] = ()  # parameter names holding upstream StageResults (or None)
    keyed_on_tracking_store: bool = False  # the stage's output lives in the MLflow store itself
    # Fields of a config parameter that cannot change the stage's output (logging cadence, thread
    # count, batch sizes of a deterministic encoder...): changing them must not re-run the stage.
    ignore: tuple[tuple[str, frozenset[str]], ...] = ()

    def fingerprint(self, parameters: dict[str, Any]) -> str:
        ignored = dict(self.ignore)
        configs = {name: _without(parameters[name], ignored.get(name, frozenset())) for name in self.configs}
        if self.keyed_on_tracking_store:
            configs["tracking_uri"] = parameters["ctx"].uri
        ups: list[str] = []
        for name in self.upstreams:
            up = parameters[name]
            if isinstance(up, dict):  # a mapping of named upstreams, e.g. corpora to evaluate on
                ups += [f"{k}={v.fingerprint if isinstance(v, StageResult) else v}" for k, v in sorted(up.items())]
            elif up is not None:
                ups.append(up.fingerprint if isinstance(up, StageResult) else str(up))
        return stage_fingerprint(self.stage, configs, ups)

    def locate(self, parameters: dict[str, Any]) -> tuple[str, Path]:
        """(fingerprint, output directory) for a task body; the same values its cache key used."""
        fp = self.fingerprint(parameters)
        ctx: TrackingContext = parameters["ctx"]
        return fp, stage_dir(ctx.workdir, self.stage, fp)

    def cache_key(self, _context: Any, parameters: dict[str, Any]) -> str:
        workdir = hashlib.sha256(str(parameters["ctx"].workdir).encode()).hexdigest()[:8]
        return f"lmpipe-{self.stage}-{self.fingerprint(parameters)}-{workdir}"


def _without(value: Any, fields: frozenset[str]) -> Any:
    if fields and isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude=set(fields))
    return value
