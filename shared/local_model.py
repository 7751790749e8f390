"""The embedded local generator: extractive, deterministic, no network.

It is what the mesh answers with when no model is configured or reachable: it picks
sentences out of the retrieved passages (and cites them) instead of writing new text.
Every task runs in well under a few milliseconds on a handful of passages.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from shared.generation import Generation, estimate_tokens
from shared.schema import ChatMessage, Passage, Usage

try:  # stemming makes "lubricate" meet "lubrication"; without PyStemmer terms match exactly
    import Stemmer

    _STEMMER = Stemmer.Stemmer("english")
except ImportError:  # pragma: no cover - depends on the environment
    _STEMMER = None

LOCAL_MODEL = "local-extractive"
NOT_FOUND = "I could not find an answer to that in the knowledge base."
DEFAULT_LABELS = ("complaint", "question", "praise", "other")
TASKS = ("answer", "chat", "summarize", "rewrite", "classify")

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves also get got may might must shall us one tell know want need please thanks thank
    s t d ll m re ve""".split()
)
# Words too vague to tie a sentence to a question ("how often ...", "what is the best way ...").
VAGUE = frozenset(
    """often usually always never sometimes best better good way ways like make makes made take use used
    using much many long really thing things something anything lot kind sort well still even""".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_BULLET = re.compile(r"^\s*(?:[-*•#>]+|\d+[.)])\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "approx.", "dr.", "mr.", "mrs.", "ms.", "no.", "fig.", "st.")
_MIN_WORDS = 3  # shorter fragments are headings, not answers

# Share of the best sentence's score another sentence needs to join the answer.
_SUPPORT_RATIO = 0.5
# Share of the question (idf-weighted) the best sentence must cover: one shared word like
# "bike" in "who won the Tour de France bike race?" is not an answer.
_MIN_COVERAGE = 0.3
# Questions about amounts ("how often", "what pressure", "how many days") are answered by
# sentences with figures in them.
_QUANTITY_QUESTION = re.compile(r"\b(how (often|many|much|long|far|heavy|big)|what (pressure|size|weight|price|range)|when should)\b", re.I)
_FIGURE = re.compile(r"\d")
_QUANTITY_BONUS = 1.4


# -- text utilities ----------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _stem(word: str) -> str:
    return _STEMMER.stemWord(word) if _STEMMER is not None else word


# Irregular forms a suffix stemmer cannot join to their verb ("is it worn?" / "chain wear").
IRREGULAR = {
    "worn": "wear", "wore": "wear", "bought": "buy", "ridden": "ride", "rode": "ride", "broke": "break",
    "broken": "break", "chose": "choose", "chosen": "choose", "fell": "fall", "fallen": "fall",
    "paid": "pay", "sent": "send", "spent": "spend", "stolen": "steal", "stole": "steal", "tore": "tear",
    "torn": "tear", "froze": "freeze", "frozen": "freeze", "lost": "lose", "kept": "keep", "left": "leave",
}


_REDACTED = re.compile(r"\[REDACTED_[A-Z_]+\]")


def terms(text: str) -> list[str]:
    """Lower-cased, stemmed content words of `text`, stopwords removed, in order."""
    out = []
    for word in _WORD.findall(_REDACTED.sub(" ", text).lower()):
        word = word.split("'", 1)[0]  # "chain's" -> "chain"
        word = IRREGULAR.get(word, word)
        if word and word not in STOPWORDS and word not in VAGUE and (len(word) > 1 or word.isdigit()):
            out.append(_stem(word))
    return out


def split_sentences(text: str) -> list[str]:
    """Readable sentences: lines first (bullets; markdown headings are dropped), then punctuation."""
    sentences: list[str] = []
    for line in _lines(text):
        if line.lstrip().startswith("#"):
            continue  # a heading names a topic; it answers nothing
        line = " ".join(_BULLET.sub("", line).split())
        if not line:
            continue
        sentences.extend(_join_abbreviations(_SENTENCE_END.split(line)))
    return [sentence for sentence in sentences if sentence]


def _lines(text: str) -> list[str]:
    """Logical lines: a line wrapped mid-sentence (next starts lower-case) is joined back."""
    lines: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            lines.append("")
        elif lines and lines[-1] and stripped[0].islower() and lines[-1][-1] not in ".!?:":
            lines[-1] = f"{lines[-1]} {stripped}"
        else:
            lines.append(stripped)
    return [line for line in lines if line]


def _join_abbreviations(pieces: list[str]) -> list[str]:
    """Undo splits after "e.g." and friends, which end in a period but not a sentence."""
    out: list[str] = []
    for piece in pieces:
        if out and out[-1].split()[-1].lower() in _ABBREVIATIONS:  # whole word: "rust." is not "st."
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece.strip())
    return out


def _finish(sentence: str) -> str:
    """A sentence that ends with punctuation, so joined sentences read as prose."""
    sentence = sentence.strip()
    return sentence if not sentence or sentence[-1] in ".!?" else f"{sentence}."


def _cite(sentence: str, number: int) -> str:
    """Put the marker before the final punctuation: "... 80 psi [1]."."""
    sentence = _finish(sentence)
    return f"{sentence[:-1]} [{number}]{sentence[-1]}"


def _capitalise(sentence: str) -> str:
    for index, char in enumerate(sentence):
        if char.isalpha():
            return sentence[:index] + char.upper() + sentence[index + 1 :]
    return sentence


def _instruction_body(question: str, verbs: str) -> str:
    """The text after an instruction like "Summarize this: ...", or after the first colon/newline."""
    match = re.match(rf"\s*(?:please\s+)?(?:{verbs})\b[^:\n]*[:\n]\s*(.*)", question, re.IGNORECASE | re.DOTALL)
    if match:
        return match.group(1).strip()
    for separator in (":", "\n"):
        if separator in question:
            return question.split(separator, 1)[1].strip()
    return question.strip()


# -- answer --------------------------------------------------------------------------------


@dataclass
class _Candidate:
    passage: int  # 0-based position in the passage list
    position: int  # sentence position inside the passage
    text: str
    terms: frozenset[str]
    score: float = 0.0
    coverage: float = 0.0


def _candidates(passages: Sequence[Passage]) -> list[_Candidate]:
    candidates = []
    for index, passage in enumerate(passages):
        for position, sentence in enumerate(split_sentences(passage.text)):
            if len(sentence.split()) >= _MIN_WORDS:
                candidates.append(_Candidate(index, position, sentence, frozenset(terms(sentence))))
    return candidates


def _passage_weights(passages: Sequence[Passage]) -> list[float]:
    """Trust earlier and higher-scored passages more, without letting rank override content."""
    best = max((passage.score for passage in passages), default=0.0)
    weights = []
    for rank, passage in enumerate(passages):
        relative = passage.score / best if best > 0 else 1.0
        weights.append((0.7 + 0.3 * max(0.0, relative)) / (1 + 0.1 * rank))
    return weights


def _query_weights(question: str, history: Sequence[ChatMessage]) -> dict[str, float]:
    """Question terms count fully; the previous user turn helps follow-ups ("and the rear one?")."""
    weights: dict[str, float] = {}
    previous = next((turn.content for turn in reversed(history) if turn.role == "user" and turn.content != question), "")
    for term in terms(previous):
        weights[term] = 0.3
    for term in terms(question):
        weights[term] = 1.0
    return weights


def _score(candidates: list[_Candidate], query: dict[str, float], passage_weights: list[float]) -> None:
    # Rare terms say more about which sentence answers: idf over the candidate sentences.
    document_frequency = Counter(term for candidate in candidates for term in candidate.terms)
    total = len(candidates)
    # A question term found nowhere counts as rarest: it is part of what was asked.
    idf = {term: math.log(1 + total / max(1, document_frequency[term])) for term in query}
    query_mass = sum(query[term] * idf[term] for term in query) or 1.0
    for candidate in candidates:
        matched = [term for term in query if term in candidate.terms]
        if not any(query[term] >= 1.0 for term in matched):
            continue  # history alone does not make a sentence an answer
        overlap = sum(query[term] * idf[term] for term in matched)
        coverage = candidate.coverage = overlap / query_mass
        # Long sentences match more by chance; soften that a little.
        length_penalty = 1 / (1 + 0.02 * max(0, len(candidate.terms) - 12))
        candidate.score = overlap * (1 + coverage) * length_penalty * passage_weights[candidate.passage]


def _select(candidates: list[_Candidate], limit: int) -> list[_Candidate]:
    ranked = sorted((c for c in candidates if c.score > 0), key=lambda c: (-c.score, c.passage, c.position))
    if not ranked or max(c.coverage for c in ranked) < _MIN_COVERAGE:
        return []
    chosen: list[_Candidate] = []
    for candidate in ranked:
        if len(chosen) >= limit:
            break
        # A supporting sentence must carry a good part of what the best one answers, not one stray word.
        if chosen and (candidate.score < _SUPPORT_RATIO * chosen[0].score or candidate.coverage < 0.6 * chosen[0].coverage):
            continue
        if any(_near_duplicate(candidate, other) for other in chosen):
            continue
        chosen.append(candidate)
    return chosen


def _with_follow_on(chosen: list[_Candidate], candidates: list[_Candidate], query: dict[str, float], limit: int) -> list[_Candidate]:
    """Add the sentence after the best one when it stays on the question.

    Writers often state the topic, then the specifics ("Hydraulic brakes use one of two
    fluids. Shimano brakes use mineral oil."); the second sentence is the answer.
    """
    best = chosen[0]
    follow = next((c for c in candidates if c.passage == best.passage and c.position == best.position + 1), None)
    if follow is None or follow in chosen or len(chosen) >= limit:
        return chosen
    if not any(query.get(term, 0) >= 1.0 for term in follow.terms):
        return chosen
    return [*chosen, follow]


def _near_duplicate(a: _Candidate, b: _Candidate) -> bool:
    if a.text.lower() == b.text.lower():
        return True
    union = a.terms | b.terms
    return bool(union) and len(a.terms & b.terms) / len(union) > 0.8


def _compose(chosen: list[_Candidate]) -> str:
    """Best passage first; sentences of one passage in reading order, cited once per run."""
    best_of: dict[int, float] = {}
    for candidate in chosen:
        best_of[candidate.passage] = max(best_of.get(candidate.passage, 0.0), candidate.score)
    ordered = sorted(chosen, key=lambda c: (-best_of[c.passage], c.passage, c.position))
    parts = []
    for index, candidate in enumerate(ordered):
        last_of_run = index + 1 == len(ordered) or ordered[index + 1].passage != candidate.passage
        text = _capitalise(candidate.text)
        parts.append(_cite(text, candidate.passage + 1) if last_of_run else _finish(text))
    return " ".join(parts)


# -- summarize / rewrite / classify / chat -----------------------------------------------------


def central_sentences(sentences: Sequence[str], max_sentences: int = 3) -> list[int]:
    """Indexes of the 2-3 most central sentences (cosine to the term-frequency centroid), in order."""
    limit = max(1, min(2 if len(sentences) <= 5 else 3, max_sentences))
    if len(sentences) <= limit:
        return list(range(len(sentences)))
    vectors = [Counter(terms(sentence)) for sentence in sentences]
    centroid: Counter[str] = Counter()
    for vector in vectors:
        centroid.update(vector)
    centroid_norm = math.sqrt(sum(count * count for count in centroid.values())) or 1.0

    def centrality(vector: Counter[str]) -> float:
        norm = math.sqrt(sum(count * count for count in vector.values()))
        if not norm:
            return 0.0
        return sum(count * centroid[term] for term, count in vector.items()) / (norm * centroid_norm)

    ranked = sorted(range(len(sentences)), key=lambda i: (-centrality(vectors[i]), i))
    return sorted(ranked[:limit])


def summarize_text(text: str, max_sentences: int = 3) -> list[str]:
    """An extractive summary of `text`: its most central sentences, in original order."""
    sentences = split_sentences(text)
    return [sentences[i] for i in central_sentences(sentences, max_sentences)]


_CONTRACTIONS = {
    "can't": "cannot", "won't": "will not", "shan't": "shall not", "ain't": "is not", "let's": "let us",
    "it's": "it is", "that's": "that is", "there's": "there is", "what's": "what is", "here's": "here is",
    "he's": "he is", "she's": "she is", "who's": "who is", "where's": "where is", "how's": "how is",
    "i'm": "I am",
}
_SUFFIXES = {"n't": " not", "'re": " are", "'ve": " have", "'ll": " will", "'d": " would"}
_SPLIT_POINTS = ("; ", ", but ", ", so ", ", and ")
_LONG_SENTENCE_WORDS = 25


def _expand_contractions(text: str) -> str:
    def whole(match: re.Match[str]) -> str:
        word = match.group(0)
        expanded = _CONTRACTIONS[word.lower().replace("’", "'")]
        return expanded[0].upper() + expanded[1:] if word[0].isupper() else expanded

    text = re.sub(r"\b(?:%s)\b" % "|".join(re.escape(k) for k in _CONTRACTIONS), whole, text.replace("’", "'"), flags=re.I)
    for suffix, expansion in _SUFFIXES.items():
        text = re.sub(rf"(\w){re.escape(suffix)}\b", rf"\1{expansion}", text, flags=re.I)
    return text


def _split_long(sentence: str) -> list[str]:
    """Break a run-on sentence at the clause boundary nearest its middle."""
    words = sentence.split()
    if len(words) <= _LONG_SENTENCE_WORDS:
        return [sentence]
    middle = len(sentence) / 2
    best: tuple[float, int, str] | None = None
    for point in _SPLIT_POINTS:
        for match in re.finditer(re.escape(point), sentence):
            left, right = sentence[: match.start()], sentence[match.end() :]
            if len(left.split()) >= 6 and len(right.split()) >= 6:
                distance = abs(match.start() - middle)
                if best is None or distance < best[0]:
                    best = (distance, match.start(), point)
    if best is None:
        return [sentence]
    _, start, point = best
    left, right = sentence[:start], sentence[start + len(point) :]
    if point.strip(", ") in ("but", "so"):  # keep the contrast / consequence word
        right = f"{point.strip(', ')} {right}"
    return _split_long(_finish(left)) + _split_long(_capitalise(right))


def rewrite_text(text: str) -> str:
    """A light, rule-based clean-up standing in for a model's rewrite: whitespace normalised,
    contractions expanded, run-on sentences split, sentences capitalised and punctuated.
    It does not rephrase; a configured model does that far better."""
    text = _expand_contractions(" ".join(text.split()))
    text = re.sub(r"(?<![\w.'])i(?![\w'])(?!\.\w)", "I", text)  # "i" -> "I", but not in "i.e."
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "word ," -> "word,"
    text = re.sub(r",(?=[A-Za-z])", ", ", text)  # "word,next" -> "word, next"
    sentences = []
    # Split loosely (lower-case starts too) so that every sentence gets capitalised.
    for sentence in _join_abbreviations(re.split(r"(?<=[.!?])\s+", text)):
        sentences.extend(_split_long(_capitalise(sentence)))
    return " ".join(_finish(_capitalise(sentence)) for sentence in sentences)


# Cue words and phrases per well-known label (stemmed at lookup); unknown labels match their own name.
_CUES: dict[str, tuple[str, ...]] = {
    "complaint": (
        "broken", "broke", "terrible", "awful", "disappointed", "disappointing", "refund", "worst", "faulty",
        "damaged", "defective", "unacceptable", "angry", "complain", "poor", "useless", "late", "never arrived",
        "not working", "doesn't work", "does not work", "stopped working", "waste", "rude", "wrong", "problem",
    ),
    "question": ("how", "what", "why", "when", "where", "which", "who", "can i", "could you", "is it", "do you", "does"),
    "praise": (
        "great", "love", "loved", "excellent", "amazing", "fantastic", "awesome", "perfect", "happy", "thank",
        "thanks", "recommend", "best", "brilliant", "wonderful", "impressed", "superb", "smooth",
    ),
}
_CATCH_ALL = ("other", "none", "unknown", "misc")


def _cue_terms(cue: str) -> tuple[str, ...]:
    # Keep stopwords here: "how", "does", "not" are exactly the cues that matter.
    return tuple(_stem(word) for word in _WORD.findall(cue.lower()))


def classify_text(text: str, labels: Sequence[str]) -> str:
    """The label with the most cue words in `text`; a catch-all label (or the first) when none match."""
    words = tuple(_stem(word) for word in _WORD.findall(text.lower()))
    joined = f" {' '.join(words)} "
    scores = {}
    for label in labels:
        cues = _CUES.get(label.lower(), (label,))
        scores[label] = sum(joined.count(f" {' '.join(_cue_terms(cue))} ") for cue in cues)
    question = next((label for label in labels if label.lower() == "question"), None)
    if question is not None and text.rstrip().endswith("?"):
        scores[question] += 2  # a question mark is the strongest cue there is
    best = max(scores.values(), default=0)
    if best <= 0:
        return next((label for label in labels if label.lower() in _CATCH_ALL), labels[0])
    return next(label for label in labels if scores[label] == best)  # ties go to the earlier label


_GREETING = re.compile(r"^\s*(hi|hello|hey|hiya|howdy|yo|good (morning|afternoon|evening)|greetings)\b", re.I)
_THANKS = re.compile(r"\b(thanks|thank you|thx|cheers|much appreciated)\b", re.I)
_HOW_ARE_YOU = re.compile(r"\bhow are (you|u)\b|\bhow('s| is) it going\b|\bhow do you do\b", re.I)
_GOODBYE = re.compile(r"^\s*(bye|goodbye|see you|see ya|good night)\b", re.I)
_HELP_OFFER = "I can help with questions about bikes: maintenance, repairs, parts and riding. What would you like to know?"


def chat_reply(message: str) -> str:
    """Small talk without passages: a fixed friendly line per kind of message."""
    if _HOW_ARE_YOU.search(message):
        return "I'm doing well, thanks for asking! How can I help with your bike today?"
    if _THANKS.search(message):
        return "You're welcome! Let me know if there's anything else I can help with."
    if _GOODBYE.search(message):
        return "Goodbye, and enjoy the ride!"
    if _GREETING.search(message):
        return "Hello! How can I help with your bike today?"
    return _HELP_OFFER


# -- the generator ------------------------------------------------------------------------------


class LocalExtractive:
    """A deterministic, offline stand-in for a language model."""

    provider = "local"

    def __init__(self, model: str = LOCAL_MODEL):
        self.model = model

    def generate(
        self,
        question: str,
        passages: Sequence[Passage],
        *,
        task: str = "answer",
        history: Sequence[ChatMessage] = (),
        max_sentences: int = 3,
        labels: Sequence[str] | None = None,
    ) -> Generation:
        """Run one task; usage is estimated (about four characters per token).

        answer     the best 1..max_sentences passage sentences, cited as [n] (1-based passage order),
                   or NOT_FOUND with grounded=False when nothing in the passages matches
        chat       a fixed friendly reply to small talk
        summarize  the most central sentences of the text after the instruction (or of the passages)
        rewrite    a rule-based clean-up of the text after the instruction
        classify   "Label: <one of labels>" by cue words (default: complaint/question/praise/other)
        """
        if task == "answer":
            text, citations = self._answer(question, passages, history, max_sentences)
        elif task == "chat":
            text, citations = chat_reply(question), []
        elif task == "summarize":
            text, citations = self._summarize(question, passages, max_sentences)
        elif task == "rewrite":
            text, citations = self._rewrite(question)
        elif task == "classify":
            body = _instruction_body(question, r"classify|categori[sz]e|label")
            text, citations = f"Label: {classify_text(body, list(labels or DEFAULT_LABELS))}", []
        else:
            raise ValueError(f"unknown task {task!r}; the local generator does {', '.join(TASKS)}")
        # Only an answer can fail to be backed by the knowledge base; the other tasks work on given text.
        grounded = not (task == "answer" and not citations)
        return self._generation(text, citations, grounded, question, passages, history)

    def _answer(
        self, question: str, passages: Sequence[Passage], history: Sequence[ChatMessage], max_sentences: int
    ) -> tuple[str, list[int]]:
        candidates = _candidates(passages)
        query = _query_weights(question, history)
        if not candidates or not query:
            return NOT_FOUND, []
        _score(candidates, query, _passage_weights(passages))
        if _QUANTITY_QUESTION.search(question):
            for candidate in candidates:
                if _FIGURE.search(candidate.text):
                    candidate.score *= _QUANTITY_BONUS
        chosen = _select(candidates, max(1, max_sentences))
        if not chosen:
            return NOT_FOUND, []
        chosen = _with_follow_on(chosen, candidates, query, max(1, max_sentences) + 1)
        return _compose(chosen), sorted({candidate.passage + 1 for candidate in chosen})

    def _summarize(self, question: str, passages: Sequence[Passage], max_sentences: int) -> tuple[str, list[int]]:
        body = _instruction_body(question, r"summari[sz]e|summary|sum up|tl;?dr")
        if (body and body != question.strip()) or not passages:
            sentences = summarize_text(body, max_sentences)
            return (" ".join(_finish(s) for s in sentences) or "There is nothing to summarize."), []
        # Only an instruction was given ("summarize the passages"): summarize what was retrieved.
        origin = [(index, sentence) for index, p in enumerate(passages) for sentence in split_sentences(p.text)]
        picked = [origin[i] for i in central_sentences([sentence for _, sentence in origin], max_sentences)]
        chosen = [_Candidate(index, position, sentence, frozenset()) for position, (index, sentence) in enumerate(picked)]
        return _compose(chosen), sorted({index + 1 for index, _ in picked})

    def _rewrite(self, question: str) -> tuple[str, list[int]]:
        """A stand-in for a model: see `rewrite_text` for the rules it applies."""
        body = _instruction_body(question, r"rewrite|rephrase|paraphrase|reword|improve|clean up|fix")
        return (rewrite_text(body) or "There is nothing to rewrite."), []

    def _generation(
        self,
        text: str,
        citations: list[int],
        grounded: bool,
        question: str,
        passages: Sequence[Passage],
        history: Iterable[ChatMessage],
    ) -> Generation:
        prompt = [question, *(passage.text for passage in passages), *(turn.content for turn in history)]
        usage = Usage(
            input_tokens=sum(estimate_tokens(part) for part in prompt),
            output_tokens=estimate_tokens(text),
            estimated=True,
        )
        return Generation(
            text=text,
            model=self.model,
            provider=self.provider,
            usage=usage,
            citations=citations,
            finish_reason="stop",
            grounded=grounded,
        )
