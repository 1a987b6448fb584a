"""The sampling settings a generation request may ask for, checked the same way everywhere.

``lmpipe generate``'s options and the served MLflow model's params go through
:func:`generation_params`. Nothing heavy is imported here: the CLI reads
``GENERATION_DEFAULTS`` when it builds its parser.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# The sampling settings of `lmpipe generate` and of the served model (GPTTextGenerator) when a caller
# leaves one out or passes None (JSON null). top_k / top_p None: no top-k / nucleus filtering.
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": None, "top_p": None,
                                       "seed": 0}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _integer(value: Any) -> int | None:
    """value as an int if it is one (an integral float too, not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(float(value))
    return None


def _real(value: Any) -> float | None:
    """value as a finite float if it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return None
    return float(value)


def generation_params(params: Mapping[str, Any] | None = None, *,
                      name: Callable[[str], str] = str) -> dict[str, Any]:
    """The sampling settings in ``params`` checked, with ``GENERATION_DEFAULTS`` where one is missing or None.

    The one check for ``lmpipe generate``'s options and the served model's params:
    ``max_new_tokens`` an integer >= 0, ``temperature`` a number >= 0 (0: greedy),
    ``top_k`` an integer >= 1, ``top_p`` in (0, 1], ``seed`` an integer. ``name``
    turns a key into what the error message calls it (the CLI: its option).
    Returns all five keys; raises ValueError naming the first bad one.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(GENERATION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generation parameter(s) {unknown}; expected {sorted(GENERATION_DEFAULTS)}")
    out = {key: default if params.get(key) is None else params[key] for key, default in GENERATION_DEFAULTS.items()}

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{name(key)} must be {expected}, got {out[key]!r}")

    n = _integer(out["max_new_tokens"])
    if n is None or n < 0:
        raise bad("max_new_tokens", "an integer >= 0")
    t = _real(out["temperature"])
    if t is None or t < 0:
        raise bad("temperature", "a number >= 0 (0: greedy)")
    k = None if out["top_k"] is None else _integer(out["top_k"])
    if out["top_k"] is not None and (k is None or k < 1):
        raise bad("top_k", "an integer >= 1 (or left out: no top-k filtering)")
    p = None if out["top_p"] is None else _real(out["top_p"])
    if out["top_p"] is not None and (p is None or not 0.0 < p <= 1.0):
        raise bad("top_p", "in (0, 1] (or left out: no nucleus filtering)")
    seed = _integer(out["seed"])
    if seed is None or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise bad("seed", "an integer")
    return {"max_new_tokens": n, "temperature": t, "top_k": k, "top_p": p, "seed": seed}


def check_prompts(prompts: Iterable[Any]) -> list[str]:
    """The prompts as a list of strings; ValueError naming the first that is not one (None, NaN, a number).

    The empty string is a prompt: generation starts from the end-of-text token (unconditional).
    """
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            missing = prompt is None or (isinstance(prompt, float) and math.isnan(prompt))
            what = "missing (null)" if missing else f"{prompt!r} ({type(prompt).__name__})"
            raise ValueError(f"prompt {i} is {what}: every prompt must be a string (\"\" generates from "
                             "the start of a document)")
        out.append(prompt)
    return out
