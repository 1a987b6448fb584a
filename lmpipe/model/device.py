"""Where a model runs: the device 'auto' picks, and the autocast that goes with it."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str = "auto", field: str = "precision"
                 ) -> contextlib.AbstractContextManager:
    """The autocast a run on ``device`` computes under (``precision`` as ``pretrain.precision``).

    'auto': bf16 on CUDA only, so CPU runs stay fp32 and bitwise reproducible (the
    golden curves); 'bf16': on CUDA and CPU; 'fp32': none. Weights, gradients and
    optimizer state stay fp32 either way. ``field`` names the setting in errors.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{field}={precision!r}: expected auto, fp32 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{field}={precision!r}: bf16 autocast runs on cuda and cpu, not {device.type}; "
                         f"use fp32 or auto")
    if device.type == "cpu" and cpu_bf16_support() == "none":
        log.warning("%s=bf16 on a CPU without bf16 kernels (no AVX-512, AVX512-BF16 or AMX): emulated, expect it "
                    "slower than fp32", field)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_bf16_support() -> str:
    """How this CPU multiplies bf16 matrices, fastest first.

    'amx': AMX tiles (Sapphire Rapids and later); 'avx512_bf16': native bf16 dot
    products (Cooper Lake, Zen 4); 'onednn': oneDNN's bf16 kernels on AVX-512 without
    bf16 instructions (they convert to fp32 in registers; half the bytes moved), or
    Arm's bf16; 'none': emulated, slower than fp32. bf16 autocast pays on the first
    three (measured on 'onednn': ``python -m bench.precision``), never on 'none'.
    """
    if _cpu_probe("_is_amx_tile_supported"):
        return "amx"
    if _cpu_probe("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "onednn"
    return "none"


def _cpu_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private in torch.cpu; absent from older builds
    return bool(probe()) if probe is not None else False


def check_device(device: str, option: str = "--device") -> str:
    """``device`` if this machine has it; ValueError in one line otherwise (no CUDA, no such GPU, a typo)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a device: expected cpu, cuda, cuda:<index> or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use {option} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {device!r}: MPS is not available on this machine; use {option} cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{option} {device!r}: expected cpu, cuda, cuda:<index> or mps")
    return device
