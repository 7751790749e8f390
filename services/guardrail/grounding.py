"""Term overlap between texts: is a question on the topic of the passages, is an answer
supported by them?

Both checks compare *content terms*: lower-cased words with stopwords removed and the
rest stemmed (Snowball English via PyStemmer when installed, a crude suffix stripper
otherwise), plus numbers normalized so "1,200" equals "1200". No model, no corpus
statistics: this is a cheap lexical check that catches answers that wander off the
retrieved text or invent figures, not a judge of paraphrase or entailment.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

from shared.schema import Passage

try:  # optional: a proper stemmer
    import Stemmer as _PyStemmer

    _STEMMER = _PyStemmer.Stemmer("english")
    _STEMMER.maxCacheSize = 20_000

    def _stem_all(words: list[str]) -> list[str]:
        return _STEMMER.stemWords(words)

except ImportError:  # pragma: no cover - PyStemmer is a declared dependency of the mesh

    _SUFFIXES = ("ational", "ization", "fulness", "ousness", "iveness", "ingly", "ments", "ement", "ness",
                 "ment", "ings", "ing", "ies", "edly", "ed", "ly", "es", "s")  # fmt: skip

    def _crude_stem(word: str) -> str:
        for suffix in _SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                return word[: -len(suffix)]
        return word

    def _stem_all(words: list[str]) -> list[str]:
        return [_crude_stem(word) for word in words]


# English function words, question words and the chit-chat an assistant wraps answers in
# ("Hope that helps!"): none of them says what a sentence is about.
STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are aren't as at be because been before being
    below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down
    during each either else etc even ever every few for from further get gets getting got had hadn't has
    hasn't have haven't having he her here hers herself him himself his how however i i'd i'll i'm i've if
    in into is isn't it it's its itself just let let's like ll may me might mine more most much must my
    myself need needs no nor not now of off often on once one only or other others otherwise our ours
    ourselves out over own per please quite rather re really s same shall she should shouldn't so some
    such than that that's the their theirs them themselves then there there's these they they'd they'll
    they're they've this those though through thus to too under until up upon us use used using usually
    ve very via was wasn't we we'd we'll we're we've were weren't what what's when where where's whether
    which while who who's whom whose why will with within without won't would wouldn't yes yet you you'd
    you'll you're you've your yours yourself yourselves
    tell know want wants think thanks thank hope helps help happy glad sure okay ok feel free ask anything
    else great good question questions answer answers note course maybe perhaps certainly definitely
    """.split()
)

# Citation markers an answer carries: [1], [2, 3], [1-3], [^1], 【1】, [source: x.md].
_CITATION = re.compile(r"\[\^?\d+(?:\s*[,;–-]\s*\d+)*\]|【\d+】|\[(?:source|src|doc)s?:[^\]]{0,200}\]", re.I)
# A word, or a number with thousands separators or decimals.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_ZERO_DECIMALS = re.compile(r"(?:(\.\d*?[1-9])|\.)0+$")  # 1299.00 -> 1299, 1.50 -> 1.5
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[.,;:!?])")
# Sentence ends: ., ! or ? followed by space and something that starts a sentence; line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\n+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
# Sentences with fewer content terms than this are not judged ("Sure!", "Hope that helps.").
MIN_TERMS = 2


def _fold(text: str) -> str:
    return (unicodedata.normalize("NFKC", text) if not text.isascii() else text).lower()


def _raw_terms(text: str) -> list[str]:
    words = []
    for token in _TOKEN.findall(_fold(text)):
        if token[0].isdigit():
            number = _THOUSANDS.sub("", token).replace(",", ".")
            words.append(_ZERO_DECIMALS.sub(r"\1", number) if "." in number else number)
        elif len(token) > 1 and token not in STOPWORDS:
            words.append(token.replace("'", ""))
    return words


_PLACEHOLDER = re.compile(r"\[REDACTED_[A-Z_]+\]")


def content_terms(text: str) -> list[str]:
    """Stemmed content words and numbers of `text`, in order, with repeats.

    Redaction placeholders are not words of the question: they never count.
    """
    words = _raw_terms(_PLACEHOLDER.sub(" ", text))
    numbers = {index for index, word in enumerate(words) if word[0].isdigit()}
    stems = _stem_all([word for index, word in enumerate(words) if index not in numbers])
    out, stem_iter = [], iter(stems)
    for index, word in enumerate(words):
        out.append(word if index in numbers else next(stem_iter))
    return out


@lru_cache(maxsize=512)
def _term_set(text: str) -> frozenset[str]:
    """Cached: the same passages are compared with every sentence of an answer."""
    return frozenset(content_terms(text))


def _passage_text(passage: Passage | str) -> str:
    if isinstance(passage, str):
        return passage
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def strip_citations(text: str) -> str:
    return _SPACE_BEFORE_PUNCT.sub("", _CITATION.sub("", text))


def split_sentences(text: str) -> list[str]:
    """Sentences and list items of `text`, citation markers removed, empty pieces dropped."""
    sentences = []
    for piece in _SENTENCE_END.split(strip_citations(text)):
        piece = _BULLET.sub("", piece).strip()
        if piece:
            sentences.append(piece)
    return sentences


def term_overlap(question: str, passages: Iterable[Passage | str]) -> tuple[float, list[str]]:
    """Share of the question's distinct content terms found in any of `passages`, and the
    terms found. (1.0, []) when the question has no content terms to compare."""
    wanted = _term_set(question)
    if not wanted:
        return 1.0, []
    available: set[str] = set()
    for passage in passages:
        available |= _term_set(_passage_text(passage))
    found = sorted(wanted & available)
    return len(found) / len(wanted), found


def sentence_support(sentence: str, passages: Sequence[Passage | str]) -> float | None:
    """The largest share of the sentence's content terms that one passage contains, or
    None when the sentence has too few terms to judge.

    Only passages that contain every number the sentence states count: an invented price
    or torque value is exactly what this check is for, and it changes one term of many.
    """
    terms = _term_set(sentence)
    if len(terms) < MIN_TERMS:
        return None
    numbers = {term for term in terms if term[0].isdigit()}
    best = 0.0
    for passage in passages:
        available = _term_set(_passage_text(passage))
        if numbers <= available:
            best = max(best, len(terms & available) / len(terms))
    return best


def groundedness(
    answer: str, passages: Sequence[Passage | str], *, threshold: float = 0.5
) -> tuple[float, list[str]]:
    """(supported share of the answer's sentences, the unsupported sentences in order).

    A sentence is supported when at least `threshold` of its content terms occur in one
    passage and every number it states occurs there too. Sentences with fewer than
    MIN_TERMS content terms are not judged; an answer with none scores 1.0.
    """
    judged, unsupported = 0, []
    for sentence in split_sentences(answer):
        support = sentence_support(sentence, passages)
        if support is None:
            continue
        judged += 1
        if support < threshold:
            unsupported.append(sentence)
    if judged == 0:
        return 1.0, []
    return (judged - len(unsupported)) / judged, unsupported
