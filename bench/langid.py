"""Language id: accuracy per language and speed on one core, of the model the language step uses and others.

    python -m bench.langid [--lines]

Text: the labelled UDHR sample (tests/fixtures/multilingual/udhr_sample.tsv, 22 languages, 440
paragraphs); with --lines, only each paragraph's first sentence (at most 120 characters), as in a
corpus cut into lines. Models: fastText lid.176 as the language step runs it (lmpipe's), and, when
installed, py3langid (lmpipe's model before it; normalised probabilities) and lingua (every
language, low-accuracy mode; its high-accuracy mode is ~30x slower). Prints per-language top-1
accuracy, overall accuracy over the languages each model knows, the share kept by the default
rule (right language and score >= 0.65), and MB/s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

# ruff: noqa: E402
import argparse
import importlib.util
import re
import time
from collections.abc import Callable
from pathlib import Path

from lmpipe.config.data import LanguageConfig
from lmpipe.data.filters import LanguageFilter

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "multilingual" / "udhr_sample.tsv"
MIN_SCORE = LanguageConfig().min_score
_FIRST_SENTENCE = re.compile(r".+?(?:[。．！？!?]|[.;:](?=\s))")

Classifier = Callable[[str], tuple[str, float]]


def read_sample(lines: bool) -> list[tuple[str, str]]:
    rows = [line.rstrip("\n").split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()[1:]]
    out = []
    for lang, _, text in rows:
        if lines:
            m = _FIRST_SENTENCE.match(text)
            text = (m.group(0) if m else text)[:120]
        out.append((lang, text))
    return out


def lid176() -> Classifier:
    return LanguageFilter(LanguageConfig()).classify


def py3langid() -> Classifier:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return lambda text: ident.classify(text)


def lingua() -> Classifier:
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()

    def classify(text: str) -> tuple[str, float]:
        top = detector.compute_language_confidence_values(text)[0]
        return top.language.iso_code_639_1.name.lower(), top.value
    return classify


MODELS: dict[str, tuple[str, Callable[[], Classifier]]] = {
    "lid.176 (lmpipe)": ("fasttext", lid176), "py3langid": ("py3langid", py3langid), "lingua (low)": ("lingua", lingua)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", action="store_true", help="first sentences instead of paragraphs")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    sample = read_sample(args.lines)
    langs = sorted({lang for lang, _ in sample})
    mb = sum(len(text.encode("utf-8")) for _, text in sample) / 1e6
    print(f"{len(sample)} {'lines' if args.lines else 'paragraphs'}, {len(langs)} languages, {mb:.3f} MB")
    results = {}
    for name, (module, make) in MODELS.items():
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed, skipped")
            continue
        classify = make()
        classify(sample[0][1])  # load before timing
        t0 = time.perf_counter()
        predicted = [classify(text) for _, text in sample]
        results[name] = (predicted, mb / (time.perf_counter() - t0))
    print(f"\n{'lang':6}" + "".join(f"{name:>18}" for name in results))
    for lang in langs:
        row = [sum(p[0] == lang for (g, _), p in zip(sample, pred) if g == lang) / sum(g == lang for g, _ in sample)
               for pred, _ in results.values()]
        print(f"{lang:6}" + "".join(f"{acc:>18.2f}" for acc in row))
    known = [(g, t) for g, t in sample if g != "nv"]  # Navajo: no model here knows it
    for label, ok in (("top-1 (no nv)", lambda g, p: p[0] == g),
                      (f"kept >= {MIN_SCORE} (no nv)", lambda g, p: p[0] == g and p[1] >= MIN_SCORE)):
        print(f"{label:22}"[:22] + "".join(
            f"{sum(ok(g, p) for (g, _), p in zip(sample, pred) if g != 'nv') / len(known):>14.3f}    "
            for pred, _ in results.values()))
    print(f"{'MB/s, one core':22}" + "".join(f"{speed:>14.2f}    " for _, speed in results.values()))


if __name__ == "__main__":
    main()
