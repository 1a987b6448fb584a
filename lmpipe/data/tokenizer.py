"""Byte-level BPE tokenizer: train it on (a sample of) the cleaned documents, save it, load it back.

The tokenizer is GPT-2 style: text is split by a regex (GPT-2's, or GPT-4's
cl100k pattern with ``tokenizer.pretokenizer: gpt4``), every byte is mapped to
one printable character (the "bytes-to-unicode" table) and BPE merges are
learned over those characters. Any string round-trips::

    >>> tok = load_tokenizer(result.path("tokenizer.json"))
    >>> ids = tok.encode("Héllo 🌍", add_special_tokens=False).ids
    >>> tok.decode(ids, skip_special_tokens=False)
    'Héllo 🌍'

Training is deterministic: the trainer's word counts are sums (order-free) and
ties between equally frequent merges are broken by the pair's token ids, so the
same documents and config give a byte-identical ``tokenizer.json`` whatever the
thread count (checked with RAYON_NUM_THREADS=1, 2, 16 and 64).

On a large corpus ``tokenizer.sample_bytes`` trains on a deterministic sample:
a document is in it iff a salted hash of its id falls below
``sample_bytes / corpus bytes``, so the sample does not depend on chunking,
order or machine, and a larger budget only adds documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmpipe.artifacts import read_versioned_json, sha256_file
from lmpipe.config.base import EOT
from lmpipe.config.data import TokenizerConfig

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
META_FORMAT_VERSION = 1
READ_BATCH_DOCS = 256  # documents per parquet read when no caller-specific batch size applies
# GPT-4's (cl100k_base) split: case-insensitive contractions, letters with at most one leading non-letter,
# digits in groups of 1-3, punctuation runs with their trailing newlines, whitespace.
GPT4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Salt of the tokenizer sample's hash. Without it the sample would be the documents with the smallest
# split hash, i.e. mostly the validation split (lmpipe.data.shards.is_validation uses the unsalted hash).
SAMPLE_SALT = "tokenizer-sample\0"


def id_fraction(doc_id: str, salt: str = "") -> float:
    """The first 8 bytes of sha256(salt + id) as a number in [0, 1).

    Stable across runs, machines and Python versions (unlike ``hash()``) and
    independent of document order: the basis of every per-document random choice.
    """
    h = int.from_bytes(hashlib.sha256((salt + doc_id).encode("utf-8")).digest()[:8], "big")
    return h / 2**64


def in_sample(doc_id: str, fraction: float) -> bool:
    """True if the document belongs to the tokenizer's training sample of the given fraction."""
    return id_fraction(doc_id, SAMPLE_SALT) < fraction


def make_pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    """The split before BPE. Both end in ByteLevel without prefix space, so decode(encode(x)) == x exactly."""
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt4":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"tokenizer.pretokenizer {kind!r} is unknown; use 'gpt2' or 'gpt4'")


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE tokenizer; special tokens get ids 0..k-1 in config order.

    ``texts`` may be strings or batches (lists) of strings; it is consumed once,
    as a stream. The vocabulary may come out smaller than cfg.vocab_size when
    the corpus has too few pairs occurring at least cfg.min_frequency times.
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: " word" and "word" stay different tokens, and decode(encode(x)) == x exactly.
    tok.pre_tokenizer = make_pre_tokenizer(cfg.pretokenizer)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        # All 256 byte symbols up front, so any byte is encodable even if the corpus never shows it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by :func:`run_train_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    return Tokenizer.from_file(str(path))


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 hex of the tokenizer.json bytes: what shards and checkpoints record to stay matched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    return sha256_file(path)


def read_tokenizer_meta(path: str | Path) -> dict[str, Any]:
    """Read ``tokenizer_meta.json``, checking its format version."""
    return read_versioned_json(Path(path), META_FORMAT_VERSION, "tokenizer metadata", "retrain the tokenizer")


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """How many UTF-8 bytes each token id stands for (int64, length vocab_size); special tokens count 0.

    In byte-level BPE each character of a token's string form is one byte (the
    GPT-2 bytes-to-unicode map), so the length is the string's length. Used to
    turn a per-token loss into bits per byte.
    """
    n = tok.get_vocab_size()
    specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in specials:
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"tokenizer has no token for id {i} below its vocab_size {n}")
        lengths[i] = len(piece)
    return lengths


@contextmanager
def special_tokens_as_text(tok: Tokenizer) -> Iterator[Tokenizer]:
    """Within the block, ``tok`` encodes literal special-token text as plain text; its setting is restored after."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = previous


def encode_ordinary(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids with literal special-token text ("<|endoftext|>", "<|end|>", ...) encoded as plain
    text, as the shards encode documents (tiktoken's ``encode_ordinary``): only ids a caller adds mark a
    document's end, a chat turn or a classifier's extract token."""
    with special_tokens_as_text(tok):
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def eot_id(tok: Tokenizer, eot_token: str) -> int:
    """The id of the end-of-text token; fails clearly if the tokenizer lacks it."""
    i = tok.token_to_id(eot_token)
    if i is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise ValueError(
            f"tokenizer.eot_token {eot_token!r} is not in the tokenizer (its special tokens: {specials}); "
            "retrain the tokenizer with it in tokenizer.special_tokens"
        )
    return i


def meta_eot_id(tok: Tokenizer, meta_file: Path | None, *, missing_ok: bool = False) -> int:
    """The end-of-text id of a tokenizer stage's tokenizer: the token its ``tokenizer_meta.json`` names.
    ``missing_ok``: a tokenizer without the file (None, or a model registered before it was logged) takes
    lmpipe's EOT."""
    if missing_ok and (meta_file is None or not Path(meta_file).is_file()):
        return eot_id(tok, EOT)
    if meta_file is None:
        raise ValueError("the tokenizer's metadata file is needed to know its end-of-text token")
    token = read_tokenizer_meta(meta_file)["eot_token"]
    return eot_id(tok, token)


def sample_fraction(cfg: TokenizerConfig, corpus_bytes: int) -> float:
    """Share of documents the tokenizer trains on: about sample_bytes of the corpus, at most all of it."""
    if cfg.sample_bytes is None or corpus_bytes <= cfg.sample_bytes:
        return 1.0
    return cfg.sample_bytes / corpus_bytes


class TokenizerMismatchError(ValueError):
    """A corpus was tokenized with a different tokenizer than the one evaluation decodes with."""
