"""The seed's orchestration patterns on the real broker: the right route and the right tier.

OpenAI-compatible models point at the fake provider on loopback, so the small and
frontier tiers are real HTTP calls; the local generator stays the offline tier.
"""

from __future__ import annotations

import pytest

from baton.client import BatonClient
from tests.conftest import MeshSpec

pytestmark = pytest.mark.e2e


MESH = MeshSpec("patterns", env=lambda fake: {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-test-not-real"})


@pytest.mark.parametrize(
    ("prompt", "metadata", "route", "model", "provider_model"),
    [
        # Factual questions: retrieval plus a small model.
        ("How much air should I put in my road bike tyres?", {}, "factual", "gpt-small", "gpt-4o-mini"),
        # Complex, multi-part requests: the frontier tier with more context (Copilot).
        ("Compare tubeless and inner tubes for a heavy commuter in a wet city, then recommend a setup and explain the trade-offs.", {}, "complex", "gpt-frontier", "gpt-4.1"),
        # The question type picks the corpora (Rufus): products vs policies.
        ("Which helmet do you sell that has MIPS?", {}, "shopping", "gpt-small", "gpt-4o-mini"),
        ("Can I return a bike I rode once?", {}, "support", "gpt-small", "gpt-4o-mini"),
        # Tasks behind one entry point, each with its own prompt (Notion).
        ("Summarize: the chain skipped twice on my ride and the rear brake squeals in the rain.", {}, "summarize", "gpt-small", "gpt-4o-mini"),
        ("Rewrite this to sound more polite: send me my refund now", {}, "rewrite", "gpt-small", "gpt-4o-mini"),
        # Metadata routes the request (Stripe): high risk goes to the strongest model.
        ("I want my money back for the e-bike", {"risk": "high"}, "high_risk", "gpt-frontier", "gpt-4.1"),
        # Small talk skips retrieval and models that cost money.
        ("hello!", {}, "smalltalk", "local-extractive", None),
    ],
    ids=["factual", "complex", "shopping", "support", "summarize", "rewrite", "high-risk", "smalltalk"],
)
async def test_each_pattern_takes_its_route_and_tier(mesh, fake, prompt, metadata, route, model, provider_model):
    fake.reset()
    async with BatonClient(mesh.nats_url, timeout_s=20) as client:
        reply = await client.ask(prompt, metadata=metadata)
    assert reply.ok, reply.error
    assert reply.route == route
    assert reply.models == [model]
    decision = next(e.data for e in reply.events if e.kind == "route")
    assert decision["reason"] and 0 < decision["confidence"] <= 1
    if provider_model:
        assert [call["body"]["model"] for call in fake.calls if call["path"].endswith("/chat/completions")] == [provider_model]
        assert reply.cost_usd > 0
    else:
        assert fake.calls == [] and reply.cost_usd == 0
    steps = [s.step for s in reply.steps]
    assert ("retrieve" in steps) == (route not in ("smalltalk", "rewrite"))


async def test_shopping_and_support_consult_different_corpora(mesh):
    async with BatonClient(mesh.nats_url, timeout_s=20) as client:
        shopping = await client.ask("Which helmet do you sell that has MIPS?", route="shopping", cache=False)
        support = await client.ask("Can I return a bike I rode once?", route="support", cache=False)
    def consulted(reply):
        return next(e.data for e in reply.events if e.kind == "retrieval")

    assert consulted(shopping)["corpora"] == ["catalog", "reviews"] and consulted(shopping)["count"] > 0
    assert consulted(support)["corpora"] == ["policies"] and consulted(support)["count"] > 0
