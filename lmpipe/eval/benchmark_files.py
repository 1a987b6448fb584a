"""Multiple-choice benchmarks scored by log-likelihood, the way lm-evaluation-harness scores them.

Each example is a context and a few candidate continuations; the model "answers"
with the choice it finds most likely. Two accuracies are reported, as in the
harness's ``multiple_choice`` tasks:

- ``acc``: argmax over choices of log P(" " + choice | context), summed over the
  continuation's tokens;
- ``acc_norm``: argmax of that sum divided by ``len(choice)``, the choice's length
  in *characters* (Python ``len`` of the choice string, without the " " delimiter).
  That is the harness's unit (its ``process_results`` divides by the Python length
  of each choice string), not bytes and not tokens; it offsets the bias
  of ``acc`` towards short choices, which have fewer tokens to lose probability on.

Three JSONL shapes are read, one example per line, with the harness's prompts:

- HellaSwag: ``activity_label``, ``ctx_a`` + ``ctx_b`` (or ``ctx``), ``endings``, ``label``.
  Context ``"{activity_label}: {ctx_a} {ctx_b.capitalize()}"``, choices the endings,
  both passed through the harness's WikiHow clean-up (:func:`hellaswag_preprocess`).
- ARC: ``question``, ``choices: {"text": [...], "label": [...]}``, ``answerKey``.
  Context ``"Question: {question}\\nAnswer:"``; the gold index is
  ``choices.label.index(answerKey)`` (letters "A".."E" or digits "1".."5").
- PIQA: ``goal``, ``sol1``, ``sol2``, ``label``. Context ``"Question: {goal}\\nAnswer:"``.

    >>> examples, bad = load_benchmark(Path("arc_easy.jsonl"), "arc", limit=500)
    >>> r = score_mc(model, tok, examples, device="cuda", eot_id=eot)
    >>> r.acc, r.acc_norm, r.n

The Hub datasets of these benchmarks (``Rowan/hellaswag``, ``allenai/ai2_arc`` with
config ``ARC-Easy``/``ARC-Challenge``, a Parquet copy of PIQA such as ``baber/piqa``)
have exactly these fields, so :func:`resolve_benchmark` writes their rows as JSONL
and the same reader scores them. Which file is scored, in order:

1. ``hub`` set, ``revision`` a full 40-hex commit sha and its JSONL already
   cached: that file, without the network (a commit's rows never change);
2. ``hub`` set and the Hub reachable (neither ``HF_HUB_OFFLINE`` nor
   ``HF_DATASETS_OFFLINE`` set): the split downloaded with ``datasets.load_dataset``
   into ``<cache_dir>/<name>-<dataset>-<config>-<split>@<revision>.jsonl``, written to
   a temporary file and renamed into place, so no run ever trusts a half-written
   one. A branch or tag name (``main``, ``v1.0``, ``refs/convert/parquet``; no
   revision is ``main``) can move, so its file is downloaded again on every online run;
3. offline, or the download failed with an ``OSError`` (a connection error, a
   timeout, a dataset or revision the Hub does not have): that cached file of an
   earlier run, with a warning naming the benchmark and saying it may be stale;
4. no such file: ``path``, with a warning naming the benchmark and the reason;
   without ``path``, an error naming both sources.

Any other failure of the download (``datasets`` raises ValueError for a split or
config the dataset lacks) is a mistake in the config, not a missing network: it
raises :class:`BenchmarkHubError` naming the benchmark, its Hub coordinates and
the field to fix, with no fallback. ``hub`` unset: ``path``. Whatever the source,
the resolved file is then read once with :func:`load_benchmark`, so a malformed
download fails before any training, naming the benchmark, file and line. The flow
fingerprints the evaluation by the resolved file's sha256, so a moved branch
re-scores and a pinned sha does not.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lmpipe.config.evaluation import BenchmarkConfig
from lmpipe.data.jsonl import BadLineReport, BenchmarkFormatError, jsonl_records

BenchmarkKind = Literal["hellaswag", "arc", "piqa"]
BENCHMARK_FORMATS: tuple[str, ...] = get_args(BenchmarkKind)  # the shapes of lines a benchmark file can have
TARGET_DELIMITER = " "  # the harness's default target_delimiter, put between context and choice


class _FieldError(Exception):
    """Raised by the per-shape parsers; load_benchmark adds the file and line."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class MCExample:
    """One question: the context, its candidate continuations, and the index of the right one."""

    context: str
    choices: list[str]
    label: int

    def __post_init__(self) -> None:
        # acc_norm divides by len(choice): an empty choice would divide by zero.
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"an example needs at least 2 non-empty choices, got {self.choices!r}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is outside 0..{len(self.choices) - 1}")


# -- readers -------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up, step for step, so contexts and choices match its own.

    The WikiHow half of HellaSwag carries markup such as ``[header]``, ``[title]``
    and ``[step]``: " [title]" becomes ". ", every other bracketed run is
    removed, and then each double space becomes one (a single pass, as the harness
    does: a triple space leaves a double). The strip comes first, so a removed
    leading "[step]" leaves a leading space behind, as it does in the harness.
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _str(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _FieldError(key, f"missing (keys: {sorted(obj)})")
    if not isinstance(obj[key], str):
        raise _FieldError(key, f"must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise _FieldError(name, f"must be a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise _FieldError(f"{name}[{i}]", f"must be a string, got {type(v).__name__}")
    return value


def _nonempty_choices(choices: list[str], name: str) -> list[str]:
    if len(choices) < 2:
        raise _FieldError(name, f"needs at least 2 choices, got {len(choices)}")
    for i, c in enumerate(choices):
        if not c:
            raise _FieldError(f"{name}[{i}]", "is empty (acc_norm divides by the choice's length)")
    return choices


def _int_label(obj: dict[str, Any], key: str, n_choices: int) -> int:
    """An int, or a string of digits (HellaSwag stores "0".."3"), inside 0..n_choices-1."""
    if key not in obj:
        raise _FieldError(key, f"missing (keys: {sorted(obj)})")
    value = obj[key]
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        label = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise _FieldError(key, f"must be an integer or a string of digits, got {value!r}")
    if not 0 <= label < n_choices:
        raise _FieldError(key, f"{label} is out of range for {n_choices} choices (0..{n_choices - 1})")
    return label


def _parse_hellaswag(obj: dict[str, Any]) -> MCExample:
    """As the harness: ``ctx_a + " " + ctx_b.capitalize()``, the activity label in front, all preprocessed.

    ``str.capitalize`` also lowercases the rest of ctx_b ("the DJ" -> "The dj");
    kept for parity. Files with only ``ctx`` use it as is.
    """
    if "ctx_a" in obj and "ctx_b" in obj:
        ctx = _str(obj, "ctx_a") + " " + _str(obj, "ctx_b").capitalize()
    elif "ctx" in obj:
        ctx = _str(obj, "ctx")
    else:
        raise _FieldError("ctx", f"missing: need 'ctx', or 'ctx_a' and 'ctx_b' (keys: {sorted(obj)})")
    if "activity_label" in obj:
        ctx = _str(obj, "activity_label") + ": " + ctx
    if "endings" not in obj:
        raise _FieldError("endings", f"missing (keys: {sorted(obj)})")
    choices = [hellaswag_preprocess(e) for e in _str_list(obj["endings"], "endings")]
    choices = _nonempty_choices(choices, "endings")
    return MCExample(hellaswag_preprocess(ctx), choices, _int_label(obj, "label", len(choices)))


def _parse_arc(obj: dict[str, Any]) -> MCExample:
    question = _str(obj, "question")
    choices_obj = obj.get("choices")
    if not isinstance(choices_obj, dict):
        problem = "missing" if "choices" not in obj else f"must be an object, got {type(choices_obj).__name__}"
        raise _FieldError("choices", f"{problem} (expected {{'text': [...], 'label': [...]}})")
    for key in ("text", "label"):
        if key not in choices_obj:
            raise _FieldError(f"choices.{key}", f"missing (keys: {sorted(choices_obj)})")
    texts = _nonempty_choices(_str_list(choices_obj["text"], "choices.text"), "choices.text")
    labels = _str_list(choices_obj["label"], "choices.label")
    if len(labels) != len(texts):
        raise _FieldError("choices.label", f"has {len(labels)} labels for {len(texts)} choices.text")
    key = _str(obj, "answerKey")
    if key not in labels:
        raise _FieldError("answerKey", f"{key!r} is not one of choices.label {labels}")
    return MCExample(f"Question: {question}\nAnswer:", texts, labels.index(key))


def _parse_piqa(obj: dict[str, Any]) -> MCExample:
    goal = _str(obj, "goal")
    choices = _nonempty_choices([_str(obj, "sol1"), _str(obj, "sol2")], "sol1/sol2")
    return MCExample(f"Question: {goal}\nAnswer:", choices, _int_label(obj, "label", 2))


_PARSERS: dict[str, Callable[[dict[str, Any]], MCExample]] = {
    "hellaswag": _parse_hellaswag,
    "arc": _parse_arc,
    "piqa": _parse_piqa,
}


def load_benchmark(
    path: Path, kind: BenchmarkKind, *, limit: int | None = None, skip_bad: bool = False
) -> tuple[list[MCExample], BadLineReport]:
    """Read a benchmark JSONL file of one shape; blank lines are skipped.

    A bad line (not UTF-8, not JSON, not an object, a field missing or of the
    wrong type, a label outside the choices) raises BenchmarkFormatError naming
    the file, the 1-based line and the field; with ``skip_bad`` it is counted in
    the report and skipped instead. ``limit`` stops after that many good examples.
    """
    examples, _, report = read_benchmark(path, kind, limit=limit, skip_bad=skip_bad)
    return examples, report


def read_benchmark(
    path: Path, kind: BenchmarkKind, *, limit: int | None, skip_bad: bool
) -> tuple[list[MCExample], list[int], BadLineReport]:
    """load_benchmark, plus each example's 1-based line (for errors found later: check_benchmarks_fit, score_mc)."""
    if kind not in _PARSERS:
        raise ValueError(f"benchmark kind {kind!r} is unknown; use one of {sorted(_PARSERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")
    parse = _PARSERS[kind]
    examples: list[MCExample] = []
    lines: list[int] = []
    report = BadLineReport()
    for lineno, record in jsonl_records(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(record, str):
                raise _FieldError(None, record)
            examples.append(parse(record))
            lines.append(lineno)
        except _FieldError as fe:
            err = BenchmarkFormatError(path, lineno, fe.field, fe.problem)
            if not skip_bad:
                raise err from None
            report.add(err)
    if not examples:
        detail = f"; {report.count} bad line(s) skipped, first: {report.first[0][1]}" if report.count else ""
        raise BenchmarkFormatError(path, 0, None, f"holds no {kind} examples{detail}")
    return examples, lines, report


# -- sources: the Hub or a local file ------------------------------------------

# The split lm-evaluation-harness scores per kind: HellaSwag's and PIQA's test labels are hidden, ARC's are not.
HUB_SPLITS: dict[str, str] = {"hellaswag": "validation", "arc": "test", "piqa": "validation"}
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a Hub commit: the one revision whose rows cannot change


class BenchmarkSourceWarning(UserWarning):
    """A benchmark with a Hub source is scored from a possibly stale cache or its local file instead."""


class BenchmarkSourceError(FileNotFoundError):
    """Neither of a benchmark's sources (the Hub, the local file) can be read."""


class BenchmarkHubError(ValueError):
    """The Hub was reached but refused the benchmark's coordinates (a split or config the dataset lacks).

    A mistake in the config rather than a missing network, so it is not covered
    up by falling back to the local file.
    """


def hub_offline(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable that switches the Hub off (huggingface_hub's truthy spellings), or None when online."""
    for name in OFFLINE_VARIABLES:
        if environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def is_commit_sha(revision: str | None) -> bool:
    """True for a full 40-hex commit sha; a branch or tag name (or None: ``main``) can move."""
    return revision is not None and COMMIT_SHA.fullmatch(revision) is not None


def hub_cache_file(bench: BenchmarkConfig, cache_dir: Path) -> Path:
    """Where a Hub benchmark's rows go: one file per (dataset, config, split, revision), under the benchmark's name.

    A missing revision is spelled ``@main`` (the Hub's default branch). Only a
    file of a commit sha is trusted without the network; that of a branch or tag
    is downloaded again on every online run and read only as an offline fallback.
    """
    assert bench.hub is not None
    parts = [bench.name, bench.hub.replace("/", "--"), bench.hub_config or "default",
             bench.split or HUB_SPLITS[bench.kind]]
    safe = "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)
    return Path(cache_dir) / f"{safe}@{re.sub(r'[^A-Za-z0-9_.-]', '_', bench.revision or 'main')}.jsonl"


class _HubRefused(Exception):
    """load_dataset failed other than by the network (its cause: e.g. ValueError for a split the dataset lacks)."""


def _download_rows(bench: BenchmarkConfig, dest: Path, label: str = "") -> None:
    """The split's rows as JSONL, one object a line, written to a temporary file and renamed into place."""
    import datasets  # here, not at import: scoring local files needs no datasets

    split = bench.split or HUB_SPLITS[bench.kind]
    try:
        ds = datasets.load_dataset(bench.hub, bench.hub_config, split=split, revision=bench.revision)
    except OSError:  # the network, offline mode, a dataset or revision the Hub does not have: may fall back
        raise
    except Exception as err:
        raise _HubRefused() from err
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, row in enumerate(ds):
                try:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                except TypeError as err:  # e.g. an image or bytes column: not a multiple-choice text benchmark
                    bad = [k for k, v in row.items()
                           if not isinstance(v, (str, int, float, bool, list, dict, type(None)))]
                    raise BenchmarkHubError(f"{label}: row {i} of hub {bench.hub!r} split {split!r} has columns "
                                            f"{bad} that are not JSON ({err})") from None
        os.replace(tmp, dest)  # a reader sees the whole split or none of it
    finally:
        tmp.unlink(missing_ok=True)


def _hub_error(bench: BenchmarkConfig, where: str, label: str, err: BaseException | None) -> BenchmarkHubError:
    """The download's non-network error, naming the benchmark, its Hub coordinates and the field to check."""
    split = bench.split or HUB_SPLITS[bench.kind]
    prefix = f"{where}." if where else ""
    text = str(err).lower()
    if "split" in text:  # datasets: "Bad split: x. Available splits: [...]", 'Unknown split "x"'
        fix = f"check {prefix}split (unset: {HUB_SPLITS[bench.kind]!r}, the split lm-evaluation-harness scores)"
    elif "config" in text:  # datasets: "BuilderConfig 'x' not found. Available: [...]"
        fix = f"check {prefix}hub_config"
    else:
        fix = f"check {prefix}hub, {prefix}hub_config, {prefix}split and {prefix}revision"
    return BenchmarkHubError(
        f"{label}: the Hub refused hub {bench.hub!r} config {bench.hub_config!r} split {split!r} revision "
        f"{bench.revision!r}: {type(err).__name__}: {err}; {fix}"
    )


def resolve_benchmark(bench: BenchmarkConfig, cache_dir: Path, *, where: str = "") -> Path:
    """The JSONL file to score for ``bench``, downloading it from the Hub first when that is the source.

    The order (see the module docstring): a cached commit sha, the Hub when
    reachable, then a cached branch or tag (possibly stale) and ``path``, each
    with a :class:`BenchmarkSourceWarning`. ``where`` (e.g. "eval.benchmarks.0")
    prefixes messages. Raises BenchmarkSourceError when no source can be read,
    BenchmarkHubError when the Hub refuses the config's split or config, and
    BenchmarkFormatError when the resolved file is malformed (checked here with
    the benchmark's kind, limit and skip_bad, so before any training).
    """
    label = f"{where} ({bench.name})" if where else f"benchmark {bench.name!r}"
    path = _resolve_source(bench, cache_dir, where, label)
    try:
        load_benchmark(path, bench.kind, limit=bench.limit, skip_bad=bench.skip_bad)
    except BenchmarkFormatError as err:
        raise BenchmarkFormatError(err.path, err.line, err.field, err.problem, where=label) from None
    return path


def _resolve_source(bench: BenchmarkConfig, cache_dir: Path, where: str, label: str) -> Path:
    """resolve_benchmark's choice of file, before its format check."""
    if bench.hub is None:
        if bench.path is None or not Path(bench.path).is_file():
            raise BenchmarkSourceError(f"{label}: path {bench.path!r} is not a file")
        return Path(bench.path)
    hub = f"hub {bench.hub!r}" + (f" ({bench.hub_config})" if bench.hub_config else "")
    cached = hub_cache_file(bench, cache_dir)
    if is_commit_sha(bench.revision) and cached.is_file():
        return cached
    offline = hub_offline()
    if offline:
        reason = f"{offline} is set"
    else:
        try:
            _download_rows(bench, cached, label)
            return cached
        except OSError as err:  # ConnectionError, timeouts, huggingface_hub's offline and not-found errors
            reason = f"the download failed: {type(err).__name__}: {err}"
        except _HubRefused as err:  # e.g. ValueError: a split or config the dataset lacks; fail, naming the field
            cause = err.__cause__
            raise _hub_error(bench, where, label, cause) from cause
    if cached.is_file():  # only a branch or tag gets here: a commit's cached file was returned above
        warnings.warn(f"{label}: scoring the cached file {str(cached)!r} of {hub}, which may be stale (revision "
                      f"{bench.revision or 'main'!r} is a branch or tag and can move): {reason}",
                      BenchmarkSourceWarning, stacklevel=3)
        return cached
    if bench.path is not None and Path(bench.path).is_file():
        warnings.warn(f"{label}: scoring the local file {bench.path!r} instead of {hub}: {reason}",
                      BenchmarkSourceWarning, stacklevel=3)
        return Path(bench.path)
    local = "no path is set" if bench.path is None else f"path {bench.path!r} is not a file"
    raise BenchmarkSourceError(f"{label}: no source to score: {hub} cannot be read ({reason}) and {local}")


def resolve_benchmarks(benchmarks: Sequence[BenchmarkConfig], cache_dir: Path) -> dict[str, Path]:
    """Benchmark name -> the file to score, for every benchmark of ``eval.benchmarks``, in order."""
    return {b.name: resolve_benchmark(b, cache_dir, where=f"eval.benchmarks.{i}") for i, b in enumerate(benchmarks)}


def benchmark_label(index: int, bench: BenchmarkConfig, source: str | Path | None = None) -> str:
    """How messages name a benchmark: its config field and name, and the file scored when known.

    E.g. "eval.benchmarks.0 (hs) file 'data/hs.jsonl'", for score_mc's ``where``.
    """
    label = f"eval.benchmarks.{index} ({bench.name})"
    return label if source is None else f"{label} file {str(source)!r}"
