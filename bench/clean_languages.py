"""Speed of the Gopher and C4 filters when they count words per language, on one core.

    python -m bench.clean_languages [--mb 4] [--repeats 5]

English: the documents of ``python -m bench.clean`` (WikiText-2 valid and test articles plus their
synthetic web mix, about --mb MB) and Tiny Shakespeare's speeches, through Gopher repetition ->
Gopher quality -> C4 (a document leaves at its first drop) as the clean stage runs them with
language id off (language None) and on (every document "en"): the ratio is the cost of the
per-language word counting on English (1.00: none). Other languages: the UDHR sample's paragraphs
(tests/fixtures/multilingual), repeated, through the same chain with their language, grouped by how
their words are found (ICU's word break or the regular expression).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

# ruff: noqa: E402
import argparse
import time
from collections.abc import Sequence

from bench.clean import corpus, data_dir, ours_chain
from bench.langid import SAMPLE
from lmpipe.data.clean import normalize_whitespace, strip_control
from lmpipe.data.filters import _ICU_WORDS
from lmpipe.data.splitting import split_documents


def run(chain: list, docs: Sequence[str], languages: Sequence[str | None]) -> float:
    """CPU seconds for every document through the chain, each with its language (CPU time: other processes
    on the machine slow the wall clock, not this)."""
    t0 = time.process_time()
    for text, lang in zip(docs, languages):
        for f in chain:
            text, reason = f(text, lang)
            if reason is not None:
                break
    return time.process_time() - t0


def best(chain: list, docs: Sequence[str], languages: Sequence[str | None], repeats: int) -> float:
    return min(run(chain, docs, languages) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="English web corpus size in MB (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the fastest counts (default 5)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    chain = ours_chain()
    shakespeare = [normalize_whitespace(strip_control(d)) for d in split_documents(
        (data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8"), "blank_line")]
    print("English, gopher_repetition -> gopher_quality -> c4, one core (fastest of "
          f"{args.repeats}; off = language None, on = 'en')")
    print(f"{'corpus':28}{'MB':>7}{'off MB/s':>10}{'on MB/s':>10}{'on/off':>8}")
    for name, docs in (("WikiText-2 + web mix", corpus(args.mb)), ("Tiny Shakespeare speeches", shakespeare)):
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        off, on = 0.0, 0.0
        for _ in range(args.repeats):  # interleaved, so a busy moment hits both alike
            off = max(off, mb / run(chain, docs, [None] * len(docs)))
            on = max(on, mb / run(chain, docs, ["en"] * len(docs)))
        print(f"{name:28}{mb:>7.2f}{off:>10.2f}{on:>10.2f}{on / off:>8.3f}")

    rows = [line.split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()[1:]]
    print("\nUDHR sample x20, the same chain with each paragraph's language")
    print(f"{'words by':28}{'MB':>7}{'MB/s':>10}")
    for name, icu in (("ICU word break", True), ("regular expression", False)):
        picked = [(text, lang) for lang, _, text in rows if (lang in _ICU_WORDS) == icu] * 20
        mb = sum(len(t.encode("utf-8")) for t, _ in picked) / 1e6
        seconds = best(chain, [t for t, _ in picked], [lang for _, lang in picked], args.repeats)
        print(f"{name:28}{mb:>7.2f}{mb / seconds:>10.2f}")


if __name__ == "__main__":
    main()
