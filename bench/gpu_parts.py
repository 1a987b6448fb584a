"""The parts of ``bench.gpu_check``, each run in a process of its own on CUDA; each returns its figures.

A figure is a dict with ``figure`` (its name) and ``ok``; the parent prints it as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.train import corpus_tokens, full_run, make_schedule
from lmpipe.config.loading import load_config
from lmpipe.config.training import TrainConfig
from lmpipe.data.shards import ArraySource, read_manifest
from lmpipe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from lmpipe.model.checkpoint import MODEL_DIR, latest_checkpoint, load_model, read_state
from lmpipe.model.device import autocast_for
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.training.checkpoint import CHECKPOINTS_DIR
from lmpipe.training.device import mfu, peak_flops

STAGES_FILE = "smoke_stages.json"  # the smoke's stage outcomes (stage, label, out_dir), for export and ddp
EXPORT_ATOL, DEVICE_ATOL = 1e-4, 1e-3
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_attention_math": "math",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu"}
FUSED_ATTENTION = {"flash", "cudnn"}  # the CUDA kernels that never hold the T x T scores in memory
DDP_STEPS = 10


def attention_ops(model: torch.nn.Module, x: torch.Tensor, autocast: contextlib.AbstractContextManager
                  ) -> list[str]:
    """Which scaled-dot-product-attention implementations one forward and backward of ``model`` ran
    (the aten operators PyTorch dispatches to; recorded on the CPU side, so no CUDA profiler is needed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast:
            _, loss = model(x, x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    names = {e.key for e in prof.key_averages()}
    return sorted({kind for op, kind in SDPA_OPS.items() if op in names})


def _device(args: argparse.Namespace) -> torch.device:
    """CUDA device 0; ``--device cpu`` runs the parts' code on the CPU (the tests: no figure is a GPU's then)."""
    if args.device != "cuda":
        return torch.device(args.device)
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def _stages(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / STAGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the smoke part did not finish, and this part uses its outputs")
    return json.loads(path.read_text(encoding="utf-8"))


def _out_dir(stages: list[dict[str, Any]], stage: str, label: str | None = None) -> Path:
    return Path(next(s["out_dir"] for s in stages if s["stage"] == stage and label in (None, s["label"])))


def _stage_result(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "stage_result.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- parts


def paths(args: argparse.Namespace) -> list[dict[str, Any]]:
    """bf16, a C compiler, flash attention, the GPT's attention operator, a fused AdamW step."""
    dev = _device(args)
    smoke = load_config(args.smoke_config)
    cfg = smoke.model
    figure: dict[str, Any] = {
        "figure": "paths", "device": _name(dev), "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported(),
        "peak_bf16_flops": peak_flops(dev)}
    problems = [] if figure["bf16"] else ["this GPU has no bf16"]
    compiler = next((found for c in (os.environ.get("CC", "cc"), "gcc", "clang") if (found := shutil.which(c))), None)
    figure["c_compiler"] = compiler
    if compiler is None:
        problems.append("no C compiler (cc, gcc, clang): torch.compile's Triton kernels need one")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        q = torch.randn(2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, device=dev, dtype=torch.bfloat16,
                        requires_grad=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        figure["flash_attention"] = True
    except RuntimeError as err:
        figure["flash_attention"] = False
        problems.append(f"flash attention: {str(err).splitlines()[0]}")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_config(cfg, smoke.tokenizer.vocab_size)).to(dev)
    x = torch.randint(0, smoke.tokenizer.vocab_size, (2, cfg.block_size), device=dev)
    autocast = autocast_for(dev, smoke.pretrain.precision)
    figure["attention"] = attention_ops(model, x, autocast)
    if not FUSED_ATTENTION & set(figure["attention"]):
        problems.append(f"the GPT's attention ran {figure['attention']}, no fused (flash or cuDNN) kernel")
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cuda")
    figure["fused_adamw"] = bool(optimizer.defaults.get("fused"))
    with autocast:
        _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    if not figure["fused_adamw"]:
        problems.append("AdamW is not the fused kernel")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        problems.append("the AdamW step left non-finite weights")
    return [figure | {"ok": not problems, "problems": problems}]


def smoke(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The gpu-smoke pipeline end to end, in <workdir>/smoke."""
    from flows.cli import _prefect_environment

    config = load_config(args.smoke_config, [f"workdir={args.workdir / 'smoke'}", f"pretrain.device={args.device}",
                                             f"finetune.device={args.device}"])
    _prefect_environment(config)  # as `lmpipe run` does, before prefect is imported
    from flows.pipeline import pipeline
    from flows.summary import format_summary

    started = time.perf_counter()
    summary = pipeline(config=config)
    seconds = time.perf_counter() - started
    print(format_summary(summary, seconds), flush=True)
    stages = [{"stage": s["stage"], "label": s["label"], "out_dir": s["out_dir"]} for s in summary["stages"]]
    (args.workdir / STAGES_FILE).write_text(json.dumps(stages, indent=1), encoding="utf-8")
    pre, tuned = _stage_result(_out_dir(stages, "pretrain")), _stage_result(_out_dir(stages, "finetune"))
    state = read_state(_out_dir(stages, "pretrain") / MODEL_DIR)
    dev = _device(args)
    peak = config.pretrain.peak_flops or peak_flops(dev)
    tok_s = pre["metrics"]["tokens_per_sec"]
    figure = {"figure": "smoke", "device": _name(dev), "seconds": round(seconds, 1),
              "pretrain_tokens_per_sec": round(tok_s), "pretrain_seconds": round(pre["metrics"]["seconds"], 1),
              "pretrain_mfu": mfu(pre["meta"]["flops_per_token"], tok_s, peak) if peak else None,
              "pretrain_final_val_loss": pre["metrics"]["final_val_loss"],
              "finetune_final_val_loss": tuned["metrics"]["final_val_loss"],
              "micro_batch": state["micro_batch"], "grad_accum_steps": state["grad_accum_steps"],
              "stage_seconds": {s["label"]: round(s["seconds"], 1) for s in summary["stages"]}}
    ok = math.isfinite(figure["pretrain_final_val_loss"]) and math.isfinite(figure["finetune_final_val_loss"])
    return [figure | {"ok": ok}]


def export(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The smoke's fine-tuned model in the transformers format: fp32 logits on CUDA vs lmpipe's and vs CPU."""
    from transformers import AutoModelForCausalLM

    from lmpipe.model.hf_export import export_hf

    stages = _stages(args.workdir)
    model_dir, tokenizer_dir = _out_dir(stages, "finetune") / MODEL_DIR, _out_dir(stages, "train_tokenizer")
    dest = export_hf(model_dir, tokenizer_dir, args.workdir / "export", overwrite=True)
    dev = _device(args)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for this comparison
    ours = load_model(model_dir, dev)
    T = ours.config.block_size
    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = load_tokenizer(tokenizer_dir / TOKENIZER_FILE).encode(text[:40_000]).ids[: 2 * T]
    x = torch.tensor(ids, dtype=torch.long).view(2, T)  # (2, T)
    with torch.no_grad():
        mine, _ = ours(x.to(dev), targets=x.to(dev))  # (2, T, V): with targets, logits at every position
        hf = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True).float().eval()
        on_cpu = hf(x).logits  # (2, T, V)
        on_cuda = hf.to(dev)(x.to(dev)).logits
    vs_lmpipe = (on_cuda - mine).abs().max().item()
    vs_cpu = (on_cuda.cpu() - on_cpu).abs().max().item()
    figure = {"figure": "export", "class": type(hf).__name__, "tokens": x.numel(),
              "max_abs_diff_vs_lmpipe_cuda": vs_lmpipe, "max_abs_diff_cuda_vs_cpu": vs_cpu,
              "logits_std": on_cpu.std().item(), "limits": [EXPORT_ATOL, DEVICE_ATOL]}
    return [figure | {"ok": vs_lmpipe <= EXPORT_ATOL and vs_cpu <= DEVICE_ATOL}]


def gpt2(args: argparse.Namespace) -> list[dict[str, Any]]:
    """GPT-2 124M in train(): tokens/s and MFU of one recipe, compiled or eager."""
    recipe = [o for o in args.recipe.split(",") if o]
    compiled = args.compile == "on"
    config = load_config(args.gpt2_config, [*recipe, f"pretrain.compile={str(compiled).lower()}",
                                            f"pretrain.device={args.device}", "pretrain.distributed.nproc_per_node=1"])
    model_cfg, preset, vocab_size = config.model, config.pretrain, config.tokenizer.vocab_size
    dev = _device(args)
    T = model_cfg.block_size
    sched = make_schedule(preset, args.warmup, args.steps)
    cfg = TrainConfig.model_validate(preset.model_dump() | {
        "max_steps": sched.max_steps, "log_interval": sched.log_interval,
        "checkpoint_interval": sched.max_steps, "eval_interval": sched.max_steps, "eval_batches": 1})
    tokens_per_step = cfg.sequences_per_step(T) * T
    text = corpus_tokens()
    need = sched.max_steps * tokens_per_step + 1
    train_src = ArraySource(np.tile(text, -(-need // len(text))) if len(text) < need else text)
    with torch.device("meta"):
        flops_per_token = GPT(GPTConfig.from_config(model_cfg, vocab_size)).flops_per_token()
    work = Path(tempfile.mkdtemp(prefix="gpt2-", dir=args.workdir))  # scratch, removed below
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        m = full_run(model_cfg, cfg, vocab_size, train_src, ArraySource(text), work, sched, dev)
        ckpt = latest_checkpoint(work / CHECKPOINTS_DIR)
        state = read_state(ckpt) if ckpt is not None else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 1.5 GB of checkpoint
    tok_s = tokens_per_step * sched.steps / m.seconds
    peak = preset.peak_flops or peak_flops(dev)
    figure = {"figure": "gpt2", "recipe": args.label,
              "compile": compiled, "device": _name(dev), "tokens_per_sec": round(tok_s),
              "mfu": mfu(flops_per_token, tok_s, peak) if peak else None, "flops_per_token": flops_per_token,
              "peak_bf16_flops": peak, "ms_per_step": round(1e3 * m.seconds / sched.steps, 1),
              "tokens_per_step": tokens_per_step, "micro_batch": state.get("micro_batch"),
              "grad_accum_steps": state.get("grad_accum_steps"), "startup_s": round(m.startup, 1),
              "window_loss": m.loss,
              "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
              "steps": f"{sched.warmup + 1}..{sched.warmup + sched.steps}"}
    return [figure | {"ok": math.isfinite(m.loss) and tok_s > 0}]


def ddp(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Where two GPUs exist: the smoke's pretraining for a few steps under torchrun, 2 processes, NCCL."""
    from lmpipe.training.launch import launch

    dev = _device(args)
    n = torch.cuda.device_count()
    if dev.type == "cuda" and n < 2:
        return [{"figure": "ddp", "ok": True, "skipped": f"{n} CUDA device: DDP needs 2"}]
    config = load_config(args.smoke_config)
    shards = _out_dir(_stages(args.workdir), "shard", f"shard/{config.data.pretrain.name}")
    manifest = read_manifest(shards)
    train_cfg = TrainConfig.model_validate(config.pretrain.model_dump() | {
        "max_steps": DDP_STEPS, "eval_interval": DDP_STEPS, "checkpoint_interval": DDP_STEPS, "log_interval": 5,
        "device": args.device, "distributed": {"nproc_per_node": 2, "strategy": "ddp", "backend": "auto"}})
    work = args.workdir / "ddp"
    spec = {"model": config.model.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
            "vocab_size": manifest["vocab_size"], "shards": str(shards),
            "tokenizer_fingerprint": manifest["tokenizer_fingerprint"], "work_dir": str(work)}
    started = time.perf_counter()
    result = launch(spec, work, 2, on_line=lambda line: print(line, flush=True),
                    env={"NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")})  # NCCL says why it fails
    peak = config.pretrain.peak_flops or peak_flops(dev)
    figure = {"figure": "ddp", "processes": 2, "device": _name(dev), "steps": result["steps"],
              "seconds": round(time.perf_counter() - started, 1),
              "tokens_per_sec": round(result["tokens_per_sec"]),
              "mfu": mfu(result["flops_per_token"], result["tokens_per_sec"], peak, 2) if peak else None,
              "final_val_loss": result["final_val_loss"]}
    return [figure | {"ok": result["steps"] == DDP_STEPS and math.isfinite(result["final_val_loss"] or math.nan)}]
