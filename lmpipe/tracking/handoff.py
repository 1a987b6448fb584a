"""Finding a trained model by the name a user has for it: a checkpoint directory or a registry URI;
and the generation settings that ``lmpipe generate`` and the served MLflow model share.

``lmpipe generate``, ``lmpipe evaluate`` and ``lmpipe export`` accept either

- a checkpoint directory (``.lmpipe/finetune/<fingerprint>/model``, or any
  ``step-NNNNNNN`` checkpoint): its tokenizer is the one whose sha256 the
  checkpoint's state.json names, given with ``--tokenizer`` or found among the
  work directory's tokenizer stages; or
- an MLflow model URI (``MODEL_URI_FORMS``: ``models:/lmpipe-gpt@candidate``,
  ``models:/lmpipe-gpt/3``, ``models:/lmpipe-gpt/latest``, ``models:/m-<model id>``
  as ``registration.json``'s ``logged_model_uri`` gives it, ``runs:/<run id>/model``):
  the registered pyfunc is downloaded and its checkpoint and tokenizer artifacts are used.

Either way the checkpoint and the tokenizer are checked to belong together.

Nothing heavy is imported at module level (``flows.cli`` reads ``GENERATION_DEFAULTS``
when it builds its parser); nothing of Prefect, and MLflow only through ``lmpipe.tracking.runs``,
inside the functions that resolve a registry URI.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_STAGE = "train_tokenizer"
MODEL_URI_FORMS = ("models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
                   "models:/m-<model id>, runs:/<run id>/model")

# The sampling settings of `lmpipe generate` and of the served model (GPTTextGenerator) when a caller
# leaves one out or passes None (JSON null). top_k / top_p None: no top-k / nucleus filtering.
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": None, "top_p": None,
                                       "seed": 0}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: Path  # directory with model.safetensors and state.json
    tokenizer_dir: Path  # directory with tokenizer.json (and tokenizer_meta.json)

    @property
    def tokenizer(self) -> Path:
        from lmpipe.data.tokenizer import TOKENIZER_FILE

        return self.tokenizer_dir / TOKENIZER_FILE


def _integer(value: Any) -> int | None:
    """value as an int if it is one (an integral float too, not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
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


def check_device(device: str, option: str = "--device") -> str:
    """``device`` if this machine has it; ValueError in one line otherwise (no CUDA, no such GPU, a typo)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a device: expected cpu, cuda, cuda:<index> or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use {option} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {device!r}: MPS is not available on this machine; use {option} cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{option} {device!r}: expected cpu, cuda, cuda:<index> or mps")
    return device


def is_model_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def find_tokenizer(fingerprint: str, workdir: Path) -> Path | None:
    """The tokenizer stage directory under workdir whose tokenizer.json has this sha256, if any."""
    from lmpipe.data.tokenizer import TOKENIZER_FILE, tokenizer_fingerprint

    for candidate in sorted((Path(workdir) / TOKENIZER_STAGE).glob(f"*/{TOKENIZER_FILE}")):
        if tokenizer_fingerprint(candidate) == fingerprint:
            return candidate.parent
    return None


def resolve_model(ref: str, *, workdir: Path, tokenizer: Path | None = None, tracking_uri: str | None = None,
                  download_dir: Path | None = None) -> ModelFiles:
    """The checkpoint and tokenizer ``ref`` names; errors say which argument is wrong and why."""
    from lmpipe.data.tokenizer import tokenizer_fingerprint
    from lmpipe.model.checkpoint import STATE_FILE, read_state

    if is_model_uri(ref):
        from lmpipe.tracking.registry import download_model_files, missing_store

        if download_dir is None:
            raise ValueError(f"model {ref!r}: a registry URI needs a download directory")
        if tracking_uri is None:  # the work directory's own store, as the pipeline uses it
            from lmpipe.config.evaluation import TrackingConfig
            from lmpipe.tracking.runs import resolve_uri

            tracking_uri = resolve_uri(TrackingConfig(), workdir)
            store = missing_store(tracking_uri)
            if store is not None:  # checked here too, to say which option points at it
                raise FileNotFoundError(f"model {ref!r}: there is no MLflow store at {store} (--workdir "
                                        f"{str(workdir)!r} is not a pipeline's work directory); pass the run's "
                                        "--workdir or --tracking-uri")
        checkpoint, tokenizer_dir = download_model_files(ref, tracking_uri, download_dir)
        files = ModelFiles(checkpoint, tokenizer_dir)
    else:
        checkpoint = Path(ref)
        if not (checkpoint / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"model {ref!r} is neither a checkpoint directory (no {STATE_FILE}) nor an MLflow model URI "
                f"({MODEL_URI_FORMS})"
            )
        fingerprint = read_state(checkpoint).get("tokenizer_fingerprint")
        if tokenizer is None:
            found = find_tokenizer(str(fingerprint), workdir)
            if found is None:
                raise FileNotFoundError(
                    f"model {ref!r} was trained with tokenizer {fingerprint}, which is not among the tokenizer "
                    f"stages under {str(Path(workdir) / TOKENIZER_STAGE)!r}; pass --tokenizer DIR"
                )
            tokenizer = found
        files = ModelFiles(checkpoint, Path(tokenizer))
    if not files.tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {str(files.tokenizer)!r} does not exist")
    expected = read_state(files.checkpoint).get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(files.tokenizer)
    if expected != actual:
        raise ValueError(f"model {ref!r} was trained with tokenizer {expected}, but {str(files.tokenizer)!r} "
                         f"is {actual}")
    return files
