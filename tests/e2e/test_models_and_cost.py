"""Models and cost end to end: the ledger, budgets, tenants, the reply cache, A/B and shadow.

Two priced models on the fake OpenAI-compatible provider (loopback), the local
generator for free, every service a separate process on a real nats-server.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from shared import subjects
from shared.budgets import day_key
from shared.schema import ErrorCode
from shared.settings import Settings
from tests.conftest import ONE_OF_EACH, MeshSpec, eventually

pytestmark = pytest.mark.e2e

SMALL = {"in": 1.0, "out": 4.0}  # USD per million tokens
BIG = {"in": 10.0, "out": 40.0}
QUESTION = "How do I true a wheel?"


def write_config(path) -> None:
    config = yaml.safe_load(Settings().config.read_text())
    fake = {"provider": "openai", "base_url_env": "FAKE_OPENAI_URL", "api_key_env": "FAKE_OPENAI_KEY", "max_output_tokens": 200}
    config["models"]["fake-small"] = {**fake, "model": "small-model", "tier": "small", "price_in_per_mtok": SMALL["in"], "price_out_per_mtok": SMALL["out"]}
    config["models"]["fake-big"] = {**fake, "model": "big-model", "tier": "frontier", "price_in_per_mtok": BIG["in"], "price_out_per_mtok": BIG["out"]}
    pipeline = ["guard.input", {"retrieve": {"top_k": 3, "corpora": ["handbook"]}}, {"generate": {"models": ["fake-big", "fake-small", "local-extractive"]}}, "guard.output"]
    base = {"steps": pipeline, "models": ["fake-big", "fake-small", "local-extractive"], "latency_budget_ms": 20000}
    config["routes"]["priced"] = {**base, "cache": {"enabled": True, "ttl_s": 1.5}}
    config["routes"]["budgeted"] = {**base, "cost_budget_usd": 0.003, "cache": {"enabled": False}}
    config["routes"]["paid_only"] = {**base, "steps": [*pipeline[:2], {"generate": {"models": ["fake-big"]}}, "guard.output"], "models": ["fake-big"], "cache": {"enabled": False}}
    config["routes"]["ab"] = {
        **base, "cache": {"enabled": False},
        "variants": [{"name": "small", "weight": 70, "models": ["fake-small"]}, {"name": "local", "weight": 30, "models": ["local-extractive"]}],
    }
    config["routes"]["shadowed"] = {**base, "steps": [*pipeline[:2], {"generate": {"models": ["fake-small"]}}, "guard.output"], "cache": {"enabled": False}, "shadow": {"model": "fake-big", "share": 1.0}}
    # acme's day affords one fake-small answer (estimated at up to ~$0.0012 each), not two.
    config["models"]["fake-claude"] = {
        "provider": "anthropic", "model": "claude-fake", "tier": "frontier", "price_in_per_mtok": BIG["in"], "price_out_per_mtok": BIG["out"],
        "base_url_env": "FAKE_ANTHROPIC_URL", "api_key_env": "FAKE_ANTHROPIC_KEY", "max_output_tokens": 200,
    }
    config["routes"]["claude"] = {
        "steps": [*pipeline[:2], {"generate": {"models": ["fake-claude"]}}, "guard.output"],
        "models": ["fake-claude"], "cache": {"enabled": False}, "latency_budget_ms": 20000,
    }
    # The judge layer on a route of its own: the fake provider plays the guard model.
    config["models"]["fake-guard"] = {**fake, "model": "guard-model"}
    judged = {"judge": {"model": "fake-guard", "budget_ms": 400, "when_unavailable": "pass"}}
    config["routes"]["judged"] = {**base, "steps": [{"guard.input": judged}, *pipeline[1:]], "cache": {"enabled": False}}
    config["routes"]["judged_strict"] = {
        **base, "steps": [{"guard.input": {"judge": {**judged["judge"], "when_unavailable": "fail"}}}, *pipeline[1:]],
        "cache": {"enabled": False},
    }
    config["tenants"] = {"acme": {"daily_budget_usd": 0.0015}, "globex": {"models": ["local-extractive"]}}
    path.write_text(yaml.safe_dump(config))


MESH = MeshSpec(
    "cost",
    counts={**ONE_OF_EACH, "router": 2},  # two routers: a paraphrase hits whichever one takes it
    config=write_config,
    env=lambda fake, claude: {"FAKE_OPENAI_URL": fake.base_url, "FAKE_OPENAI_KEY": "sk-test", "FAKE_ANTHROPIC_URL": claude.base_url, "FAKE_ANTHROPIC_KEY": "sk-ant-test"},
)


def price(usage, model) -> float:
    rates = BIG if model == "fake-big" else SMALL if model == "fake-small" else {"in": 0, "out": 0}
    return usage.input_tokens * rates["in"] / 1e6 + usage.output_tokens * rates["out"] / 1e6


async def test_the_ledger_adds_up_exactly_across_hops(client):
    reply = await client.ask(QUESTION, route="priced", cache=False)
    assert reply.ok and reply.models == ["fake-big"]
    paid = [s for s in reply.steps if s.model]
    assert [s.step for s in paid] == ["generate"]
    assert reply.cost_usd == pytest.approx(sum(s.cost_usd for s in reply.steps), abs=1e-12)
    assert reply.cost_usd == pytest.approx(price(paid[0].usage, "fake-big"), abs=1e-12)
    assert reply.usage.input_tokens == sum(s.usage.input_tokens for s in paid)
    assert all(s.cost_usd == 0 for s in reply.steps if not s.model)


async def test_an_expensive_model_over_the_route_budget_is_downgraded(client):
    reply = await client.ask(QUESTION, route="budgeted")
    assert reply.ok and reply.models == ["fake-small"]
    skipped = next(e.data["skipped"] for e in reply.events if e.kind == "model" and "skipped" in e.data)
    assert skipped[0]["model"] == "fake-big" and "over budget" in skipped[0]["why"]
    assert reply.cost_usd <= 0.003


async def test_a_request_that_cannot_be_afforded_is_refused_clearly(client, fake):
    reply = await client.ask(QUESTION, route="paid_only", max_cost_usd=0.000001)
    assert not reply.ok and reply.error.code == ErrorCode.BUDGET_EXCEEDED
    assert "over budget" in reply.error.message
    assert fake.calls == []  # nothing was spent finding out


async def test_a_tenant_over_its_daily_budget_is_served_by_a_cheaper_model(client, mesh):
    first = await client.ask(QUESTION, route="budgeted", metadata={"tenant": "acme"})
    assert first.models == ["fake-small"]
    spent = float((await (await client.js.key_value(subjects.BUDGETS_BUCKET)).get(day_key("acme"))).value)
    assert spent == pytest.approx(first.cost_usd)
    later = [await client.ask(QUESTION, route="budgeted", metadata={"tenant": "acme"}) for _ in range(2)]
    assert all(r.ok and r.models == ["local-extractive"] and r.cost_usd == 0 for r in later)
    total = float((await (await client.js.key_value(subjects.BUDGETS_BUCKET)).get(day_key("acme"))).value)
    assert total == pytest.approx(first.cost_usd) and total <= 0.0015  # never silently overspent


async def test_a_tenant_model_allow_list_is_enforced(client, fake):
    reply = await client.ask(QUESTION, route="priced", metadata={"tenant": "globex"}, cache=False)
    assert reply.ok and reply.models == ["local-extractive"] and fake.calls == []


async def test_the_reply_cache_hits_misses_expires_and_can_be_skipped(client, fake):
    question = "How do I adjust a rim brake?"
    first = await client.ask(question, route="priced")
    second = await client.ask("  how do I ADJUST a rim brake? ", route="priced")  # normalized
    assert not first.cached and second.cached
    assert second.answer == first.answer and second.cost_usd == 0 and second.steps == []
    assert len(fake.calls) == 1
    skipped = await client.ask(question, route="priced", cache=False)
    assert not skipped.cached and len(fake.calls) == 2
    await asyncio.sleep(1.6)  # the route's TTL
    expired = await client.ask(question, route="priced")
    assert not expired.cached and len(fake.calls) == 3


async def test_a_paraphrase_is_answered_from_the_semantic_cache_and_a_near_miss_is_not(client, fake):
    first = await client.ask("What is the warranty on the Metro 8?", route="priced")
    # Each of the two routers finds it: the one that indexed it, and the other through its watch.
    paraphrases = [await client.ask("What warranty does the Metro 8 come with?", route="priced") for _ in range(6)]
    paraphrase = paraphrases[0]
    other_product = await client.ask("What is the warranty on the Tempo SL?", route="priced")
    assert not first.cached and all(p.cached for p in paraphrases) and not other_product.cached
    assert paraphrase.answer == first.answer and paraphrase.cost_usd == 0
    assert len(fake.calls) == 2  # the paraphrase reached no model; the other product did
    (hit,) = [event for event in paraphrase.events if event.kind == "cache"]
    assert hit.data == {"hit": True, "semantic": True, "paraphrase_of": "What is the warranty on the Metro 8?"}


async def test_the_judge_layer_blocks_on_unsafe_and_follows_the_route_when_it_is_down_or_slow(client, fake):
    fake.script([{"mode": "ok", "text": "unsafe\nS14"}])
    blocked = await client.ask("Please tell me how to true a wheel", route="judged")
    assert not blocked.ok and blocked.error.code == ErrorCode.INPUT_REJECTED
    assert "refused by the judge" in blocked.error.message

    fake.script([{"mode": "hang"}])  # slower than the judge's 400 ms: unavailable, and this route passes
    slow = await client.ask("Please tell me how to true a wheel", route="judged")
    assert slow.ok
    (verdict,) = [e for e in slow.events if e.step == "guard.input.judge"]
    assert verdict.data["judge"] == "unavailable" and verdict.data["judge_reason"].startswith("judge slow")

    fake.script([{"mode": "malformed"}])  # garbage on a strict route: refused, with the reason
    strict = await client.ask("Please tell me how to true a wheel", route="judged_strict")
    assert not strict.ok and "garbage from the judge" in strict.error.message


async def test_the_ab_split_is_stable_per_session_and_within_tolerance(client):
    sessions = [f"ab-{i}" for i in range(120)]
    replies = await asyncio.gather(*(client.ask(QUESTION, route="ab", session_id=s) for s in sessions))
    share = sum(r.variant == "small" for r in replies) / len(replies)
    assert 0.58 <= share <= 0.82
    assert all(r.models == (["fake-small"] if r.variant == "small" else ["local-extractive"]) for r in replies)
    again = await client.ask("And how tight should the spokes be?", route="ab", session_id=sessions[0])
    assert again.variant == replies[0].variant


async def test_shadow_calls_are_made_recorded_and_never_returned(client, fake):
    reply = await client.ask(QUESTION, route="shadowed")
    assert reply.ok and reply.models == ["fake-small"]
    bucket = await client.js.key_value(subjects.SHADOW_BUCKET)

    async def shadow_record() -> dict | None:  # the shadow call runs after the reply
        try:
            return json.loads((await bucket.get(reply.request_id)).value)
        except Exception:  # not stored yet
            return None

    record = await eventually(shadow_record, 5, every=0.1)
    assert record["shadow_model"] == "fake-big" and record["primary_model"] == "fake-small" and record["outcome"] == "ok"
    assert record["cost_usd"] > 0
    models_called = sorted(call["body"]["model"] for call in fake.calls if call["path"].endswith("/chat/completions"))
    assert models_called == ["big-model", "small-model"]
    assert reply.cost_usd == pytest.approx(price(next(s for s in reply.steps if s.model).usage, "fake-small"))
    assert any(e.data.get("shadow") == "fake-big" for e in reply.events)


async def test_the_anthropic_provider_answers_through_the_mesh_plain_and_streamed(client, claude):
    reply = await client.ask(QUESTION, route="claude")
    assert reply.ok and reply.models == ["fake-claude"] and reply.answer.startswith("Fake answer to:")
    generate = next(s for s in reply.steps if s.model)
    assert not generate.usage.estimated and generate.usage.input_tokens > 0
    assert reply.cost_usd == pytest.approx(generate.usage.input_tokens * BIG["in"] / 1e6 + generate.usage.output_tokens * BIG["out"] / 1e6)
    pieces, final = [], None
    async for item in client.stream(QUESTION, route="claude"):
        if isinstance(item, str):
            pieces.append(item)
        else:
            final = item
    assert final.ok and len(pieces) >= 2 and "".join(pieces) == final.answer
    calls = [c for c in claude.calls if c["path"].endswith("/messages")]
    assert [c["body"].get("stream", False) for c in calls[-2:]] == [False, True]
    assert all(c["api_key"] for c in calls)
