"""The device a run trains on: picking it, autocast, peak FLOP/s, and the largest micro-batch that fits."""

from __future__ import annotations

import contextlib

import torch

from lmpipe.model.gpt import GPT, GPTConfig

# Dense bf16 peak FLOP/s (no sparsity) by device-name substring, for MFU; NVIDIA's data sheets.
# First match wins: the PCIe and NVL cards before the SXM ones ("NVIDIA H100 80GB HBM3"); GH200 is an H200.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "A100": 312e12}


# ---------------------------------------------------------------- pieces of the loop


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (as torch.cuda.get_device_name says it); None: unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(flops_per_token: int, tokens_per_sec: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs at this speed over the peak of
    ``devices`` GPUs (``GPT.flops_per_token``: 6N + 12*L*H*Q*T, PaLM's and nanoGPT's count)."""
    return flops_per_token * tokens_per_sec / (peak * devices)


def activation_bytes(config: GPTConfig, micro_batch: int, packed: bool = False) -> int:
    """Estimated fp32 training memory of one micro-batch beyond the weights and optimizer.

    Per layer s*b*h*(34 + 5*a*s/h) values (Korthikanti et al. 2022, "Reducing activation
    recomputation", counted in 4-byte floats here), plus the logits, their fp32 copy
    and gradient (3 * b*s*V). Used to pick 'auto' micro-batches where an out-of-memory
    error cannot be caught (CPU).

    ``packed``: the run passes ``doc_sep`` (packed SFT), so attention gets the
    block-diagonal mask of ``model.packed_attention``, a (b, 1, s, s) bool tensor alive
    for the whole forward (b*s*s bytes). Scaled dot-product attention turns it into a
    float mask of the same shape in every layer, and the fused (masked, non-flash) kernel
    saves that copy for the backward: L*b*s*s more floats, all alive at the peak (what
    autograd saves, measured without dropout). The per-head s*s scores of unfused
    attention (the 5*a*s/h term) are counted for both layouts already.
    """
    s, b, h, a, L, V = config.block_size, micro_batch, config.n_embd, config.n_head, config.n_layer, config.vocab_size
    mask = b * s * s * (4 * L + 1) if packed else 0
    return 4 * (L * s * b * h * (34 + 5 * a * s // h) + 3 * b * s * V) + mask


# A micro-batch must leave this share of the GPU free after a trial step: DDP's gradient buckets,
# the optimizer state and compiled kernels' workspaces come on top of what the trial uses.
CUDA_HEADROOM = 0.15


def _fits_on_cuda(model: GPT, micro_batch: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager, doc_sep: int | None = None) -> bool:
    """One forward and backward of a micro-batch of random tokens: does it fit, with headroom?

    The trial allocates no optimizer state and no DDP buckets: 12 bytes per parameter
    (AdamW's two fp32 moments, one gradient bucket) are added to its peak. ``doc_sep``
    as in training: a packed run's trial builds the block-diagonal mask and takes the
    masked attention kernel (no flash attention), so it measures what training will use.
    """
    T = model.config.block_size
    x = torch.randint(0, model.config.vocab_size, (micro_batch, T), device=device)
    loss: torch.Tensor | None = None
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with autocast:
            _, loss = model(x, x, doc_sep=doc_sep)
        loss.backward()
        torch.cuda.synchronize(device)
        total = torch.cuda.get_device_properties(device).total_memory
        need = torch.cuda.max_memory_allocated(device) + 12 * model.num_params(non_embedding=False)
        return need <= (1 - CUDA_HEADROOM) * total
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as err:  # cuBLAS / cuDNN workspaces report running out differently
        if "out of memory" in str(err) or "ALLOC_FAILED" in str(err):
            return False
        raise
    finally:
        loss = None  # drop the graph before emptying the cache
        model.zero_grad(set_to_none=True)
        del x
        torch.cuda.empty_cache()


def find_micro_batch(model: GPT, per_rank: int, device: torch.device,
                     autocast: contextlib.AbstractContextManager, available_bytes: int | None = None,
                     doc_sep: int | None = None) -> int:
    """The largest divisor of per_rank (sequences per step per process) that fits the device.

    CUDA: tried for real, largest first, catching out-of-memory errors (before compile,
    whose kernels need no more memory than eager ones). Elsewhere: the largest whose
    ``activation_bytes`` fit in half the available memory (``available_bytes``, default
    what psutil reports) after 16 bytes per parameter (weights, gradients, 2 moments).
    ``doc_sep``: the run packs documents (``TrainData.doc_sep``), whose attention mask
    grows with b*s*s; both the trial and the estimate include it.
    """
    divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
    if device.type == "cuda":
        return next((d for d in divisors if _fits_on_cuda(model, d, device, autocast, doc_sep)), 1)
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    budget = available_bytes // 2 - 16 * model.num_params(non_embedding=False)
    packed = doc_sep is not None
    return next((d for d in divisors if activation_bytes(model.config, d, packed) <= budget), 1)
