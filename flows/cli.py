"""The `lmpipe` command: load a config, run a flow, print what happened and where to look.

    lmpipe run                                   # the demo (the config's defaults)
    lmpipe run --config configs/tiny.yaml pretrain.max_steps=200
    lmpipe data --config configs/demo.yaml       # the data stages only
    lmpipe config --config configs/demo.yaml     # print the resolved config
    lmpipe why wikitext2/0/17                    # which cleaning step removed a document, and why
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from lmpipe.config import ConfigError, PipelineConfig, load_config


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
    return parser


def explain_removal(workdir: str, doc_id: str) -> tuple[str, int]:
    """The `why` command's text and exit status (0 when the document was removed somewhere)."""
    from lmpipe.clean import why_removed

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
    reg = summary.get("registered")
    if reg:
        lines += ["", f"registered model: {reg['model_uri']} (version {reg['version']})"]
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "why":
        text, status = explain_removal(args.workdir, args.doc_id)
        print(text)
        return status
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
