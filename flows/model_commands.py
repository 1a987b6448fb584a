"""`lmpipe generate | evaluate | export`: a trained model, given as a checkpoint directory or an MLflow model URI.

Each command checks its own arguments and files first, so a typo fails before
a model is downloaded, then resolves the model (``lmpipe.tracking.handoff``) and
returns the text to print. Errors are ``OSError`` / ``ValueError`` that name the
option and the value; ``flows.cli`` prints them.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpipe.model.generation_settings import GENERATION_DEFAULTS

if TYPE_CHECKING:
    from lmpipe.config import PipelineConfig


def settle_workdir(args: argparse.Namespace) -> PipelineConfig:
    """Fill in the work directory when the command line left it out: --config's when one is given, else the
    default; --workdir given wins. Notes where it came from (``workdir_from``). Returns the config read."""
    from lmpipe.config import PipelineConfig, load_config

    config = load_config(args.config) if args.config else PipelineConfig()
    given = f"--config {args.config}: " if args.config else ""
    args.workdir_from = "--workdir" if args.workdir is not None or not given else f"{given}workdir"
    if args.workdir is None:
        args.workdir = Path(config.workdir)
    return config


def settle_locations(args: argparse.Namespace) -> None:
    """Fill in what the command line left out: the work directory and tracking URI (for evaluate also
    eval_tokens) from --config when one is given, else the defaults; an option given on the command line wins.
    Also notes where each came from (``workdir_from``, ``tracking_from``), for the errors that name them."""
    config = settle_workdir(args)
    given = f"--config {args.config}: " if args.config else ""
    args.tracking_from = "--tracking-uri" if args.tracking_uri is not None or not given else f"{given}tracking.uri"
    if args.tracking_uri is None:
        args.tracking_uri = config.tracking.uri  # None: the work directory's own store
    if getattr(args, "eval_tokens", 0) is None:
        args.eval_tokens = config.eval.eval_tokens


@contextmanager
def _model_files(args: argparse.Namespace) -> Iterator[Any]:
    """The model's checkpoint and tokenizer files; an MLflow model is downloaded to a folder removed afterwards."""
    from lmpipe.tracking.handoff import resolve_model

    with tempfile.TemporaryDirectory(prefix="lmpipe-model-") as tmp:
        yield resolve_model(args.model, workdir=args.workdir, tokenizer=args.tokenizer,
                            tracking_uri=args.tracking_uri, download_dir=Path(tmp),
                            workdir_from=args.workdir_from, tracking_from=args.tracking_from)


def _load(files: Any, device: str) -> tuple[Any, Any, int]:
    """(model, tokenizer, end-of-text id) of resolved model files."""
    from lmpipe.data.tokenizer import META_FILE, load_tokenizer, meta_eot_id
    from lmpipe.model.checkpoint import load_model

    tok = load_tokenizer(files.tokenizer)
    return load_model(files.checkpoint, device=device), tok, meta_eot_id(tok, files.tokenizer_dir / META_FILE,
                                                                         missing_ok=True)


def generate(args: argparse.Namespace) -> str:
    """Continue each --prompt; options are checked as the served model checks its params."""
    settle_locations(args)
    from lmpipe.eval.samples import generate_samples
    from lmpipe.model.checkpoint import is_chat_model, read_state
    from lmpipe.model.device import check_device
    from lmpipe.model.generation_settings import generation_params

    check_device(args.device)
    sampling = generation_params({key: getattr(args, key) for key in GENERATION_DEFAULTS},
                                 name=lambda key: "--" + key.replace("_", "-"))
    with _model_files(args) as files:
        model, tok, eot = _load(files, args.device)
        chat = args.chat if args.chat is not None else is_chat_model(read_state(files.checkpoint))
        samples = generate_samples(model, tok, args.prompt, **sampling, device=args.device, chat=chat, start_id=eot)
    return "\n\n".join(s["prompt"] + s["completion"] for s in samples)


def _read_texts(paths: list[Path]) -> list[tuple[Path, str]]:
    texts = []
    for path in paths:
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"--text {str(path)!r}: no such file") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"--text {str(path)!r}: not UTF-8 text (byte {err.start})") from None
    return texts


def _read_benchmarks(specs: list[str], limit: int | None) -> list[tuple[str, str, list, list]]:
    """(--benchmark spec, format, examples, their file lines) of each FORMAT=PATH."""
    from lmpipe.eval.benchmark_files import BENCHMARK_FORMATS, read_benchmark

    benches = []
    for spec in specs:
        kind, sep, path = spec.partition("=")
        formats = ", ".join(BENCHMARK_FORMATS)
        if not sep or not path:
            raise ValueError(f"--benchmark {spec!r}: expected FORMAT=PATH, FORMAT one of {formats} "
                             "(e.g. -b arc=ARC-Easy-Test.jsonl)")
        if kind not in BENCHMARK_FORMATS:
            raise ValueError(f"--benchmark {spec!r}: {kind!r} is not a benchmark format; FORMAT=PATH names the shape "
                             f"of the file's lines, one of {formats} (e.g. -b piqa={path})")
        try:
            examples, lines, _ = read_benchmark(Path(path), kind, limit=limit, skip_bad=False)  # type: ignore[arg-type]
        except OSError as err:
            raise OSError(f"--benchmark {spec!r}: {err}") from None
        except ValueError as err:  # a malformed line, named with its file and line
            raise ValueError(f"--benchmark {spec!r}: {err}") from None
        benches.append((spec, kind, examples, lines))
    return benches


def evaluate(args: argparse.Namespace) -> str:
    """Held-out loss / perplexity / bits per byte of --text files, acc / acc_norm of --benchmark files."""
    settle_locations(args)
    from lmpipe.eval.heldout import score_text
    from lmpipe.eval.multiple_choice import score_mc
    from lmpipe.model.device import check_device

    check_device(args.device)
    if not args.text and not args.benchmark:
        raise ValueError("nothing to score: give --text FILE and/or --benchmark FORMAT=PATH")
    if args.eval_tokens < 1:
        raise ValueError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    texts, benches = _read_texts(args.text), _read_benchmarks(args.benchmark, args.limit)
    rows = []
    with _model_files(args) as files:
        model, tok, eot = _load(files, args.device)
        if texts:
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
            mc = score_mc(model, tok, examples, device=args.device, batch_size=args.batch_size, eot_id=eot,
                          where=f"--benchmark {spec!r}", lines=lines)
            rows.append(f"{kind + ' ' + Path(spec.partition('=')[2]).name:<40} {mc.n:>6} {mc.acc:>8.4f} "
                        f"{mc.acc_norm:>8.4f}")
    return "\n".join(rows)


def export(args: argparse.Namespace) -> str:
    """Write the model in the Hugging Face transformers format."""
    settle_locations(args)
    from lmpipe.data.tokenizer import META_FILE
    from lmpipe.model.hf_export import export_hf

    with _model_files(args) as files:
        if not (files.tokenizer_dir / META_FILE).is_file():
            raise FileNotFoundError(f"model {args.model!r} comes without {META_FILE} (registered before lmpipe "
                                    "logged it): export its checkpoint directory with --tokenizer instead")
        dest = export_hf(files.checkpoint, files.tokenizer_dir, args.dest, overwrite=args.force)
    return (f"exported {args.model} to {dest}\n"
            f"  transformers: AutoModelForCausalLM.from_pretrained({str(dest)!r})\n"
            f"  lm-evaluation-harness: lm_eval --model hf --model_args pretrained={dest} --tasks hellaswag")
