"""The `lmpipe` command: load a config, run a flow, print what happened and where to look.

    lmpipe run                                   # the demo (the config's defaults)
    lmpipe run --config configs/tiny.yaml pretrain.max_steps=200
    lmpipe data --config configs/demo.yaml       # the data stages only
    lmpipe config --config configs/demo.yaml     # print the resolved config
    lmpipe why wikitext2/0/17                    # which cleaning step removed a document, and why

A trained model, given as a checkpoint directory or an MLflow model URI
(``models:/lmpipe-gpt@candidate``):

    lmpipe generate models:/lmpipe-gpt@candidate -p "ROMEO:" --temperature 0.8 --top-k 40
    lmpipe evaluate .lmpipe/finetune/<fp>/model --benchmark piqa=piqa-valid.jsonl
    lmpipe export models:/lmpipe-gpt@candidate hf-model/   # Hugging Face transformers format
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from lmpipe.config.base import ConfigError
from lmpipe.config.evaluation import EvalConfig
from lmpipe.config.loading import load_config
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.tracking.handoff import GENERATION_DEFAULTS, MODEL_URI_FORMS  # light: no torch, no MLflow


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the whole pipeline"), ("data", "run the data stages only"),
                            ("config", "print the resolved configuration as YAML")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", help="YAML preset (default: the built-in demo)")
        p.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    p = sub.add_parser("why", help="say which cleaning step removed a document, and why")
    p.add_argument("doc_id", help="the document's id, e.g. wikitext2/0/17")
    p.add_argument("--workdir", default=PipelineConfig().workdir, help="the run's work directory")

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help=f"checkpoint directory, or MLflow model URI ({MODEL_URI_FORMS})")
        p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: found by the checkpoint's "
                                                      "tokenizer fingerprint under --workdir)")
        p.add_argument("--workdir", type=Path, default=Path(PipelineConfig().workdir), help="the run's work directory")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the work directory's store)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
        return p

    p = model_command("generate", "continue prompts with a trained model")
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help='a prompt (repeat for several); "" starts from the end-of-text token (unconditional)')
    # The served model's defaults too (lmpipe.tracking.handoff.GENERATION_DEFAULTS); both are checked by generation_params.
    p.add_argument("--max-new-tokens", type=int, default=GENERATION_DEFAULTS["max_new_tokens"],
                   help="at most this many tokens, >= 0 (default %(default)s)")
    p.add_argument("--temperature", type=float, default=GENERATION_DEFAULTS["temperature"],
                   help=">= 0; 0: greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=GENERATION_DEFAULTS["top_k"],
                   help="sample from the k most likely tokens, >= 1 (default: all)")
    p.add_argument("--top-p", type=float, default=GENERATION_DEFAULTS["top_p"],
                   help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=GENERATION_DEFAULTS["seed"], help="(default %(default)s)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt in the chat template, reply up to <|end|> (default: on for chat SFT models)")
    p = model_command("evaluate", "score a trained model: held-out loss / perplexity / bits per byte on text "
                                  "files, acc / acc_norm on multiple-choice benchmarks")
    p.add_argument("--text", "-t", action="append", type=Path, default=[], metavar="FILE",
                   help="a UTF-8 text file to score as one held-out document (repeat for several)")
    p.add_argument("--eval-tokens", type=int, default=EvalConfig().eval_tokens,
                   help="score at most this many tokens of each text (default: eval.eval_tokens)")
    p.add_argument("--benchmark", "-b", action="append", default=[], metavar="KIND=PATH",
                   help="hellaswag|arc|piqa=local JSONL file (repeat for several)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each")
    p.add_argument("--batch-size", type=int, default=16)
    p = model_command("export", "write a trained model in the Hugging Face transformers format")
    p.add_argument("dest", type=Path, help="the folder to write: a new one, or an earlier export to replace")
    p.add_argument("--force", action="store_true", help="replace dest even if it holds other files")
    p = sub.add_parser("make-cloze", help="a HellaSwag-shaped next-line benchmark from the documents a source "
                                          "read with max_bytes leaves unread (lmpipe.eval.cloze)")
    p.add_argument("file", type=Path, help="the corpus text file")
    p.add_argument("--max-bytes", type=int, required=True, help="the source's max_bytes: items come from the "
                                                                "documents after it")
    p.add_argument("--boundary", default="blank_line", help="the source's doc_boundary (default blank_line)")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--endings", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    return parser


def make_cloze_command(args: argparse.Namespace) -> str:
    from lmpipe.eval.cloze import held_out_documents, make_cloze, write_cloze

    first, docs = held_out_documents(args.file.read_text(encoding="utf-8"), args.boundary, args.max_bytes,
                                     source=str(args.file))
    items = make_cloze(docs[first:], n_items=args.items, n_endings=args.endings, seed=args.seed, first_index=first)
    write_cloze(items, args.out)
    return (f"{args.out}: {len(items)} items of {args.endings} endings from documents {first}..{len(docs) - 1} "
            f"of {args.file.name} (the ones a source with max_bytes={args.max_bytes} does not read)")


def explain_removal(workdir: str, doc_id: str) -> tuple[str, int]:
    """The `why` command's text and exit status (0 when the document was removed somewhere)."""
    from lmpipe.data.clean import why_removed

    rows = why_removed(workdir, doc_id)
    if not rows:
        return (f"{doc_id}: not removed by any finished clean stage under {workdir} "
                "(kept, or not in these corpora: ids are <corpus>/<source index>/<n or id>)"), 1
    lines = []
    for r in rows:
        lines += [f"{doc_id}: removed by {r['step']} in {r['clean_dir']}", f"  reason:  {r['reason']}",
                  f"  source:  {r['source']} ({r['bytes']} bytes)", f"  excerpt: {r['excerpt'][:200]!r}"]
    return "\n".join(lines), 0


def _prefect_environment(config: PipelineConfig) -> None:
    """Keep an ephemeral Prefect's database and cached results beside the run's other artifacts,
    unless the user points at a Prefect home or server of their own. Must run before prefect is imported."""
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        home = Path(config.workdir).resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)  # prefect does not create missing parents
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def format_summary(summary: dict, seconds: float) -> str:
    width = max([28, *(len(s["label"]) + 3 for s in summary["stages"])])  # corpus names make labels long
    lines = ["", f"{'stage':<{width}}{'status':<8}{'seconds':>9}  output", "-" * (width + 50)]
    for s in summary["stages"]:
        lines.append(f"{s['label']:<{width}}{s['status']:<8}{s['seconds']:>9.1f}  {s['out_dir']}")
    lines.append(f"{'total (incl. start-up)':<{width + 8}}{seconds:>9.1f}")
    evaluation = summary["metrics"].get("evaluate", {})
    if evaluation:
        lines += ["", f"{'model':<12}{'corpus':<20}{'loss':>8}{'ppl':>10}{'bits/byte':>11}"]
        for key in sorted(k for k in evaluation if k.endswith(".loss")):
            stem = key.removesuffix(".loss")
            model, corpus = stem.split(".", 1)  # model names have no dots; corpus names may
            lines.append(f"{model:<12}{corpus:<20}{evaluation[stem + '.loss']:>8.3f}"
                         f"{evaluation[stem + '.perplexity']:>10.1f}{evaluation[stem + '.bits_per_byte']:>11.3f}")
    choice = sorted(k.removesuffix(".acc_norm") for k in evaluation if k.endswith(".acc_norm"))
    if choice:
        lines += ["", f"{'model':<12}{'benchmark':<20}{'acc':>8}{'acc_norm':>10}"]
        for stem in choice:
            model, bench = stem.split(".", 1)
            lines.append(f"{model:<12}{bench:<20}{evaluation[stem + '.acc']:>8.3f}{evaluation[stem + '.acc_norm']:>10.3f}")
    classifier = summary["metrics"].get("classify")
    if classifier:
        lines += ["", f"classifier: accuracy {classifier['accuracy']:.3f}, macro-F1 {classifier['macro_f1']:.3f} "
                      "on the held-out examples"]
    reg = summary.get("registered")
    if reg:
        lines += ["", f"registered model: {reg['model_uri']} (version {reg['version']})"]
        decision = reg.get("promotion")
        if decision:
            lines.append(f"champion gate:    {'promoted to' if decision['promoted'] else 'not promoted to'} "
                         f"@{decision['alias']}: {decision['reason']}")
    uri = summary["tracking_uri"]
    lines += [
        "",
        f"artifacts:   {summary['workdir']}",
        f"MLflow run:  {summary['mlflow_run_id']} in {uri}",
        f"MLflow UI:   mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000",
    ]
    if "PREFECT_API_URL" in os.environ:
        lines.append(f"Prefect UI:  {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        lines.append(f"Prefect UI:  PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')} prefect server start"
                     "   # then open http://127.0.0.1:4200")
    return "\n".join(lines)


def model_command(args: argparse.Namespace) -> str:
    """generate / evaluate / export: resolve the model, do the work, return what to print."""
    import tempfile

    from lmpipe.tracking.handoff import check_device, generation_params, resolve_model

    texts: list[tuple[Path, str]] = []
    benches: list[tuple[str, str, list]] = []  # (--benchmark spec, kind, examples)
    sampling = {}
    if args.command in ("generate", "evaluate"):  # bad arguments fail before the model is fetched
        check_device(args.device)
    if args.command == "generate":  # the options checked as the served model checks its params
        sampling = generation_params({key: getattr(args, key) for key in GENERATION_DEFAULTS},
                                     name=lambda key: "--" + key.replace("_", "-"))
    if args.command == "evaluate":  # bad arguments and files fail before the model is fetched
        from lmpipe.eval.benchmark_files import read_benchmark

        if not args.text and not args.benchmark:
            raise ValueError("nothing to score: give --text FILE and/or --benchmark KIND=PATH")
        if args.eval_tokens < 1:
            raise ValueError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
        for path in args.text:
            try:
                texts.append((path, path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                raise FileNotFoundError(f"--text {str(path)!r}: no such file") from None
            except UnicodeDecodeError as err:
                raise ValueError(f"--text {str(path)!r}: not UTF-8 text (byte {err.start})") from None
        for spec in args.benchmark:
            kind, sep, path = spec.partition("=")
            if not sep or kind not in ("hellaswag", "arc", "piqa"):
                raise ValueError(f"--benchmark {spec!r}: expected KIND=PATH with KIND hellaswag, arc or piqa")
            try:
                examples, lines, _ = read_benchmark(Path(path), kind, limit=args.limit, skip_bad=False)  # type: ignore
                benches.append((spec, kind, examples, lines))
            except OSError as err:
                raise OSError(f"--benchmark {spec!r}: {err}") from None
            except ValueError as err:  # a malformed line, named with its file and line
                raise ValueError(f"--benchmark {spec!r}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="lmpipe-model-") as tmp:
        files = resolve_model(args.model, workdir=args.workdir, tokenizer=args.tokenizer,
                              tracking_uri=args.tracking_uri, download_dir=Path(tmp))
        if args.command == "export":
            from lmpipe.data.tokenizer import META_FILE
            from lmpipe.model.hf_export import export_hf

            if not (files.tokenizer_dir / META_FILE).is_file():
                raise FileNotFoundError(f"model {args.model!r} comes without {META_FILE} (registered before lmpipe "
                                        "logged it): export its checkpoint directory with --tokenizer instead")

            dest = export_hf(files.checkpoint, files.tokenizer_dir, args.dest, overwrite=args.force)
            return (f"exported {args.model} to {dest}\n"
                    f"  transformers: AutoModelForCausalLM.from_pretrained({str(dest)!r})\n"
                    f"  lm-evaluation-harness: lm_eval --model hf --model_args pretrained={dest} --tasks hellaswag")

        from lmpipe.data.tokenizer import load_tokenizer
        from lmpipe.model.checkpoint import load_model

        model = load_model(files.checkpoint, device=args.device)
        tok = load_tokenizer(files.tokenizer)
        if args.command == "generate":
            from lmpipe.data.tokenizer import META_FILE, meta_eot_id
            from lmpipe.eval.samples import generate_samples
            from lmpipe.model.checkpoint import is_chat_model, read_state

            chat = args.chat if args.chat is not None else is_chat_model(read_state(files.checkpoint))
            samples = generate_samples(model, tok, args.prompt, **sampling, device=args.device, chat=chat,
                                       start_id=meta_eot_id(tok, files.tokenizer_dir / META_FILE, missing_ok=True))
            return "\n\n".join(s["prompt"] + s["completion"] for s in samples)

        from lmpipe.data.tokenizer import META_FILE, meta_eot_id
        from lmpipe.eval.multiple_choice import score_mc

        meta = files.tokenizer_dir / META_FILE
        eot = meta_eot_id(tok, meta, missing_ok=True)
        rows = []
        if texts:
            from lmpipe.eval.heldout import score_text

            rows.append(f"{'text':<40} {'tokens':>8} {'bytes':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>9}")
            for path, text in texts:
                try:
                    r = score_text(model, tok, text, start_id=eot, eval_tokens=args.eval_tokens,
                                   batch_size=args.batch_size, device=args.device)
                except ValueError as err:
                    raise ValueError(f"--text {str(path)!r}: {err}") from None
                rows.append(f"{path.name:<40} {r['tokens']:>8,.0f} {r['bytes']:>10,.0f} {r['loss']:>8.4f} "
                            f"{r['perplexity']:>10.2f} {r['bits_per_byte']:>9.4f}")
        if benches:
            rows.append(f"{'benchmark':<40} {'n':>6} {'acc':>8} {'acc_norm':>8}")
        for spec, kind, examples, lines in benches:
            r = score_mc(model, tok, examples, device=args.device, batch_size=args.batch_size, eot_id=eot,
                         where=f"--benchmark {spec!r}", lines=lines)
            rows.append(f"{kind + ' ' + Path(spec.partition('=')[2]).name:<40} {r.n:>6} {r.acc:>8.4f} "
                        f"{r.acc_norm:>8.4f}")
        return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "why":
        text, status = explain_removal(args.workdir, args.doc_id)
        print(text)
        return status
    if args.command == "make-cloze":
        try:
            print(make_cloze_command(args))
        except (OSError, ValueError) as err:
            print(f"lmpipe make-cloze: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("generate", "evaluate", "export"):
        try:
            print(model_command(args))
        except (OSError, ValueError) as err:
            print(f"lmpipe {args.command}: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"lmpipe: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    _prefect_environment(config)
    from flows.pipeline import pipeline, prepare_data  # imports prefect: after the environment is set

    flow = pipeline if args.command == "run" else prepare_data
    start = time.perf_counter()
    try:
        summary = flow(config=config)
    except Exception as err:  # the traceback is in the Prefect log above; end with the reason
        print(f"\nlmpipe: {args.command} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
