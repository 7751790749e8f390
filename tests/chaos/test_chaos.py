"""Chaos: steady load while a random replica is SIGKILLed every few seconds.

`make test` runs a short version; `make chaos` runs 1,000 requests
(BATON_CHAOS_REQUESTS) and prints the ledgers.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from shared.config import load_config
from tests.chaos.ledger import run_load
from tests.conftest import MeshSpec

pytestmark = pytest.mark.chaos

REQUESTS = int(os.environ.get("BATON_CHAOS_REQUESTS", "150"))
DURATION_S = float(os.environ.get("BATON_CHAOS_SECONDS", "15"))
CONCURRENCY = 8
TWO_OF_EACH = {"router": 2, "retriever": 2, "generator": 2, "guardrail": 2, "fallback": 2}


MESH = MeshSpec("chaos", counts=TWO_OF_EACH, settings={"ack_wait_s": 2.0, "max_deliver": 20})


async def kill_replicas(mesh, stop: asyncio.Event, rng: random.Random, kills: list[str]) -> None:
    """Every 1.5-3 s, SIGKILL one replica of a random service and start a new one."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(1.5, 3.0))
            return
        except TimeoutError:
            pass
        victim = rng.choice([r for r in mesh.replicas if r.alive])
        mesh.kill(victim)
        mesh.replicas.remove(victim)
        mesh.spawn(victim.service)
        kills.append(victim.service)


async def test_every_accepted_request_gets_exactly_one_reply_while_replicas_die(mesh, capsys):
    config = load_config(mesh.settings.config)
    budgets = {name: route.latency_budget_ms for name, route in config.routes.items()}  # no request sets its own
    baseline = await run_load(mesh.nats_url, max(30, REQUESTS // 4), CONCURRENCY, DURATION_S / 4, budgets_ms=budgets)
    stop, kills = asyncio.Event(), []
    killer = asyncio.create_task(kill_replicas(mesh, stop, random.Random(7), kills))
    try:
        chaos = await run_load(mesh.nats_url, REQUESTS, CONCURRENCY, DURATION_S, budgets_ms=budgets)
    finally:
        stop.set()
        await killer
    report = "\n".join([baseline.line("no faults"), chaos.line(f"chaos ({len(kills)} kills: {', '.join(kills)})")])
    with capsys.disabled():
        print("\n" + report)
    (mesh.settings.state_dir / "chaos-ledger.txt").write_text(report + "\n")

    assert len(kills) >= DURATION_S / 4
    assert baseline.lost == chaos.lost == 0
    assert baseline.duplicates == chaos.duplicates == 0
    assert baseline.late_ok == chaos.late_ok == 0  # no ok Reply after its deadline
    assert chaos.redundant == 0  # a Reply already delivered is not sent again by a redelivered hop
    assert chaos.accepted == chaos.sent == REQUESTS
    assert chaos.answered + chaos.errors == chaos.accepted
    assert chaos.answered >= 0.95 * chaos.accepted
