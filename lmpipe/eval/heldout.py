"""Evaluation: held-out loss, perplexity and bits per byte, plus seeded text samples.

Every model is scored on the ``val`` split of every corpus with the same fixed
token budget, read from the start of the split in consecutive windows, so two
models (or two runs) are compared on exactly the same tokens.

Bits per byte divides the summed loss by the UTF-8 bytes those tokens stand
for, which makes it comparable across tokenizers: a tokenizer with longer
tokens has a higher loss per token but not per byte.

After SFT (``finetune.mode=sft``) every model is also scored on the fine-tuning
run's held-out examples (:func:`score_sft`), under the name ``SFT_HELD_OUT``
(``sft/val``) where a corpus name would be: only the assistant targets count, as
in training, so the figures measure the task the model was fine-tuned for.

    >>> r = evaluate_loss(model, TokenSplit(shard_dir, "val"), token_byte_lengths(tok),
    ...                   eval_tokens=4096, batch_size=8, device="cpu")
    >>> sorted(r)
    ['bits_per_byte', 'bytes', 'loss', 'perplexity', 'tokens']
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmpipe.data.sft import SFTData
from lmpipe.data.shards import ArraySource, TokenSource
from lmpipe.data.tokenizer import encode_ordinary, token_byte_lengths
from lmpipe.model.gpt import GPT, IGNORE_INDEX

METRICS = ("loss", "perplexity", "bits_per_byte")
MC_METRICS = ("acc", "acc_norm")
# The delta row of the report compares these two model names when both are evaluated.
BASE, FINETUNED = "base", "finetuned"
# How much was scored, logged beside the figures (finetuned.<corpus>.tokens, finetuned.<benchmark>.n) so that a
# later report compares with a registered model's figures only where they were scored on as much.
SCORED = {"held_out": "tokens", "multiple_choice": "n"}


def evaluate_loss(
    model: GPT,
    split: TokenSource,
    token_bytes: np.ndarray,
    *,
    eval_tokens: int,
    batch_size: int,
    device: str | torch.device,
    mask: TokenSource | None = None,
    doc_sep: int | None = None,
) -> dict[str, float]:
    """Score the first ``min(eval_tokens, split.num_tokens - 1)`` target tokens of a split.

    Window k holds tokens ``[k*T, k*T + T]`` (T = block_size): its first T tokens
    are the inputs, its last T the targets, so the next window starts where this
    one's targets ended and every token after the first is scored exactly once.
    The last window is cut short to stay inside the budget; in a batch it is
    padded with ignored targets (IGNORE_INDEX), which causal attention keeps from
    affecting the real positions.

    ``mask`` (one entry per token of the split, as SFT's loss masks): only the
    targets whose entry is not 0 are scored, as training counts them; ``tokens``
    and ``bytes`` are then those targets' (the budget still counts positions).
    ``doc_sep``: given to the model, for windows that pack documents ending with
    that token (each attends only within itself, ``GPT.forward``).
    """
    _check_scoring(split, mask, eval_tokens, batch_size)
    block = model.config.block_size
    # The first token is only ever context: nothing predicts it.
    n_targets = min(eval_tokens, split.num_tokens - 1)
    starts = list(range(0, n_targets, block))
    extra = {} if doc_sep is None else {"doc_sep": doc_sep}

    was_training = model.training
    model.eval()
    sum_nats = torch.zeros((), dtype=torch.float64, device=device)  # stays on device: no sync per batch
    sum_bytes = n_scored = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(starts), batch_size):
                x, y = _scoring_batch(split, mask, starts[b : b + batch_size], block, n_targets, len(token_bytes))
                scored = y[y != IGNORE_INDEX]
                n_scored += len(scored)
                sum_bytes += int(token_bytes[scored].sum())
                yt = torch.from_numpy(y).to(device)
                logits, _ = model(torch.from_numpy(x).to(device), yt, **extra)  # (B, T, V): all positions
                # Per-token losses in float32, summed in float64 so a long budget adds up exactly.
                nats = F.cross_entropy(
                    logits.float().flatten(0, 1), yt.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
                )  # (B*T,), 0 where ignored
                sum_nats += nats.double().sum()
    finally:
        model.train(was_training)
    return _held_out_figures(float(sum_nats.item()), n_scored, sum_bytes, n_targets)


def _check_scoring(split: TokenSource, mask: TokenSource | None, eval_tokens: int, batch_size: int) -> None:
    if eval_tokens < 1:
        raise ValueError(f"eval.eval_tokens must be >= 1, got {eval_tokens}")
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if split.num_tokens < 2:
        raise ValueError(f"the split has {split.num_tokens} token(s); scoring needs at least 2")
    if mask is not None and mask.num_tokens != split.num_tokens:
        raise ValueError(f"the loss mask has {mask.num_tokens} entries for the split's {split.num_tokens} tokens")


def _scoring_batch(split: TokenSource, mask: TokenSource | None, starts: list[int], block: int, n_targets: int,
                   vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (B, T) of the windows at ``starts``, the last cut to the budget and padded with
    IGNORE_INDEX targets; masked targets are IGNORE_INDEX too."""
    lengths = [min(block, n_targets - s) for s in starts]
    x = np.zeros((len(starts), max(lengths)), dtype=np.int64)
    y = np.full((len(starts), max(lengths)), IGNORE_INDEX, dtype=np.int64)
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        w = split.window(s, n + 1)
        if w.size and int(w.max()) >= vocab:
            raise ValueError(
                f"token id {int(w.max())} at position >= {s} is outside the tokenizer's "
                f"vocabulary of {vocab}: the shards and tokenizer do not match"
            )
        targets = w[1:]
        if mask is not None:
            targets = np.where(mask.window(s + 1, n) != 0, targets, IGNORE_INDEX)
        x[i, :n], y[i, :n] = w[:-1], targets
    return x, y


def _held_out_figures(total_nats: float, n_scored: int, n_bytes: int, n_targets: int) -> dict[str, float]:
    if n_scored == 0:
        raise ValueError(f"the loss mask leaves none of the {n_targets} targets to score")
    if n_bytes == 0:
        raise ValueError(f"the {n_scored} scored tokens stand for 0 bytes (only special tokens?)")
    loss = total_nats / n_scored
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / n_bytes,
        "tokens": n_scored,
        "bytes": n_bytes,
    }


def score_sft(
    model: GPT,
    data: SFTData,
    token_bytes: np.ndarray,
    *,
    eot_id: int,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte on the val examples of SFT data, as fine-tuning counts them.

    ``data`` is ``lmpipe.data.sft.build_sft_data``'s (the model's ``block_size``), as the
    fine-tuning stage hands it over (``lmpipe.data.sft.read_held_out``): its
    val stream is scored whole, in the windows fine-tuning validates on (one
    example, or one bin of packed examples, per ``block_size`` window; packed
    windows with ``eot_id`` as ``doc_sep``, so each example attends only to
    itself). Only the targets of ``val_mask`` count: each assistant reply, its
    ``<|end|>`` and the closing end-of-text (the last two stand for 0 bytes).
    ``tokens`` is the number of scored targets and ``examples`` of examples, so
    both layouts give the same figures for the same examples.
    """
    block = model.config.block_size
    n = len(data.val_tokens)
    if (n - 1) % block:
        raise ValueError(f"the SFT val stream has {n} tokens, not whole windows of the model's block_size={block} "
                         "(plus one): it was laid out for another block_size")
    r = evaluate_loss(model, ArraySource(data.val_tokens), token_bytes, eval_tokens=n - 1, batch_size=batch_size,
                      device=device, mask=ArraySource(data.val_mask),
                      doc_sep=eot_id if data.layout == "packed" else None)
    return {**r, "examples": data.val_examples}


def score_text(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    *,
    start_id: int,
    eval_tokens: int,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte on a text, as :func:`evaluate_loss` scores a val split.

    The text is one document encoded as the shards encode one (literal special-token
    text stays text), after ``start_id`` (the end-of-text token: "a document
    begins"), so every one of its tokens is scored, up to ``eval_tokens``; with a
    budget that covers the text, ``bytes`` is the text's UTF-8 length.
    """
    [ids] = encode_ordinary(tokenizer, [text])
    if not ids:
        raise ValueError("the text encodes to no tokens: nothing to score")
    source = ArraySource(np.array([start_id, *ids], dtype=np.int64))
    return evaluate_loss(model, source, token_byte_lengths(tokenizer), eval_tokens=eval_tokens,
                         batch_size=batch_size, device=device)
