"""Where a model runs: the device 'auto' picks, and the autocast that goes with it."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: CPU runs stay fp32 and bitwise reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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
