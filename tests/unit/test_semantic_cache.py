"""The semantic cache's similarity test, measured on paraphrases and near misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.cache import similar
from shared.embedder import shared_embedder

PAIRS = [json.loads(line) for line in (Path(__file__).parents[1] / "data/paraphrases.jsonl").read_text().splitlines()]


def _hits(same: bool) -> list[dict]:
    embedder = shared_embedder()
    return [
        pair for pair in PAIRS if pair["same"] == same
        and similar(pair["a"], pair["b"], float(embedder.embed(pair["a"]) @ embedder.embed(pair["b"])))
    ]  # fmt: skip


def test_most_paraphrases_hit_and_near_misses_almost_never_do():
    # Measured at the shipped threshold: 12 of 20 paraphrases hit, 1 of 20 near misses.
    assert len(_hits(same=True)) >= 12
    assert len(_hits(same=False)) <= 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is the warranty on the Metro 8?", "What is the warranty on the Tempo SL?"),
        ("Do you ship to Ireland?", "Do you ship to Spain?"),
        ("What tyre pressure for 28 mm tyres?", "What tyre pressure for 40 mm tyres?"),
        ("How do I adjust my rear derailleur?", "How do I adjust my front derailleur?"),
    ],
)
def test_the_same_question_about_another_product_place_or_size_never_hits(a, b):
    embedder = shared_embedder()
    cosine = float(embedder.embed(a) @ embedder.embed(b))
    assert not similar(a, b, cosine)
    assert not similar(a, b, 1.0)  # not even if the embedding called them identical


async def test_a_question_with_personal_data_is_never_indexed():
    from shared.cache import SemanticIndex, remember, scope_key
    from shared.schema import Envelope, Request

    class NoKV:  # any KV call would be a write of the question
        def __getattr__(self, name):
            raise AssertionError(f"the index was touched ({name})")

    env = Envelope(request_id="r1", request=Request(prompt="x"), route="factual", slip=[], deadline=0.0)
    env.context.question = "My email is jane.doe@example.com, how do I bleed Shimano brakes?"
    index = SemanticIndex()
    await remember(NoKV(), index, env, "key")
    assert index.nearest(scope_key(env), shared_embedder().embed(env.context.question)) == []
