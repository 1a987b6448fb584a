"""De-duplication primitives: exact hashes, shingles, MinHash signatures, LSH parameters and clustering."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import rensa

from lmpipe.data.dedup import (
    MINHASH_BLOCK_DOCS,
    SignatureStore,
    band_keys,
    cluster_roots,
    exact_hashes,
    first_occurrence,
    minhash_signatures,
    near_duplicates,
    optimal_bands,
    shingles,
)
from tests.conftest import REPO

REPO = REPO


def random_doc(rng: random.Random, words: int = 200) -> list[str]:
    """Words drawn from a 5000-word vocabulary: two such documents share almost no 5-gram."""
    return [f"w{rng.randrange(5000)}" for _ in range(words)]


def one_word_changed(words: list[str], at: int) -> list[str]:
    return [*words[:at], "changed", *words[at + 1:]]


# ---------------------------------------------------------------------------
# exact


def test_exact_hash_is_the_first_8_bytes_of_sha256_big_endian():
    digest = hashlib.sha256("caf\u00e9".encode()).digest()
    got = exact_hashes(["abc", "caf\u00e9"])
    assert got.dtype == np.uint64
    assert got.tolist() == [0xBA7816BF8F01CFEA, int.from_bytes(digest[:8], "big")]
    assert exact_hashes([]).shape == (0,)


def test_first_occurrence_points_at_the_earliest_equal_key():
    keys = np.array([5, 9, 5, 2, 9, 9, 7, 2], dtype=np.uint64)
    assert first_occurrence(keys).tolist() == [0, 1, 0, 3, 1, 1, 6, 3]
    assert first_occurrence(np.zeros(0, np.uint64)).tolist() == []
    # The largest uint64 values sort correctly too (no signed overflow).
    top = np.array([2**64 - 1, 0, 2**64 - 1], dtype=np.uint64)
    assert first_occurrence(top).tolist() == [0, 1, 0]


# ---------------------------------------------------------------------------
# shingles and signatures


def test_shingles_lowercase_strip_punctuation_and_join_words():
    assert shingles("The cat, the DOG's bone!", 2) == ["the cat", "cat the", "the dogs", "dogs bone"]
    assert shingles("a b c", 3) == ["a b c"]
    assert shingles("Too short.", 5) == ["too short"]  # fewer than n words: one shingle
    assert shingles("  ...  ", 5) == [""]
    assert shingles("Été à Zürich", 1) == ["été", "à", "zürich"]  # letters of every script are words


def test_signatures_are_rensa_rminhash_of_the_shingles():
    texts = ["one two three four five six", "Short one.", ""]
    got = minhash_signatures(texts, ngram=3, permutations=16, seed=7)
    assert got.dtype == np.uint32 and got.shape == (3, 16)
    for text, row in zip(texts, got):
        m = rensa.RMinHash(num_perm=16, seed=7)
        m.update(shingles(text, 3))
        assert row.tolist() == m.digest()
    assert minhash_signatures([], ngram=3, permutations=16, seed=7).shape == (0, 16)


def test_signatures_of_many_documents_are_computed_block_by_block_with_the_same_result():
    texts = [" ".join(random_doc(random.Random(n), 30)) for n in range(MINHASH_BLOCK_DOCS * 2 + 3)]
    got = minhash_signatures(texts, ngram=5, permutations=8, seed=3)
    for i in (0, MINHASH_BLOCK_DOCS - 1, MINHASH_BLOCK_DOCS, len(texts) - 1):  # block edges
        m = rensa.RMinHash(num_perm=8, seed=3)
        m.update(shingles(texts[i], 5))
        assert got[i].tolist() == m.digest()


def test_signatures_are_the_same_in_another_process():
    texts = [" ".join(random_doc(random.Random(n), 50)) for n in range(20)]
    here = minhash_signatures(texts, ngram=5, permutations=32, seed=1)
    code = ("import json, sys; from lmpipe.data.dedup import minhash_signatures; "
            "print(json.dumps(minhash_signatures(json.loads(sys.stdin.read()), 5, 32, 1).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash salt must not matter
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         cwd=REPO, env=env, check=True).stdout
    assert json.loads(out) == here.tolist()


def test_similar_texts_have_similar_signatures():
    rng = random.Random(3)
    a = random_doc(rng)
    sig = minhash_signatures([" ".join(a), " ".join(one_word_changed(a, 100)), " ".join(random_doc(rng))],
                             ngram=5, permutations=112, seed=1)
    # One word changed in 200 alters 5 of 196 five-word shingles: true Jaccard 191/201 = 0.95.
    assert np.mean(sig[0] == sig[1]) > 0.85
    assert np.mean(sig[0] == sig[2]) < 0.05


# ---------------------------------------------------------------------------
# LSH parameters


@pytest.mark.parametrize(
    ("threshold", "permutations", "expected"),
    [
        # The same values as datasketch's MinHashLSH._optimal_param(threshold, permutations, 0.5, 0.5) (checked once).
        (0.5, 112, (22, 5)),
        (0.7, 112, (12, 9)),
        (0.8, 112, (9, 12)),
        (0.9, 112, (5, 22)),
        (0.8, 128, (9, 13)),
        (0.8, 256, (17, 15)),
        (0.85, 64, (4, 15)),
        (0.95, 16, (1, 16)),
    ],
)
def test_optimal_bands(threshold, permutations, expected):
    bands, rows = optimal_bands(threshold, permutations)
    assert (bands, rows) == expected and bands * rows <= permutations


def test_optimal_bands_weights_trade_false_positives_for_negatives():
    # Fearing false negatives more means more bands (more candidates); fearing false positives, longer ones.
    assert optimal_bands(0.8, 112, fp_weight=0.1, fn_weight=0.9) == (12, 9)
    assert optimal_bands(0.8, 112, fp_weight=0.9, fn_weight=0.1) == (5, 21)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1.0"):
        optimal_bands(1.0, 112)


# ---------------------------------------------------------------------------
# candidates, verification, clusters


def test_band_keys_equal_exactly_when_the_band_is_equal():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [9, 9, 3, 4], [2, 1, 4, 3]], dtype=np.uint32)
    keys = band_keys(sig, bands=2, rows=2)
    assert keys.dtype == np.uint64 and keys.shape == (4, 2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] == keys[2, 1]
    assert len({*keys[:, 0].tolist()}) == 3 and len({*keys[:, 1].tolist()}) == 3  # order of values matters


def test_cluster_roots_are_the_smallest_ordinal_of_each_component():
    a, b = np.array([4, 1, 6, 2]), np.array([6, 3, 2, 7])
    assert cluster_roots(8, a, b).tolist() == [0, 1, 2, 1, 2, 5, 2, 2]


def test_candidates_that_fail_against_the_first_are_checked_among_themselves():
    # All three share the first band; doc 0 differs from both others, docs 1 and 2 are 3/4 equal.
    sig = np.array([[1, 1, 0, 0], [1, 1, 5, 6], [1, 1, 5, 7]], dtype=np.uint32)
    store = SignatureStore([sig[:1], sig[1:]])
    assert near_duplicates(store, np.ones(3, bool), 0.75, bands=1, rows=2).tolist() == [0, 1, 1]
    assert near_duplicates(store, np.ones(3, bool), 0.8, bands=1, rows=2).tolist() == [0, 1, 2]
    # An inactive document (already an exact duplicate) takes no part.
    assert near_duplicates(store, np.array([True, False, True]), 0.75, bands=1, rows=2).tolist() == [0, 1, 2]


def test_near_duplicates_over_memory_mapped_chunks(tmp_path):
    rng = random.Random(0)
    docs = [random_doc(rng) for _ in range(300)]
    docs[150] = one_word_changed(docs[10], 50)  # near copy across chunks
    docs[151] = one_word_changed(docs[150], 120)  # and a copy of the copy: same cluster
    docs[250] = one_word_changed(docs[249], 0)  # inside the last chunk
    docs[260] = docs[20][:100] + random_doc(rng, 100)  # half the text shared: Jaccard ~0.32, not a duplicate
    sig = minhash_signatures([" ".join(d) for d in docs], ngram=5, permutations=112, seed=1)
    chunks = []
    for i, (lo, hi) in enumerate([(0, 100), (100, 200), (200, 300)]):
        np.save(tmp_path / f"{i}.npy", sig[lo:hi])
        chunks.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    store = SignatureStore(chunks)
    assert len(store) == 300
    roots = near_duplicates(store, np.ones(300, bool), 0.8, *optimal_bands(0.8, 112))
    expected = np.arange(300)
    expected[[150, 151]] = 10
    expected[250] = 249
    assert roots.tolist() == expected.tolist()
    sims = store.similarity(np.array([10, 10, 249, 20]), np.array([150, 151, 250, 260]))
    assert (sims[:3] >= 0.8).all() and sims[3] < 0.5
