"""The pretraining data loader: every window once per epoch, an exact resume position, one slice per rank.

Order. The train split is cut into ``n = (num_tokens - 1) // block_size``
windows of ``block_size + 1`` tokens at stride ``block_size`` (a window's last
token is the target of its last position, and the first input of the next
window). Epoch ``e`` visits the windows in a permutation drawn from
``np.random.default_rng([seed, e])``, all moved by a small epoch-dependent
shift, so the ``slack`` tokens the cut leaves at the end are not left out of
every epoch. Unlike random offsets, an epoch sees each token once.

Position. Sequence ``k`` of the run (counted over all ranks, micro-steps and
epochs) is window ``k % n`` of epoch ``k // n``; optimizer step ``s`` takes
sequences ``s * G .. (s + 1) * G - 1`` where ``G`` is the global batch in
sequences. The data position is therefore a pure function of the step: a run
resumed at step ``k`` reads exactly what an uninterrupted one would, and a
checkpoint only needs the step (``position_state`` records the rest for
people reading it).

Ranks. Rank ``r`` of ``W`` takes micro-batch ``m * W + r`` of a step's
``A * W`` micro-batches, so ``W`` ranks with ``A`` accumulation steps see
exactly what one process with ``A * W`` accumulation steps sees.

Prefetch. ``BatchLoader`` builds the next micro-batches on a background thread
(the page faults of memory-mapped shards and numpy's copies of the windows
mostly run outside the GIL) while the current step runs on the accelerator.
On CUDA the batches are written into a ring of pinned host buffers, allocated
once, so ``next()`` can start an asynchronous copy that overlaps with compute.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict

import numpy as np
import torch

from lmpipe.data.shards import TokenSource
from lmpipe.model.gpt import IGNORE_INDEX

_POLL_S = 0.05  # how often a blocked thread looks at the stop flag
_CACHED_EPOCHS = 2  # the epoch being read and the one before (a step may straddle the boundary)


class WindowOrder:
    """The token stream cut into windows of block_size + 1 tokens at stride block_size, shuffled per epoch."""

    def __init__(self, num_tokens: int, block_size: int, seed: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        n = (num_tokens - 1) // block_size
        if n < 1:
            raise ValueError(
                f"block_size={block_size} needs at least {block_size + 1} tokens for one window, but the split has "
                f"num_tokens={num_tokens}: use a smaller block_size or more data"
            )
        self.num_tokens = num_tokens
        self.block_size = block_size
        self.seed = seed
        self.num_windows = n
        self.slack = (num_tokens - 1) - n * block_size  # tokens the cut leaves over, 0 <= slack < block_size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the loader's thread and the training loop may both ask

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Window start offsets of an epoch in visiting order, int64 (n,); read-only (it is cached)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        with self._lock:
            starts = self._cache.get(epoch)
            if starts is None:
                rng = np.random.default_rng([self.seed, epoch])
                shift = int(rng.integers(0, self.slack + 1))
                perm = rng.permutation(self.num_windows)
                starts = shift + perm.astype(np.int64) * self.block_size  # (n,)
                starts.flags.writeable = False
                self._cache[epoch] = starts
                while len(self._cache) > _CACHED_EPOCHS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(epoch)
            return starts

    def position(self, sequence: int) -> tuple[int, int]:
        """Global sequence number -> (epoch, index within the epoch)."""
        if sequence < 0:
            raise ValueError(f"sequence must be >= 0, got {sequence}")
        return divmod(sequence, self.num_windows)

    def starts(self, first: int, count: int) -> np.ndarray:
        """Start offsets (int64, (count,)) of global sequences first .. first + count - 1, across epochs."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        epoch, index = self.position(first)
        parts = []
        while count > 0:
            take = min(count, self.num_windows - index)
            parts.append(self.epoch_starts(epoch)[index : index + take])
            count -= take
            epoch, index = epoch + 1, 0
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def sequence_range(step: int, micro: int, *, micro_batch: int, accum_steps: int, rank: int, world_size: int) -> int:
    """First global sequence number of (optimizer step, micro-step) on a rank; the micro-batch is that and the
    next micro_batch - 1 sequences."""
    if not 0 <= micro < accum_steps:
        raise ValueError(f"micro must be in [0, {accum_steps}), got {micro}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_step = micro_batch * accum_steps * world_size
    return step * per_step + (micro * world_size + rank) * micro_batch


def position_state(order: WindowOrder, step: int, sequences_per_step: int) -> dict[str, int]:
    """The data position after `step` optimizer steps, for the checkpoint (the step alone determines it)."""
    seen = step * sequences_per_step
    epoch, index = order.position(seen)
    return {"epoch": epoch, "index": index, "sequences_seen": seen}


def data_position(order: WindowOrder, sequences_per_step: int, step: int) -> dict[str, int]:
    """A checkpoint's ``data`` record: the seed, the next step, the tokens seen and ``position_state``."""
    return ({"seed": order.seed, "next_step": step, "tokens_seen": step * sequences_per_step * order.block_size}
            | position_state(order, step, sequences_per_step))


class _Failure:
    """Carries the producer's exception through the queue to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchLoader:
    """One rank's micro-batches in training order, prepared ahead by a background thread."""

    def __init__(
        self, src: TokenSource, order: WindowOrder, block_size: int, *, micro_batch: int, accum_steps: int,
        device: torch.device, start_step: int = 0, rank: int = 0, world_size: int = 1,
        mask: TokenSource | None = None, prefetch: int = 4,
    ) -> None:
        if block_size != order.block_size:
            raise ValueError(f"block_size={block_size} but the window order was cut for {order.block_size}")
        if src.num_tokens != order.num_tokens:
            raise ValueError(
                f"the source has {src.num_tokens} tokens but the window order was cut for {order.num_tokens}"
            )
        if mask is not None and mask.num_tokens != src.num_tokens:
            raise ValueError(f"the mask has {mask.num_tokens} tokens, the source {src.num_tokens}")
        if micro_batch < 1 or accum_steps < 1 or prefetch < 1 or start_step < 0:
            raise ValueError(
                f"need micro_batch, accum_steps, prefetch >= 1 and start_step >= 0, got micro_batch={micro_batch}, "
                f"accum_steps={accum_steps}, prefetch={prefetch}, start_step={start_step}"
            )
        sequence_range(0, 0, micro_batch=1, accum_steps=1, rank=rank, world_size=world_size)  # validates rank
        self.src, self.mask, self.order = src, mask, order
        self.block_size, self.micro_batch, self.accum_steps = block_size, micro_batch, accum_steps
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.device = device
        self._cuda = device.type == "cuda"
        # A new thread starts on GPU 0: without this, its first CUDA call would create a context there in
        # every rank of a multi-GPU run.
        self._device_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self._cuda else None
        self._queue: queue.Queue[tuple[int, torch.Tensor, torch.Tensor] | _Failure] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # CUDA: pinned (x, y) buffer pairs, reused. One more than the queue holds for the batch being built and
        # one for the batch whose copy to the device may still be running. A buffer is free again once the
        # event recorded after its copy has completed.
        self._pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._free: queue.Queue[tuple[int, torch.cuda.Event | None]] = queue.Queue()
        if self._cuda:
            shape = (micro_batch, block_size)
            for i in range(prefetch + 2):
                self._pinned.append(
                    (torch.empty(shape, dtype=torch.int64, pin_memory=True),
                     torch.empty(shape, dtype=torch.int64, pin_memory=True))
                )
                self._free.put((i, None))
        self._thread = threading.Thread(target=self._produce, name="lmpipe-loader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer (background thread)

    def _produce(self) -> None:
        try:
            if self._cuda:
                torch.cuda.set_device(self._device_index)
            step = self.start_step
            while not self._stop.is_set():
                for micro in range(self.accum_steps):
                    item = self._build(step, micro)
                    if item is None or not self._put(item):
                        return  # stopped
                step += 1
        except BaseException as e:  # handed to the consumer, which re-raises it in next()
            self._put(_Failure(e))

    def _build(self, step: int, micro: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """The micro-batch (slot, x, y); slot is the pinned buffer index on CUDA, -1 on CPU. None when stopped."""
        first = sequence_range(step, micro, micro_batch=self.micro_batch, accum_steps=self.accum_steps,
                               rank=self.rank, world_size=self.world_size)
        starts = self.order.starts(first, self.micro_batch)
        length = self.block_size + 1
        windows = np.stack([self.src.window(int(s), length) for s in starts])  # (B, T+1)
        if self._cuda:
            slot = self._take_free()
            if slot is None:
                return None
            x, y = self._pinned[slot]
        else:
            slot = -1
            x = torch.empty((self.micro_batch, self.block_size), dtype=torch.int64)
            y = torch.empty_like(x)
        x_np, y_np = x.numpy(), y.numpy()  # (B, T) views of the tensors' memory
        np.copyto(x_np, windows[:, :-1])
        np.copyto(y_np, windows[:, 1:])
        if self.mask is not None:
            m = np.stack([self.mask.window(int(s), length) for s in starts])[:, 1:]  # (B, T), aligned with y
            y_np[m == 0] = IGNORE_INDEX
        return slot, x, y

    def _take_free(self) -> int | None:
        """A pinned buffer whose previous copy to the device has finished; None when stopped."""
        while not self._stop.is_set():
            try:
                slot, event = self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()
            return slot
        return None

    def _put(self, item: tuple[int, torch.Tensor, torch.Tensor] | _Failure) -> bool:
        """Blocks while the queue is full, but gives up (False) once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------ consumer (training loop)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch (x, y), int64 (micro_batch, block_size) on the device."""
        if self._error is not None:
            raise RuntimeError("the data loader thread failed earlier") from self._error
        if self._stop.is_set():
            raise RuntimeError("the data loader is closed")
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data loader thread stopped without a batch or an error") from None
        if isinstance(item, _Failure):
            self._error = item.error
            raise RuntimeError(f"the data loader thread failed: {item.error!r}") from item.error
        slot, x, y = item
        if not self._cuda:
            return x, y
        x_dev = x.to(self.device, non_blocking=True)
        y_dev = y.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the copies above run on this stream
        self._free.put((slot, event))
        return x_dev, y_dev

    def close(self) -> None:
        """Stop the thread and wait for it; the producer polls the stop flag, so this returns promptly."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        while True:  # drop prepared batches (and their references to the pinned buffers)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
