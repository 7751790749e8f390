"""Failures end to end: a misbehaving model provider, a replica killed mid-request.

The provider is the fake OpenAI-compatible server on loopback; everything else is
real: nats-server, five service processes, JetStream redelivery.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml

from shared.settings import Settings
from tests.conftest import MeshSpec, eventually

pytestmark = pytest.mark.e2e

PRICE_IN, PRICE_OUT = 1.0, 4.0  # USD per million tokens


def flaky_config(path) -> None:
    """The default config plus a route whose first model is the fake provider."""
    config = yaml.safe_load(Settings().config.read_text())
    config["models"]["fake-gpt"] = {
        "provider": "openai", "model": "fake-model", "tier": "small",
        "price_in_per_mtok": PRICE_IN, "price_out_per_mtok": PRICE_OUT,
        "base_url_env": "FAKE_OPENAI_URL", "api_key_env": "FAKE_OPENAI_KEY",
    }
    config["routes"]["flaky"] = {
        "steps": [
            "guard.input",
            {"retrieve": {"top_k": 4, "corpora": ["handbook"]}},
            {"generate": {"models": ["fake-gpt"], "budget_ms": 4000}},
            "guard.output",
        ],
        "latency_budget_ms": 20000,
        "models": ["fake-gpt", "local-extractive"],
        "fallback": {"models": ["local-extractive"], "degrade": True},
        "cache": {"enabled": False},  # every ask must reach the provider
    }
    config["breakers"] = {"threshold": 1000, "cooldown_s": 60}  # breakers have their own test
    path.write_text(yaml.safe_dump(config))


MESH = MeshSpec(
    "failures",
    config=flaky_config,
    settings={"ack_wait_s": 1.5},
    env=lambda fake: {"FAKE_OPENAI_URL": fake.base_url, "FAKE_OPENAI_KEY": "sk-test-not-a-real-key"},
)


QUESTION = "How do I repair a puncture?"


async def test_a_healthy_provider_answers_with_its_usage_and_cost(client, fake):
    reply = await client.ask(QUESTION, route="flaky")
    assert reply.ok and reply.answer.startswith("Fake answer to:")
    assert reply.models == ["fake-gpt"] and not reply.fallbacks
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0 and not reply.usage.estimated
    expected = reply.usage.input_tokens * PRICE_IN / 1e6 + reply.usage.output_tokens * PRICE_OUT / 1e6
    assert reply.cost_usd == pytest.approx(expected)
    assert fake.calls[0]["authorization"] is True


@pytest.mark.parametrize("mode", ["error500", "malformed", "rate_limit"])
async def test_a_transient_fault_is_retried_on_the_same_model(client, fake, mode):
    fake.script([{"mode": mode, "retry_after": 0.3}])
    reply = await client.ask(QUESTION, route="flaky")
    assert reply.ok and reply.answer.startswith("Fake answer to:")
    assert reply.models == ["fake-gpt"] and not reply.fallbacks
    retries = [e.data for e in reply.events if e.kind == "model" and "retry" in e.data]
    assert [r["retry"] for r in retries] == [1]
    if mode == "rate_limit":
        assert retries[0]["wait_s"] == pytest.approx(0.3)  # the server's Retry-After, not our backoff
    assert len(fake.calls) == 2


async def test_a_bad_request_is_not_retried(client, fake):
    fake.script([{"mode": "bad_request"}])
    reply = await client.ask(QUESTION, route="flaky")
    assert reply.ok and reply.fallbacks == ["retry_model"]
    assert len(fake.calls) == 1


@pytest.mark.parametrize("mode", ["error500", "malformed", "rate_limit"])
async def test_a_provider_that_keeps_failing_falls_back_to_the_next_model(client, fake, mode):
    fake.set_default({"mode": mode, "retry_after": 0.2})
    try:
        reply = await client.ask(QUESTION, route="flaky")
    finally:
        fake.set_default({"mode": "ok"})
    assert reply.ok, reply.error
    assert reply.fallbacks == ["retry_model"]
    assert reply.models == ["fake-gpt", "local-extractive"]
    assert [s.outcome for s in reply.steps if s.step == "generate"] == ["failed", "ok"]
    assert "puncture" in reply.answer.lower() or "tube" in reply.answer.lower()
    assert len(fake.calls) == 3  # the first try and two retries


async def test_a_hanging_provider_is_cut_at_the_step_budget_and_the_request_still_answered(client, fake):
    fake.script([{"mode": "hang"}])
    started = time.monotonic()
    reply = await client.ask(QUESTION, route="flaky")
    elapsed = time.monotonic() - started
    assert reply.ok and reply.fallbacks == ["retry_model"]
    assert 3.5 < elapsed < 10, elapsed  # the 4 s generate budget, not the provider's 60 s hang
    failed = next(s for s in reply.steps if s.outcome == "failed")
    assert failed.step == "generate" and failed.duration_ms >= 3900


async def test_a_replica_killed_mid_request_is_answered_once_by_another(client, fake, mesh):
    fake.script([{"mode": "ok", "latency_s": 3}])
    request_id = await client.submit(QUESTION, route="flaky")
    future = client._pending[request_id]
    # until the generator is inside the model call
    await eventually(lambda: fake.calls, 5, what="the generator never called the provider")
    victim = next(r for r in mesh.replicas if r.service == "generator")
    mesh.kill(victim)
    mesh.replicas.remove(victim)
    mesh.spawn("generator")
    reply = await asyncio.wait_for(future, 20)
    assert reply.ok and reply.answer.startswith("Fake answer to:")
    assert len(fake.calls) == 2  # redelivered once to the new replica
    await asyncio.sleep(2)  # longer than ack_wait: a second reply would have arrived by now
    assert client.duplicates == 0
    assert (await client.result(request_id)).answer == reply.answer
