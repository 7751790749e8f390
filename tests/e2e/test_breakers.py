"""A failing provider trips its breaker for every generator replica; a probe closes it."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from baton.client import BatonClient
from shared import subjects
from tests.conftest import MeshSpec
from tests.e2e.test_failures import QUESTION, flaky_config

pytestmark = pytest.mark.e2e
COOLDOWN_S = 2.0


def breakers_config(path) -> None:
    """The flaky route's config with a breaker that opens after two failures."""
    flaky_config(path)
    config = yaml.safe_load(path.read_text())
    config["breakers"] = {"threshold": 2, "cooldown_s": COOLDOWN_S}
    config["models"]["fake-gpt"]["retries"] = 0
    path.write_text(yaml.safe_dump(config))


MESH = MeshSpec(
    "breakers",
    counts={"router": 1, "retriever": 1, "generator": 2, "guardrail": 1, "fallback": 1},
    config=breakers_config,
    env=lambda fake: {"FAKE_OPENAI_URL": fake.base_url, "FAKE_OPENAI_KEY": "sk-test"},
)


async def breaker_state(client: BatonClient) -> str:
    kv = await client.js.key_value(subjects.BREAKERS_BUCKET)
    try:
        entry = await kv.get("fake-gpt")
    except Exception:
        return "closed"
    return yaml.safe_load(entry.value)["state"]


async def test_the_breaker_opens_skips_the_model_for_all_replicas_then_closes(mesh, fake):
    async with BatonClient(mesh.nats_url, timeout_s=20) as client:
        fake.set_default({"mode": "error500"})
        for _ in range(2):
            reply = await client.ask(QUESTION, route="flaky")
            assert reply.ok and reply.fallbacks == ["retry_model"]
        assert await breaker_state(client) == "open"
        calls_when_opened = len(fake.calls)

        # Both replicas skip the model at once: no call, no timeout, the next model answers.
        replies = await asyncio.gather(*(client.ask(QUESTION, route="flaky") for _ in range(6)))
        assert all(r.ok and r.models == ["local-extractive"] for r in replies)
        assert len(fake.calls) == calls_when_opened
        skipped = [e.data for r in replies for e in r.events if e.kind == "fallback"]
        assert skipped and all(s["reason"] == "model_error" for s in skipped)
        assert all(max(s.duration_ms for s in r.steps) < 1000 for r in replies)

        fake.set_default({"mode": "ok"})
        await asyncio.sleep(COOLDOWN_S + 0.2)
        probe = await client.ask(QUESTION, route="flaky")
        assert probe.ok and probe.models == ["fake-gpt"]
        assert await breaker_state(client) == "closed"
