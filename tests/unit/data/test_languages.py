"""Many languages: language id (ja vs zh, unknown codes), words of unspaced scripts, the web filters on 13 languages,
and on a text file of lines and one of pages read as a user's corpus is.

Text is real: paragraphs of the Universal Declaration of Human Rights (tests/fixtures/multilingual).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmpipe.artifacts import StageResult
from lmpipe.config.data import (
    LANGUAGE_ID_LABELS,
    C4Config,
    CleanConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
)
from lmpipe.config.loading import load_config
from lmpipe.data.filters import C4Filter, GopherQuality, LanguageFilter, language_identifier, tokens_and_words
from tests.conftest import REPO
from tests.unit.data.test_clean import clean, clean_files, documents, removed
from tests.unit.data.test_gutenberg import download

SAMPLE = REPO / "tests" / "fixtures" / "multilingual" / "udhr_sample.tsv"


def paragraphs(lang: str) -> list[str]:
    rows = [line.split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()[1:]]
    return [text for code, _, text in rows if code == lang]


# ---------------------------------------------------------------------------
# language id


def test_language_id_tells_japanese_from_chinese():
    f = LanguageFilter(LanguageConfig(languages=["ja", "zh"]))
    ja, zh = paragraphs("ja"), paragraphs("zh")
    # Every Japanese paragraph is Japanese; the first, a date line without kana, scores under 0.65.
    assert [f.label(t)[0] for t in ja] == ["ja"] * 20
    assert f.label(ja[0]) == ("ja", "language: ja scored 0.59 < 0.65")
    assert f.label("すべて人は自国においてひとしく公務につく権利を有する。") == ("ja", None)
    # Chinese, Simplified then Traditional: one Traditional paragraph of twenty is taken for Japanese.
    assert [f.label(t)[0] for t in zh] == ["zh"] * 18 + ["ja", "zh"]
    assert f.label("只有經男女雙方的自由的和完全的同意，才能締婚。") == ("zh", None)
    assert f.label("人人有权离开任何国家，包括其本国在内，并有权返回他的国家。") == ("zh", None)


def test_unknown_language_is_a_config_error_naming_it():
    with pytest.raises(ValidationError, match=r"'nv': not a language the language id model \(fastText lid\.176\) "
                                              r"knows, so no document would ever be kept as one; it knows af als"):
        LanguageConfig(languages=["en", "nv"])
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.clean.language.languages=[ja, xx, zh]"])
    assert "data.clean.language.languages" in str(err.value) and "'xx': not a language" in str(err.value)
    assert LanguageConfig(languages=["ja", "zh", "th", "yue", "ceb"]).languages == ["ja", "zh", "th", "yue", "ceb"]


def test_the_config_knows_exactly_the_models_labels():
    model = language_identifier()
    labels: set[str] = set()
    for text in ("", "x", "hello", "日本語", "ελληνικά"):
        labels |= {label.removeprefix("__label__") for label in model.predict(text, k=-1, threshold=-1.0)[0]}
    assert labels == LANGUAGE_ID_LABELS and len(labels) == 176


def test_language_id_downloads_nothing(tmp_path):
    """The model is read from inside the wheel: with no network and an empty home, nothing is fetched or cached."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    code = ("from lmpipe.config.data import LanguageConfig; from lmpipe.data.filters import LanguageFilter; "
            "print(LanguageFilter(LanguageConfig()).classify('Everyone has the right to life.')[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == "en\n"
    assert list((tmp_path / "home").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


# ---------------------------------------------------------------------------
# words


def test_words_of_chinese_japanese_thai_lines():
    zh = "人人有權離開任何國家，包括其本國在內，並有權返回他的國家。"
    assert tokens_and_words(zh, "zh")[1] == ["人人", "有權", "離開", "任何", "國家", "包括", "其", "本國", "在內",
                                           "並", "有權", "返回", "他的", "國家"]
    ja = "何人も、ほしいままに自己の財産を奪われることはない。"
    assert tokens_and_words(ja, "ja")[1] == ["何人", "も", "ほしい", "まま", "に", "自己", "の", "財産", "を", "奪",
                                           "われる", "こと", "は", "ない"]
    th = "คนทุกคนมีสิทธิในการดำรงชีวิต เสรีภาพ และความมั่นคงแห่งตัวตน"
    assert tokens_and_words(th, "th")[1] == ["คน", "ทุก", "คน", "มี", "สิทธิ", "ใน", "การ", "ดำรง", "ชีวิต", "เสรีภาพ",
                                           "และ", "ความ", "มั่นคง", "แห่ง", "ตัว", "ตน"]
    # Full-width punctuation separates words and is no token; other punctuation is a symbol token ('').
    assert tokens_and_words(zh, "zh")[0] == tokens_and_words(zh, "zh")[1]
    assert tokens_and_words("第217A(III)号决议", "zh")[0] == ["第", "217A", "", "III", "", "号", "决议"]
    # Without the language: Chinese and Japanese lines are a few "words" (what dropped them before); Thai falls
    # apart at its vowel signs, which \w does not match.
    assert len(tokens_and_words(zh)[1]) == 3 and len(tokens_and_words(ja)[1]) == 2 and len(tokens_and_words(th)[1]) == 13


def test_words_of_scripts_with_vowel_signs_and_beyond_the_bmp():
    hi = "प्रत्येक व्यक्ति को विचार और उसकी अभिव्यक्ति की स्वतन्त्रता का अधिकार है।"
    assert tokens_and_words(hi, "hi")[1] == ["प्रत्येक", "व्यक्ति", "को", "विचार", "और", "उसकी", "अभिव्यक्ति", "की",
                                           "स्वतन्त्रता", "का", "अधिकार", "है"]
    assert tokens_and_words(hi)[1][:3] == ["प", "रत", "य"]  # \w stops at every vowel sign and virama
    assert tokens_and_words("𠀋人人生而自由。", "zh")[1] == ["𠀋", "人", "人生", "而", "自由"]  # UTF-16 offsets


def test_english_words_do_not_change_with_the_language():
    text = "Don't stop: 10,000 e-mails... (see #3)"
    assert tokens_and_words(text, "en") == tokens_and_words(text, None) == tokens_and_words(text, "fr") == (
        ["Don't", "stop", "", "10,000", "e", "", "mails", "", "", "see", "", "3", ""],
        ["Don't", "stop", "10,000", "e", "mails", "see", "3"])


# ---------------------------------------------------------------------------
# rules per language


def test_gopher_quality_per_language():
    q = GopherQuality(GopherQualityConfig(min_words=10))
    zh = "人人有權離開任何國家，包括其本國在內，並有權返回他的國家。"
    assert q(zh) == (zh, "gopher_quality: 3 words < 10")
    assert q(zh, "zh") == (zh, None)  # 14 words; mean word length 1.6, a rule Chinese skips
    fr = paragraphs("fr")[12]
    assert q(fr) == (fr, "gopher_quality: 0 distinct stop words < 2")  # English stop words
    assert q(fr, "fr") == (fr, None)
    de_words = GopherQuality(GopherQualityConfig(min_words=10, stop_words=["der", "die", "und"],
                                                 stop_words_language="de"))
    assert de_words(fr, "fr") == (fr, None)
    assert de_words(paragraphs("de")[12], "de") == (paragraphs("de")[12], None)
    en = "It is said that the cat sat on the mat in the hall of the old house by the sea today."
    assert de_words(en, "en") == (en, None) and de_words(en) == (en, "gopher_quality: 0 distinct stop words < 2")


def test_c4_per_language():
    c4 = C4Filter(C4Config(min_sentences=1))
    zh = "人人有權離開任何國家，包括其本國在內，並有權返回他的國家。"
    assert c4(zh) == (zh, "c4: 0 sentences < 1 (0 of 1 lines kept)")  # one "word" on the line
    assert c4(zh, "zh") == (zh, None)
    th = "คนทุกคนมีสิทธิในการดำรงชีวิต เสรีภาพ และความมั่นคงแห่งตัวตน"  # Thai ends sentences with no mark
    assert c4(th, "th") == (th, None)
    assert c4(th, "ja") == (th, "c4: 0 sentences < 1 (0 of 1 lines kept)")
    el = "Ποιος έχει το δικαίωμα της ελευθερίας;"
    assert c4(el, "el") == (el, None) and c4(el, "ru") == (el, "c4: 0 sentences < 1 (0 of 1 lines kept)")
    two = "すべて人は自国においてひとしく公務につく権利を有する。何人も、ほしいままに自己の財産を奪われることはない。"
    assert C4Filter(C4Config(min_sentences=2))(two, "ja") == (two, None)
    assert C4Filter(C4Config(min_sentences=2))(two, "en")[1] == "c4: 0 sentences < 2 (0 of 1 lines kept)"


# ---------------------------------------------------------------------------
# the clean stage on thirteen languages with web junk mixed in

LANGUAGES = ["en", "fr", "de", "ro", "vi", "ru", "el", "ar", "hi", "ja", "zh", "ko", "th"]
JUNK = [
    "Home | About | Contact | Blog",
    "1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14. 15.",
    " ".join(["Buy cheap watches now, best prices online!"] * 6),
    "function init() { var x = 1; return x; } window.onload = init;",
    "今すぐ購入！" * 12,
    "首页 | 关于我们 | 联系我们 | 网站地图",
    "Главная | Новости | Контакты | Поиск",
    "หน้าแรก | เกี่ยวกับเรา | ติดต่อเรา",
    "0912 3456 7890 1234 5678 9012 3456 7890 1234 5678",
    "ホーム | 会社概要 | お問い合わせ | サイトマップ | プライバシーポリシー",
    "今すぐ購入してください！送料無料です。" * 8,
    "Цена: 100 руб., 200 руб., 300 руб., 400 руб., 500 руб., 600 руб., 700 руб.",
    "Cliquez ici pour vous abonner à notre lettre d'information",
]
WEB = dict(language=LanguageConfig(enabled=True, languages=LANGUAGES),
           gopher_repetition={"enabled": True}, gopher_quality={"enabled": True, "min_words": 10},
           c4={"enabled": True, "min_sentences": 1})


def test_web_filters_keep_thirteen_languages_and_drop_the_junk(tmp_path):
    # Article 19, freedom of opinion and expression; NFC as the clean stage makes it (the Vietnamese is not)
    article19 = [unicodedata.normalize("NFC", paragraphs(lang)[12]) for lang in LANGUAGES]
    texts = article19 + JUNK + [article19[0]]
    result = clean(tmp_path, [texts], **WEB)
    assert documents(result)["id"] == [f"t/0/{i}" for i in range(13)]
    assert documents(result)["text"] == article19
    listed = str(LANGUAGES)
    assert [(r["id"], r["reason"]) for r in removed(result)] == [
        ("t/0/13", "language: en scored 0.32 < 0.65"),
        ("t/0/14", f"language: cs (0.26) not in {listed}"),
        ("t/0/16", "language: en scored 0.13 < 0.65"),
        ("t/0/17", "language: zh scored 0.56 < 0.65"),
        ("t/0/21", "language: en scored 0.12 < 0.65"),
        ("t/0/24", "language: ru scored 0.45 < 0.65"),
        ("t/0/15", "gopher_repetition: characters in the top 3-gram 0.3502 > 0.18"),
        ("t/0/23", "gopher_repetition: characters in the top 3-gram 0.2632 > 0.18"),
        ("t/0/18", "gopher_quality: 7 words < 10"),
        ("t/0/19", "gopher_quality: 4 words < 10"),
        ("t/0/20", "gopher_quality: 7 words < 10"),
        ("t/0/22", "gopher_quality: 9 words < 10"),
        ("t/0/25", "gopher_quality: 9 words < 10"),
        ("t/0/26", "dedup: same text as t/0/0"),
    ]
    nbytes = {lang: len(text.encode()) for lang, text in zip(LANGUAGES, article19)}
    rows = {r["language"]: r for r in json.loads(result.path("clean_report.json").read_text())["languages"]}
    assert rows == {r["language"]: r for r in result.meta["languages"]}
    assert {lang: (r["docs_in"], r["docs_out"], r["bytes_out"]) for lang, r in rows.items()} == {
        **{lang: (1, 1, nbytes[lang]) for lang in LANGUAGES},
        "en": (6, 1, nbytes["en"]), "fr": (2, 1, nbytes["fr"]), "ru": (3, 1, nbytes["ru"]), "ja": (3, 1, nbytes["ja"]),
        "zh": (3, 1, nbytes["zh"]), "th": (2, 1, nbytes["th"]), "cs": (1, 0, 0)}
    assert rows["en"]["bytes_in"] == 2 * nbytes["en"] + sum(len(JUNK[i].encode()) for i in (0, 2, 3, 8))
    assert sum(r["bytes_in"] for r in rows.values()) == sum(len(t.encode()) for t in texts)


def test_without_language_id_the_rules_keep_only_english(tmp_path):
    """What the issue saw: split by spaces and judged by English stop words, every other language goes."""
    article19 = [unicodedata.normalize("NFC", paragraphs(lang)[12]) for lang in LANGUAGES]
    result = clean(tmp_path, [article19], **{**WEB, "language": LanguageConfig(enabled=False)})
    assert documents(result)["text"] == article19[:1]
    assert "languages" not in json.loads(result.path("clean_report.json").read_text())
    reasons = {r["id"]: r["reason"] for r in removed(result)}
    assert reasons["t/0/9"] == "gopher_quality: 2 words < 10"  # Japanese
    assert reasons["t/0/8"] == "gopher_quality: mean word length 1.409 < 3.0"  # Hindi cut at its vowel signs


# ---------------------------------------------------------------------------
# the same read from text files: one document a line, then pages of several lines


def read_and_clean(tmp_path: Path, lines: list[str], boundary: str, cfg: CleanConfig, name: str) -> StageResult:
    """Write ``lines`` to a .txt file, read it as a source with ``doc_boundary`` (the download stage), clean it."""
    root = tmp_path / name
    root.mkdir()
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = download(root, boundary, on=False, uri=root / "corpus.txt")
    return clean_files(root, [docs.path(chunk) for chunk in docs.meta["chunks"]], cfg)


LINE_LANGUAGES = ["en", "fr", "de", "ru", "el", "ar", "vi", "hi", "ja", "zh", "ko", "th"]  # 9 scripts
LINE_JUNK = {  # each junk line and the reason it is removed
    "Click here to subscribe to our newsletter": "gopher_quality: 7 words < 10",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua.": f"language: la (0.47) not in {LINE_LANGUAGES}",
    "Welcome to {{ site.name }}, the best place to find everything you need for your home and garden.":
        "c4: contains '{'",
    "{{ page.title }} | {{ site.name }} - {% include footer.html %}": "language: en scored 0.39 < 0.65",
    "ホーム | 会社概要 | お問い合わせ | サイトマップ | プライバシーポリシー": "gopher_quality: 9 words < 10",
    "Главная | Новости | Контакты | Поиск": "gopher_quality: 4 words < 10",
    "首页 | 关于我们 | 联系我们 | 网站地图": "gopher_quality: 7 words < 10",
    " ".join(["buy"] * 20): "gopher_repetition: characters in the top 2-gram 1.443 > 0.2",
    "#### ***** ===== ----- >>>>> <<<<< ##### *****": "language: de scored 0.17 < 0.65",
    "Please enable JavaScript in your browser to view this site and all of its content properly.":
        "c4: 0 sentences < 1 (0 of 1 lines kept)",
}
# The web filters at their defaults but for two thresholds a document of one line cannot meet: Gopher's 50 words
# (a web page's; these lines are one UDHR article each, the shortest 17 words, the Japanese) and C4's 5 sentences
# (an article is one or two).
LINE_WEB = CleanConfig(language=LanguageConfig(enabled=True, languages=LINE_LANGUAGES),
                       gopher_repetition=GopherRepetitionConfig(enabled=True),
                       gopher_quality=GopherQualityConfig(enabled=True, min_words=10),
                       c4=C4Config(enabled=True, min_sentences=1))


def test_a_file_of_lines_in_twelve_languages_keeps_each_language_and_drops_the_junk_between(tmp_path):
    natural = [paragraphs(lang)[12] for lang in LINE_LANGUAGES]  # article 19 in most; one paragraph a line
    junk = list(LINE_JUNK)
    lines = [line for i, text in enumerate(natural) for line in [text, *junk[i:i + 1]]]
    assert len(lines) == len(natural) + len(junk) and lines[-1] == natural[-1]
    result = read_and_clean(tmp_path, lines, "line", LINE_WEB, "lines")
    ids = [f"book/0/{n}" for n in range(len(lines))]  # one document a line, numbered in file order
    kept = documents(result)
    assert kept["id"] == [ids[lines.index(text)] for text in natural]
    assert kept["text"] == [unicodedata.normalize("NFC", text) for text in natural]  # the Vietnamese is not NFC
    assert {lines[ids.index(r["id"])]: r["reason"] for r in removed(result)} == LINE_JUNK
    assert len(removed(result)) == len(junk)


# Pages of several lines, junk lines of another language inside each: a Japanese page with English junk, an English
# page with Japanese junk. C4 removes lines by each page's language: a Japanese line is many words to ICU, so it
# stays, and 。 ends its sentences. Every threshold is at its default.
JA_PAGE = [paragraphs("ja")[3], paragraphs("ja")[4], "Click here to subscribe to our newsletter", paragraphs("ja")[5],
           paragraphs("ja")[6], "Please enable JavaScript to view this page.", paragraphs("ja")[7],
           "By using this site you agree to our cookie policy.", paragraphs("ja")[8]]
EN_PAGE = [paragraphs("en")[4], paragraphs("en")[5], "ホーム | 会社概要 | お問い合わせ | サイトマップ", paragraphs("en")[6],
           paragraphs("en")[7], "今すぐ購入してください！送料無料です。", paragraphs("en")[8], paragraphs("en")[9]]
PAGE_JUNK = {2, 5, 7}, {2, 5}  # the junk lines' indexes in each page


def test_c4_removes_junk_lines_inside_a_page_by_the_page_s_language(tmp_path):
    pages = [[line for i, line in enumerate(page) if i not in junk] for page, junk in zip([JA_PAGE, EN_PAGE],
                                                                                          PAGE_JUNK, strict=True)]
    web = CleanConfig(language=LanguageConfig(enabled=True, languages=["en", "ja"]),
                      gopher_repetition=GopherRepetitionConfig(enabled=True),
                      gopher_quality=GopherQualityConfig(enabled=True), c4=C4Config(enabled=True))
    result = read_and_clean(tmp_path, [*JA_PAGE, "", *EN_PAGE], "blank_line", web, "pages")
    assert documents(result)["text"] == ["\n".join(page) for page in pages]
    assert removed(result) == []
    c4 = next(row for row in result.meta["report"] if row["step"] == "c4")
    junk_bytes = sum(len(page[i].encode()) + 1 for page, junk in zip([JA_PAGE, EN_PAGE], PAGE_JUNK) for i in junk)
    assert (c4["docs_in"], c4["docs_out"], c4["bytes_in"] - c4["bytes_out"]) == (2, 2, junk_bytes)
    # C4 alone, without language id: the Japanese lines are a word or two each, so they go with the junk.
    alone = read_and_clean(tmp_path, [*JA_PAGE, "", *EN_PAGE], "blank_line", CleanConfig(c4=C4Config(enabled=True)),
                           "alone")
    assert documents(alone)["text"] == ["\n".join(pages[1])]
    assert [(r["id"], r["reason"]) for r in removed(alone)] == [("book/0/0", "c4: 0 sentences < 5 (0 of 9 lines kept)")]


def test_sample_fixture_is_what_its_readme_says():
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "lang\tudhr_file\ttext" and len(lines) == 441
    counts = {lang: len(paragraphs(lang)) for lang in sorted({line.split("\t")[0] for line in lines[1:]})}
    assert counts == {**dict.fromkeys(["ar", "de", "el", "en", "es", "fr", "he", "hi", "it", "ja", "ko", "nl", "nv",
                                       "pl", "pt", "ro", "ru", "th", "tr", "uk", "vi"], 20), "zh": 20}
    assert Path(SAMPLE).stat().st_size < 200_000


def test_c4_counts_an_unspaced_line_s_words_without_its_citation_markers():
    from lmpipe.config.data import C4Config
    from lmpipe.data.filters import C4Filter, split_words

    assert split_words("你好。[1][2]", "zh") == ["你好", "1", "2"]  # ICU makes words of the markers' digits
    c4 = C4Filter(C4Config(enabled=True, min_words_per_line=3, min_sentences=0))
    assert c4("你好。[1][2]", "zh") == ("", None)  # one word once the citations go: the line is dropped
    assert c4("我们今天去公园散步。", "zh")[0] == "我们今天去公园散步。"
