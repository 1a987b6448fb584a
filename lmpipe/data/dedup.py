"""De-duplication across a whole corpus: exact (a hash per text) and near (MinHash with LSH).

The clean stage runs in two phases. Each chunk task computes *signatures* of
its surviving documents (``exact_hashes``, ``minhash_signatures``); the
reducer then finds duplicates over all chunks from the signatures alone, so it
never holds the texts, and the first document in corpus order always wins::

    >>> first_occurrence(np.array([7, 3, 7, 3, 9], dtype=np.uint64)).tolist()
    [0, 1, 0, 1, 4]

Near duplicates follow the standard recipe (Broder 1997; Leskovec et al.,
*Mining of Massive Datasets*, ch. 3): signatures are cut into ``bands`` of
``rows`` values; documents whose band values are all equal in some band become
candidates; a candidate pair counts only if its estimated Jaccard similarity
(the share of equal signature values) reaches the threshold; duplicate pairs
are merged with union-find and each cluster keeps its earliest document.

Everything here is a pure function of its arrays: sorting is stable and ties
go to the smaller ordinal, so the result never depends on which process or in
which order the chunk signatures were computed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import rensa

# Words for shingles: lower-cased, punctuation removed inside words ("don't" -> "dont"), so
# re-punctuated copies still match. \w keeps letters and digits of every script.
PUNCTUATION = re.compile(r"[^\w\s]")
PAIR_BATCH = 1 << 16  # candidate pairs verified at a time: bounds the gathered signatures (~60 MB at 112 values)

# FNV-1a over 32-bit words, then the splitmix64 finaliser: a fast, well-mixed 64-bit key per band.
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def exact_hashes(texts: Sequence[str]) -> np.ndarray:
    """The first 8 bytes of each text's UTF-8 sha256 as uint64 (a collision needs ~4e9 distinct texts)."""
    digests = b"".join(hashlib.sha256(t.encode("utf-8")).digest()[:8] for t in texts)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position, the position of the first element with the same key (itself if it is the first).

    Sort-based, so memory is a few arrays of the keys' length, never a set of Python objects.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.empty(len(keys), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


MINHASH_BLOCK_DOCS = 256  # documents whose shingles are in memory at once


def shingles(text: str, n: int) -> list[str]:
    """Word n-grams of the lower-cased, punctuation-stripped text; a text of fewer than n words is one shingle."""
    words = PUNCTUATION.sub("", text.lower()).split()
    if len(words) <= n:
        return [" ".join(words)]
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def minhash_signatures(texts: Sequence[str], ngram: int, permutations: int, seed: int) -> np.ndarray:
    """uint32 MinHash signatures [len(texts), permutations] over word n-gram shingles (rensa's RMinHash).

    rensa hashes tokens with a fixed seeded hash (not Python's salted ``hash``), so a signature is the
    same in every process.
    """
    out = np.zeros((len(texts), permutations), dtype=np.uint32)
    # A block at a time: the shingle strings of a whole 64 MiB chunk would take ~1 GB.
    for lo in range(0, len(texts), MINHASH_BLOCK_DOCS):
        block = texts[lo:lo + MINHASH_BLOCK_DOCS]
        matrix = rensa.RMinHash.digest_matrix_from_token_sets([shingles(t, ngram) for t in block], permutations, seed)
        out[lo:lo + len(block)] = np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(block), permutations)
    return out


def _collision_integrals(threshold: float, bands: int, rows: int, nodes: np.ndarray, weights: np.ndarray
                         ) -> tuple[float, float]:
    """Areas of false positives (similarity < threshold but candidates) and false negatives (the reverse).

    P(candidate | similarity s) = 1 - (1 - s^rows)^bands, a polynomial of degree bands*rows, which
    Gauss-Legendre quadrature integrates exactly given enough nodes.
    """
    def area(lo: float, hi: float, positive: bool) -> float:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        p = 1.0 - (1.0 - s ** rows) ** bands
        return float((hi - lo) / 2 * np.dot(weights, p if positive else 1.0 - p))

    return area(0.0, threshold, True), area(threshold, 1.0, False)


def optimal_bands(threshold: float, permutations: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                  ) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= permutations minimising the weighted false positive + negative areas.

    The same criterion as datasketch's MinHashLSH; the first minimum in (bands, rows) order wins ties.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    nodes, weights = np.polynomial.legendre.leggauss(permutations // 2 + 1)  # exact up to degree permutations+1
    best, best_error = (0, 0), float("inf")
    for bands in range(1, permutations + 1):
        for rows in range(1, permutations // bands + 1):
            fp, fn = _collision_integrals(threshold, bands, rows, nodes, weights)
            error = fp * fp_weight + fn * fn_weight
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [n, bands]: one hash of each band's ``rows`` signature values."""
    n = len(signatures)
    keys = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
            for col in range(b * rows, (b + 1) * rows):
                h ^= signatures[:, col].astype(np.uint64)
                h *= _FNV_PRIME
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
            keys[:, b] = h
    return keys


class SignatureStore:
    """The signatures of all chunks, addressed by corpus ordinal; chunks stay memory-mapped on disk."""

    def __init__(self, chunks: Sequence[np.ndarray]) -> None:
        self.chunks = list(chunks)
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, ordinals: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, ordinals, side="right") - 1
        out = np.empty((len(ordinals), self.chunks[0].shape[1]), dtype=np.uint32)
        for c in np.unique(which):
            mask = which == c
            out[mask] = self.chunks[c][ordinals[mask] - self.offsets[c]]
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Estimated Jaccard similarity of each pair (a[i], b[i]): the share of equal signature values."""
        out = np.empty(len(a), dtype=np.float64)
        for i in range(0, len(a), PAIR_BATCH):
            sa, sb = self.gather(a[i:i + PAIR_BATCH]), self.gather(b[i:i + PAIR_BATCH])
            out[i:i + PAIR_BATCH] = np.mean(sa == sb, axis=1)
        return out


def _verified_pairs(keys: np.ndarray, ordinals: np.ndarray, store: SignatureStore, threshold: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of documents sharing a band key whose similarity reaches the threshold.

    Within each group of equal keys, every member is checked against the group's first member; the
    members that fail form a smaller group checked against their own first member, and so on. This
    finds every similar document of a group in a few vectorised rounds instead of all pairs.
    """
    order = np.argsort(keys, kind="stable")  # ordinals ascend, so equal keys stay in corpus order
    ordered = keys[order]
    group = np.cumsum(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    members = ordinals[order]
    found_a, found_b = [], []
    while True:
        in_group = np.bincount(group)[group] >= 2
        group, members = group[in_group], members[in_group]
        if not len(group):
            break
        pivot = np.concatenate(([True], group[1:] != group[:-1]))
        a = members[pivot][np.cumsum(pivot) - 1][~pivot]
        group, members = group[~pivot], members[~pivot]
        similar = store.similarity(a, members) >= threshold
        found_a.append(a[similar])
        found_b.append(members[similar])
        group, members = group[~similar], members[~similar]
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_a), np.concatenate(found_b)


def cluster_roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over n ordinals joined by the pairs (a[i], b[i]); each ordinal's root is its cluster's smallest."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(x) for x in range(n)], dtype=np.int64)


def near_duplicates(store: SignatureStore, active: np.ndarray, threshold: float, bands: int, rows: int
                    ) -> np.ndarray:
    """For each ordinal, the earliest document of its near-duplicate cluster (itself if none or inactive).

    active: bool mask of documents that take part (exact duplicates are already gone). Band keys for
    all documents are computed chunk by chunk: 8 bytes per document and band.
    """
    keys = np.concatenate([band_keys(np.asarray(c), bands, rows) for c in store.chunks]) if len(store) else \
        np.zeros((0, bands), np.uint64)
    ordinals = np.flatnonzero(active)
    pairs_a, pairs_b = [], []
    for band in range(bands):
        a, b = _verified_pairs(keys[ordinals, band], ordinals, store, threshold)
        pairs_a.append(a)
        pairs_b.append(b)
    pairs = np.unique(np.stack([np.concatenate(pairs_a), np.concatenate(pairs_b)], axis=1), axis=0)
    return cluster_roots(len(store), pairs[:, 0], pairs[:, 1])
