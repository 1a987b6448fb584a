"""What changing a config field changes, declared once, on the field.

A field is marked with ``Annotated[type, Affects(...)]``; an unmarked field is
``"output"``. Two readers use the marks, so they cannot disagree:

* a stage's fingerprint (:func:`fingerprinted`): what can change the stage's output;
* resuming training from a checkpoint (:func:`trajectory`): what decides which
  optimizer steps are taken, so must match the checkpoint.

``"output"``: both. ``"execution"``: how the steps are carried out (how a global
batch is split into micro-batches, accumulation steps and processes; the device;
compile; how many batches a validation reads): the figures may differ, so the
fingerprint counts it, but the steps are the same, so a checkpoint resumes across
it (the global batch itself is compared). ``"none"``: neither (logging and
checkpoint cadence, thread count, MFU's peak, a deterministic encoder's batch).
A mark that names ``output_when`` is ``"output"`` while that field of the same
section is not None (or, with ``output_value``, equals it): validating every
``eval_interval`` steps decides nothing, unless early stopping counts its
patience in validations; Muon's settings decide nothing unless ``optimizer`` is
``muon``.

The mark is looked up through the section's base classes, so a subclass that
redeclares a field only to change its default keeps the base's mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

Effect = Literal["output", "execution", "none"]


@dataclass(frozen=True)
class Affects:
    """``Annotated`` metadata of a config field: what changing it changes (see the module's docstring)."""

    effect: Effect
    output_when: str | None = None  # a field of the same section: while it is not None, the effect is "output"
    output_value: Any = None  # given: while output_when's field equals it instead


EXECUTION = Affects("execution")
NO_EFFECT = Affects("none")


def _mark(cls: type[BaseModel], name: str) -> Affects | None:
    for klass in cls.__mro__:
        info = (getattr(klass, "__pydantic_fields__", None) or {}).get(name)
        mark = next((m for m in info.metadata if isinstance(m, Affects)), None) if info is not None else None
        if mark is not None:
            return mark
    return None


def field_effect(section: BaseModel, name: str) -> Effect:
    """What changing field ``name`` of ``section`` (with the section's other values) changes."""
    mark = _mark(type(section), name)
    if mark is None:
        return "output"
    if mark.output_when is not None:
        value = getattr(section, mark.output_when, None)
        if (value == mark.output_value) if mark.output_value is not None else (value is not None):
            return "output"
    return mark.effect


def _kept(section: BaseModel, effects: tuple[Effect, ...]) -> dict[str, Any]:
    dumped = section.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if field_effect(section, k) in effects}


def fingerprinted(section: BaseModel) -> dict[str, Any]:
    """The section's values that can change a stage's output (JSON form): what its fingerprint covers."""
    return _kept(section, ("output", "execution"))


def trajectory(section: BaseModel) -> dict[str, Any]:
    """The training settings that decide which steps are taken (JSON form): they must match a checkpoint to
    resume from it."""
    return _kept(section, ("output",))
