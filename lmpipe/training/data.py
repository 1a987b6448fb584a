"""What a language-model run trains on: the train and val token streams, their loss masks, packing, validation
windows."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lmpipe.data.shards import TokenSource
from lmpipe.training.validation import check_split_lengths, eval_offsets


class CutExampleMask:
    """Loss mask of packed examples: a window that starts inside an example does not train on its rest.

    A guard for streams whose windows can cut examples: SFT's packed layout puts
    whole examples in every window (``lmpipe.data.sft.pack_examples``), where it masks nothing.

    With a block-diagonal mask (``doc_sep``) the rest of an example cut by the
    window's start would be seen without its beginning (an SFT reply without its
    prompt) at positions from 0; its targets are masked here, through the first
    ``sep`` of the window. A window starting at the stream's start or right after a
    ``sep`` is whole. Wraps the given mask (None: every target counts otherwise).
    """

    def __init__(self, tokens: TokenSource, mask: TokenSource | None, sep: int) -> None:
        self.tokens, self.mask, self.sep = tokens, mask, sep
        self.num_tokens = tokens.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        m = (self.mask.window(start, length) if self.mask is not None
             else np.ones(length, dtype=np.int64)).copy()
        if start > 0 and self.tokens.window(start - 1, 1)[0] != self.sep:
            ends = np.flatnonzero(self.tokens.window(start, length) == self.sep)
            m[: ends[0] + 1 if len(ends) else length] = 0
        return m


@dataclass(frozen=True)
class TrainData:
    """The token streams of a run and how to read them.

    ``train_mask`` / ``val_mask``: loss masks parallel to the streams, targets whose
    mask is 0 do not count (SFT prompts). ``aligned_val``: validation windows start
    at multiples of block_size (SFT: one example, or one bin of packed examples,
    each). ``doc_sep``: the token that ends every packed example (SFT's packed
    layout, the end-of-text id); training and validation windows then attend only
    within each example, with positions restarting at its start (``GPT.forward``).
    SFT's packed windows hold whole examples (``lmpipe.data.sft.pack_examples``);
    for a stream laid out otherwise, the loss masks skip the remainder of an example
    a window starts inside (``CutExampleMask``, which masks nothing in whole-example windows).
    """

    train: TokenSource
    val: TokenSource
    train_mask: TokenSource | None = None
    val_mask: TokenSource | None = None
    doc_sep: int | None = None
    aligned_val: bool = False

    def checked(self, block_size: int) -> TrainData:
        """Fail before training on splits too short or masks of another length; wrap the masks for packing."""
        check_split_lengths(block_size, self.train, self.val)
        for name, src, mask in (("train", self.train, self.train_mask), ("val", self.val, self.val_mask)):
            if mask is not None and mask.num_tokens != src.num_tokens:
                raise ValueError(f"{name} loss mask has {mask.num_tokens} entries for {src.num_tokens} tokens")
        if self.doc_sep is None:
            return self
        return replace(self, train_mask=CutExampleMask(self.train, self.train_mask, self.doc_sep),
                       val_mask=CutExampleMask(self.val, self.val_mask, self.doc_sep))

    @property
    def masked(self) -> bool:
        """Whether targets are masked: steps then weight micro-batches by their targets (``TrainStep``)."""
        return self.train_mask is not None

    def val_offsets(self, block_size: int, windows: int) -> np.ndarray:
        """The fixed validation windows' starts: ``windows`` spread over the split (aligned: deduplicated)."""
        offsets = eval_offsets(self.val.num_tokens, block_size, windows)
        return np.unique(offsets // block_size * block_size) if self.aligned_val else offsets
