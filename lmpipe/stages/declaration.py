"""What a stage reads, declared once: its fingerprint, output directory and cache key follow from it.

A :class:`StageSpec` names which of the stage task's arguments are config sections,
which are other inputs (plain values, and the content digests of input files: an
edited file re-runs the stage, a moved one does not), and which are upstream stage
results. The task hands its arguments over whole (``SPEC.locate(locals())`` as its
first statement); what is not declared (where to log, names for the UI, the
chunks an upstream's result already determines) is not part of the fingerprint.

A section counts with the fields that can change an output
(``lmpipe.config.effects.fingerprinted``: logging cadence, thread counts... are
declared so on the fields). The work directory is not part of the fingerprint:
the same stage computed in another work directory has the same fingerprint
(and its own files there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmpipe.artifacts import StageResult
from lmpipe.config.effects import fingerprinted
from lmpipe.stages.contract import stage_dir
from lmpipe.stages.fingerprint import stage_fingerprint
from lmpipe.tracking.runs import TrackingContext


@dataclass(frozen=True)
class StageSpec:
    """Which arguments of a stage's task make up its fingerprint."""

    stage: str
    configs: tuple[str, ...] = ()  # argument names holding config sections
    inputs: tuple[str, ...] = ()  # other values that decide the output: input files' sha256, settings
    upstreams: tuple[str, ...] = ()  # argument names holding upstream StageResults (or None, or a name -> result map)
    keyed_on_tracking_store: bool = False  # the stage's output lives in the MLflow store itself
    # Fields of a section this stage does not read (another stage does: a corpus's cleaning is the clean
    # stage's); fields that can change no output at all are declared so on the field instead.
    not_read: tuple[tuple[str, frozenset[str]], ...] = ()

    def fingerprint(self, arguments: Mapping[str, Any]) -> str:
        skip = dict(self.not_read)
        values = {name: _fingerprinted(arguments[name], skip.get(name, frozenset())) for name in self.configs}
        values |= {name: arguments[name] for name in self.inputs}
        if self.keyed_on_tracking_store:
            values["tracking_uri"] = arguments["ctx"].uri
        ups: list[str] = []
        for name in self.upstreams:
            up = arguments[name]
            if isinstance(up, dict):  # a mapping of named upstreams, e.g. corpora to evaluate on
                ups += [f"{k}={v.fingerprint if isinstance(v, StageResult) else v}" for k, v in sorted(up.items())]
            elif up is not None:
                ups.append(up.fingerprint if isinstance(up, StageResult) else str(up))
        return stage_fingerprint(self.stage, values, ups)

    def locate(self, arguments: Mapping[str, Any]) -> tuple[str, Path]:
        """(fingerprint, output directory) from the task's arguments: the same values its cache key used."""
        fp = self.fingerprint(arguments)
        ctx: TrackingContext = arguments["ctx"]
        return fp, stage_dir(ctx.workdir, self.stage, fp)


def _fingerprinted(value: Any, not_read: frozenset[str]) -> Any:
    if isinstance(value, BaseModel):
        return {k: v for k, v in fingerprinted(value).items() if k not in not_read}
    return value
