"""The injection detector's model layer: TF-IDF + logistic regression, trained on the
public corpus (tests/data/injection_corpus.jsonl), shipped as a small weight file.

`train` fits on labelled rows with scikit-learn (tools and `baton eval guard` only);
`Weights.save` writes the vocabulary, idf and coefficients to shared/models/, and the
service loads them with numpy alone, so scoring a text is a dict lookup per word and
bigram (tens of microseconds) and needs no fit at start.

The text is scored as written and in every decoded view of it (base64, hex, %-escapes,
leetspeak undone: normalization.views), and the worst view counts. The probability
becomes one more signal for the detector's noisy-or only at MIN_PROBABILITY or above:
chosen by leave-one-source-out on the corpus's train split (the README gives the
figures on the frozen test split), where the benign look-alikes of every left-out
source stayed at or under 2 % false positives.

    .venv/bin/python tools/train_injection_model.py     # refit and rewrite the weights
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.guardrail.injection import Signal, normalize
from services.guardrail.normalization import views

MIN_PROBABILITY = 0.7
# Between these the model only leans: a weak cue that needs another (a structural cue, a
# heuristic) to reject.
LEANING_PROBABILITY = 0.5
LEANING_WEIGHT = 0.2
C = 4.0  # inverse regularization strength, chosen by leave-one-source-out on the train split
MAX_FEATURES = 20000
WEIGHTS_PATH = Path(__file__).resolve().parents[2] / "shared/models/injection_tfidf.npz"
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


@dataclass(frozen=True)
class Weights:
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray
    intercept: float

    def save(self, path: Path = WEIGHTS_PATH) -> None:
        terms = sorted(self.vocabulary, key=self.vocabulary.__getitem__)
        np.savez_compressed(path, terms=np.array("\n".join(terms)), idf=self.idf.astype(np.float32),
                            coef=self.coef.astype(np.float32), intercept=np.float32(self.intercept))

    @classmethod
    def load(cls, path: Path = WEIGHTS_PATH) -> Weights:
        with np.load(path) as data:
            terms = str(data["terms"]).split("\n")
            return cls({term: i for i, term in enumerate(terms)}, data["idf"].astype(np.float64),
                       data["coef"].astype(np.float64), float(data["intercept"]))

    def probability(self, text: str) -> float:
        words = _TOKEN.findall(normalize(text))
        counts: dict[int, int] = {}
        for gram in (*words, *(f"{a} {b}" for a, b in zip(words, words[1:]))):
            index = self.vocabulary.get(gram)
            if index is not None:
                counts[index] = counts.get(index, 0) + 1
        if not counts:
            return 1.0 / (1.0 + math.exp(-self.intercept))
        indices = np.fromiter(counts, dtype=np.int64, count=len(counts))
        values = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * self.idf[indices]
        logit = self.intercept + float(self.coef[indices] @ values) / float(np.sqrt(values @ values))
        return 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))


def train(texts: Sequence[str], labels: Sequence[int], c: float = C) -> Weights:
    """Fit on labelled texts (1 = injection); needs scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=MAX_FEATURES,
                                 preprocessor=normalize)
    features = vectorizer.fit_transform(list(texts))
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(features, list(labels))
    return Weights(
        vocabulary={term: int(index) for term, index in vectorizer.vocabulary_.items()},
        idf=np.asarray(vectorizer.idf_, dtype=np.float64),
        coef=np.asarray(model.coef_[0], dtype=np.float64),
        intercept=float(model.intercept_[0]),
    )


_lock = threading.Lock()
_loaded: Weights | None = None


def available() -> bool:
    return WEIGHTS_PATH.exists()


def shipped() -> Weights:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = Weights.load()
        return _loaded


def warm() -> bool:
    """Load the weights now (at service start) rather than on the first request."""
    return available() and shipped() is not None


def probability(text: str, weights: Weights | None = None) -> float:
    """P(injection): the worst of the text and its decoded views."""
    weights = weights or shipped()
    return max(weights.probability(view) for view in (text, *views(text)))


def model_signal(text: str, min_probability: float = MIN_PROBABILITY, weights: Weights | None = None) -> Signal | None:
    """A detector signal when the classifier is confident, else None."""
    if weights is None and _loaded is None and not available():  # a stat per request only until loaded
        return None
    p = probability(text, weights)
    if p >= min_probability:
        return Signal("model", f"tf-idf classifier p={p:.2f}", round(p, 4))
    if p >= LEANING_PROBABILITY:
        return Signal("model", f"tf-idf classifier leans to injection p={p:.2f}", LEANING_WEIGHT)
    return None
