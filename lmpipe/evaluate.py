"""Evaluation: held-out loss, perplexity and bits per byte, plus seeded text samples.

Every model is scored on the ``val`` split of every corpus with the same fixed
token budget, read from the start of the split in consecutive windows, so two
models (or two runs) are compared on exactly the same tokens.

Bits per byte divides the summed loss by the UTF-8 bytes those tokens stand
for, which makes it comparable across tokenizers: a tokenizer with longer
tokens has a higher loss per token but not per byte.

After SFT (``finetune.mode=sft``) every model is also scored on the fine-tuning
run's held-out examples (:func:`score_sft`), under the name ``SFT_HELD_OUT``
(``sft/val``) where a corpus name would be: only the assistant targets count, as
in training, so the figures measure the task the model was fine-tuned for.

    >>> r = evaluate_loss(model, TokenSplit(shard_dir, "val"), token_byte_lengths(tok),
    ...                   eval_tokens=4096, batch_size=8, device="cpu")
    >>> sorted(r)
    ['bits_per_byte', 'bytes', 'loss', 'perplexity', 'tokens']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from lmpipe.benchmarks import benchmark_label, read_benchmark, score_mc
from lmpipe.checkpoint import load_model, read_state
from lmpipe.config import SFT_HELD_OUT, EvalConfig, PipelineConfig
from lmpipe.loader import ArraySource, TokenSource
from lmpipe.model import IGNORE_INDEX
from lmpipe.sft import END_TOKEN, VAL_EVERY, Layout, Message, SFTData, build_sft_data, encode_chat_prompt
from lmpipe.shards import MANIFEST_FILE, TokenSplit, read_manifest
from lmpipe.stage import BuildOutput, StageResult, markdown_cell, run_stage, write_json_atomic
from lmpipe.tokenizer import (META_FILE, TOKENIZER_FILE, encode_ordinary, load_tokenizer, meta_eot_id,
                              token_byte_lengths, tokenizer_fingerprint)

METRICS = ("loss", "perplexity", "bits_per_byte")
MC_METRICS = ("acc", "acc_norm")
# The delta row of the report compares these two model names when both are evaluated.
BASE, FINETUNED = "base", "finetuned"
# How much was scored, logged beside the figures (finetuned.<corpus>.tokens, finetuned.<benchmark>.n) so that a
# later report compares with a registered model's figures only where they were scored on as much.
SCORED = {"held_out": "tokens", "multiple_choice": "n"}


class SFTHeldOut(BaseModel):
    """The fine-tuning run's SFT data settings: what the evaluate stage rebuilds its held-out examples from,
    exactly as ``lmpipe.train.run_finetune`` split and laid them out (``lmpipe.sft.build_sft_data``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="finetune.sft_path")
    layout: Layout = Field(description="finetune.sft_layout")
    block_size: int = Field(ge=2, description="model.block_size: the windows the examples are laid out in")
    skip_long: bool = Field(description="finetune.sft_skip_long")
    skip_bad: bool = Field(description="finetune.sft_skip_bad")

    @classmethod
    def of(cls, config: PipelineConfig) -> SFTHeldOut | None:
        """The SFT data of the config's fine-tuning run; None unless finetune.mode is "sft"."""
        ft = config.finetune
        if ft.mode != "sft":
            return None
        return cls(path=str(ft.sft_path), layout=ft.sft_layout, block_size=config.model.block_size,
                   skip_long=ft.sft_skip_long, skip_bad=ft.sft_skip_bad)


class TokenizerMismatchError(ValueError):
    """A corpus was tokenized with a different tokenizer than the one evaluation decodes with."""


def evaluate_loss(
    model: torch.nn.Module,
    split: TokenSource,
    token_bytes: np.ndarray,
    *,
    eval_tokens: int,
    batch_size: int,
    device: str | torch.device,
    mask: TokenSource | None = None,
    doc_sep: int | None = None,
) -> dict[str, float]:
    """Score the first ``min(eval_tokens, split.num_tokens - 1)`` target tokens of a split.

    Window k holds tokens ``[k*T, k*T + T]`` (T = block_size): its first T tokens
    are the inputs, its last T the targets, so the next window starts where this
    one's targets ended and every token after the first is scored exactly once.
    The last window is cut short to stay inside the budget; in a batch it is
    padded with ignored targets (IGNORE_INDEX), which causal attention keeps from
    affecting the real positions.

    ``mask`` (one entry per token of the split, as SFT's loss masks): only the
    targets whose entry is not 0 are scored, as training counts them; ``tokens``
    and ``bytes`` are then those targets' (the budget still counts positions).
    ``doc_sep``: given to the model, for windows that pack documents ending with
    that token (each attends only within itself, ``GPT.forward``).
    """
    if eval_tokens < 1:
        raise ValueError(f"eval.eval_tokens must be >= 1, got {eval_tokens}")
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if split.num_tokens < 2:
        raise ValueError(f"the split has {split.num_tokens} token(s); scoring needs at least 2")
    if mask is not None and mask.num_tokens != split.num_tokens:
        raise ValueError(f"the loss mask has {mask.num_tokens} entries for the split's {split.num_tokens} tokens")
    block = model.config.block_size
    # The first token is only ever context: nothing predicts it.
    n_targets = min(eval_tokens, split.num_tokens - 1)
    starts = list(range(0, n_targets, block))
    extra = {} if doc_sep is None else {"doc_sep": doc_sep}

    was_training = model.training
    model.eval()
    sum_nats = torch.zeros((), dtype=torch.float64, device=device)  # stays on device: no sync per batch
    sum_bytes = 0
    n_scored = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(starts), batch_size):
                batch = starts[b : b + batch_size]
                lengths = [min(block, n_targets - s) for s in batch]
                x = np.zeros((len(batch), max(lengths)), dtype=np.int64)
                y = np.full((len(batch), max(lengths)), IGNORE_INDEX, dtype=np.int64)
                for i, (s, n) in enumerate(zip(batch, lengths)):
                    w = split.window(s, n + 1)
                    if w.size and int(w.max()) >= len(token_bytes):
                        raise ValueError(
                            f"token id {int(w.max())} at position >= {s} is outside the tokenizer's "
                            f"vocabulary of {len(token_bytes)}: the shards and tokenizer do not match"
                        )
                    targets = w[1:]
                    if mask is not None:
                        targets = np.where(mask.window(s + 1, n) != 0, targets, IGNORE_INDEX)
                    x[i, :n], y[i, :n] = w[:-1], targets
                    scored = targets[targets != IGNORE_INDEX]
                    n_scored += len(scored)
                    sum_bytes += int(token_bytes[scored].sum())
                xt = torch.from_numpy(x).to(device)
                yt = torch.from_numpy(y).to(device)
                logits, _ = model(xt, yt, **extra)  # (B, T, V): all positions, since targets are given
                # Per-token losses in float32, summed in float64 so a long budget adds up exactly.
                nats = F.cross_entropy(
                    logits.float().flatten(0, 1), yt.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
                )  # (B*T,), 0 where ignored
                sum_nats += nats.double().sum()
    finally:
        model.train(was_training)

    total = float(sum_nats.item())
    if n_scored == 0:
        raise ValueError(f"the loss mask leaves none of the {n_targets} targets to score")
    if sum_bytes == 0:
        raise ValueError(f"the {n_scored} scored tokens stand for 0 bytes (only special tokens?)")
    loss = total / n_scored
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total / math.log(2) / sum_bytes,
        "tokens": n_scored,
        "bytes": sum_bytes,
    }


def score_sft(
    model: torch.nn.Module,
    data: SFTData,
    token_bytes: np.ndarray,
    *,
    eot_id: int,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte on the val examples of SFT data, as fine-tuning counts them.

    ``data`` is ``lmpipe.sft.build_sft_data``'s (the model's ``block_size``): its
    val stream is scored whole, in the windows fine-tuning validates on (one
    example, or one bin of packed examples, per ``block_size`` window; packed
    windows with ``eot_id`` as ``doc_sep``, so each example attends only to
    itself). Only the targets of ``val_mask`` count: each assistant reply, its
    ``<|end|>`` and the closing end-of-text (the last two stand for 0 bytes).
    ``tokens`` is the number of scored targets and ``examples`` of examples, so
    both layouts give the same figures for the same examples.
    """
    block = model.config.block_size
    n = len(data.val_tokens)
    if (n - 1) % block:
        raise ValueError(f"the SFT val stream has {n} tokens, not whole windows of the model's block_size={block} "
                         "(plus one): it was laid out for another block_size")
    r = evaluate_loss(model, ArraySource(data.val_tokens), token_bytes, eval_tokens=n - 1, batch_size=batch_size,
                      device=device, mask=ArraySource(data.val_mask),
                      doc_sep=eot_id if data.layout == "packed" else None)
    return {**r, "examples": data.val_examples}


def score_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    text: str,
    *,
    start_id: int,
    eval_tokens: int,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte on a text, as :func:`evaluate_loss` scores a val split.

    The text is one document encoded as the shards encode one (literal special-token
    text stays text), after ``start_id`` (the end-of-text token: "a document
    begins"), so every one of its tokens is scored, up to ``eval_tokens``; with a
    budget that covers the text, ``bytes`` is the text's UTF-8 length.
    """
    [ids] = encode_ordinary(tokenizer, [text])
    if not ids:
        raise ValueError("the text encodes to no tokens: nothing to score")
    source = ArraySource(np.array([start_id, *ids], dtype=np.int64))
    return evaluate_loss(model, source, token_byte_lengths(tokenizer), eval_tokens=eval_tokens,
                         batch_size=batch_size, device=device)


def generate_samples(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    top_p: float | None = None,
    device: str | torch.device,
    start_id: int | None = None,
    chat: bool = False,
) -> list[dict[str, str]]:
    """Continue each prompt; returns ``[{"prompt", "completion"}, ...]`` in prompt order.

    Each prompt gets its own generator seeded with ``seed``, so a sample does
    not depend on which prompts came before it. A prompt that encodes to no
    tokens (the empty string) starts from ``start_id`` (the end-of-text token:
    "a new document begins"). ``chat``: each prompt is a user turn in the chat
    template (``lmpipe.sft``) followed by the open assistant turn, and the reply
    ends at its ``<|end|>`` token (not part of the completion): how an SFT model
    is prompted. Leaves the model in eval mode.
    """
    model.eval()
    samples = []
    end_id = tokenizer.token_to_id(END_TOKEN) if chat else None
    for i, prompt in enumerate(prompts):
        # In chat, the ids are laid out exactly as in SFT training (a prompt's literal "<|end|>" stays text).
        ids = (encode_chat_prompt([Message("user", prompt)], tokenizer) if chat
               else tokenizer.encode(prompt, add_special_tokens=False).ids)
        if not ids:
            if start_id is None:
                raise ValueError(f"eval.prompts[{i}] = {prompt!r} encodes to no tokens and no start_id was given")
            ids = [start_id]
        gen = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=gen, eos_id=end_id)
        new = out[0, len(ids) :].tolist()
        if end_id is not None and end_id in new:
            new = new[: new.index(end_id)]
        # Decode prompt and continuation together so a character split across the
        # boundary comes out whole; fall back to the new tokens alone otherwise.
        full = tokenizer.decode(ids + new, skip_special_tokens=False)
        head = tokenizer.decode(ids, skip_special_tokens=False)
        completion = full[len(head) :] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=False)
        samples.append({"prompt": prompt, "completion": completion})
    return samples


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
    choice: list[dict[str, Any]] = (),
    reference: dict[str, Any] | None = None,
) -> str:
    """The report as markdown: one row per model, loss / ppl / bpb per corpus, a delta row, the
    multiple-choice benchmarks (acc / acc_norm, with their delta row), samples.

    ``reference`` (an earlier registered model, see ``lmpipe.tracking.champion_metrics``)
    adds two rows to each table: its figures as logged at its registration and the
    fine-tuned model's delta to them (:func:`compare_with_reference`); a figure scored
    on another amount is marked † and has no delta. Without one, a line says so.
    """
    models = list(dict.fromkeys(r["model"] for r in results))
    compared = {row["metric"]: row for row in compare_with_reference(results, choice, reference)} if reference else {}
    label = reference_label(reference) if reference else ""

    def reference_rows(names: list[str], stats: Sequence[str], fmts: dict[str, str]) -> list[str]:
        """The reference's row and the delta row of one table, or nothing when it shares no figure with it."""
        cells = [compared.get(f"{FINETUNED}.{n}.{m}") for n in names for m in stats]
        if not any(cells):
            return []
        fmt_of = [fmts[m] for _ in names for m in stats]
        values = ["" if c is None else fmt.format(c["reference"]) + ("" if c["comparable"] else " †")
                  for c, fmt in zip(cells, fmt_of)]
        deltas = ["" if c is None or c["delta"] is None else ("{:+" + fmt[2:]).format(c["delta"])
                  for c, fmt in zip(cells, fmt_of)]
        return ["| " + " | ".join([markdown_cell(label)] + values) + " |",
                "| " + " | ".join([f"Δ {FINETUNED} − {markdown_cell(label)}"] + deltas) + " |"]
    corpora = list(dict.fromkeys(r["corpus"] for r in results))
    by = {(r["model"], r["corpus"]): r for r in results}
    fmt = {"loss": "{:.4f}", "perplexity": "{:.2f}", "bits_per_byte": "{:.4f}"}
    short = {"loss": "loss", "perplexity": "ppl", "bits_per_byte": "bpb"}

    lines = [
        "# Evaluation report",
        "",
        f"Held-out `val` split of each corpus, first {eval_tokens:,} target tokens (or all of them if fewer); "
        "loss in nats per token, bpb = bits per UTF-8 byte (comparable across tokenizers). Lower is better.",
        "",
    ]
    if SFT_HELD_OUT in corpora:
        lines[-1:-1] = [
            "",
            f"`{SFT_HELD_OUT}`: all the held-out examples of the fine-tuning run's finetune.sft_path (every "
            f"{VAL_EVERY}th example it kept), in its windows; only the assistant's targets are scored (each reply, "
            "its `<|end|>` and the closing end-of-text), as fine-tuning trains on them: the task itself.",
        ]
    header = ["model"] + [f"{markdown_cell(c)} {short[m]}" for c in corpora for m in METRICS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" + "---:|" * (len(header) - 1))

    def cell(model: str, corpus: str, metric: str) -> str:
        r = by.get((model, corpus))
        return "" if r is None else fmt[metric].format(r[metric])

    for model in models:
        cells = [cell(model, c, m) for c in corpora for m in METRICS]
        lines.append("| " + " | ".join([markdown_cell(model)] + cells) + " |")
    if BASE in models and FINETUNED in models:
        cells = []
        for c in corpora:
            for m in METRICS:
                a, b = by.get((FINETUNED, c)), by.get((BASE, c))
                cells.append("" if a is None or b is None else ("{:+" + fmt[m][2:]).format(a[m] - b[m]))
        lines.append("| " + " | ".join([f"Δ {FINETUNED} − {BASE}"] + cells) + " |")
    lines += reference_rows(corpora, METRICS, fmt)

    if choice:
        benches = list(dict.fromkeys(r["benchmark"] for r in choice))
        mc = {(r["model"], r["benchmark"]): r for r in choice}
        lines += ["", "Multiple choice, by log-likelihood (acc_norm: per character of the choice, as "
                  "lm-evaluation-harness). Higher is better.", ""]
        header = ["model"] + [f"{markdown_cell(b)} {m}" for b in benches for m in ("acc", "acc_norm")]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" + "---:|" * (len(header) - 1))
        for model in dict.fromkeys(r["model"] for r in choice):
            cells = ["" if (model, b) not in mc else f"{mc[model, b][m]:.4f}" for b in benches
                     for m in ("acc", "acc_norm")]
            lines.append("| " + " | ".join([markdown_cell(model)] + cells) + " |")
        if all((m, b) in mc for m in (BASE, FINETUNED) for b in benches):
            cells = [f"{mc[FINETUNED, b][m] - mc[BASE, b][m]:+.4f}" for b in benches for m in ("acc", "acc_norm")]
            lines.append("| " + " | ".join([f"Δ {FINETUNED} − {BASE}"] + cells) + " |")
        lines += reference_rows(benches, MC_METRICS, {m: "{:.4f}" for m in MC_METRICS})
        lines += [""] + [f"- {b}: {mc[next(iter(mc))[0], b]['n']} examples ({mc[next(iter(mc))[0], b]['kind']})"
                         for b in benches]

    lines.append("")
    if reference is None:
        lines.append("No earlier registered model to compare with: there was no champion when this model was first "
                     "evaluated.")
    else:
        lines.append(f"{label}: version {reference['version']} of {reference['name']}, @{reference['alias']} when "
                     f"this model was first evaluated. Its figures are those logged at its registration (run "
                     f"{reference['run_id']}): they compare only under the same evaluation settings and data. "
                     "† marks a figure scored on another amount than here, which gets no delta"
                     + (":" if any(not c["comparable"] for c in compared.values()) else "."))
        unit = {"held_out": "tokens", "multiple_choice": "examples"}
        marked = {(c["name"], c["kind"]): c for c in compared.values() if not c["comparable"]}
        for (name, kind), c in marked.items():
            then = "none logged" if c["reference_scored"] is None else f"{c['reference_scored']:,}"
            lines.append(f"- {name}: {then} {unit[kind]} then, {c['scored']:,} here")
        if not compared:
            lines.append(f"- {label} has no figure for any corpus or benchmark evaluated here.")

    lines += ["", "Tokens and bytes scored:", ""]
    for r in results:
        what = f"{r['tokens']:,} tokens"
        if r["corpus"] == SFT_HELD_OUT:
            what = f"{r['tokens']:,} assistant target tokens in {r['examples']:,} examples"
        lines.append(f"- {r['model']} on {r['corpus']}: {what}, {r['bytes']:,} bytes")

    if any(samples.values()):
        lines += ["", "## Samples"]
        for model, rows in samples.items():
            lines += ["", f"### {model}"]
            for row in rows:
                text = row["prompt"] + row["completion"]
                lines += ["", f"Prompt: `{row['prompt']}`", ""]
                lines += [f"> {line}" if line else ">" for line in text.split("\n")]
    return "\n".join(lines) + "\n"


def is_chat_model(state: dict[str, Any]) -> bool:
    """Was the checkpoint (its state.json) fine-tuned on chat SFT data? Then it is prompted in the chat template."""
    return state.get("train", {}).get("mode") == "sft"


LOSS_CURVES = "loss_curves.png"


def plot_loss_curves(curves: dict[str, Path], dest: Path) -> None:
    """Training loss per step of each training stage (its metrics.jsonl), one panel each, as a PNG.

    The fine-tuning steps are its own (they start at 1). Rows without a loss (none
    today) are skipped. Written with matplotlib's Agg backend, no display needed.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, path) in zip(axes[0], curves.items()):
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1)
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)


def run_evaluate(
    cfg: EvalConfig,
    models: dict[str, Path],
    corpora: dict[str, StageResult],
    tokenizer: StageResult,
    out_dir: Path,
    fingerprint: str,
    curves: dict[str, Path] | None = None,
    benchmark_files: dict[str, Path] | None = None,
    reference: dict[str, Any] | None = None,
    sft: SFTHeldOut | None = None,
) -> StageResult:
    """Score every model on every corpus's val split and sample from each; write the report.

    ``curves`` (stage name -> metrics.jsonl) adds a plot of the training losses.
    ``benchmark_files`` (benchmark name -> JSONL) is what ``lmpipe.benchmarks.resolve_benchmarks``
    chose to score (a Hub download or the local file); a benchmark not in it is read
    from its ``path``. ``reference``: an earlier registered model to compare with
    (see :func:`render_markdown`). ``sft``: the SFT data of the fine-tuning run, whose
    held-out examples every model is also scored on (:func:`score_sft`), as the corpus
    ``SFT_HELD_OUT`` of the results, metrics and report (plus ``<model>.sft/val.examples``);
    the file is read and tokenized once per stage run, before any model is loaded.
    """
    if not models:
        raise ValueError("run_evaluate: no models to evaluate (models is empty)")
    if not corpora:
        raise ValueError("run_evaluate: no corpora to evaluate on (corpora is empty)")
    # Everything is checked before the slow part, so a mismatch fails at once.
    tok_path = tokenizer.path(TOKENIZER_FILE)
    tok_fp = tokenizer_fingerprint(tok_path)
    manifests = {}
    for name, shards in corpora.items():
        manifest = read_manifest(Path(shards.out_dir))
        if manifest["tokenizer_fingerprint"] != tok_fp:
            raise TokenizerMismatchError(
                f"corpus {name!r}: {Path(shards.out_dir) / MANIFEST_FILE} was tokenized with tokenizer "
                f"{manifest['tokenizer_fingerprint']}, but evaluation decodes with {tok_path} "
                f"(sha256 {tok_fp}); re-shard the corpus with this tokenizer"
            )
        manifests[name] = manifest
    benchmarks = {}  # parsed now: a bad file fails before any model is loaded
    for i, bench in enumerate(cfg.benchmarks):
        source = (benchmark_files or {}).get(bench.name, bench.path)
        if source is None:
            raise ValueError(f"eval.benchmarks.{i} ({bench.name}): no file to score: it has no path and its Hub "
                             "download was not resolved (lmpipe.benchmarks.resolve_benchmarks)")
        try:
            benchmarks[bench.name] = (bench, benchmark_label(i, bench, source),
                                      *read_benchmark(Path(source), bench.kind, limit=bench.limit,
                                                      skip_bad=bench.skip_bad))
        except OSError as err:
            raise FileNotFoundError(f"eval.benchmarks.{i} ({bench.name}): {err}") from err
        except ValueError as err:
            raise ValueError(f"eval.benchmarks.{i} ({bench.name}): {err}") from err
    states = {}
    for name, ckpt in models.items():
        if not Path(ckpt).is_dir():
            raise FileNotFoundError(f"checkpoint directory of model {name!r} does not exist: {ckpt}")
        state = states[name] = read_state(Path(ckpt))
        if state.get("tokenizer_fingerprint") != tok_fp:
            raise TokenizerMismatchError(
                f"model {name!r}: {state['state_file']} was trained with tokenizer "
                f"{state.get('tokenizer_fingerprint')!r}, but evaluation uses {tok_path} (sha256 {tok_fp})"
            )
        block = (state.get("model") or {}).get("block_size")
        if sft is not None and block != sft.block_size:
            raise ValueError(f"model {name!r}: {state['state_file']} has block_size {block!r}, but the held-out SFT "
                             f"examples are laid out in windows of model.block_size={sft.block_size}, as fine-tuning "
                             "trained on them")
    if sft is not None and not Path(sft.path).is_file():
        raise FileNotFoundError(f"finetune.sft_path: SFT file {sft.path!r} does not exist")

    def build(tmp: Path) -> BuildOutput:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tok = load_tokenizer(tok_path)
        token_bytes = token_byte_lengths(tok)
        # Every corpus was checked to use this tokenizer, so they share one end-of-text id.
        start_id = next(iter(manifests.values()))["eot_id"]
        splits = {name: TokenSplit(Path(shards.out_dir), "val") for name, shards in corpora.items()}
        sft_data, sft_eot = None, None
        if sft is not None:  # read and tokenized once, for every model; the end-of-text id as fine-tuning finds it
            sft_eot = meta_eot_id(tok, tokenizer.path(META_FILE))
            sft_data = build_sft_data(Path(sft.path), tok, sft_eot, sft.block_size, layout=sft.layout,
                                      skip_long=sft.skip_long, skip_bad=sft.skip_bad, field="finetune.sft_path")

        results, samples, model_info, choice = [], {}, {}, []
        for model_name, ckpt in models.items():
            model = load_model(Path(ckpt), device=device)
            model_info[model_name] = {
                "checkpoint": str(ckpt), "step": states[model_name].get("step"), "params": model.num_params(),
            }
            for corpus_name, split in splits.items():
                try:
                    r = evaluate_loss(
                        model, split, token_bytes,
                        eval_tokens=cfg.eval_tokens, batch_size=cfg.batch_size, device=device,
                    )
                except ValueError as err:
                    raise ValueError(f"evaluating model {model_name!r} on corpus {corpus_name!r} (val split): {err}") from err
                results.append({"model": model_name, "corpus": corpus_name, **r})
            if sft_data is not None:
                try:
                    r = score_sft(model, sft_data, token_bytes, eot_id=sft_eot, batch_size=cfg.batch_size,
                                  device=device)
                except ValueError as err:
                    raise ValueError(f"evaluating model {model_name!r} on the held-out SFT examples of "
                                     f"{sft.path}: {err}") from err
                results.append({"model": model_name, "corpus": SFT_HELD_OUT, **r})
            for bench_name, (bench, label, examples, lines, bad) in benchmarks.items():
                mc = score_mc(model, tok, examples, device=device, batch_size=cfg.batch_size, eot_id=start_id,
                              where=label, lines=lines)
                choice.append({"model": model_name, "benchmark": bench_name, "kind": bench.kind, "n": mc.n,
                               "acc": mc.acc, "acc_norm": mc.acc_norm, "skipped_lines": bad.count,
                               "truncated_choices": mc.truncated})
            samples[model_name] = generate_samples(
                model, tok, cfg.prompts,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                seed=cfg.seed, device=device, start_id=start_id, chat=is_chat_model(states[model_name]),
            )
            del model

        corpus_info = {
            name: {
                "fingerprint": corpora[name].fingerprint,
                "val_tokens": split.num_tokens,
                "val_bytes": split.num_bytes,
            }
            for name, split in splits.items()
        }
        sft_info = None if sft_data is None else {**sft.model_dump(), **sft_data.meta()}
        markdown = render_markdown(results, samples, eval_tokens=cfg.eval_tokens, choice=choice, reference=reference)
        write_json_atomic(
            tmp / "report.json",
            {"models": model_info, "corpora": corpus_info, "results": results, "multiple_choice": choice,
             "samples": samples, "reference": reference, "sft": sft_info,
             "compared_with_reference": compare_with_reference(results, choice, reference) if reference else []},
        )
        write_json_atomic(
            tmp / "samples.json",
            {
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "samples": samples,
            },
        )
        if curves:
            plot_loss_curves(curves, tmp / LOSS_CURVES)
            markdown += f"\n![training loss]({LOSS_CURVES})\n"
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        metrics = {f"{r['model']}.{r['corpus']}.{m}": float(r[m])
                   for r in results for m in (*METRICS, SCORED["held_out"])}
        metrics |= {f"{r['model']}.{SFT_HELD_OUT}.examples": float(r["examples"])
                    for r in results if r["corpus"] == SFT_HELD_OUT}
        metrics |= {f"{r['model']}.{r['benchmark']}.{m}": float(r[m])
                    for r in choice for m in (*MC_METRICS, SCORED["multiple_choice"])}
        return BuildOutput(metrics=metrics, meta={"markdown": markdown, "device": device, "held_out": results,
                                                  "multiple_choice": choice})

    return run_stage("evaluate", fingerprint, out_dir, build)
