"""Loading a config: a YAML preset, dotted overrides, and errors that name each bad field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpipe.config.base import ConfigError
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import FINETUNE_MODES, MODEL_ARCHS

# Sections with variants: the field that picks one, and the variants by its value.
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"finetune": ("mode", FINETUNE_MODES),
                                                   "model": ("arch", MODEL_ARCHS)}


def _field_name(path: list[str | int]) -> str:
    """The path as the config's errors write it: ``data.pretrain.sources[0].uri``."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).removeprefix(".")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = e["loc"]
        if loc and loc[0] in _VARIANTS and len(loc) > 1 and loc[1] in _VARIANTS[str(loc[0])][1]:
            loc = loc[:1] + loc[2:]  # the variant's tag is the section's mode or arch, not a field
        field = _field_name(list(loc)) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        shown = "" if e["type"] in ("missing",) else f" (got {e['input']!r})"
        if isinstance(e.get("input"), dict):
            shown = ""
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig, raising ConfigError that names each bad field."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


_STEP = re.compile(r"([^.\[\]]+)((?:\[[^\[\]]*\])*)")
_INDEX = re.compile(r"\[([^\[\]]*)\]")


def _override_path(dotted: str) -> list[str | int]:
    """``a.b[0].c`` (or ``a.b.0.c``) as ``['a', 'b', 0, 'c']``; a digit between dots stays a string (a list
    takes it as an index, a section as a field name)."""
    path: list[str | int] = []
    for part in dotted.split("."):
        step = _STEP.fullmatch(part)
        if step is None:
            raise ConfigError(f"override {dotted}: {part!r} is not a field name, optionally with [index]")
        path.append(step[1])
        for raw in _INDEX.findall(step[2]):
            if not raw.isdigit():
                raise ConfigError(f"override {dotted}: [{raw}] is not a list index (0, 1, 2, ...)")
            path.append(int(raw))
    return path


def _as_index(key: str | int, items: list[Any], dotted: str, field: str) -> int:
    """``key`` as an index into the list ``field``, or a ConfigError naming the field, the index and the length."""
    if isinstance(key, str) and not key.isdigit():
        raise ConfigError(f"override {dotted}: {field} is a list: give an item's index ({field}[0].{key}), "
                          "not a field name")
    index = int(key)
    if index >= len(items):
        held = f"{len(items)} item{'s' if len(items) != 1 else ''}" if items else "no items"
        raise ConfigError(f"override {dotted}: index {index} is out of range: {field} has {held}"
                          + (f" (indices 0..{len(items) - 1})" if items else ""))
    return index


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (so 3, 1e-3, true, [a, b]).

    A list item is reached by its index, written either way: ``data.pretrain.sources[0].doc_boundary=file``
    or ``data.pretrain.sources.0.doc_boundary=file``.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    if not all(dotted.split(".")):
        raise ConfigError(f"override {override!r} has an empty field name")
    path = _override_path(dotted)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML: {err}") from None
    node: Any = data
    for i, key in enumerate(path):
        field = _field_name(path[:i])
        if isinstance(node, list):
            key = _as_index(key, node, dotted, field)
        elif isinstance(key, int):
            kind = "a section" if isinstance(node, dict) else ("not set" if node is None else repr(node))
            raise ConfigError(f"override {dotted}: {field} is not a list, so [{key}] cannot index it (it is {kind})")
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {field} is not a section")
        if i == len(path) - 1:
            node[key] = value
            return
        if isinstance(node, dict) and node.get(key) is None and isinstance(path[i + 1], str):
            node[key] = {}  # a section left unset, or a misspelt field that validation then names
        node = node.get(key) if isinstance(node, dict) else node[key]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML preset (or the defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
        source = str(p)
    # Start from the resolved preset so overrides can reach into default sections.
    data = build_config(data, source).model_dump(mode="json")
    for override in overrides:
        apply_override(data, override)
    _drop_other_mode_fields(data, overrides)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_config(data, source)


def _drop_other_mode_fields(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """After ``finetune.mode=...`` (or ``model.arch=...``) switches the preset's variant of a section, leave out
    the preset's fields the new variant does not have (an SFT preset's sft_path in mode continue), and those
    holding another variant's default where the new one's differs (GPT-2's ``bias: true`` becomes Qwen3's
    false); a field the overrides set stays, so a misplaced one is still an error that names it."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    for name, (picker, variants) in _VARIANTS.items():
        section = data.get(name)
        if f"{name}.{picker}" not in keys or not isinstance(section, dict):
            continue
        variant = variants.get(section.get(picker))  # type: ignore[arg-type]
        if variant is None:
            continue  # an unknown mode or arch: validation names it
        given = {k.removeprefix(f"{name}.").split(".")[0] for k in keys if k.startswith(f"{name}.")}
        others = [v for v in variants.values() if v is not variant]
        for field in list(section):
            if field in given:
                continue
            if field not in variant.model_fields:
                del section[field]
            elif section[field] != variant.model_fields[field].default and any(
                    field in o.model_fields and o.model_fields[field].default == section[field] for o in others):
                del section[field]  # another variant's default, not a choice: the new variant's default applies
