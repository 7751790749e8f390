"""A static sentence embedder on numpy alone: all-MiniLM-L6-v2 distilled into a table.

tools/distill_embedder.py ran the transformer once over its whole vocabulary (model2vec),
so embedding a text here is WordPiece tokenization plus the mean of the tokens' rows:
tens of microseconds and no torch. The same embedder serves the router's embeddings
backend, the injection detector and the semantic reply cache, so one 4 MB table is
loaded once per process.

The tokenizer is BERT's uncased WordPiece (lower-case, accents stripped, punctuation
split off, greedy longest match with "##" continuations), written out here because the
`tokenizers` package is not a dependency.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from pathlib import Path

import numpy as np

MODEL_PATH = Path(__file__).with_name("models") / "minilm_static.npz"
_MAX_WORD_CHARS = 100  # BERT's limit: longer "words" are [UNK]
_MAX_TOKENS = 512  # a long prompt is embedded from its first 512 tokens
_CACHE_WORDS = 100_000  # memoized words per process (a few MB at most)


class StaticEmbedder:
    def __init__(self, path: Path = MODEL_PATH) -> None:
        with np.load(path) as data:
            # Kept as stored, int8 rows and one scale per row, and scaled per text: a quarter
            # of the memory of a float32 table (4 MB instead of 15 in every process loading it).
            self.codes = data["vectors"]
            self.scales = data["scale"].astype(np.float32)
            tokens = str(data["tokens"]).split("\n")
        self.index = {token: i for i, token in enumerate(tokens)}
        self.unknown = self.index.get("[UNK]")
        self.dims = self.codes.shape[1]
        self._cache: dict[str, tuple[int, ...]] = {}

    def tokens(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _basic_words(text):
            ids.extend(self.pieces(word))
            if len(ids) >= _MAX_TOKENS:
                return ids[:_MAX_TOKENS]
        return ids

    def embed(self, text: str) -> np.ndarray:
        """The unit-length mean of the text's token vectors (zeros for text with no known token)."""
        ids = self.tokens(text)
        if not ids:
            return np.zeros(self.dims, dtype=np.float32)
        # The sum of the scaled rows (the mean's 1/n goes away in the normalization).
        vector = self.scales[ids] @ self.codes[ids].astype(np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else vector

    def embed_many(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.embed(text) for text in texts]) if texts else np.zeros((0, self.dims), np.float32)

    def pieces(self, word: str) -> tuple[int, ...]:
        """The word's WordPiece ids, memoized (a plain dict: cheaper per call than lru_cache)."""
        found = self._cache.get(word)
        if found is None:
            found = self._wordpiece(word)
            if len(self._cache) < _CACHE_WORDS:
                self._cache[word] = found
        return found

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_WORD_CHARS:
            return (self.unknown,) if self.unknown is not None else ()
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.index:
                    pieces.append(self.index[piece])
                    break
                end -= 1
            else:
                return (self.unknown,) if self.unknown is not None else ()
            start = end
        return tuple(pieces)


_ASCII_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_UNICODE_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def _basic_words(text: str) -> list[str]:
    """BERT's basic tokenizer: lower-case, strip accents, split on spaces and punctuation."""
    text = text.lower()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if text.isascii():
        return _ASCII_WORD.findall(text)  # the common case: one regex pass
    # CJK characters are words of their own in BERT's vocabulary.
    text = _CJK.sub(r" \g<0> ", text)
    return _UNICODE_WORD.findall(text)


_lock = threading.Lock()
_shared: StaticEmbedder | None = None


def shared_embedder() -> StaticEmbedder:
    """The process's one embedder, loaded on first use (about 30 ms)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = StaticEmbedder()
        return _shared


def language_words(text: str) -> list[str]:
    """The words that tell a language: lower-case letters only (no names, codes, keys or numbers)."""
    stripped = (raw.strip(".,;:!?()[]\"'«»“”") for raw in text.split())
    return [word for word in stripped if word.isalpha() and word.islower()]


def pieces_per_word(text: str) -> float:
    """WordPiece tokens per lower-case word: about 1.0-1.3 for English, 2 or more for a
    language the English vocabulary does not know (it breaks those words up)."""
    embedder = shared_embedder()
    words = [piece for word in language_words(text) for piece in _basic_words(word)]
    return sum(len(embedder.pieces(word)) for word in words) / len(words) if words else 0.0
