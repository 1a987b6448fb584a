"""The evaluation report: markdown tables, deltas to the champion, the loss-curve plot."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.config.base import SFT_HELD_OUT
from lmpipe.data.jsonl import read_jsonl_objects
from lmpipe.data.sft import VAL_EVERY
from lmpipe.eval.heldout import BASE, FINETUNED, MC_METRICS, METRICS, SCORED


def markdown_cell(text: str) -> str:
    """Text for a cell of a stage report's markdown table: a literal | would end the cell."""
    return text.replace("|", "\\|")


def compare_with_reference(
    results: list[dict[str, Any]], choice: Sequence[dict[str, Any]], reference: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per figure of the fine-tuned model that the reference (an earlier registered model) also has.

    ``reference["metrics"]`` are the ``finetuned.*`` metrics logged when that model
    was registered. A figure is ``comparable`` only when the reference logged the
    same amount scored (held-out tokens, benchmark examples) as this evaluation; a
    figure that is not gets no delta: a different token budget or benchmark limit
    moves the numbers by itself. Registrations from before these amounts were logged
    have none, so none of their figures compare.
    """
    ref = reference["metrics"]
    rows = []
    for kind, group, names, key in (("held_out", results, METRICS, "corpus"),
                                    ("multiple_choice", choice, MC_METRICS, "benchmark")):
        for r in group:
            if r["model"] != FINETUNED:
                continue
            scored = r[SCORED[kind]]
            ref_scored = ref.get(f"{FINETUNED}.{r[key]}.{SCORED[kind]}")
            comparable = ref_scored is not None and float(ref_scored) == float(scored)
            for m in names:
                metric = f"{FINETUNED}.{r[key]}.{m}"
                if metric not in ref:
                    continue
                rows.append({"metric": metric, "kind": kind, "name": r[key], "stat": m, FINETUNED: float(r[m]),
                             "reference": float(ref[metric]),
                             "delta": float(r[m]) - float(ref[metric]) if comparable else None,
                             "comparable": comparable, "scored": scored,
                             "reference_scored": None if ref_scored is None else int(ref_scored)})
    return rows


def reference_label(reference: dict[str, Any]) -> str:
    """How the report names the earlier registered model: ``champion v3``."""
    return f"{reference['alias']} v{reference['version']}"


def render_markdown(
    results: list[dict[str, Any]],
    samples: dict[str, list[dict[str, str]]],
    *,
    eval_tokens: int,
    choice: Sequence[dict[str, Any]] = (),
    reference: dict[str, Any] | None = None,
) -> str:
    """The report as markdown: one row per model, loss / ppl / bpb per corpus, a delta row, the
    multiple-choice benchmarks (acc / acc_norm, with their delta row), samples.

    ``reference`` (an earlier registered model, see ``lmpipe.tracking.registry.champion_metrics``)
    adds two rows to each table: its figures as logged at its registration and the
    fine-tuned model's delta to them (:func:`compare_with_reference`); a figure scored
    on another amount is marked † and has no delta. Without one, a line says so.
    """
    compared = {row["metric"]: row for row in compare_with_reference(results, list(choice), reference)} \
        if reference else {}
    against = _ReferenceRows(compared, reference_label(reference) if reference else "")
    lines = _held_out_section(results, eval_tokens, against)
    if choice:
        lines += _choice_section(choice, against)
    lines += _reference_note(reference, compared, against.label)
    lines += _scored_section(results) + _samples_section(samples)
    return "\n".join(lines) + "\n"


# Figures per table at most (besides the model's name): wider tables split. Prefect's markdown clips a table wider
# than its page instead of wrapping it; six figures under corpus names already were.
TABLE_COLUMNS = 4


def _groups(names: list[str], per_name: int) -> list[list[str]]:
    """``names`` (corpora, benchmarks) in runs of as many as fit ``TABLE_COLUMNS`` with ``per_name`` figures each."""
    size = max(1, TABLE_COLUMNS // per_name)
    return [names[i : i + size] for i in range(0, len(names), size)]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" + "---:|" * (len(cells) - 1)]


class _ReferenceRows:
    """The reference's row and the fine-tuned model's delta row under a table, from compare_with_reference."""

    def __init__(self, compared: dict[str, dict[str, Any]], label: str) -> None:
        self.compared, self.label = compared, label

    def __call__(self, names: Sequence[str], stats: Sequence[str], fmts: dict[str, str]) -> list[str]:
        """Nothing when the reference shares no figure with this table."""
        cells = [self.compared.get(f"{FINETUNED}.{n}.{m}") for n in names for m in stats]
        if not any(cells):
            return []
        fmt_of = [fmts[m] for _ in names for m in stats]
        values = ["" if c is None else fmt.format(c["reference"]) + ("" if c["comparable"] else " †")
                  for c, fmt in zip(cells, fmt_of, strict=True)]
        deltas = ["" if c is None or c["delta"] is None else ("{:+" + fmt[2:]).format(c["delta"])
                  for c, fmt in zip(cells, fmt_of, strict=True)]
        return [_row([markdown_cell(self.label), *values]),
                _row([f"Δ {FINETUNED} − {markdown_cell(self.label)}", *deltas])]


_HELD_OUT_FMT = {"loss": "{:.4f}", "perplexity": "{:.2f}", "bits_per_byte": "{:.4f}"}
_SHORT = {"loss": "loss", "perplexity": "ppl", "bits_per_byte": "bpb"}


def _held_out_section(results: list[dict[str, Any]], eval_tokens: int, against: _ReferenceRows) -> list[str]:
    models = list(dict.fromkeys(r["model"] for r in results))
    corpora = list(dict.fromkeys(r["corpus"] for r in results))
    by = {(r["model"], r["corpus"]): r for r in results}
    lines = [
        "# Evaluation report",
        "",
        f"Held-out `val` split of each corpus, first {eval_tokens:,} target tokens (or all of them if fewer); "
        "loss in nats per token, bpb = bits per UTF-8 byte (comparable across tokenizers). Lower is better.",
    ]
    if SFT_HELD_OUT in corpora:
        lines += [
            "",
            f"`{SFT_HELD_OUT}`: all the held-out examples of the fine-tuning run's finetune.sft_path (every "
            f"{VAL_EVERY}th example it kept, or more when those are too few for the champion gate), in its "
            "windows; only the assistant's targets are scored (each reply, "
            "its `<|end|>` and the closing end-of-text), as fine-tuning trains on them: the task itself.",
        ]

    def cell(model: str, corpus: str, metric: str) -> str:
        r = by.get((model, corpus))
        return "" if r is None else _HELD_OUT_FMT[metric].format(r[metric])

    for group in _groups(corpora, len(METRICS)):
        lines += [""] + _header(["model"] + [f"{markdown_cell(c)} {_SHORT[m]}" for c in group for m in METRICS])
        lines += [_row([markdown_cell(model)] + [cell(model, c, m) for c in group for m in METRICS])
                  for model in models]
        if BASE in models and FINETUNED in models:
            cells = []
            for c in group:
                for m in METRICS:
                    a, b = by.get((FINETUNED, c)), by.get((BASE, c))
                    cells.append("" if a is None or b is None else ("{:+" + _HELD_OUT_FMT[m][2:]).format(a[m] - b[m]))
            lines.append(_row([f"Δ {FINETUNED} − {BASE}", *cells]))
        lines += against(group, METRICS, _HELD_OUT_FMT)
    return lines


def _choice_section(choice: Sequence[dict[str, Any]], against: _ReferenceRows) -> list[str]:
    benches = list(dict.fromkeys(r["benchmark"] for r in choice))
    mc = {(r["model"], r["benchmark"]): r for r in choice}
    stats = ("acc", "acc_norm")
    lines = ["", "Multiple choice, by log-likelihood (acc_norm: per character of the choice, as "
             "lm-evaluation-harness). Higher is better."]
    for group in _groups(benches, len(stats)):
        lines += [""] + _header(["model"] + [f"{markdown_cell(b)} {m}" for b in group for m in stats])
        for model in dict.fromkeys(r["model"] for r in choice):
            cells = ["" if (model, b) not in mc else f"{mc[model, b][m]:.4f}" for b in group for m in stats]
            lines.append(_row([markdown_cell(model), *cells]))
        if all((m, b) in mc for m in (BASE, FINETUNED) for b in group):
            cells = [f"{mc[FINETUNED, b][m] - mc[BASE, b][m]:+.4f}" for b in group for m in stats]
            lines.append(_row([f"Δ {FINETUNED} − {BASE}", *cells]))
        lines += against(group, MC_METRICS, {m: "{:.4f}" for m in MC_METRICS})
    first = next(iter(mc))[0]
    return lines + [""] + [f"- {b}: {mc[first, b]['n']} examples ({mc[first, b]['kind']})" for b in benches]


def _reference_note(reference: dict[str, Any] | None, compared: dict[str, dict[str, Any]], label: str) -> list[str]:
    if reference is None:
        return ["", "No earlier registered model to compare with: there was no champion when this model was first "
                    "evaluated."]
    lines = ["", f"{label}: version {reference['version']} of {reference['name']}, @{reference['alias']} when "
                 f"this model was first evaluated. Its figures are those logged at its registration (run "
                 f"{reference['run_id']}): they compare only under the same evaluation settings and data. "
                 "† marks a figure scored on another amount than here, which gets no delta"
                 + (":" if any(not c["comparable"] for c in compared.values()) else ".")]
    unit = {"held_out": "tokens", "multiple_choice": "examples"}
    marked = {(c["name"], c["kind"]): c for c in compared.values() if not c["comparable"]}
    for (name, kind), c in marked.items():
        then = "none logged" if c["reference_scored"] is None else f"{c['reference_scored']:,}"
        lines.append(f"- {name}: {then} {unit[kind]} then, {c['scored']:,} here")
    if not compared:
        lines.append(f"- {label} has no figure for any corpus or benchmark evaluated here.")
    return lines


def _scored_section(results: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Tokens and bytes scored:", ""]
    for r in results:
        what = f"{r['tokens']:,} tokens"
        if r["corpus"] == SFT_HELD_OUT:
            what = f"{r['tokens']:,} assistant target tokens in {r['examples']:,} examples"
        lines.append(f"- {r['model']} on {r['corpus']}: {what}, {r['bytes']:,} bytes")
    return lines


def _samples_section(samples: dict[str, list[dict[str, str]]]) -> list[str]:
    if not any(samples.values()):
        return []
    lines = ["", "## Samples"]
    for model, rows in samples.items():
        lines += ["", f"### {model}"]
        for row in rows:
            text = row["prompt"] + row["completion"]
            lines += ["", f"Prompt: `{row['prompt']}`", ""]
            lines += [f"> {line}" if line else ">" for line in text.split("\n")]
    return lines


LOSS_CURVES = "loss_curves.png"
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")  # ![alt](target)
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def embed_images(markdown: str, directory: Path) -> str:
    """The markdown with every image that is a file beside it (``![alt](loss_curves.png)``, relative to
    ``directory``) carried inside as a ``data:`` URI, for a viewer that has only the text (a Prefect markdown
    artifact: a relative path there loads nothing). Absolute URLs and ``data:`` URIs are left as they are; an
    image file that is missing is an error naming it."""

    def inline(match: re.Match[str]) -> str:
        alt, target = match.groups()
        if ":" in target or target.startswith("/"):
            return match.group(0)
        path = directory / target
        media = _MEDIA_TYPES.get(path.suffix.lower())
        if media is None:
            raise ValueError(f"image {target!r} in the report: not one of {sorted(_MEDIA_TYPES)}")
        if not path.is_file():
            raise FileNotFoundError(f"image {target!r} in the report: {path} does not exist")
        return f"![{alt}](data:{media};base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"

    return _IMAGE.sub(inline, markdown)


def plot_loss_curves(curves: dict[str, Path], dest: Path) -> None:
    """Training loss per step of each training stage (its metrics.jsonl), one panel each, as a PNG.

    The fine-tuning steps are its own (they start at 1). Rows without a loss (none
    today) are skipped. Written with matplotlib's Agg backend, no display needed.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, path) in zip(axes[0], curves.items(), strict=False):
        rows = read_jsonl_objects(Path(path), "metrics file")  # a bad line: an error naming the file and line
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1)
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
