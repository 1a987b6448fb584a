"""Token shards: the corpus encoded once, stored as flat binary files that training memory-maps.

Layout of one shard file (all little-endian)::

    bytes 0..255   header: magic b"LMPTOKS\\0", format_version u32, itemsize u32 (2 = uint16, 4 = uint32),
                   token count u64, document count u64, zero padding
    bytes 256..    the tokens, uint16 when the vocabulary fits (<= 65,536 ids), else uint32

Every document is followed by the end-of-text token, so documents stay
separable after concatenation. A split (train / val) is a sequence of files
``{split}_{index:06d}.bin`` of exactly ``shard_tokens`` tokens (the last one
shorter); a document may continue into the next file and is counted in the
file where it ends. ``manifest.json`` lists every file with its sha256 and
counts, and the tokenizer fingerprint the tokens belong to;
``doc_index.parquet`` says where each document's tokens are. A reader checks
each shard against its manifest sha256 when it opens it (``TokenSplit``), so a
damaged shard fails before training or evaluation reads a token of it.

The work is split in two stages so it scales with the corpus:

* ``encode_chunk`` (one per document-set chunk, run in parallel): the chunk's
  documents as raw token files ``train.tokens`` / ``val.tokens`` plus
  ``docs.parquet`` (id, split, tokens, bytes per document);
* ``shard`` (one per corpus): concatenates the encoded chunks in corpus order
  with bulk copies. The token stream, hence every shard file and the document
  index, is the same however the corpus was chunked or the chunks scheduled.

Documents go to train or val by a hash of their id, so the split does not depend
on processing order or batch sizes. (Ids are positions within a source, so
inserting a document in the middle of a file does move later ones.) When that
leaves one split empty (a corpus of one book, read as one document), the split is
taken inside every document instead (``VAL_INSIDE``): its last ``val_fraction``,
cut at a paragraph break near that point (:func:`held_out_cut`), is validation.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from lmpipe.artifacts import CorruptArtifactError, StageResult, read_versioned_json
from lmpipe.data.documents import utf8_len
from lmpipe.data.tokenizer import (
    META_FILE,
    TOKENIZER_FILE,
    eot_id,
    id_fraction,
    load_tokenizer,
    read_tokenizer_meta,
    tokenizer_fingerprint,
)

MAGIC = b"LMPTOKS\0"
SHARD_FORMAT_VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQQ")  # magic, format_version, itemsize, tokens, documents
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
DOC_INDEX_FILE = "doc_index.parquet"
ENCODED_DOCS_FILE = "docs.parquet"
SPLITS = ("train", "val")
VAL_BY_DOCUMENT = "documents"  # each document wholly in train or val, by a hash of its id
VAL_INSIDE = "inside_documents"  # the last val_fraction of every document is validation
# Where a document may be cut, best first: a blank line, a line end, a space. The break's whitespace belongs to
# neither part, so neither ends or starts with it.
_BREAKS = (re.compile(r"\s*\n[ \t]*\n\s*"), re.compile(r"\s*\n\s*"), re.compile(r"\s+"))
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """True if the document belongs to the validation split.

    The first 8 bytes of sha256(id) read as a number in [0, 1): stable across
    runs, machines and Python versions (unlike ``hash()``), and independent of
    document order.
    """
    return id_fraction(doc_id) < val_fraction


def document_split_is_one_sided(doc_ids: Iterable[str], val_fraction: float) -> bool:
    """Whether splitting by document puts every one of ``doc_ids`` on the same side (or there are none); reads
    only until it has seen a document of each split."""
    seen: set[bool] = set()
    for doc_id in doc_ids:
        seen.add(is_validation(doc_id, val_fraction))
        if len(seen) == 2:
            return False
    return True


def held_out_cut(text: str, val_fraction: float) -> tuple[int, int] | None:
    """Where a document is cut when the validation split is taken inside documents: (end of its training part,
    start of its validation part), or None when it is too short to cut (it all trains).

    The validation part is the last ``val_fraction`` of the text's characters, its start moved to the nearest
    paragraph break (blank line) within half that part's length; failing one, to the nearest line end, then the
    nearest space, each within the same reach; failing all, the point itself. An equally near later break wins.

        >>> text = "One.\\n\\nTwo two.\\n\\nThree three three.\\n\\nFour."
        >>> cut = held_out_cut(text, 0.3)
        >>> text[:cut[0]], text[cut[1]:]
        ('One.\\n\\nTwo two.\\n\\nThree three three.', 'Four.')
    """
    n = len(text)
    target = n - round(n * val_fraction)
    if not 0 < target < n:
        return None
    reach = max(1, (n - target) // 2)
    lo, hi = max(1, target - reach), min(n, target + reach + 1)
    for brk in _BREAKS:
        best: tuple[int, int] | None = None
        for m in brk.finditer(text, lo, hi):
            start, end = _whole_break(text, m.start(), m.end())
            if start > 0 and end < n and (best is None or abs(end - target) <= abs(best[1] - target)):
                best = (start, end)
        if best is not None:
            return best
    return target, target


def _whole_break(text: str, start: int, end: int) -> tuple[int, int]:
    """A break with all of its whitespace: a match that the search window's edge cut short is widened, so neither
    part ends or starts with whitespace."""
    while start > 0 and text[start - 1].isspace():
        start -= 1
    while end < len(text) and text[end].isspace():
        end += 1
    return start, end


def split_batch(batch: dict[str, list], val_fraction: float, val_split: str) -> dict[str, list]:
    """A batch of documents (id, text, nbytes) as the pieces that are encoded, each with its split (``val``: a
    list of bools): the documents themselves (VAL_BY_DOCUMENT), or each one's training part and then its
    validation part (VAL_INSIDE; a document too short to cut is one training piece)."""
    if val_split == VAL_BY_DOCUMENT:
        return {**batch, "val": [is_validation(d, val_fraction) for d in batch["id"]]}
    if val_split != VAL_INSIDE:
        raise ValueError(f"unknown val_split {val_split!r}: {VAL_BY_DOCUMENT!r} or {VAL_INSIDE!r}")
    out: dict[str, list] = {"id": [], "text": [], "nbytes": [], "val": []}
    for doc_id, text, nbytes in zip(batch["id"], batch["text"], batch["nbytes"], strict=True):
        cut = held_out_cut(text, val_fraction)
        parts = [(text, nbytes, False)] if cut is None else [
            (text[:cut[0]], None, False), (text[cut[1]:], None, True)]
        for part, size, val in parts:
            out["id"].append(doc_id)
            out["text"].append(part)
            out["nbytes"].append(utf8_len(part) if size is None else size)
            out["val"].append(val)
    return out


def tokens_file(split: str) -> str:
    """An encoded chunk's raw token file of one split (no header: shard_dtype, little-endian)."""
    return f"{split}.tokens"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _pack_header(itemsize: int, tokens: int, documents: int) -> bytes:
    return _HEADER.pack(MAGIC, SHARD_FORMAT_VERSION, itemsize, tokens, documents).ljust(HEADER_BYTES, b"\0")


def write_shard(path: Path, pieces: Iterable[np.ndarray], documents: int) -> dict[str, Any]:
    """Write one shard file from token arrays (all of one shard dtype) and return its manifest entry.

    The file is written as ``<path>.tmp``, fsync'd and renamed, so a shard file
    that exists is complete. The sha256 is computed while writing, not by
    reading the file back. ``documents`` is the number of documents ending in
    this shard, as the header records it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        raise ValueError(f"token shard {str(path)!r} would hold no tokens; shards are never empty")
    dtypes = {p.dtype for p in pieces}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES.values():
        raise ValueError(f"token shard {str(path)!r}: pieces have dtype(s) {sorted(map(str, dtypes))}, "
                         f"expected one of {[d.str for d in _DTYPES.values()]}")
    dtype = pieces[0].dtype
    tokens = sum(len(p) for p in pieces)
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        header = _pack_header(dtype.itemsize, tokens, documents)
        f.write(header)
        digest.update(header)
        for piece in pieces:
            view = memoryview(np.ascontiguousarray(piece).data).cast("B")
            f.write(view)
            digest.update(view)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "sha256": digest.hexdigest(), "tokens": tokens, "documents": documents}


def read_shard(path: str | Path, sha256: str | None = None) -> np.ndarray:
    """Memory-map one shard's tokens after checking the file: against ``sha256`` (its manifest entry's) when
    given, then its header.

    The whole file is mapped once and the hash taken over that mapping, which the
    returned tokens are a view of: the file is read once per open, and no byte
    that differs from what was hashed is ever used (hashing mapped pages is also
    faster than buffered reads, see ``bench/verify.py``). A hash mismatch raises
    ``CorruptArtifactError`` before any token is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard {str(path)!r} does not exist")
    size = path.stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)  # mmap refuses 0 bytes
    if sha256 is not None:
        actual = hashlib.sha256(raw.data).hexdigest()
        if actual != sha256:
            raise CorruptArtifactError(path, f"sha256 {sha256}", f"sha256 {actual} ({size} bytes)", MANIFEST_FILE)
    if size < HEADER_BYTES:
        raise ValueError(f"token shard {str(path)!r} is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, itemsize, tokens, _documents = _HEADER.unpack(raw[: _HEADER.size].tobytes())
    if magic != MAGIC:
        raise ValueError(f"token shard {str(path)!r} has magic {magic!r}, expected {MAGIC!r}: not an lmpipe shard")
    if version != SHARD_FORMAT_VERSION:
        raise ValueError(
            f"token shard {str(path)!r} has format_version {version}, this code reads {SHARD_FORMAT_VERSION}; "
            "re-run the shard stage"
        )
    if itemsize not in _DTYPES:
        raise ValueError(f"token shard {str(path)!r} has itemsize {itemsize}, expected one of {sorted(_DTYPES)}")
    expected = HEADER_BYTES + tokens * itemsize
    if size != expected:
        raise ValueError(
            f"token shard {str(path)!r} is {size} bytes but its header promises {tokens} tokens "
            f"({expected} bytes): truncated or corrupt"
        )
    if tokens == 0:
        raise ValueError(f"token shard {str(path)!r} holds no tokens; the writer never writes empty shards")
    return raw[HEADER_BYTES:].view(_DTYPES[itemsize])  # HEADER_BYTES keeps the tokens aligned


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read a shard directory's ``manifest.json``, checking its format version."""
    return read_versioned_json(Path(shard_dir) / MANIFEST_FILE, MANIFEST_FORMAT_VERSION, "shard manifest",
                               "re-run the shard stage")


class TokenSplit:
    """All shards of one split, memory-mapped, addressed as one token sequence.

    Every shard is checked against the sha256 its manifest entry records as it is
    opened (``read_shard``): a damaged shard raises ``CorruptArtifactError`` here,
    before any of its tokens reaches training or evaluation.
    """

    def __init__(self, shard_dir: Path, split: str) -> None:
        self.shard_dir = Path(shard_dir)
        self.split = split
        manifest = read_manifest(self.shard_dir)
        if split not in manifest["splits"]:
            raise ValueError(
                f"split {split!r} is not in {str(self.shard_dir / MANIFEST_FILE)!r}; "
                f"it has {sorted(manifest['splits'])}"
            )
        entry = manifest["splits"][split]
        self.vocab_size: int = manifest["vocab_size"]
        self.eot_id: int = manifest["eot_id"]
        self.tokenizer_fingerprint: str = manifest["tokenizer_fingerprint"]
        self.num_documents: int = entry["documents"]
        self.num_bytes: int = entry["bytes"]
        self._shards: list[np.ndarray] = []
        for s in entry["shards"]:
            tokens = read_shard(self.shard_dir / s["file"], s["sha256"])
            if len(tokens) != s["tokens"] or tokens.dtype.name != manifest["dtype"]:
                raise CorruptArtifactError(self.shard_dir / s["file"], f"{s['tokens']} {manifest['dtype']} tokens",
                                           f"{len(tokens)} {tokens.dtype.name} tokens", MANIFEST_FILE)
            self._shards.append(tokens)
        # _starts[i] is the global index of shard i's first token; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum([len(t) for t in self._shards], dtype=np.int64)])
        self.num_tokens: int = int(self._starts[-1])
        if self.num_tokens != entry["tokens"]:
            raise ValueError(
                f"split {split!r} in {str(self.shard_dir)!r}: shards hold {self.num_tokens} tokens, "
                f"the manifest says {entry['tokens']}"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """int64 copy of tokens[start:start+length]; may cross shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window start={start} length={length} is outside split {self.split!r} "
                f"of {self.num_tokens} tokens in {str(self.shard_dir)!r}"
            )
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, "right")) - 1  # shard holding `start`
        done = 0
        while done < length:
            lo = start + done - int(self._starts[i])
            take = min(length - done, len(self._shards[i]) - lo)
            out[done : done + take] = self._shards[i][lo : lo + take]
            done += take
            i += 1
        return out


# --- encoding one chunk ---------------------------------------------------------------------------


def load_checked_tokenizer(tokenizer: StageResult) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer set up for encoding corpora, after checking it is the one its metadata describes.

    Returns the tokenizer and {"sha256", "eot_id", "vocab_size", "dtype"}. Literal
    "<|endoftext|>" inside a document is encoded as plain text (like tiktoken's
    encode_ordinary), so the eot id only ever marks a real document boundary.
    """
    tok_path = tokenizer.path(TOKENIZER_FILE)
    tok_meta = read_tokenizer_meta(tokenizer.path(META_FILE))
    tok_sha = tokenizer_fingerprint(tok_path)
    if tok_sha != tok_meta["tokenizer_sha256"]:
        raise ValueError(
            f"tokenizer file {str(tok_path)!r} has sha256 {tok_sha}, its metadata records "
            f"{tok_meta['tokenizer_sha256']}: the tokenizer directory was modified"
        )
    tok = load_tokenizer(tok_path)
    tok.encode_special_tokens = True
    vocab_size = tok.get_vocab_size()
    info = {"sha256": tok_sha, "eot_id": eot_id(tok, tok_meta["eot_token"]), "vocab_size": vocab_size,
            "dtype": shard_dtype(vocab_size)}
    return tok, info


def tokens_with_eot(encodings: Sequence[Encoding], eot: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate encoded documents, each followed by ``eot``; returns (tokens, lengths including the eot).

    The ids go to numpy in one pass, without per-document arrays: this is the
    only per-token Python work of the shard stages.
    """
    lengths = np.fromiter((len(e) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    is_eot = np.zeros(total, dtype=bool)
    is_eot[ends - 1] = True
    tokens = np.empty(total, dtype=dtype)
    # numpy raises OverflowError on an id the dtype cannot hold instead of wrapping it around.
    tokens[~is_eot] = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype,
                                  count=total - len(encodings))
    tokens[is_eot] = eot
    return tokens, lengths


def encoded_batches(tok: Tokenizer, batches: Iterable[dict[str, list]]) -> Iterator[tuple[dict[str, list], list]]:
    """(batch, encodings) for each document batch, in order, encoding one batch ahead.

    The batch encoder runs in Rust on every core without the GIL; while it works
    on batch k+1 in a helper thread, the caller's Python work on batch k (ids to
    numpy, routing, writing) proceeds, so the cores do not idle between batches.
    Offsets are not needed, so ``encode_batch_fast`` skips computing them (same
    ids as ``encode_batch``).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="lmpipe-encode") as encoder:
        pending: tuple[dict[str, list], Future] | None = None
        for batch in batches:
            future = encoder.submit(tok.encode_batch_fast, batch["text"], add_special_tokens=False)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class TokenSource(Protocol):
    """A token sequence training can read windows of (``lmpipe.data.shards.TokenSplit``, ``ArraySource``)."""

    num_tokens: int

    def window(self, start: int, length: int) -> np.ndarray: ...


class ArraySource:
    """A token sequence held in memory: SFT streams, loss masks, a scored text file, tests."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.num_tokens = len(self.tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window start={start} length={length} is outside {self.num_tokens} tokens")
        return self.tokens[start : start + length].copy()


class SplicedSource:
    """Pieces of token sources, ``(source, start, length)``, read as one sequence (nothing is copied).

    What a continual run trains on: the new documents' train split with evenly spaced stretches of earlier
    data spliced after it (``replay_pieces``)."""

    def __init__(self, pieces: list[tuple[TokenSource, int, int]]) -> None:
        for src, start, length in pieces:
            if start < 0 or length < 0 or start + length > src.num_tokens:
                raise IndexError(f"piece start={start} length={length} is outside {src.num_tokens} tokens")
        self.pieces = [p for p in pieces if p[2] > 0]
        self._starts = np.concatenate([[0], np.cumsum([p[2] for p in self.pieces], dtype=np.int64)])
        self.num_tokens = int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window start={start} length={length} is outside {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, "right")) - 1
        done = 0
        while done < length:
            src, base, size = self.pieces[i]
            lo = start + done - int(self._starts[i])
            take = min(length - done, size - lo)
            out[done: done + take] = src.window(base + lo, take)
            done += take
            i += 1
        return out


def replay_pieces(pool: TokenSource, tokens: int, stretches: int) -> list[tuple[TokenSource, int, int]]:
    """``tokens`` tokens of ``pool`` (all of it if it holds fewer) in ``stretches`` equal stretches spread evenly
    over it: a deterministic sample of earlier data that still reads whole passages."""
    tokens = min(tokens, pool.num_tokens)
    if tokens <= 0:
        return []
    stretches = max(1, min(stretches, tokens))
    size, extra = divmod(tokens, stretches)
    gap = (pool.num_tokens - tokens) / stretches
    pieces, at = [], 0.0
    for k in range(stretches):
        length = size + (1 if k < extra else 0)
        pieces.append((pool, int(at), length))
        at += length + gap
    return pieces
