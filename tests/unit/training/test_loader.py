"""The pretraining loader: epoch order, exact resume position, rank slicing, prefetch thread behaviour.

Tokens are np.arange(N), so a window's content says where it starts; sizes are tiny
(a few dozen windows) so steps cross epoch boundaries.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lmpipe.data.shards import ArraySource
from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.training.loader import BatchLoader, WindowOrder, position_state, sequence_range

N, T = 200, 8  # n = 199 // 8 = 24 windows, slack = 199 - 192 = 7
CPU = torch.device("cpu")


def expected_batch(
    tokens: np.ndarray, starts: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    w = tokens[starts[:, None] + np.arange(T + 1)]  # (B, T+1)
    x, y = w[:, :-1], w[:, 1:].copy()
    if mask is not None:
        y[mask[starts[:, None] + np.arange(1, T + 1)] == 0] = IGNORE_INDEX
    return x, y


def take(loader: BatchLoader, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tuple(t.numpy() for t in loader.next()) for _ in range(count)]


def test_each_epoch_visits_every_window_once_in_its_own_order() -> None:
    order = WindowOrder(N, T, seed=3)
    assert (order.num_windows, order.slack) == (24, 7)
    shifts = set()
    for epoch in range(20):
        starts = order.epoch_starts(epoch)
        assert starts.dtype == np.int64 and starts.shape == (24,)
        shift = int(starts.min())  # the permutation contains window 0
        assert 0 <= shift <= order.slack
        shifts.add(shift)
        assert sorted(((starts - shift) // T).tolist()) == list(range(24))  # stride block_size, each window once
        assert np.all((starts - shift) % T == 0)
        assert np.all(starts + T + 1 <= N)
    assert len(shifts) > 1  # windows move between epochs: the slack tokens are not always left out
    assert np.array_equal(order.epoch_starts(0), WindowOrder(N, T, seed=3).epoch_starts(0))
    assert not np.array_equal(order.epoch_starts(0), order.epoch_starts(1))
    assert not np.array_equal(order.epoch_starts(0), WindowOrder(N, T, seed=4).epoch_starts(0))


def test_starts_cross_the_epoch_boundary() -> None:
    order = WindowOrder(N, T, seed=0)
    assert order.position(0) == (0, 0)
    assert order.position(23) == (0, 23)
    assert order.position(30) == (1, 6)
    got = order.starts(20, 10)
    assert np.array_equal(got, np.concatenate([order.epoch_starts(0)[20:], order.epoch_starts(1)[:6]]))
    assert np.array_equal(order.starts(5, 3), order.epoch_starts(0)[5:8])
    three = [order.epoch_starts(2), order.epoch_starts(3), order.epoch_starts(4)[:2]]  # wider than one epoch
    assert np.array_equal(order.starts(48, 50), np.concatenate(three))
    assert order.starts(7, 0).shape == (0,)


def test_too_short_source_names_block_size() -> None:
    with pytest.raises(ValueError, match=r"block_size=8 .*num_tokens=8"):
        WindowOrder(8, 8, seed=0)
    assert WindowOrder(9, 8, seed=0).num_windows == 1


def test_ranks_and_micro_steps_partition_a_step_like_one_process() -> None:
    B, A, W = 3, 2, 4
    for step in (0, 5):
        single = [sequence_range(step, m, micro_batch=B, accum_steps=A * W, rank=0, world_size=1) for m in range(A * W)]
        assert single == [step * B * A * W + i * B for i in range(A * W)]
        for m in range(A):
            for r in range(W):
                got = sequence_range(step, m, micro_batch=B, accum_steps=A, rank=r, world_size=W)
                assert got == single[m * W + r]
        ranks = {sequence_range(step, m, micro_batch=B, accum_steps=A, rank=r, world_size=W) + i
                 for m in range(A) for r in range(W) for i in range(B)}
        assert ranks == set(range(step * B * A * W, (step + 1) * B * A * W))
    with pytest.raises(ValueError, match="rank"):
        sequence_range(0, 0, micro_batch=1, accum_steps=1, rank=2, world_size=2)


def test_position_state_across_an_epoch_boundary() -> None:
    order = WindowOrder(N, T, seed=0)  # 24 windows per epoch
    assert position_state(order, 0, 5) == {"epoch": 0, "index": 0, "sequences_seen": 0}
    assert position_state(order, 4, 5) == {"epoch": 0, "index": 20, "sequences_seen": 20}
    assert position_state(order, 5, 5) == {"epoch": 1, "index": 1, "sequences_seen": 25}
    assert position_state(order, 24, 5) == {"epoch": 5, "index": 0, "sequences_seen": 120}


def test_batches_are_the_windows_in_order_and_resume_exactly() -> None:
    tokens = np.arange(N, dtype=np.int64)
    order = WindowOrder(N, T, seed=1)
    B, A, steps = 2, 3, 10  # 6 sequences per step: 60 sequences, 2.5 epochs
    with BatchLoader(ArraySource(tokens), order, T, micro_batch=B, accum_steps=A, device=CPU, prefetch=2) as loader:
        stream = take(loader, steps * A)
    for i, (x, y) in enumerate(stream):
        step, micro = divmod(i, A)
        ex, ey = expected_batch(tokens, order.starts(step * B * A + micro * B, B))
        assert x.dtype == np.int64 and x.shape == (B, T)
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    with BatchLoader(ArraySource(tokens), order, T, micro_batch=B, accum_steps=A, device=CPU, start_step=4) as loader:
        resumed = take(loader, (steps - 4) * A)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(resumed, stream[4 * A :], strict=False))


def test_mask_sets_ignored_targets() -> None:
    tokens = np.arange(N, dtype=np.int64)
    mask = np.random.default_rng(0).integers(0, 2, size=N)
    order = WindowOrder(N, T, seed=2)
    with BatchLoader(ArraySource(tokens), order, T, micro_batch=4, accum_steps=1, device=CPU,
                     mask=ArraySource(mask)) as loader:
        stream = take(loader, 8)
    for step, (x, y) in enumerate(stream):
        ex, ey = expected_batch(tokens, order.starts(step * 4, 4), mask)
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    assert sum(int((y == IGNORE_INDEX).sum()) for _, y in stream) > 0


def test_ranks_together_see_what_one_process_sees() -> None:
    tokens = np.arange(N, dtype=np.int64)
    order = WindowOrder(N, T, seed=5)
    B, A, W, steps = 2, 2, 3, 4
    with BatchLoader(ArraySource(tokens), order, T, micro_batch=B, accum_steps=A * W, device=CPU) as loader:
        single = take(loader, steps * A * W)
    per_rank = []
    for r in range(W):
        with BatchLoader(ArraySource(tokens), order, T, micro_batch=B, accum_steps=A, device=CPU, rank=r,
                         world_size=W) as loader:
            per_rank.append(take(loader, steps * A))
    for step in range(steps):
        for m in range(A):
            for r in range(W):
                x, y = per_rank[r][step * A + m]
                sx, sy = single[step * A * W + m * W + r]
                assert np.array_equal(x, sx) and np.array_equal(y, sy)


class FailingSource(ArraySource):
    """Raises on the n-th window read: a bad shard in the middle of training."""

    def __init__(self, tokens: np.ndarray, fail_at: int) -> None:
        super().__init__(tokens)
        self.calls, self.fail_at = 0, fail_at

    def window(self, start: int, length: int) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(f"bad read at {start}")
        return super().window(start, length)


def test_a_producer_error_surfaces_in_next() -> None:
    order = WindowOrder(N, T, seed=0)
    src = FailingSource(np.arange(N), fail_at=3)  # batch 0 reads windows 1-2, batch 1 fails on its first
    with BatchLoader(src, order, T, micro_batch=2, accum_steps=1, device=CPU) as loader:
        x, _ = loader.next()
        assert np.array_equal(x.numpy(), expected_batch(np.arange(N), order.starts(0, 2))[0])
        for _ in range(2):  # and again on a retry, instead of waiting for a batch that never comes
            with pytest.raises(RuntimeError, match="loader thread failed") as info:
                loader.next()
            cause = info.value.__cause__
            assert isinstance(cause, OSError) and str(cause) == f"bad read at {order.starts(2, 1)[0]}"


class CountingSource(ArraySource):
    def __init__(self, tokens: np.ndarray, signal_after: int) -> None:
        super().__init__(tokens)
        self.calls, self.signal_after, self.reached = 0, signal_after, threading.Event()

    def window(self, start: int, length: int) -> np.ndarray:
        self.calls += 1
        if self.calls >= self.signal_after:
            self.reached.set()
        return super().window(start, length)


def test_close_returns_promptly_with_a_full_queue() -> None:
    prefetch, B = 2, 2
    src = CountingSource(np.arange(N), signal_after=(prefetch + 1) * B)  # queue full, one more batch in hand
    before = set(threading.enumerate())
    loader = BatchLoader(src, WindowOrder(N, T, seed=0), T, micro_batch=B, accum_steps=1, device=CPU, prefetch=prefetch)
    (thread,) = set(threading.enumerate()) - before
    assert thread.name == "lmpipe-loader"
    assert thread.daemon
    assert src.reached.wait(2.0)
    time.sleep(0.1)  # let it block on put
    assert thread.is_alive() and src.calls == (prefetch + 1) * B  # bounded: it does not run ahead
    t0 = time.monotonic()
    loader.close()
    assert time.monotonic() - t0 < 2.0
    assert not thread.is_alive()
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loader.next()


def test_loader_rejects_a_mismatched_order() -> None:
    with pytest.raises(ValueError, match="block_size=4"):
        BatchLoader(ArraySource(np.arange(N)), WindowOrder(N, T, seed=0), 4, micro_batch=1, accum_steps=1, device=CPU)
