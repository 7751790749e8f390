"""The per-client limit at the router, on the real mesh: a flood waits behind its own limit."""

from __future__ import annotations

import asyncio

import pytest

from baton.client import BatonClient
from shared.schema import ErrorCode
from shared.settings import Settings
from tests.conftest import MeshSpec

pytestmark = pytest.mark.e2e
LIMIT = 2


def fairness_config(path) -> None:
    # The client id "flood" names a tenant with its own limit; everyone else has the default.
    path.write_text(Settings().config.read_text() + f"\ntenants:\n  flood:\n    max_in_flight: {LIMIT}\n")


MESH = MeshSpec("fairness", config=fairness_config)


async def test_a_clients_requests_in_flight_never_exceed_its_tenants_limit_and_others_go_past(mesh):
    async with BatonClient(mesh.nats_url, client_id="flood", timeout_s=60) as flood, BatonClient(mesh.nats_url, timeout_s=60) as other:
        flooding = [asyncio.ensure_future(flood.ask("How do I fix a puncture?", cache=False)) for _ in range(24)]
        await asyncio.sleep(0.3)
        others = await asyncio.gather(*(other.ask("How often should I lube my chain?", cache=False) for _ in range(4)))
        replies = await asyncio.gather(*flooding)
    assert all(r.ok for r in others), [r.error for r in others if not r.ok]
    # On a loaded machine the last of the flood may wait past its deadline (it counts from
    # the publish): it is then told so, never left without an answer.
    assert all(r.ok or r.error.code == ErrorCode.DEADLINE_EXCEEDED for r in replies), [r.error for r in replies if not r.ok]
    assert sum(r.ok for r in replies) >= len(replies) // 2
    # Each flood request's time in the mesh: from its first hop's publish (the router's
    # forward) to the end of its last step.
    spans = [(r.steps[0].started_at - r.steps[0].queued_ms / 1000, r.steps[-1].started_at + r.steps[-1].duration_ms / 1000) for r in replies if r.steps]
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= LIMIT, f"{peak} of the flood's requests were in the mesh at once"
    # The other client's requests, sent after the flood, did not wait for it to drain.
    assert max(r.latency_ms for r in others) < max(r.latency_ms or 0 for r in replies if r.ok)
