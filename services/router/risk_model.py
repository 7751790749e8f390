"""A second reader for risk: a logistic regression over all-MiniLM-L6-v2 sentence embeddings.

The cues in risk.py catch how incidents are usually worded; the route classifier's
high-risk probability catches wording near its examples. Both read words. A customer who
asks "is it normal for the pack to tick and get warm overnight?" uses none of the cue words
and few of the examples' words; the transformer reads what the sentence is about. It costs
15-30 ms of CPU per text, so the router asks it only when the classifier already gives
high risk some weight (see Router): a few percent of ordinary traffic.

The head (384 weights and a bias) is fitted once by tools/train_risk_encoder.py on the
routes' examples (high_risk against every other route) and shipped in shared/models/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared.encoder import EncoderUnavailable, shared_encoder

MODEL_PATH = Path(__file__).resolve().parents[2] / "shared" / "models" / "risk_encoder_head.npz"
log = logging.getLogger("baton.router")


class EncoderRiskModel:
    """P(high risk | text) from the contextual encoder and a fitted linear head."""

    def __init__(self, path: Path = MODEL_PATH) -> None:
        with np.load(path) as data:
            self.weights = data["weights"].astype(np.float32)
            self.bias = float(data["bias"])
            self.threshold = float(data["threshold"])
        self.encoder = shared_encoder()  # loaded now: the first risky request should not wait 1-2 s

    def probability(self, text: str) -> float:
        logit = float(self.encoder.embed(text) @ self.weights) + self.bias
        return float(1.0 / (1.0 + np.exp(-logit)))


def load_risk_model(path: Path = MODEL_PATH) -> EncoderRiskModel | None:
    """The encoder's risk head, or None (logged) when its package or head file is missing:
    the router then decides risk from the cues and the classifier alone."""
    if not path.exists():
        log.warning("risk model: %s is missing; risk is judged by cues and the classifier only", path.name)
        return None
    try:
        return EncoderRiskModel(path)
    except EncoderUnavailable as exc:
        log.warning("risk model off: %s", exc)
        return None


# Class-balanced (high-risk examples weigh as much in total as all the others) and a weak
# penalty: the same choice as the leave-one-source-out runs in tools/train_risk_encoder.py.
HEAD_C = 10.0
THRESHOLD = 0.4  # leave-one-author-out: a miss at 0.42; false escalations change by one or none between 0.3 and 0.6


def fit_head(embeddings: np.ndarray, high_risk: np.ndarray, c: float = HEAD_C) -> tuple[np.ndarray, float]:
    """Weights and bias of a class-balanced l2 logistic regression (numpy only, via learning.fit_softmax)."""
    from services.router.learning import fit_softmax

    features = np.hstack([embeddings.astype(np.float64), np.ones((len(embeddings), 1))])
    labels = high_risk.astype(np.intp)
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        raise ValueError("the risk head needs both high-risk and other examples")
    weights = np.where(labels == 1, (len(labels) - positives) / positives, 1.0)
    dual = fit_softmax(features @ features.T, labels, weights, c, 2)
    primal = features.T @ dual  # (dims + 1, 2)
    direction = primal[:, 1] - primal[:, 0]
    return direction[:-1].astype(np.float32), float(direction[-1])


def save_head(weights: np.ndarray, bias: float, path: Path = MODEL_PATH, threshold: float = THRESHOLD, **about: str) -> None:
    np.savez(path, weights=weights, bias=np.array(bias), threshold=np.array(threshold), about=np.array(about.get("source", "")))
