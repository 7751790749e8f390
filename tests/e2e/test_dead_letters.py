"""A request that crashes its service on every delivery ends in a clear error, not silence."""

from __future__ import annotations

import asyncio
import json

import pytest

from baton.client import BatonClient
from shared import subjects
from shared.schema import ErrorCode
from tests.conftest import MeshSpec, eventually

pytestmark = pytest.mark.e2e
POISON = "POISON-PILL"


MESH = MeshSpec("dead", settings={"ack_wait_s": 1.0, "max_deliver": 2}, env={"BATON_CHAOS_CRASH_ON": f"retriever:{POISON}"})


async def test_a_hop_that_kills_its_service_every_time_is_dead_lettered_and_answered(mesh):
    async with BatonClient(mesh.nats_url, timeout_s=30) as client:
        request_id = await client.submit(f"How do I fix a puncture? {POISON}")
        future = client._pending[request_id]
        crashes = 0

        def answered_while_supervised() -> bool:
            """Play supervisor: restart the crashed replica until the request is answered."""
            nonlocal crashes
            for replica in [r for r in mesh.replicas if not r.alive]:
                crashes += 1
                mesh.replicas.remove(replica)
                mesh.spawn(replica.service)
            return future.done()

        await eventually(answered_while_supervised, 30, every=0.1)
        reply = await asyncio.wait_for(future, 5)

        assert crashes == 2  # max_deliver
        assert not reply.ok and reply.error.code == ErrorCode.REDELIVERY_EXHAUSTED
        assert reply.error.step == "retrieve" and "2 times" in reply.error.message
        letter = json.loads((await (await client.js.key_value(subjects.DEAD_LETTERS_BUCKET)).get(request_id)).value)
        assert letter["consumer"] == "retriever" and letter["step"] == "retrieve"
        assert POISON in letter["body"]
        info = await client.js.consumer_info(subjects.STREAM, "retriever")
        assert info.num_pending == 0 and info.num_ack_pending == 0  # nothing left to redeliver

        await asyncio.to_thread(mesh.wait_ready)
        healthy = await client.ask("How do I fix a puncture?")
        assert healthy.ok
