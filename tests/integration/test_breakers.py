"""The circuit breaker state machine, and breakers shared by two replicas through KV."""

import asyncio

import nats
from nats.js.api import KeyValueConfig

from shared.breakers import Breaker, Breakers
from tests.conftest import eventually


def test_repeated_failures_open_the_breaker_and_a_success_closes_it():
    breaker = Breaker()
    for _ in range(2):
        breaker = breaker.after_failure(now=10.0, threshold=3)
    assert breaker.state == "closed" and breaker.allows(10.0, 30)
    breaker = breaker.after_failure(now=11.0, threshold=3)
    assert breaker.state == "open" and not breaker.allows(20.0, 30)
    assert breaker.allows(41.0, 30)  # the cool-down passed: a probe may go
    probing = breaker.probing(now=41.0)
    assert probing.state == "half_open" and not probing.allows(42.0, 30)  # one probe at a time
    assert probing.after_failure(now=43.0, threshold=3).state == "open"
    assert probing.after_success() == Breaker()


async def test_a_breaker_opened_by_one_replica_is_seen_by_another_and_closes_after_a_probe(nats_url):
    connections = [await nats.connect(nats_url) for _ in range(2)]
    bucket = "breakers_test"
    await connections[0].jetstream().create_key_value(KeyValueConfig(bucket=bucket))
    replicas = [Breakers(threshold=2, cooldown_s=0.5) for _ in range(2)]
    try:
        for replica, nc in zip(replicas, connections):
            await replica.attach(await nc.jetstream().key_value(bucket))
        a, b = replicas
        await a.record("gpt", ok=False)
        await a.record("gpt", ok=False)
        await eventually(lambda: b.state("gpt").state == "open", 1, every=0.02)  # the watch delivers within moments
        assert not await b.acquire("gpt")  # no call while open
        await asyncio.sleep(0.6)  # past the cooldown: time itself is what the test waits for
        wins = await asyncio.gather(a.acquire("gpt"), b.acquire("gpt"))
        assert sorted(wins) == [False, True]  # exactly one replica takes the half-open probe
        prober = a if wins[0] else b
        await prober.record("gpt", ok=True)
        await eventually(lambda: a.state("gpt").state == b.state("gpt").state == "closed", 1, every=0.02)
        assert a.state("gpt") == b.state("gpt") == Breaker()
    finally:
        for replica in replicas:
            await replica.detach()
        await connections[0].jetstream().delete_key_value(bucket)
        for nc in connections:
            await nc.close()
