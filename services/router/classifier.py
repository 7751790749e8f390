"""The routing brain: which route a request belongs to, and how complex it is.

Plain Python, no NATS. Two questions are answered here:

* `RouteClassifier` learns routes from the labeled `examples` each route carries in
  the config (plus its `hints`, as weak hints) and returns a probability
  for every route. The default backend is TF-IDF (word 1-2 grams and char_wb 2-5
  grams) with a logistic regression: deterministic, trains in well under a second
  on a few hundred examples and predicts in well under a millisecond.
* `complexity()` scores how demanding a request is from transparent features
  (length, several questions, multi-part markers, reasoning words, constraints),
  so that a route with `escalate_to` can hand hard requests to a stronger route.

Requests such as "summarize: <pasted text>" carry a payload whose words say
nothing about the route (a pasted review is full of product words). The classifier
therefore looks at the *instruction* part of the text: quoted passages and the long
tail after an instruction's colon are replaced by a marker token (`focus_text`).

Probabilities are made usable against `routing.min_confidence` in two ways: the
softmax temperature is fitted by cross-validation over the examples at train time
(raw probabilities from a dozen examples per route are far too flat), and there is
no intercept, so the number of examples a route happens to have is not a prior and
text unlike every example gets a flat, unconfident distribution.

The embeddings backend (`backend="embeddings"`) adds sentence embeddings from the
static embedder in shared/embedder.py (all-MiniLM-L6-v2 distilled once; numpy only at
run time) to the TF-IDF features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from services.router.learning import Row, Tfidf, char_wb_ngrams, fit_softmax, gram, join_rows, primal, stratified_folds, word_ngrams

if TYPE_CHECKING:
    from shared.config import MeshConfig

BACKENDS = ("tfidf", "embeddings")

# A keyword is one word, not a sentence: it should nudge, not outvote real examples.
KEYWORD_WEIGHT = 0.5
# Few examples per route: a weak penalty lets the model commit to confident
# probabilities, which min_confidence then thresholds meaningfully.
TFIDF_C = 20.0
EMBEDDINGS_C = 20.0
EMBEDDINGS_SCALE = 0.75  # weight of the embedding block against the two TF-IDF blocks (session 3: best on the dev part and on 5-fold CV over the examples)
RANDOM_STATE = 0
# No intercept: how many examples a route has is an authoring accident, not a traffic
# prior, and text sharing nothing with any example gets a flat (unconfident) distribution.
PAYLOAD_MARKER = "xxpayload"


class BackendUnavailable(RuntimeError):
    """The requested classifier backend cannot run on this machine; the message says what to install."""


# ---------------------------------------------------------------------------
# The instruction part of a request


# A quoted passage opens after a space, colon or bracket and closes before a space,
# punctuation or the end, so apostrophes inside words ("it's") do not end it.
_QUOTED = re.compile(r"""(?:^|(?<=[\s:(\-]))['"\u2018\u201c](.+?)['"\u2019\u201d](?=[\s.,;!?)]|$)""", re.S)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_FIRST_BREAK = re.compile(r":\s*|[.!?]+\s+")
_POINTS_AT = re.compile(r"\b(this|these|the following|below|here)\b", re.I)
_MATERIAL = r"(text|message|e-?mail|notes?|reviews?|post|thread|paragraph|sentence|article|blurb|description|announcement|letter|reply|ticket|feedback|comments?|list|ad|chat|conversation|report|newsletter|instructions?)"
_NAMES_MATERIAL = re.compile(rf"\b(this|these|the following|that|my)\s+(\w+\s+){{0,2}}{_MATERIAL}\b", re.I)
MIN_QUOTED_WORDS = 4
MIN_PAYLOAD_WORDS = 8
# After a text-task verb pointing at material ("turn this into ...:"), even a short tail is the material.
MIN_TASK_PAYLOAD_WORDS = 2
_TASK_VERB = re.compile(
    r"^\s*(?:(?:please|can you|could you|would you|pls)\s+)?(?:rewrite|rephrase|reword|paraphrase|turn|make|label|tag|classify|"
    r"categori[sz]e|sort|group|summari[sz]e|sum up|shorten|condense|translate|proofread|polish|edit|simplify|tidy)\b", re.I)
MAX_INSTRUCTION_WORDS = 25


def focus_text(text: str) -> str:
    """The text with pasted payloads replaced by a marker: what the route depends on."""
    text = _QUOTED.sub(_quoted_marker, text).strip()
    head, brk, tail = _split_instruction(text)
    if tail and _is_payload(head, brk, tail):
        return f"{head.strip()} {PAYLOAD_MARKER}"
    return " ".join(text.split())


def asks_for_text_task(instruction: str) -> bool:
    """Whether the instruction asks for work on material ("rewrite this: ...", "is this
    review a complaint?") rather than telling the user's own story after a colon."""
    return bool(_TASK_VERB.match(instruction) or _NAMES_MATERIAL.search(instruction))


def _quoted_marker(match: re.Match[str]) -> str:
    # Short quotes ("the 'H' screw") are part of the question; long ones are material.
    return f" {PAYLOAD_MARKER} " if len(match.group(1).split()) >= MIN_QUOTED_WORDS else match.group(0)


def _split_instruction(text: str) -> tuple[str, str, str]:
    """The first clause, the break that ends it (":" or a sentence end) and the rest."""
    match = _FIRST_BREAK.search(text)
    if match is None:
        return text, "", ""
    return text[: match.start()], match.group().strip(), text[match.end():]


def _is_payload(head: str, brk: str, tail: str) -> bool:
    """Whether what follows the first clause is material to work on rather than the question itself."""
    if len(head.split()) > MAX_INSTRUCTION_WORDS:
        return False
    if _TASK_VERB.match(head) and (_POINTS_AT.search(head) or _NAMES_MATERIAL.search(head)) and len(tail.split()) >= MIN_TASK_PAYLOAD_WORDS:
        return True  # "label this: do you open on Sundays?", "make this blurb punchier? A bike for work."
    if len(tail.split()) < MIN_PAYLOAD_WORDS:
        return False
    if tail.lstrip().startswith(PAYLOAD_MARKER) or _NAMES_MATERIAL.search(head):
        return True  # "... this review: <review>", "Can you condense these notes? <notes>"
    if brk != ":":
        return False  # sentences after a sentence are just a longer request
    if _POINTS_AT.search(head):
        return True  # "Make this more formal: <text>"
    # "Quick question: how do I ...?" is one question after the colon, not material.
    sentences = [s for s in _SENTENCE_END.split(tail.strip()) if s.strip()]
    return len(sentences) > 1 or "\n" in tail.strip() or not tail.rstrip().endswith("?")


# ---------------------------------------------------------------------------
# Features: TF-IDF (default) and sentence embeddings (optional)


class _Features(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def word_width(self) -> int:
        """Columns 0 .. word_width - 1 are the word n-grams."""
        ...

    def fit(self, texts: list[str]) -> list[Row]: ...

    def vectorize(self, text: str) -> Row:
        """One text as (column indices, values)."""
        ...


class _TfidfFeatures:
    """Word 1-2 grams for phrasing, char_wb 2-5 grams for misspellings and short texts."""

    def __init__(self) -> None:
        self._blocks: list[Tfidf] = []

    @property
    def width(self) -> int:
        return sum(block.width for block in self._blocks)

    @property
    def word_width(self) -> int:
        return self._blocks[0].width

    def fit(self, texts: list[str]) -> list[Row]:
        focused = [focus_text(t) for t in texts]
        self._blocks = [Tfidf.fit(_WORDS, focused), Tfidf.fit(_CHARS, focused)]
        return [self._row(text) for text in focused]

    def vectorize(self, text: str) -> Row:
        return self._row(focus_text(text))

    def _row(self, focused: str) -> Row:
        return join_rows([block.row(focused) for block in self._blocks], [block.width for block in self._blocks])


_WORDS = word_ngrams(r"(?u)\b\w[\w'&-]*\b", 1, 2)
_CHARS = char_wb_ngrams(2, 5)


class _EmbeddingFeatures:
    """Sentence embeddings of the instruction part (all-MiniLM-L6-v2 distilled to a static
    table: shared/embedder.py, numpy only) next to the TF-IDF features.

    The embedding carries meaning across wording ("cost of a full service" near "how
    much is a repair"); TF-IDF keeps the exact phrasings the examples teach ("summarize:",
    "classify this"). Both are l2-normalized blocks of one linear model.
    """

    def __init__(self) -> None:
        from shared.embedder import shared_embedder

        self._embedder = shared_embedder()
        self._tfidf = _TfidfFeatures()

    @property
    def width(self) -> int:
        return self._tfidf.width + self._embedder.dims

    @property
    def word_width(self) -> int:
        return self._tfidf.word_width

    def fit(self, texts: list[str]) -> list[Row]:
        rows = self._tfidf.fit(texts)
        return [self._with_embedding(row, text) for row, text in zip(rows, texts)]

    def vectorize(self, text: str) -> Row:
        return self._with_embedding(self._tfidf.vectorize(text), text)

    def _with_embedding(self, row: Row, text: str) -> Row:
        dense = self._embedder.embed(focus_text(text)).astype(np.float64) * EMBEDDINGS_SCALE
        return join_rows([row, (np.arange(dense.shape[0]), dense)], [self._tfidf.width, dense.shape[0]])


def available_backends() -> list[str]:
    """Both backends run here: the embedder ships with the repository (shared/models/)."""
    from shared.embedder import MODEL_PATH

    return ["tfidf", "embeddings"] if MODEL_PATH.exists() else ["tfidf"]


# ---------------------------------------------------------------------------
# The classifier


@dataclass
class RouteClassifier:
    """Route probabilities for a request text. Build it with `train` or `from_config`."""

    routes: tuple[str, ...]
    backend: str
    temperature: float = 1.0  # learned by cross-validation; <1 sharpens, >1 softens
    _features: _Features | None = field(repr=False, default=None)
    _coef: np.ndarray | None = field(repr=False, default=None)  # (routes, features), already divided by temperature

    @classmethod
    def train(cls, examples: dict[str, list[str]], keywords: dict[str, list[str]] | None = None, *, backend: str = "tfidf") -> RouteClassifier:
        """Learn routes from labeled examples; keywords join as short, down-weighted examples.

        Routes without examples are left out: the classifier never predicts them.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown classifier backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        routes = tuple(name for name, texts in examples.items() if any(t.strip() for t in texts))
        if not routes:
            raise ValueError("no route has examples: give at least one route an 'examples' list")
        features: _Features = _EmbeddingFeatures() if backend == "embeddings" else _TfidfFeatures()
        if len(routes) == 1:
            return cls(routes=routes, backend=backend)
        texts, labels, weights = _training_set(examples, keywords or {}, routes)
        rows = features.fit(texts)
        kernel = gram(rows, features.width)
        targets = np.array([routes.index(label) for label in labels])
        c = TFIDF_C if backend == "tfidf" else EMBEDDINGS_C
        dual = fit_softmax(kernel, targets, weights, c, len(routes))
        temperature = _fit_temperature(kernel, targets, weights, c, len(routes))
        return cls(routes=routes, backend=backend, temperature=temperature, _features=features, _coef=primal(rows, features.width, dual) / temperature)

    @classmethod
    def from_config(cls, config: MeshConfig, *, backend: str | None = None) -> RouteClassifier:
        """Train on the routes' `examples` and `hints`; the backend defaults to `routing.classifier`."""
        examples = {name: list(route.examples) for name, route in config.routes.items()}
        keywords = {name: list(route.hints) for name, route in config.routes.items()}
        chosen = backend or config.routing.classifier
        if chosen == "off":
            raise ValueError("routing.classifier is 'off': the router uses its rules only")
        return cls.train(examples, keywords, backend=chosen)

    def predict(self, text: str) -> list[tuple[str, float]]:
        """Every known route with its probability, best first; the probabilities sum to 1."""
        if self._features is None or self._coef is None:
            return [(self.routes[0], 1.0)]
        columns, values = self._features.vectorize(text)
        if not np.any(columns < self._features.word_width):
            # Not one word any example uses ("asdf qwerty", "qqqq"): the character n-grams and the
            # dense embedding still score, and with many varied examples in one route they lean
            # to it (seen: nonsense at 0.71 high_risk). Nothing is known: every route is as likely.
            return [(route, 1.0 / len(self.routes)) for route in self.routes]
        probs = _softmax(self._coef[:, columns] @ values)
        # Stable sort: equal probabilities keep the config's route order.
        order = sorted(range(len(self.routes)), key=lambda i: -probs[i])
        return [(self.routes[i], float(probs[i])) for i in order]

    def best(self, text: str) -> tuple[str, float]:
        return self.predict(text)[0]


def _training_set(examples: dict[str, list[str]], keywords: dict[str, list[str]], routes: tuple[str, ...]) -> tuple[list[str], list[str], np.ndarray]:
    texts, labels, weights = [], [], []
    for route in routes:
        for text in examples[route]:
            if text.strip():
                texts.append(text)
                labels.append(route)
                weights.append(1.0)
        # Keywords of routes without examples are ignored with the route itself.
        for word in keywords.get(route, []):
            texts.append(word)
            labels.append(route)
            weights.append(KEYWORD_WEIGHT)
    return texts, labels, np.array(weights)


CALIBRATION_FOLDS = 5
# Below this many examples in some route, held-out logits are noise: keep the raw probabilities.
CALIBRATION_MIN_EXAMPLES = 5
_TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(2.0), 41))


def _fit_temperature(kernel: np.ndarray, targets: np.ndarray, weights: np.ndarray, c: float, n_routes: int) -> float:
    """The softmax temperature that makes held-out confidences honest.

    With a dozen examples per route a logistic regression's raw probabilities say
    little (they depend mostly on C). Cross-validated logits over the examples
    (keywords always stay in training) pick the temperature with the lowest held-out
    log-loss, so min_confidence compares against something like an accuracy.
    The vocabulary is shared across folds: a small leak that keeps training fast. On the
    Gram matrix a fold costs a few milliseconds, so this stays at start-up.
    """
    real = np.flatnonzero(weights >= 1.0)
    hints = np.flatnonzero(weights < 1.0)
    smallest = int(np.bincount(targets[real], minlength=n_routes).min())
    if smallest < CALIBRATION_MIN_EXAMPLES:
        return 1.0
    logits, truth = [], []
    for train_at, test_at in stratified_folds(targets[real], min(CALIBRATION_FOLDS, smallest), seed=RANDOM_STATE):
        train = np.concatenate([real[train_at], hints])
        held_out = real[test_at]
        dual = fit_softmax(kernel[np.ix_(train, train)], targets[train], weights[train], c, n_routes)
        logits.append(kernel[np.ix_(held_out, train)] @ dual)
        truth.append(targets[held_out])
    stacked, gold = np.vstack(logits), np.concatenate(truth)
    losses = [_log_loss(stacked / t, gold) for t in _TEMPERATURES]
    return float(_TEMPERATURES[int(np.argmin(losses))])


def _log_loss(logits: np.ndarray, gold: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(gold)), gold].mean())


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


# ---------------------------------------------------------------------------
# Complexity


@dataclass(frozen=True)
class Complexity:
    score: float  # 0 (a one-line question) .. 1 (a multi-part, comparative, constrained request)
    reasons: list[str]


# Each feature adds points; the score is their sum, capped at 1. Points are chosen so
# that any two strong signals (e.g. a comparison plus a second question) cross 0.6.
_MULTI_PART = [
    (re.compile(r"\bthen\b", re.I), "then"),
    (re.compile(r"\balso\b|\bas well as\b|\bplus\b", re.I), "also"),
    (re.compile(r"\bfirst\b.*\b(second|then|next|after that)\b", re.I | re.S), "first ... second"),
    (re.compile(r"(^|\s)(\d[.)]|[-*\u2022])\s+\S", re.M), "numbered list"),
    (re.compile(r"\bincluding\b|\bin the order\b|\bwhat order\b|\bfor each\b|\beach (step|one)\b", re.I), "parts to cover"),
]
_REASONING = [
    (re.compile(r"\bcompar(e|ing|ison)\b|\bversus\b|\bvs\.?(?=\s)|\bweigh (up|the)\b", re.I), "comparison"),
    (re.compile(r"\btrade-?offs?\b|\bpros and cons\b|\bdownsides?\b", re.I), "trade-offs"),
    (re.compile(r"\bexplain\b|\bwhy\b", re.I), "explanation"),
    (re.compile(r"\brecommend|\bwhich (one )?(should|would) (i|you)\b|\badvise\b", re.I), "recommendation"),
    (re.compile(r"\bplan\b|\bschedule\b|\bdesign\b|\bchecklist\b|\broutine\b", re.I), "planning"),
    (re.compile(r"\bstep by step\b|\bwalk me through\b|\bbreak (it )?down\b|\bwork out\b|\brank\b|\bdiagnos", re.I), "step-by-step reasoning"),
]
_CONSTRAINTS = [
    (re.compile(r"\bfor an? (\w+ ){0,3}(rider|commuter|beginner|family|kid|child|person)\b", re.I), "rider profile"),
    (re.compile(r"\bin (a |the )?(wet|cold|hot|hilly|rainy|winter|summer)\b|\bin winter\b|\bin the rain\b", re.I), "conditions"),
    (re.compile(r"\b\d+(\.\d+)?\s?(kg|km|m|mm|wh|%|cm|miles?)\b", re.I), "measurements"),
    (re.compile(r"\bbudget\b|\bunder [\u20ac$\u00a3]?\d+|\bover (\w+ )?years?\b", re.I), "budget or horizon"),
    (re.compile(r"\bi (weigh|ride|commute|carry|want|need|am|'m)\b", re.I), "personal situation"),
]
MULTI_PART_POINTS, MULTI_PART_CAP = 0.2, 0.4
REASONING_POINTS, REASONING_CAP = 0.15, 0.45
CONSTRAINT_POINTS, CONSTRAINT_CAP = 0.1, 0.2


def complexity(text: str) -> Complexity:
    """How demanding a request is, with the reasons: transparent, cheap, deterministic."""
    parts = [_length(text), _asks(text), _clauses(text),
             _matches(text, _MULTI_PART, MULTI_PART_POINTS, MULTI_PART_CAP, "multi-part"),
             _matches(text, _REASONING, REASONING_POINTS, REASONING_CAP, "reasoning"),
             _matches(text, _CONSTRAINTS, CONSTRAINT_POINTS, CONSTRAINT_CAP, "constraints")]
    score = min(1.0, sum(points for points, _ in parts))
    reasons = [reason for points, reason in parts if points > 0]
    return Complexity(score=round(score, 3), reasons=reasons)


def _length(text: str) -> tuple[float, str]:
    # Short questions are rarely hard; long ones usually carry several asks or constraints.
    words = len(text.split())
    if words <= 15:
        return 0.0, ""
    points = min(0.3, 0.3 * (words - 15) / 35)  # ramps up to 0.3 at 50 words
    return points, f"{words} words"


_ASK_WORDS = (
    r"what|what's|how|which|why|when|where|should|can|could|would|will|is|are|do|does|"
    r"compare|explain|recommend|rank|list|tell|give|show|work|break|walk|plan|design|suggest|describe|estimate|weigh|outline|help"
)
# A clause start is the text's start, a sentence end, a comma or semicolon, or "and"/"then".
_ASK = re.compile(rf"(?:^|[.?!;,:]\s+|\band\s+|\bthen\s+)(?:{_ASK_WORDS})\b", re.I)


def _asks(text: str) -> tuple[float, str]:
    # "What X, how Y, and what Z?" is three questions behind one question mark:
    # count clauses that open with a question word or a request verb.
    count = max(len(re.findall(r"\?+", text)), len(_ASK.findall(text.strip())))
    if count < 2:
        return 0.0, ""
    return min(0.35, 0.2 + 0.15 * (count - 2)), f"{count} asks"


def _clauses(text: str) -> tuple[float, str]:
    # Lists of aspects ("durability, repairability, comfort and cost") ask for several answers.
    separators = len(re.findall(r"[,;:]\s|\s-\s|\s\u2014\s", text))
    if separators < 3:
        return 0.0, ""
    return min(0.2, 0.05 * (separators - 1)), f"{separators} clauses"


def _matches(text: str, rules: list[tuple[re.Pattern[str], str]], points: float, cap: float, kind: str) -> tuple[float, str]:
    found = [name for pattern, name in rules if pattern.search(text)]
    if not found:
        return 0.0, ""
    return min(cap, points * len(found)), f"{kind}: {', '.join(found)}"


__all__ = ["BackendUnavailable", "Complexity", "RouteClassifier", "asks_for_text_task", "available_backends", "complexity", "focus_text"]
