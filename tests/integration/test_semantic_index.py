"""The semantic cache's index on a real JetStream KV bucket: one entry per question, every
router replica's copy fed by a watch, bounded per scope."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shared import cache
from shared.schema import Envelope, Reply, Request, Step
from tests.conftest import eventually


def asked(question: str, route: str = "factual") -> Envelope:
    env = Envelope(
        request_id="r1", request=Request(prompt=question), route=route, deadline=time.time() + 30,
        slip=[Step(service="generator", name="generate", params={"models": ["gpt-small"]})],
    )
    env.context.question = question
    return env


@pytest.fixture
async def kv(kv_bucket):
    return await kv_bucket(ttl=60)


async def test_a_question_one_replica_indexed_is_found_by_another_through_its_watch(kv):
    here, there = cache.SemanticIndex(), cache.SemanticIndex()
    await here.attach(kv)
    await there.attach(kv)
    try:
        first = asked("What is the warranty on the Metro 8?")
        key = cache.cache_key(first)
        await cache.store(kv, key, Reply(request_id="r1", ok=True, answer="Two years."), ttl_s=60, question=first.context.question)
        await cache.remember(kv, here, first, key)

        paraphrase = asked("What warranty does the Metro 8 come with?")
        found = await eventually(lambda: cache.semantic_lookup(kv, there, paraphrase), timeout=5, what="the other replica's copy")
        hit, earlier = found
        assert hit.reply.answer == "Two years." and earlier == "What is the warranty on the Metro 8?"
        assert await cache.semantic_lookup(kv, there, asked("What is the warranty on the Tempo SL?")) is None
        assert await cache.semantic_lookup(kv, there, asked("What warranty does the Metro 8 come with?", route="complex")) is None
    finally:
        await here.detach()
        await there.detach()


async def test_a_replica_started_later_loads_what_was_indexed_before(kv):
    early = cache.SemanticIndex()
    first = asked("How often should I replace my chain?")
    await cache.remember(kv, early, first, "k1")
    late = cache.SemanticIndex()
    await late.attach(kv)
    try:
        vector = cache._vector("How often do I need to replace the chain?")
        nearest = await eventually(lambda: late.nearest(cache.scope_key(first), vector), timeout=5, what="the initial values")
        assert nearest[0][1:] == ("k1", "How often should I replace my chain?")
    finally:
        await late.detach()


async def test_an_unreadable_entry_is_skipped_and_the_watch_goes_on(kv):
    index = cache.SemanticIndex()
    await index.attach(kv)
    try:
        good = asked("Do you ship to Ireland?")
        await kv.put(f"{cache.SEMANTIC_PREFIX}{cache.scope_key(good)}.bad", b"not json")
        await cache.remember(kv, cache.SemanticIndex(), good, "k2")  # written by another replica
        vector = cache._vector("Do you ship to Ireland?")
        nearest = await eventually(lambda: index.nearest(cache.scope_key(good), vector), timeout=5, what="the entry after the bad one")
        assert [key for _, key, _ in nearest] == ["k2"]
    finally:
        await index.detach()


def test_each_scope_keeps_only_its_newest_questions():
    index = cache.SemanticIndex(size=3)
    rows = np.eye(4, dtype=np.float32)
    for n in range(4):
        index.add("s", f"k{n}", f"question {n}", rows[n])
    assert {key for _, key, _ in index.nearest("s", rows[0], count=5)} == {"k1", "k2", "k3"}  # k0 evicted
    index.add("s", "k3", "question 3 again", rows[3])  # the same key again takes no second row
    assert [(key, q) for _, key, q in index.nearest("s", rows[3], count=1)] == [("k3", "question 3 again")]
    assert len(index.nearest("s", rows[3], count=5)) == 3
    index.add("s", "odd", "another embedder's entry", np.ones(8, dtype=np.float32))  # cannot be compared: ignored
    assert "odd" not in {key for _, key, _ in index.nearest("s", rows[3], count=5)}
