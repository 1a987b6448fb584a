"""The `lmpipe` command: load a config, run a flow, print what happened and where to look.

    lmpipe run                                   # the demo (the config's defaults)
    lmpipe run --config configs/tiny.yaml pretrain.max_steps=200
    lmpipe data --config configs/demo.yaml       # the data stages only
    lmpipe config --config configs/demo.yaml     # print the resolved config
    lmpipe why wikitext2/0/17                    # which cleaning step removed a document, and why
    lmpipe verify --config configs/demo.yaml     # hash what a run would reuse; --repair moves damage aside

A trained model, given as a checkpoint directory or an MLflow model URI
(``models:/lmpipe-gpt@candidate``):

    lmpipe generate models:/lmpipe-gpt@candidate -p "ROMEO:" --temperature 0.8 --top-k 40
    lmpipe evaluate .lmpipe/finetune/<fp>/model --benchmark piqa=piqa-valid.jsonl   # FORMAT=PATH
    lmpipe generate --config configs/demo.yaml models:/lmpipe-gpt@candidate -p "ROMEO:"   # workdir and tracking.uri
    lmpipe export models:/lmpipe-gpt@candidate hf-model/   # Hugging Face transformers format
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows import model_commands
from flows.summary import format_summary
from lmpipe.config import ConfigError, EvalConfig, PipelineConfig, load_config
from lmpipe.eval.benchmark_files import BENCHMARK_FORMATS
from lmpipe.model.generation_settings import GENERATION_DEFAULTS
from lmpipe.tracking.uris import MODEL_URI_FORMS


class CommandFailed(Exception):
    """A command ran and failed; its message, printed as it is, says why."""


@dataclass(frozen=True)
class Answer:
    """What a command prints, with an exit status other than 0 (``why``: 1 when no step removed the document)."""

    text: str
    status: int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the whole pipeline"), ("data", "run the data stages only"),
                            ("continual", "train the @champion on what is new in the pretraining files "
                                          "(the scheduled run)"),
                            ("config", "print the resolved configuration as YAML")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", help="YAML preset (default: the built-in demo)")
        p.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    p = sub.add_parser("verify", help="hash every stage directory the config's run would reuse; "
                                      "exit status 1 if one is damaged")
    p.add_argument("--config", "-c", help="YAML preset (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    p.add_argument("--repair", action="store_true",
                   help="move damaged stage directories aside (to <workdir>/damaged/) so the next run "
                        "rebuilds them")
    p.add_argument("--data", action="store_true", help="the data stages only (what `lmpipe data` builds)")
    p = sub.add_parser("why", help="say which cleaning step removed a document, and why")
    p.add_argument("doc_id", help="the document's id, e.g. wikitext2/0/17")
    p.add_argument("--config", "-c", metavar="YAML", help="the run's preset: its workdir is where to look; "
                                                          "--workdir, when given, wins over it")
    p.add_argument("--workdir", help=f"the run's work directory (default: the --config's workdir, else "
                                     f"{PipelineConfig().workdir})")
    _generate_arguments(_model_parser(sub, "generate", "continue prompts with a trained model"))
    _evaluate_arguments(_model_parser(sub, "evaluate", "score a trained model: held-out loss / perplexity / bits "
                                                       "per byte on text files, acc / acc_norm on benchmarks"))
    p = _model_parser(sub, "export", "write a trained model in the Hugging Face transformers format")
    p.add_argument("dest", type=Path, help="the folder to write: a new one, or an earlier export to replace")
    p.add_argument("--force", action="store_true", help="replace dest even if it holds other files")
    _cloze_arguments(sub.add_parser("make-cloze", help="a HellaSwag-shaped next-line benchmark from the documents "
                                                       "a source read with max_bytes leaves unread"))
    return parser


def _model_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command on a trained model: the model reference and where to find its files."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("model", help=f"checkpoint directory, or MLflow model URI ({MODEL_URI_FORMS})")
    p.add_argument("--config", "-c", metavar="YAML",
                   help="the run's preset: its workdir and tracking.uri say where the model's files are; "
                        "--workdir and --tracking-uri, when given, win over it")
    p.add_argument("--workdir", type=Path, help="the run's work directory (default: the --config's workdir, else "
                                                f"{PipelineConfig().workdir})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the --config's tracking.uri, else the work "
                                          "directory's store)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: found by the checkpoint's "
                                                  "tokenizer fingerprint under the work directory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    return p


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help='a prompt (repeat for several); "" starts from the end-of-text token (unconditional)')
    # The served model's defaults too (GENERATION_DEFAULTS); both are checked by generation_params.
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


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", "-t", action="append", type=Path, default=[], metavar="FILE",
                   help="a UTF-8 text file to score as one held-out document (repeat for several)")
    p.add_argument("--eval-tokens", type=int, help="score at most this many tokens of each text (default: the "
                                                   f"--config's eval.eval_tokens, else {EvalConfig().eval_tokens})")
    p.add_argument("--benchmark", "-b", action="append", default=[], metavar="FORMAT=PATH",
                   help=f"a local JSONL benchmark file and the shape of its lines, FORMAT one of "
                        f"{', '.join(BENCHMARK_FORMATS)} (the dataset it comes from, not a name): "
                        "-b arc=ARC-Easy-Test.jsonl (repeat for several)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each")
    p.add_argument("--batch-size", type=int, default=16)


def _cloze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the corpus text file")
    p.add_argument("--max-bytes", type=int, required=True, help="the source's max_bytes: items come from the "
                                                                "documents after it")
    p.add_argument("--boundary", default="blank_line", help="the source's doc_boundary (default blank_line)")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--endings", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")


def run(args: argparse.Namespace) -> str:
    """`lmpipe run` / `lmpipe data` / `lmpipe continual`: the whole pipeline, its data stages, or the continual
    flow, on the config."""
    config = load_config(args.config, args.overrides)
    _prefect_environment(config)
    from flows.continual import continual  # imports prefect: after the environment is set
    from flows.pipeline import pipeline, prepare_data

    _start_temporary_api()
    flow = {"run": pipeline, "data": prepare_data, "continual": continual}[args.command]
    start = time.perf_counter()
    log_file = Path(config.workdir) / "logs" / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    with _log_to(log_file):
        state = flow(config=config, return_state=True)
        if state.is_completed():
            summary = state.result()
        else:
            raise CommandFailed(_failure_text(args.command, state, log_file))
    log_file.unlink(missing_ok=True)  # Prefect keeps the log of a run that went well; this copy is for failures
    return format_summary(summary, time.perf_counter() - start)


def _failure_text(command: str, state: Any, log_file: Path) -> str:
    """What the terminal shows last: the one-line error first, then where the whole story is."""
    from prefect.client.orchestration import get_client

    from flows.notify import Failure, describe_failure
    from tasks.stages import one_line

    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        error = RuntimeError(state.message or state.name)
    try:
        with get_client(sync_client=True) as client:
            failure = describe_failure(client.read_flow_run(state.state_details.flow_run_id), error)
    except Exception:  # noqa: BLE001 - without the API's details, the error itself still comes first
        failure = Failure(flow_run="", url=None, stage=None, error=one_line(error))
    lines = [f"\nlmpipe: {command} {failure.headline()}", f"  full log, with the traceback: {log_file}"]
    if failure.url:
        lines.append(f"  Prefect flow run: {failure.url}")
    return "\n".join(lines)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Everything the run logs (what the terminal shows, tracebacks included) also into ``path``."""
    from prefect.logging.formatters import PrefectFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = "%(asctime)s.%(msecs)03d | %(levelname)-7s"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PrefectFormatter(  # the terminal's format, with the date
        f"{stamp} | %(name)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
        flow_run_fmt=f"{stamp} | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt=f"{stamp} | Task run %(task_run_name)r - %(message)s"))
    handler.handleError = lambda record: None  # type: ignore[method-assign] # a full disk: the run's error first
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        with contextlib.suppress(OSError):  # a full disk cannot take the last lines: the run's error goes first
            handler.close()


def show_config(args: argparse.Namespace) -> str:
    """`lmpipe config`: the resolved configuration as YAML."""
    config = load_config(args.config, args.overrides)
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip("\n")


def verify(args: argparse.Namespace) -> Answer:
    """`lmpipe verify`: the table of stages and their files' state; exit status 1 if damage is left."""
    config = load_config(args.config, args.overrides)
    _prefect_environment(config)
    from flows.verify import format_report
    from flows.verify import verify as check

    rows, sound = check(config, repair=args.repair, data_only=args.data)
    return Answer(format_report(rows, config.workdir), 0 if sound or args.repair else 1)


def why(args: argparse.Namespace) -> Answer:
    """`lmpipe why`: which cleaning step removed a document; exit status 1 when none did."""
    model_commands.settle_workdir(args)
    return Answer(*explain_removal(args.workdir, args.doc_id))


def cloze_benchmark(args: argparse.Namespace) -> str:
    """`lmpipe make-cloze`: a next-line benchmark from the documents a source's max_bytes leaves unread."""
    from lmpipe.eval.cloze import held_out_documents, make_cloze, write_cloze

    first, docs = held_out_documents(args.file.read_text(encoding="utf-8"), args.boundary, args.max_bytes,
                                     source=str(args.file))
    items = make_cloze(docs[first:], n_items=args.items, n_endings=args.endings, seed=args.seed, first_index=first)
    write_cloze(items, args.out)
    return (f"{args.out}: {len(items)} items of {args.endings} endings from documents {first}..{len(docs) - 1} "
            f"of {args.file.name} (the ones a source with max_bytes={args.max_bytes} does not read)")


def explain_removal(workdir: str, doc_id: str) -> tuple[str, int]:
    """The `why` command's text and exit status (0 when the document was removed somewhere)."""
    from lmpipe.stages.clean import why_removed

    found = why_removed(workdir, doc_id)
    if not found.rows:
        if found.uncombined:
            return (f"{doc_id}: not removed by any finished clean stage under {workdir}, nor by the per-document "
                    f"steps of {len(found.uncombined)} clean_chunk stage(s) that no finished clean stage combined "
                    "(a failed or unfinished run): whether it is kept is not known until their clean stage runs "
                    "(de-duplication), and it may be in a chunk that was not cleaned"), 1
        return (f"{doc_id}: not removed by any finished clean stage under {workdir} "
                "(kept, or not in these corpora: ids are <corpus>/<source index>/<n or id>)"), 1
    lines = []
    for r in found.rows:
        if r["stage"] == "clean":
            lines.append(f"{doc_id}: removed by {r['step']} in {r['stage_dir']}")
        else:
            lines.append(f"{doc_id}: removed by {r['step']} in the clean_chunk stage {r['stage_dir']} "
                         f"(chunk {r['chunk']}; no finished clean stage combined it, so the answer comes from "
                         "this chunk stage)")
        lines += [f"  reason:  {r['reason']}", f"  source:  {r['source']} ({r['bytes']} bytes)",
                  f"  excerpt: {r['excerpt'][:200]!r}"]
    return "\n".join(lines), 0


def _prefect_environment(config: PipelineConfig) -> None:
    """Keep an ephemeral Prefect's database and cached results beside the run's other artifacts,
    unless the user points at a Prefect home or server of their own. Must run before prefect is imported."""
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        home = Path(config.workdir).resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)  # prefect does not create missing parents
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server starts in a subprocess; Prefect gives it 20 s, which a loaded shared machine
    # (or two runs starting together on one database) can exceed.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The library logs through `logging` (it never imports prefect); its lines go where the flow's go, also
    # from the chunk runner's worker processes, which inherit this.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmpipe")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _start_temporary_api() -> None:
    """Start the temporary Prefect API of a run that has no server of its own, one process at a time per
    Prefect home.

    The server migrates the home's database as it starts. Two runs of one work directory started together
    would migrate it at once, and one fails ('duplicate column name', 'table ... already exists'); so the
    start holds an exclusive lock on a file in the home until the server answers. The kernel drops the lock
    of a killed process. The flow's client then finds this process's server already running.
    """
    import fcntl

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    with open(home / TEMPORARY_API_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        SubprocessASGIServer().start()


TEMPORARY_API_LOCK = "temporary-api.lock"


COMMANDS: dict[str, Callable[[argparse.Namespace], str | Answer]] = {
    "run": run,
    "data": run,
    "continual": run,
    "config": show_config,
    "why": why,
    "verify": verify,
    "generate": model_commands.generate,
    "evaluate": model_commands.evaluate,
    "export": model_commands.export,
    "make-cloze": cloze_benchmark,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; what it returns goes to stdout, a failure to stderr with a non-zero exit status.

    A bad configuration exits 2 (nothing ran); a bad argument, a missing or malformed file, or a failed
    run exits 1, with a message that names the option or field and the value.
    """
    args = _parser().parse_args(argv)
    # MLflow draws a progress bar for every artifact it downloads (registering a model, generate, export): noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        answer = COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"lmpipe: {err}", file=sys.stderr)
        return 2
    except CommandFailed as failed:
        print(failed, file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"lmpipe {args.command}: {err}", file=sys.stderr)
        return 1
    if isinstance(answer, Answer):
        print(answer.text)
        return answer.status
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
