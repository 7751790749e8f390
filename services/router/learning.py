"""The router's learning on numpy alone: TF-IDF features and a multinomial logistic regression.

The router trains at start from the config's examples (a user edits them), so training
must be cheap in time *and memory*: scikit-learn and scipy cost the router ~60 MB of
resident imports for a problem of a few hundred short texts. Here:

* `Tfidf` is scikit-learn's TfidfVectorizer for the two analyzers the router uses
  (word n-grams with a token pattern, char_wb n-grams), lower-cased, smooth idf,
  sublinear tf, l2 per block: the same numbers (a unit test compares them).
* `fit_softmax` minimizes scikit-learn's objective for `LogisticRegression(fit_intercept=False)`
  (C x weighted cross-entropy + half the squared weights) in the span of the examples:
  with n examples and d >> n features, the weights are X^T A, so the problem is solved on
  the n x n Gram matrix (a few hundred squared) by Newton-CG, then mapped back to d weights.
  Without an intercept and with an l2 penalty, the optimum is unique, so the solution is
  scikit-learn's up to solver tolerance.

Sparse rows are (column indices, values) pairs; nothing here needs scipy.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Row = tuple[np.ndarray, np.ndarray]  # (column indices, values) of one sparse row

def word_ngrams(token_pattern: str, low: int, high: int) -> Callable[[str], list[str]]:
    """scikit-learn's `analyzer="word"`: lower-case, tokens by pattern, then n-grams joined by spaces."""
    pattern = re.compile(token_pattern)

    def analyze(text: str) -> list[str]:
        tokens = pattern.findall(text.lower())
        grams = list(tokens) if low == 1 else []
        for n in range(max(low, 2), min(high, len(tokens)) + 1):
            grams.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        return grams

    return analyze


def char_wb_ngrams(low: int, high: int) -> Callable[[str], list[str]]:
    """scikit-learn's `analyzer="char_wb"`: character n-grams inside space-padded words."""

    def analyze(text: str) -> list[str]:
        # scikit-learn's own loop: plain appends beat slicing comprehensions on short words.
        grams: list[str] = []
        append = grams.append
        for word in text.lower().split():  # split() already treats any run of white space as one
            padded = f" {word} "
            size = len(padded)
            for n in range(low, high + 1):
                offset = 0
                append(padded[:n])
                while offset + n < size:
                    offset += 1
                    append(padded[offset:offset + n])
                if offset == 0:
                    break  # a word no longer than n counts once, whole
        return grams

    return analyze


@dataclass
class Tfidf:
    """One TF-IDF block: vocabulary and idf learned from the training texts."""

    analyze: Callable[[str], list[str]]
    vocabulary: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, analyze: Callable[[str], list[str]], texts: Sequence[str]) -> Tfidf:
        documents = Counter(term for text in texts for term in set(analyze(text)))
        vocabulary = {term: i for i, term in enumerate(sorted(documents))}
        frequency = np.array([documents[term] for term in sorted(documents)], dtype=np.float64)
        # Smooth idf: as if one extra document held every term once.
        idf = np.log((1.0 + len(texts)) / (1.0 + frequency)) + 1.0
        return cls(analyze, vocabulary, idf)

    @property
    def width(self) -> int:
        return len(self.vocabulary)

    def row(self, text: str) -> Row:
        vocabulary = self.vocabulary
        known = [(vocabulary[term], count) for term, count in Counter(self.analyze(text)).items() if term in vocabulary]
        if not known:
            return np.zeros(0, dtype=np.intp), np.zeros(0)
        index = np.fromiter((i for i, _ in known), dtype=np.intp, count=len(known))
        weights = (1.0 + np.log(np.fromiter((c for _, c in known), dtype=np.float64, count=len(known)))) * self.idf[index]
        return index, weights / np.linalg.norm(weights)


def join_rows(parts: Sequence[Row], widths: Sequence[int]) -> Row:
    """Side-by-side blocks of one row as a single sparse row."""
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.intp)
    return np.concatenate([cols + off for (cols, _), off in zip(parts, offsets)]), np.concatenate([vals for _, vals in parts])


# Columns densified at a time: a few hundred rows x 512 columns is under a megabyte. Products
# densify one such block, reused, so no large transient is left behind as heap the process
# cannot give back (seen: +25 MB RSS with whole-matrix blocks).
_CHUNK = 512


def _column_blocks(rows: Sequence[Row], width: int) -> Iterator[tuple[int, np.ndarray]]:
    """The rows as dense blocks of _CHUNK columns (one array, refilled): products without scipy."""
    all_rows = np.repeat(np.arange(len(rows), dtype=np.intp), [len(cols) for cols, _ in rows])
    all_cols = np.concatenate([cols for cols, _ in rows]) if rows else np.zeros(0, np.intp)
    all_vals = np.concatenate([vals for _, vals in rows]) if rows else np.zeros(0)
    order = np.argsort(all_cols, kind="stable")
    cols, at_rows, vals = all_cols[order], all_rows[order], all_vals[order]
    bounds = np.searchsorted(cols, np.arange(0, width + _CHUNK, _CHUNK))
    block = np.zeros((len(rows), _CHUNK))
    for k, start in enumerate(range(0, width, _CHUNK)):
        lo, hi = bounds[k], bounds[k + 1]
        block[:] = 0.0
        block[at_rows[lo:hi], cols[lo:hi] - start] = vals[lo:hi]
        yield start, block[:, : min(_CHUNK, width - start)]


def gram(rows: Sequence[Row], width: int) -> np.ndarray:
    """X X^T of the sparse rows."""
    matrix = np.zeros((len(rows), len(rows)))
    for _, block in _column_blocks(rows, width):
        matrix += block @ block.T
    return matrix


def primal(rows: Sequence[Row], width: int, dual: np.ndarray) -> np.ndarray:
    """The weights X^T A (routes x width) of dual coefficients A (rows x routes)."""
    coef = np.zeros((dual.shape[1], width))
    for start, block in _column_blocks(rows, width):
        coef[:, start:start + block.shape[1]] = dual.T @ block
    return coef


def fit_softmax(kernel: np.ndarray, targets: np.ndarray, weights: np.ndarray, c: float, n_classes: int, *, tolerance: float = 1e-8) -> np.ndarray:
    """Dual coefficients A of the l2-penalized multinomial logistic regression (no intercept).

    Minimizes c * sum_i w_i * CE(softmax(K A)_i, y_i) + tr(A^T K A) / 2 through K = Z Z^T
    (Z = U sqrt(S) from K's eigendecomposition): a dense problem in at most n dimensions,
    solved by Newton's method with conjugate-gradient steps (Hessian-vector products only).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(kernel)
    keep = eigenvalues > eigenvalues.max(initial=0.0) * 1e-12
    roots = np.sqrt(eigenvalues[keep])
    z = eigenvectors[:, keep] * roots  # rows: the examples in an orthonormal basis of their span
    one_hot = np.eye(n_classes)[targets]
    cw = (c * weights)[:, None]
    beta = np.zeros((z.shape[1], n_classes))

    def loss_and_grad(b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        logits = z @ b
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        probs = np.exp(log_probs)
        loss = float(-(cw[:, 0] * (log_probs * one_hot).sum(axis=1)).sum() + 0.5 * (b * b).sum())
        return loss, z.T @ (cw * (probs - one_hot)) + b, probs

    loss, grad, probs = loss_and_grad(beta)
    for _ in range(100):
        if np.abs(grad).max() <= tolerance:
            break

        def hessian_times(v: np.ndarray, probs: np.ndarray = probs) -> np.ndarray:
            d = z @ v
            return z.T @ (cw * probs * (d - (probs * d).sum(axis=1, keepdims=True))) + v

        step = _conjugate_gradient(hessian_times, -grad, 0.1 * min(1.0, math.sqrt(float(np.abs(grad).max()))))
        slope = float((grad * step).sum())
        scale = 1.0
        while True:  # backtracking: Newton steps can overshoot far from the optimum
            new_loss, new_grad, new_probs = loss_and_grad(beta + scale * step)
            if new_loss <= loss + 1e-4 * scale * slope or scale < 1e-10:
                break
            scale *= 0.5
        beta, loss, grad, probs = beta + scale * step, new_loss, new_grad, new_probs
    # Back from the basis Z to the examples: K A = Z beta with A = U S^(-1/2) beta.
    return (eigenvectors[:, keep] / roots) @ beta


def _conjugate_gradient(apply: Callable[[np.ndarray], np.ndarray], rhs: np.ndarray, relative_tolerance: float) -> np.ndarray:
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    norm = float((residual * residual).sum())
    stop = (relative_tolerance ** 2) * norm
    for _ in range(rhs.size):
        if norm <= stop:
            break
        product = apply(direction)
        alpha = norm / float((direction * product).sum())
        x += alpha * direction
        residual -= alpha * product
        new_norm = float((residual * residual).sum())
        direction = residual + (new_norm / norm) * direction
        norm = new_norm
    return x


def stratified_folds(targets: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions: each class's examples dealt round-robin, in a seeded shuffle, into `folds` folds."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(targets), dtype=np.intp)
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        fold_of[members] = np.arange(len(members)) % folds
    return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(folds)]


__all__ = ["Row", "Tfidf", "char_wb_ngrams", "fit_softmax", "gram", "join_rows", "primal", "stratified_folds", "word_ngrams"]
