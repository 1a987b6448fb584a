"""Stage evaluate: held-out loss, perplexity and bits per byte, benchmarks, samples and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmpipe.artifacts import BuildOutput, StageResult, write_json_atomic
from lmpipe.config.base import SFT_HELD_OUT
from lmpipe.config.evaluation import EvalConfig
from lmpipe.data.sft import HeldOutSFT, read_held_out
from lmpipe.data.shards import MANIFEST_FILE, TokenSplit, read_manifest
from lmpipe.data.tokenizer import (
    META_FILE,
    TOKENIZER_FILE,
    TokenizerMismatchError,
    load_tokenizer,
    meta_eot_id,
    token_byte_lengths,
    tokenizer_fingerprint,
)
from lmpipe.eval.benchmark_files import benchmark_label, read_benchmark
from lmpipe.eval.heldout import MC_METRICS, METRICS, SCORED, evaluate_loss, score_sft
from lmpipe.eval.multiple_choice import score_mc
from lmpipe.eval.report import LOSS_CURVES, compare_with_reference, plot_loss_curves, render_markdown
from lmpipe.eval.samples import generate_samples
from lmpipe.model.checkpoint import is_chat_model, load_model, read_state
from lmpipe.model.gpt import GPT
from lmpipe.stages.contract import run_stage


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
    sft: Path | None = None,
) -> StageResult:
    """Score every model on every corpus's val split and sample from each; write the report.

    ``curves`` (stage name -> metrics.jsonl) adds a plot of the training losses.
    ``benchmark_files`` (benchmark name -> JSONL) is what ``lmpipe.eval.benchmark_files.resolve_benchmarks``
    chose to score (a Hub download or the local file); a benchmark not in it is read
    from its ``path``. ``reference``: an earlier registered model to compare with
    (see :func:`render_markdown`). ``sft``: the held-out SFT examples the fine-tuning stage
    wrote (``lmpipe.data.sft.HELD_OUT_FILE``, as it laid them out), which every model is
    also scored on (:func:`score_sft`), as the corpus ``SFT_HELD_OUT`` of the results,
    metrics and report (plus ``<model>.sft/val.examples``); read before any model is loaded.
    """
    if not models:
        raise ValueError("run_evaluate: no models to evaluate (models is empty)")
    if not corpora:
        raise ValueError("run_evaluate: no corpora to evaluate on (corpora is empty)")
    # Everything is checked before the slow part, so a mismatch fails at once.
    tok_path = tokenizer.path(TOKENIZER_FILE)
    tok_fp = tokenizer_fingerprint(tok_path)
    manifests = _checked_manifests(corpora, tok_path, tok_fp)
    benchmarks = _read_benchmarks(cfg, benchmark_files or {})  # a bad file fails before any model is loaded
    if sft is not None and not Path(sft).is_file():
        raise FileNotFoundError(f"the fine-tuning stage's held-out SFT examples {str(sft)!r} do not exist")
    held_out = read_held_out(Path(sft)) if sft is not None else None
    states = _checked_states(models, tok_path, tok_fp, held_out)

    def build(tmp: Path) -> BuildOutput:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tok = load_tokenizer(tok_path)
        scorer = _Scorer(cfg, tok, device, held_out,
                         # Every corpus was checked to use this tokenizer, so they share one end-of-text id.
                         start_id=next(iter(manifests.values()))["eot_id"],
                         # the end-of-text id as fine-tuning finds it
                         sft_eot=meta_eot_id(tok, tokenizer.path(META_FILE)) if held_out is not None else None)
        splits = {name: TokenSplit(Path(shards.out_dir), "val") for name, shards in corpora.items()}
        results: list[dict[str, Any]] = []
        choice: list[dict[str, Any]] = []
        samples, model_info = {}, {}
        for model_name, ckpt in models.items():
            model = load_model(Path(ckpt), device=device)
            model_info[model_name] = {
                "checkpoint": str(ckpt), "step": states[model_name].get("step"), "params": model.num_params(),
            }
            results += scorer.losses(model_name, model, splits)
            choice += scorer.multiple_choice(model_name, model, benchmarks)
            samples[model_name] = scorer.samples(model, chat=is_chat_model(states[model_name]))
            del model
        corpus_info = {name: {"fingerprint": corpora[name].fingerprint, "val_tokens": split.num_tokens,
                              "val_bytes": split.num_bytes} for name, split in splits.items()}
        report = {"models": model_info, "corpora": corpus_info, "results": results, "multiple_choice": choice,
                  "samples": samples, "reference": reference,
                  "sft": None if held_out is None else {**held_out.source, **held_out.data.meta()},
                  "compared_with_reference": compare_with_reference(results, choice, reference) if reference else []}
        markdown = _write_report(tmp, cfg, report, curves)
        return BuildOutput(metrics=_metrics(results, choice),
                           meta={"markdown": markdown, "device": device, "held_out": results,
                                 "multiple_choice": choice})

    return run_stage("evaluate", fingerprint, out_dir, build)


def _checked_manifests(corpora: dict[str, StageResult], tok_path: Path, tok_fp: str) -> dict[str, dict[str, Any]]:
    """Each corpus's shard manifest, checked to come from the tokenizer evaluation decodes with."""
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
    return manifests


def _read_benchmarks(cfg: EvalConfig, benchmark_files: dict[str, Path]) -> dict[str, tuple[Any, ...]]:
    """name -> (config, label, examples, lines, bad-line report) of every configured benchmark, parsed."""
    benchmarks = {}
    for i, bench in enumerate(cfg.benchmarks):
        source = benchmark_files.get(bench.name, bench.path)
        if source is None:
            raise ValueError(f"eval.benchmarks.{i} ({bench.name}): no file to score: it has no path and its Hub "
                             "download was not resolved (lmpipe.eval.benchmark_files.resolve_benchmarks)")
        try:
            benchmarks[bench.name] = (bench, benchmark_label(i, bench, source),
                                      *read_benchmark(Path(source), bench.kind, limit=bench.limit,
                                                      skip_bad=bench.skip_bad))
        except OSError as err:
            raise FileNotFoundError(f"eval.benchmarks.{i} ({bench.name}): {err}") from err
        except ValueError as err:
            raise ValueError(f"eval.benchmarks.{i} ({bench.name}): {err}") from err
    return benchmarks


def _checked_states(models: dict[str, Path], tok_path: Path, tok_fp: str,
                    held_out: HeldOutSFT | None) -> dict[str, dict[str, Any]]:
    """Each model's checkpoint state, checked against the tokenizer and the held-out SFT windows."""
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
        if held_out is not None and block != held_out.block_size:
            raise ValueError(f"model {name!r}: {state['state_file']} has block_size {block!r}, but the held-out SFT "
                             f"examples are laid out in windows of model.block_size={held_out.block_size}, as "
                             "fine-tuning trained on them")
    return states


class _Scorer:
    """What evaluation measures of one model, as rows of the report."""

    def __init__(self, cfg: EvalConfig, tok: Tokenizer, device: str, held_out: HeldOutSFT | None, *,
                 start_id: int, sft_eot: int | None) -> None:
        self.cfg, self.tok, self.device, self.held_out = cfg, tok, device, held_out
        self.start_id, self.sft_eot = start_id, sft_eot
        self.token_bytes = token_byte_lengths(tok)

    def losses(self, model_name: str, model: GPT, splits: dict[str, TokenSplit]) -> list[dict[str, Any]]:
        """Loss, perplexity and bits per byte on each corpus's val split, and on the held-out SFT examples."""
        rows = []
        for corpus_name, split in splits.items():
            try:
                r = evaluate_loss(model, split, self.token_bytes, eval_tokens=self.cfg.eval_tokens,
                                  batch_size=self.cfg.batch_size, device=self.device)
            except ValueError as err:
                raise ValueError(f"evaluating model {model_name!r} on corpus {corpus_name!r} (val split): "
                                 f"{err}") from err
            rows.append({"model": model_name, "corpus": corpus_name, **r})
        if self.held_out is not None:
            assert self.sft_eot is not None
            try:
                r = score_sft(model, self.held_out.data, self.token_bytes, eot_id=self.sft_eot,
                              batch_size=self.cfg.batch_size, device=self.device)
            except ValueError as err:
                raise ValueError(f"evaluating model {model_name!r} on the held-out SFT examples of "
                                 f"{self.held_out.source['path']}: {err}") from err
            rows.append({"model": model_name, "corpus": SFT_HELD_OUT, **r})
        return rows

    def multiple_choice(self, model_name: str, model: GPT,
                        benchmarks: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
        rows = []
        for bench_name, (bench, label, examples, lines, bad) in benchmarks.items():
            mc = score_mc(model, self.tok, examples, device=self.device, batch_size=self.cfg.batch_size,
                          eot_id=self.start_id, where=label, lines=lines)
            rows.append({"model": model_name, "benchmark": bench_name, "kind": bench.kind, "n": mc.n,
                         "acc": mc.acc, "acc_norm": mc.acc_norm, "skipped_lines": bad.count,
                         "truncated_choices": mc.truncated})
        return rows

    def samples(self, model: GPT, *, chat: bool) -> list[dict[str, str]]:
        cfg = self.cfg
        return generate_samples(model, self.tok, cfg.prompts, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
                                device=self.device, start_id=self.start_id, chat=chat)


def _write_report(tmp: Path, cfg: EvalConfig, report: dict[str, Any], curves: dict[str, Path] | None) -> str:
    """report.json, samples.json, report.md and the loss-curve plot; returns the markdown."""
    markdown = render_markdown(report["results"], report["samples"], eval_tokens=cfg.eval_tokens,
                               choice=report["multiple_choice"], reference=report["reference"])
    write_json_atomic(tmp / "report.json", report)
    write_json_atomic(tmp / "samples.json", {
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "samples": report["samples"],
    })
    if curves:
        plot_loss_curves(curves, tmp / LOSS_CURVES)
        markdown += f"\n![training loss]({LOSS_CURVES})\n"
    (tmp / "report.md").write_text(markdown, encoding="utf-8")
    return markdown


def _metrics(results: list[dict[str, Any]], choice: list[dict[str, Any]]) -> dict[str, float]:
    metrics = {f"{r['model']}.{r['corpus']}.{m}": float(r[m])
               for r in results for m in (*METRICS, SCORED["held_out"])}
    metrics |= {f"{r['model']}.{SFT_HELD_OUT}.examples": float(r["examples"])
                for r in results if r["corpus"] == SFT_HELD_OUT}
    metrics |= {f"{r['model']}.{r['benchmark']}.{m}": float(r[m])
                for r in choice for m in (*MC_METRICS, SCORED["multiple_choice"])}
    return metrics
