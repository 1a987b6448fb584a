"""Benchmark of lmpipe.data.filters against datatrove's reference filters, on one core.

    python -m bench.clean [--mb 4]

Documents: the WikiText-2 valid and test articles (as the clean stage sees them: control
characters stripped, whitespace normalised) plus a synthetic web-like mix built from their
sentences (navigation lines, cookie and JavaScript notices, bullet lists, repeated boilerplate,
code, lorem ipsum, French and German pages, contact details), repeated up to about --mb MB.

Prints, for our GopherRepetition + GopherQuality + C4Filter chain and datatrove's
GopherRepetitionFilter + GopherQualityFilter + C4QualityFilter chain on the same documents:
docs/s and MB/s on one core and the ratio ours/theirs; then, per filter run alone on every
document, how often the two agree on keep/drop; then our full default web set alone.

datatrove's English word tokenizer is spaCy's (``spacy.blank("en")`` with a sentencizer), which
needs no downloaded data; its NLTK tokenizer would need punkt data, absent offline. spaCy must be
installed (``pip install spacy``); it is not a dependency of lmpipe.
"""

from __future__ import annotations

import os

# One core: no thread pools in numpy/BLAS/Rayon, and the process pinned to one CPU.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

# The imports come after the thread settings above, which must be in place before numpy and friends load.
# ruff: noqa: E402
import argparse
import random
import re
import time
from collections.abc import Callable
from itertools import compress
from pathlib import Path

from lmpipe.config.data import C4Config, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig, PIIConfig
from lmpipe.data.clean import normalize_whitespace, strip_control
from lmpipe.data.filters import (
    C4Filter,
    GopherQuality,
    GopherRepetition,
    LanguageFilter,
    language_identifier,
    split_words,
)
from lmpipe.data.splitting import split_documents
from lmpipe.data.transforms import PIIMasker, fix_text

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The shared corpora beside the checkout when present, else the copies bundled in data/."""
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "wikitext2-valid.txt").is_file() else REPO / "data"


def wikitext_articles() -> list[str]:
    docs = []
    for name in ("wikitext2-valid.txt", "wikitext2-test.txt"):
        text = (data_dir() / name).read_text(encoding="utf-8")
        docs += [normalize_whitespace(strip_control(d)) for d in split_documents(text, "wikitext_title")]
    return docs


FRENCH = ("Le village se trouve au bord de la rivière, non loin de la forêt. Les habitants vivent "
          "surtout de l'agriculture et du tourisme. En été, de nombreux visiteurs viennent pour "
          "profiter du calme et des paysages. L'église date du douzième siècle.")
GERMAN = ("Die Stadt liegt an einem großen Fluss und ist für ihre alte Brücke bekannt. Viele "
          "Menschen arbeiten in der Industrie oder im Handel. Im Sommer finden zahlreiche Feste "
          "statt. Das Rathaus wurde im neunzehnten Jahrhundert gebaut.")
BOILERPLATE = ["Home | About | Contact | Blog", "Share this:", "Posted by admin", "Read more",
               "This site uses cookies to improve your experience.",
               "Please enable JavaScript to view the comments.",
               "Copyright 2021 All rights reserved", "Privacy Policy | Terms of Use", "Click here..."]


def _detokenize(text: str) -> str:
    """WikiText's tokenised spelling ("word , word @-@ word") back to plain web-like text."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "thing")
    text = re.sub(r" ([,.;:!?)\]']|'s|n't)", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


def _sentences(articles: list[str]) -> list[str]:
    text = _detokenize(" ".join(articles[:40]))
    return [s.strip() for s in re.split(r"(?<=\.) ", text) if 40 < len(s) < 300 and "=" not in s]


def web_page(rng: random.Random, sentences: list[str]) -> str:
    """One synthetic web page: prose paragraphs mixed with one kind of typical web noise."""
    paras = ["\n".join(" ".join(rng.choices(sentences, k=rng.randint(2, 5))) for _ in range(1))
             for _ in range(rng.randint(1, 6))]
    kind = rng.randrange(10)
    if kind == 0:
        paras = [rng.choice(BOILERPLATE) for _ in range(4)] + paras + rng.sample(BOILERPLATE, 3)
    elif kind == 1:
        paras.append("\n".join(f"- {rng.choice(sentences)[:40]}" for _ in range(rng.randint(3, 12))))
    elif kind == 2:
        block = rng.choice(paras)
        paras += [block] * rng.randint(1, 4)
    elif kind == 3:
        paras.append("function init() { var x = 1; return x; }")
    elif kind == 4:
        paras.insert(0, "Lorem ipsum dolor sit amet, consectetur adipiscing elit.")
    elif kind == 5:
        paras = [FRENCH, FRENCH.split(". ")[0] + "."] if rng.random() < 0.5 else [GERMAN]
    elif kind == 6:
        paras.append(f"Contact john.doe{rng.randint(1, 99)}@example.com or call (555) 234-{rng.randint(1000, 9999)}. "
                     f"Our server is at 93.184.216.{rng.randint(1, 250)} and +44 20 7946 0958.")
    elif kind == 7:
        paras = [" ".join(rng.choices(["#tag", "...", "1234", "|", "&"], k=60))]
    elif kind == 8:
        paras = [rng.choice(sentences)[:60]]
    return "\n\n".join(paras)


def corpus(target_mb: float) -> list[str]:
    articles = wikitext_articles()
    rng = random.Random(0)
    sentences = _sentences(articles)
    base = articles + [web_page(rng, sentences) for _ in range(len(articles) * 8)]
    docs, size, i = [], 0, 0
    while size < target_mb * 1e6:
        docs.append(base[i % len(base)])
        size += len(docs[-1].encode("utf-8"))
        i += 1
    return docs


def ours_chain() -> list[Callable[[str], tuple[str, str | None]]]:
    return [GopherRepetition(GopherRepetitionConfig(enabled=True)), GopherQuality(GopherQualityConfig(enabled=True)),
            C4Filter(C4Config(enabled=True))]


def theirs_chain() -> list[Callable[[str], tuple[str, str | None]]]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    def wrap(f):
        def run(text: str) -> tuple[str, str | None]:
            doc = Document(text=text, id="0")
            res = f.filter(doc)
            keep = res if isinstance(res, bool) else res[0]
            return doc.text, None if keep else (res[1] if isinstance(res, tuple) else "drop")
        return run

    return [wrap(GopherRepetitionFilter()), wrap(GopherQualityFilter()), wrap(C4QualityFilter())]


def run_chain(chain, docs: list[str], transforms_after=()) -> tuple[float, int]:
    """Seconds to run the chain over docs (a document leaves at its first drop), documents kept."""
    kept = 0
    t0 = time.perf_counter()
    for text in docs:
        for f in chain:
            text, reason = f(text)
            if reason is not None:
                break
        else:
            for t in transforms_after:
                text = t(text)
            kept += 1
    return time.perf_counter() - t0, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB (default 4)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    docs = corpus(args.mb)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"documents: {len(docs)} ({mb:.2f} MB; WikiText-2 valid+test articles and a synthetic web mix)")

    ours, theirs = ours_chain(), theirs_chain()
    theirs[1]("warm up spaCy once before timing.")
    t_ours = min(run_chain(ours, docs)[0] for _ in range(3))
    t_theirs, _ = run_chain(theirs, docs)
    print("\nchain gopher_repetition -> gopher_quality -> c4, one core")
    print(f"{'':12}{'docs/s':>10}{'MB/s':>9}")
    print(f"{'ours':12}{len(docs) / t_ours:>10.0f}{mb / t_ours:>9.2f}")
    print(f"{'datatrove':12}{len(docs) / t_theirs:>10.0f}{mb / t_theirs:>9.2f}")
    print(f"ratio ours/datatrove (speed): {t_theirs / t_ours:.1f}x")

    print("\nkeep/drop agreement, each filter alone on every document")
    print(f"{'filter':20}{'agree':>8}{'agree 50+':>11}{'kept ours':>11}{'kept theirs':>13}{'same text':>11}")
    unique = list(dict.fromkeys(docs))  # decisions do not depend on repetition
    long = [len(split_words(d)) >= 50 for d in unique]
    for name, a, b in zip(("gopher_repetition", "gopher_quality", "c4"), ours, theirs):
        ra, rb = [a(d) for d in unique], [b(d) for d in unique]
        same_call = [(x[1] is None) == (y[1] is None) for x, y in zip(ra, rb)]
        agree, agree_long = sum(same_call) / len(unique), sum(compress(same_call, long)) / sum(long)
        both = [(x[0], y[0]) for x, y in zip(ra, rb) if x[1] is None and y[1] is None]
        same = sum(x == y for x, y in both) / max(1, len(both))
        print(f"{name:20}{agree:>8.1%}{agree_long:>11.1%}{sum(x[1] is None for x in ra):>11}"
              f"{sum(y[1] is None for y in rb):>13}{same:>11.1%}")
    final = [(run_chain(ours, [d])[1], run_chain(theirs, [d])[1]) for d in unique]
    agree = sum(a == b for a, b in final) / len(unique)
    agree_long = sum(compress((a == b for a, b in final), long)) / sum(long)
    print(f"{'whole chain':20}{agree:>8.1%}{agree_long:>11.1%}{sum(a for a, _ in final):>11}"
          f"{sum(b for _, b in final):>13}")
    print(f"(over {len(unique)} distinct documents, {sum(long)} of them with 50+ words; "
          "'same text': kept by both with identical output)")

    language_identifier()  # load the model before timing
    web = [LanguageFilter(LanguageConfig(enabled=True)), *ours]
    pii = PIIMasker(PIIConfig(enabled=True))
    steps = {"fix_text": lambda: [fix_text(d) for d in docs],
             "language": lambda: [web[0](d) for d in docs],
             "gopher_repetition": lambda: [web[1](d) for d in docs],
             "gopher_quality": lambda: [web[2](d) for d in docs],
             "c4": lambda: [web[3](d) for d in docs],
             "pii": lambda: [pii(d) for d in docs]}
    print("\nours, each step alone on all documents, one core")
    print(f"{'step':20}{'docs/s':>10}{'MB/s':>9}")
    for name, fn in steps.items():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        print(f"{name:20}{len(docs) / dt:>10.0f}{mb / dt:>9.2f}")

    t0 = time.perf_counter()
    _, kept = run_chain([lambda t: (fix_text(t), None), *web], docs, transforms_after=(pii,))
    dt = time.perf_counter() - t0
    print("\nours, default web set (fix_text, language, gopher rep, gopher quality, c4, pii on the kept)")
    print(f"{'':12}{'docs/s':>10}{'MB/s':>9}{'kept':>8}")
    print(f"{'web set':12}{len(docs) / dt:>10.0f}{mb / dt:>9.2f}{kept / len(docs):>8.1%}")


if __name__ == "__main__":
    main()
