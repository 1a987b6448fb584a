"""Loading a config: a YAML preset, dotted overrides, and errors that name each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpipe.config.base import ConfigError
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import FINETUNE_MODES


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = e["loc"]
        if loc[:1] == ("finetune",) and len(loc) > 1 and loc[1] in FINETUNE_MODES:
            loc = loc[:1] + loc[2:]  # the variant's tag is the section's mode, not a field
        field = ".".join(str(p) for p in loc) or "<root>"
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


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (so 3, 1e-3, true, [a, b])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML: {err}") from None
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if isinstance(child, list) and keys[i + 1].isdigit():
            raise ConfigError(f"override {dotted}: list items cannot be overridden one by one; "
                              f"set {'.'.join(keys[: i + 1])} whole")
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


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
    """After ``finetune.mode=...`` switches the preset's fine-tune variant, leave out the preset's fields the new
    variant does not have (an SFT preset's sft_path in mode continue); a field the overrides set stays, so a
    misplaced one is still an error that names it."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    section = data.get("finetune")
    if "finetune.mode" not in keys or not isinstance(section, dict):
        return
    variant = FINETUNE_MODES.get(section.get("mode"))  # type: ignore[arg-type]
    if variant is None:
        return  # an unknown mode: validation names it
    given = {k.removeprefix("finetune.").split(".")[0] for k in keys if k.startswith("finetune.")}
    for field in list(section):
        if field not in variant.model_fields and field not in given:
            del section[field]
