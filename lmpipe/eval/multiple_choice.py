"""Multiple-choice scoring by log-likelihood: acc and acc_norm, as lm-evaluation-harness computes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmpipe.config.evaluation import BenchmarkConfig
from lmpipe.data.jsonl import BenchmarkFormatError
from lmpipe.data.tokenizer import encode_ordinary
from lmpipe.eval.benchmark_files import TARGET_DELIMITER, MCExample, benchmark_label, read_benchmark
from lmpipe.model.gpt import GPT, IGNORE_INDEX


@dataclass(frozen=True)
class MCPrediction:
    """Per-example outcome: summed log-likelihood of each choice and the two argmaxes."""

    label: int
    loglikelihoods: list[float]
    pred: int  # argmax of loglikelihoods
    pred_norm: int  # argmax of loglikelihoods / len(choice) in characters


@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    n: int
    predictions: list[MCPrediction]
    truncated: int  # (example, choice) pairs whose context lost tokens on the left to fit block_size


# -- scoring -------------------------------------------------------------------


def encode_continuations(
    tok: Tokenizer, context: str, continuations: Sequence[str], *, eot_id: int
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each continuation, split as the harness splits them.

    As the harness's ``_encode_pair``: whitespace at the end of the context is
    moved to the front of the continuation (a BPE tokenizer attaches a space to
    the word after it), then ``context + continuation`` is encoded whole and the
    continuation is the tail after the context's own encoding, so its tokens are
    those the model would see in running text. The harness takes that tail
    without checking; here it is taken only when the context's encoding really
    is a prefix of the whole. Otherwise a BPE merge crosses the boundary, the
    tail would not spell the continuation, and the continuation is encoded on
    its own instead (with byte-level BPE and the " " delimiter this does not
    happen in practice: a pre-token never spans "x" + " y").

    An empty context becomes ``[eot_id]`` ("a document begins"), as the harness
    puts its prefix token there. Literal special-token text in a benchmark
    is encoded as plain text.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    if not context:
        return [eot_id], encode_ordinary(tok, continuations)
    ctx_ids, *wholes = encode_ordinary(tok, [context, *(context + c for c in continuations)])
    conts = []
    for cont, ids in zip(continuations, wholes):
        if ids[: len(ctx_ids)] == ctx_ids:
            conts.append(ids[len(ctx_ids) :])
        else:
            conts.append(encode_ordinary(tok, [cont])[0])
    return ctx_ids, conts


@dataclass(frozen=True)
class _Request:
    example: int
    choice: int
    inp: list[int]  # the model's input: (context + continuation)[-(block_size + 1):][:-1]
    cont: list[int]  # the continuation's tokens, predicted by the last len(cont) input positions


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (np.argmax's tie rule, as the harness)."""
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def _requests(
    tokenizer: Tokenizer, examples: Sequence[MCExample], block_size: int, eot_id: int, lines: Sequence[int] | None,
    where: str,
) -> tuple[list[_Request], int]:
    """score_mc's requests and how many lost context tokens; ValueError for a continuation it cannot score.

    Shared by score_mc and check_benchmarks_fit, so the check before training
    rejects exactly what scoring would: a context is left-truncated to fit, but a
    continuation (" " + choice) must fit ``block_size`` on its own. ``lines`` (the
    examples' 1-based lines in their file) and ``where`` (the benchmark and its
    file) only add to the message.
    """
    requests: list[_Request] = []
    truncated = 0
    for i, ex in enumerate(examples):
        ctx_ids, conts = encode_continuations(
            tokenizer, ex.context, [TARGET_DELIMITER + c for c in ex.choices], eot_id=eot_id
        )
        for j, cont in enumerate(conts):
            if not cont or len(cont) > block_size:
                at = f"line {lines[i]} (example {i})" if lines is not None else f"example {i}"
                raise ValueError(
                    f"{where + ': ' if where else ''}{at} choice {j} ({ex.choices[j][:60]!r}): the continuation is "
                    f"{len(cont)} tokens; scoring needs 1..{block_size} (model block_size) so that context precedes it"
                )
            seq = ctx_ids + cont
            truncated += len(seq) > block_size + 1
            requests.append(_Request(i, j, seq[-(block_size + 1) :][:-1], cont))
    return requests, truncated


def check_benchmarks_fit(
    benchmarks: Sequence[BenchmarkConfig], files: Mapping[str, Path], tokenizer: Tokenizer, block_size: int
) -> None:
    """Fail now, before any training, on a benchmark example that score_mc could not score with this block_size.

    ``files`` is :func:`resolve_benchmarks`' result (a benchmark missing from it is
    read from its ``path``). Each benchmark is read as evaluation reads it (its
    limit, skip_bad) and encoded by the same code as score_mc. A long context is
    no error (scoring keeps its rightmost tokens, as lm-evaluation-harness does);
    a choice whose continuation alone exceeds ``block_size`` tokens is: the
    ValueError names ``eval.benchmarks.<i>``, the benchmark, its file, the line,
    the token count and block_size.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for i, bench in enumerate(benchmarks):
        label = benchmark_label(i, bench)
        source = files.get(bench.name, bench.path)
        if source is None:
            raise ValueError(f"{label}: no file to check: it has no path and its Hub download was not resolved "
                             "(lmpipe.eval.benchmark_files.resolve_benchmarks)")
        try:
            examples, lines, _ = read_benchmark(Path(source), bench.kind, limit=bench.limit, skip_bad=bench.skip_bad)
        except BenchmarkFormatError as err:
            raise BenchmarkFormatError(err.path, err.line, err.field, err.problem, where=label) from None
        # eot_id stands in for an empty context only; the continuations checked never contain it.
        _requests(tokenizer, examples, block_size, 0, lines, benchmark_label(i, bench, source))


def score_mc(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[MCExample],
    *,
    device: str | torch.device,
    batch_size: int = 16,
    eot_id: int,
    where: str = "",
    lines: Sequence[int] | None = None,
) -> MCResult:
    """acc and acc_norm of a GPT (``lmpipe.model.gpt.GPT`` interface) on multiple-choice examples.

    Every (example, choice) pair is one request: the continuation " " + choice
    tokenized by :func:`encode_continuations`, its log-likelihood the sum of
    log_softmax(logits) of its tokens. A context too long for the model keeps
    its rightmost tokens: the input is the last ``block_size + 1`` tokens of
    context + continuation without the final one (the harness's left
    truncation); a continuation longer than ``block_size`` tokens cannot be
    scored and raises ValueError naming the example (:func:`check_benchmarks_fit`
    finds such examples before training). ``where`` (e.g. "eval.benchmarks.0 (hs)
    file 'hs.jsonl'") prefixes every error, so it names the benchmark and its file; ``lines``
    (:func:`read_benchmark`'s) name each example's line in it.

    Requests are sorted longest first and batched, padded on the right with
    ``eot_id``; causal attention keeps padding from affecting earlier positions,
    and only the continuation positions are gathered, in float32. acc_norm
    divides by the choice's length in characters, as the harness does (see the
    module docstring). The model is left in the train/eval mode it came in.
    """
    prefix = f"{where}: " if where else ""
    if batch_size < 1:
        raise ValueError(f"{prefix}batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError(f"{prefix}no examples to score")
    requests, truncated = _requests(tokenizer, examples, model.config.block_size, eot_id, lines, where)

    was_training = model.training
    model.eval()
    lls = [[0.0] * len(ex.choices) for ex in examples]
    # Longest first: batches of similar lengths waste little compute on padding.
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].inp))
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                batch = [requests[r] for r in order[b : b + batch_size]]
                for req, s in zip(batch, _continuation_log_likelihoods(model, batch, eot_id, device), strict=True):
                    lls[req.example][req.choice] = s
    finally:
        model.train(was_training)

    predictions = []
    for ex, ll in zip(examples, lls, strict=True):
        norm = [v / len(c) for v, c in zip(ll, ex.choices, strict=True)]
        predictions.append(MCPrediction(ex.label, ll, _argmax(ll), _argmax(norm)))
    n = len(predictions)
    return MCResult(
        acc=sum(p.pred == p.label for p in predictions) / n,
        acc_norm=sum(p.pred_norm == p.label for p in predictions) / n,
        n=n,
        predictions=predictions,
        truncated=truncated,
    )


def _continuation_log_likelihoods(model: GPT, batch: list[_Request], eot_id: int,
                                  device: str | torch.device) -> list[float]:
    """The summed log-probability of each request's continuation tokens, in one forward pass."""
    T = len(batch[0].inp)
    x = np.full((len(batch), T), eot_id, dtype=np.int64)  # (B, T), right-padded
    want = np.zeros((len(batch), T), dtype=bool)  # positions that predict a continuation token
    target = np.zeros((len(batch), T), dtype=np.int64)  # the token each such position predicts
    for row, req in enumerate(batch):
        n = len(req.inp)
        x[row, :n] = req.inp
        # Position t predicts token t + 1, so the last len(cont) positions predict the continuation.
        want[row, n - len(req.cont) : n] = True
        target[row, n - len(req.cont) : n] = req.cont
    xt = torch.from_numpy(x).to(device)
    # Targets make the model return logits at every position; all ignored, the loss is unused.
    logits, _ = model(xt, torch.full_like(xt, IGNORE_INDEX))  # (B, T, V)
    want_t = torch.from_numpy(want).to(device)
    picked = logits[want_t].float()  # (M, V), M = continuation tokens in the batch, row-major
    logp = F.log_softmax(picked, dim=-1)  # (M, V)
    tgt = torch.from_numpy(target[want]).to(device)  # (M,)
    tok_lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)  # (M,)
    rows = want_t.nonzero()[:, 0]  # (M,) batch row of each scored token
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
    sums.index_add_(0, rows, tok_lp.double())  # (B,)
    return sums.tolist()
