"""GPU check: lmpipe's CUDA paths on one GPU (two for DDP), one JSON line per figure, non-zero on any failure.

    make gpu-check                        # = python -m bench.gpu_check
    python -m bench.gpu_check [--workdir DIR] [--parts paths,smoke,export,gpt2,ddp] [--warmup 3] [--steps 5]
                              [--budget 480] [--smoke-config YAML] [--gpt2-config YAML]

First, with or without a GPU: both presets are loaded and checked (they must train on CUDA), and the
recipes to measure are read from the config classes: every value of ``model.arch`` and of
``pretrain.optimizer`` where those settings exist (GPT-2 blocks with AdamW where they do not). Without
CUDA the check stops there (exit 3). Then each part runs in a process of its own, so that a crash or a
hang is reported and the other parts still run:

* ``paths``: bf16 support, a C compiler (torch.compile's Triton launchers need one), flash attention
  (SDPA with only the flash backend allowed, forward and backward, at gpu-smoke's head size), the
  attention operator the GPT's own forward takes under autocast, one fused AdamW step.
* ``smoke``: the ``gpu-smoke`` pipeline end to end in ``<workdir>/smoke`` (bf16, torch.compile, flash
  attention, fused AdamW, pinned prefetching, automatic micro-batch), with the pretraining's tokens/s
  (compile time included: the stage's own figure), MFU and the micro-batch it chose.
* ``export``: the smoke's fine-tuned model exported to transformers; its fp32 logits on CUDA against
  lmpipe's on CUDA (<= 1e-4, as the CPU test) and against its own on CPU (<= 1e-3: other kernels).
* ``gpt2``: GPT-2 124M (``gpt2-124m``'s model and 524,288-token batches; the bytes of data/*.txt as
  tokens) in ``train()``, tokens/s and MFU for each recipe compiled and eager: steps
  warmup+1..warmup+steps between two progress callbacks, no checkpoint inside the window.
* ``ddp``: where two GPUs exist, 10 pretraining steps of the smoke's model on its shards under
  torchrun with 2 processes (NCCL).

MFU = flops_per_token x tokens/s / peak: 6N + 12*L*H*Q*T FLOPs per token (``GPT.flops_per_token``)
against the GPU's dense bf16 peak (``lmpipe.training.device.PEAK_BF16_FLOPS``, by device name).
Figures are JSON lines on stdout; each part's other output is in ``<workdir>/<part>.log``. Exit status:
0 every part passed, 1 one failed or did not fit in ``--budget`` seconds, 2 a preset is invalid,
3 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import torch
from pydantic import BaseModel

from lmpipe.config.base import ConfigError
from lmpipe.config.loading import load_config
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import DEFAULT_ARCH, MODEL_ARCHS, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SMOKE, GPT2 = REPO / "configs" / "gpu-smoke.yaml", REPO / "configs" / "gpt2-124m.yaml"
PARTS = ("paths", "smoke", "export", "gpt2", "ddp")
TIMEOUT_S = {"paths": 120, "smoke": 330, "export": 120, "gpt2": 240, "ddp": 240}  # per process
FIGURE = "gpu-check-figure "  # a part's figure lines in its output
NO_CUDA = ("gpu-check: no CUDA device: torch {torch} (CUDA {cuda}) sees none (torch.cuda.is_available() is "
           "False), so nothing was measured; the presets are valid ({presets})")
EXIT_FAILED, EXIT_PRESET, EXIT_NO_CUDA = 1, 2, 3


# ---------------------------------------------------------------- presets and recipes (no GPU needed)


# What trains where the config has no such setting (before model.arch and pretrain.optimizer existed).
FIXED = {"arch": "arch=gpt2", "optimizer": "optimizer=adamw"}


@dataclass(frozen=True)
class Recipe:
    """One architecture x optimizer: dotted overrides of the gpt2-124m preset, and its name."""

    overrides: tuple[str, ...]
    label: str


def literal_values(annotation: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` annotation (inside ``Annotated`` or a union with None too); () otherwise."""
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin is Annotated:
        return literal_values(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(v for member in get_args(annotation) for v in literal_values(member))
    return ()


def choices(section: type[BaseModel], name: str, prefix: str) -> list[str]:
    """A dotted override per value field ``name`` of ``section`` can take, its default first; [] when the
    section has no such field. A sub-section (``optimizer: {name: muon, ...}``) is chosen by its own
    ``name`` / ``kind`` / ``type`` field."""
    info = section.model_fields.get(name)
    if info is None:
        return []
    values = literal_values(info.annotation)
    if values:
        return [f"{prefix}.{name}={v}" for v in sorted(values, key=lambda v: v != info.default)]
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
        for key in ("name", "kind", "type"):
            if found := choices(info.annotation, key, f"{prefix}.{name}"):
                return found
    return []


def arch_choices() -> list[str]:
    """A ``model.arch`` override per architecture, the default first: each is its own section class
    (``MODEL_ARCHS``), whose ``arch`` field has one value."""
    return [f"model.arch={a}" for a in sorted(MODEL_ARCHS, key=lambda a: a != DEFAULT_ARCH)]


def recipes(model_section: type[BaseModel] | None = None, train_section: type[BaseModel] = TrainConfig
            ) -> list[Recipe]:
    """Every architecture x optimizer the config offers (``model.arch``, ``pretrain.optimizer``); the
    architectures are ``arch_choices()`` unless ``model_section`` is one class with an ``arch`` field."""
    axes: list[list[tuple[str, str | None]]] = []  # per axis: (its name in a label, the override or None)
    archs = arch_choices() if model_section is None else choices(model_section, "arch", "model")
    for found, fixed in ((archs, FIXED["arch"]),
                         (choices(train_section, "optimizer", "pretrain"), FIXED["optimizer"])):
        axes.append([(o.split(".", 1)[1], o) for o in found] or [(fixed, None)])
    return [Recipe(tuple(o for _, o in combo if o is not None), ",".join(name for name, _ in combo))
            for combo in product(*axes)]


def load_presets(smoke: Path, gpt2: Path) -> tuple[PipelineConfig, dict[Recipe, PipelineConfig]]:
    """The gpu-smoke preset and gpt2-124m's for each recipe, each checked to train on CUDA."""
    def checked(path: Path, overrides: Iterable[str] = ()) -> PipelineConfig:
        config = load_config(path, list(overrides))
        for section in ("pretrain", "finetune"):
            device = getattr(config, section).device
            if device not in ("cuda", "auto"):
                raise ConfigError(f"{path}: {section}.device={device!r}: the GPU check trains on CUDA")
        return config

    return checked(smoke), {r: checked(gpt2, r.overrides) for r in recipes()}


def describe(config: PipelineConfig) -> dict[str, Any]:
    m, p = config.model, config.pretrain
    return {"name": config.name, "model": f"{m.n_layer}x{m.n_embd}, {m.n_head} heads, context {m.block_size}",
            "vocab": config.tokenizer.vocab_size, "batch_tokens": p.batch_tokens, "batch_size": p.batch_size,
            "max_steps": p.max_steps, "compile": p.compile, "precision": p.precision}


# ---------------------------------------------------------------- the parent: parts in processes


def emit(figure: dict[str, Any]) -> None:
    print(json.dumps(figure), flush=True)


def run_part(args: argparse.Namespace, part: str, extra: list[str], label: str, timeout: float
             ) -> list[dict[str, Any]]:
    """``part`` in a child process (its own session: a timeout ends everything it started); its figures."""
    log = args.workdir / f"{label}.log"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", part, "--workdir", str(args.workdir),
           "--smoke-config", str(args.smoke_config), "--gpt2-config", str(args.gpt2_config),
           "--warmup", str(args.warmup), "--steps", str(args.steps), *extra]
    print(f"gpu-check: {label} (at most {timeout:.0f} s), log {log}", file=sys.stderr, flush=True)
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            code = None
    text = log.read_text(encoding="utf-8", errors="replace")
    figures = [json.loads(line[len(FIGURE):]) for line in text.splitlines() if line.startswith(FIGURE)]
    tail = " | ".join(text.strip().splitlines()[-8:])
    about = {"figure": part} | ({"run": label} if label != part else {})
    if code is None:
        figures.append(about | {"ok": False, "error": f"timed out after {timeout:.0f} s", "log": str(log)})
    elif not figures or (code != 0 and all(f.get("ok") for f in figures)):
        figures.append(about | {"ok": False, "error": f"exited with code {code}: {tail}", "log": str(log)})
    return figures


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the parts work and log (default: .lmpipe/gpu-check/<UTC time>)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of %(default)s")
    parser.add_argument("--warmup", type=int, default=3, help="gpt2: untimed steps (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="gpt2: timed steps (default 5)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts (default 480)")
    parser.add_argument("--smoke-config", type=Path, default=SMOKE, help="the smoke preset (default gpu-smoke)")
    parser.add_argument("--gpt2-config", type=Path, default=GPT2, help="the GPT-2 124M preset (default gpt2-124m)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--recipe", default="", help=argparse.SUPPRESS)  # gpt2: comma-separated overrides
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)  # gpt2: the recipe's name
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # a part's device (tests: cpu)
    parser.add_argument("--compile", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts {','.join(unknown)}: not a part; the parts are {','.join(PARTS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part is not None:
        return child(args)
    try:
        smoke, gpt2 = load_presets(args.smoke_config, args.gpt2_config)
    except ConfigError as err:
        print(f"gpu-check: invalid preset: {err}", file=sys.stderr)
        return EXIT_PRESET
    emit({"figure": "presets", "ok": True, "gpu-smoke": describe(smoke),
          "gpt2-124m": describe(next(iter(gpt2.values()))), "recipes": [r.label for r in gpt2]})
    if not torch.cuda.is_available():
        presets = ", ".join(p.name for p in (args.smoke_config, args.gpt2_config))
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "none: a CPU-only build",
                             presets=presets), file=sys.stderr)
        return EXIT_NO_CUDA
    if args.workdir is None:
        args.workdir = Path(".lmpipe") / "gpu-check" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[tuple[str, list[str], str]] = []
    for part in args.parts:
        if part == "gpt2":
            runs += [("gpt2", ["--recipe", ",".join(r.overrides), "--label", r.label, "--compile", c],
                      f"gpt2-{r.label.replace('=', '-').replace(',', '_')}-compile-{c}")
                     for r in gpt2 for c in ("on", "off")]
        else:
            runs.append((part, [], part))
    failed: list[str] = []
    for part, extra, label in runs:
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            figures = [{"figure": part} | ({"run": label} if label != part else {})
                       | {"ok": False, "error": f"not run: the budget of {args.budget:.0f} s is spent"}]
        else:
            figures = run_part(args, part, extra, label, min(TIMEOUT_S[part], left))
        for figure in figures:
            emit(figure)
            if not figure.get("ok"):
                failed.append(str(figure.get("run", figure["figure"])))
    emit({"figure": "gpu-check", "ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - started, 1),
          "workdir": str(args.workdir)})
    return EXIT_FAILED if failed else 0


# ---------------------------------------------------------------- the parts (in a child process, on CUDA)


def child(args: argparse.Namespace) -> int:
    from bench import gpu_parts

    try:
        figures = getattr(gpu_parts, args.part)(args)
    except Exception as err:  # noqa: BLE001 - the part's failure is its figure; the traceback goes to the log
        import traceback

        traceback.print_exc()
        about = {"recipe": args.label, "compile": args.compile == "on"} if args.part == "gpt2" else {}
        figures = [{"figure": args.part, **about, "ok": False,
                    "error": f"{type(err).__name__}: {err}".splitlines()[0]}]
    for figure in figures:
        print(FIGURE + json.dumps(figure), flush=True)
    return 0 if all(f.get("ok") for f in figures) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
