"""A 3-node NATS cluster on loopback (stream replicas 3): kill the stream leader under load.

Losing the leader loses no request; losing two of three nodes gives explicit errors
to new requests instead of hangs.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nats
import pytest

from baton.client import BatonClient, NotAccepted
from shared import subjects
from shared.natsd import NatsServer, free_port
from tests.chaos.ledger import run_load
from tests.conftest import eventually, mesh_settings, running_mesh

pytestmark = pytest.mark.chaos

REQUESTS = int(os.environ.get("BATON_CHAOS_REQUESTS", "150"))
DURATION_S = float(os.environ.get("BATON_CHAOS_SECONDS", "15"))


def node_config(name: str, client_port: int, cluster_ports: list[int], index: int, store: Path) -> str:
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in cluster_ports)
    return f"""
server_name: {name}
listen: 127.0.0.1:{client_port}
jetstream: enabled
cluster {{
  name: baton-test
  listen: 127.0.0.1:{cluster_ports[index]}
  routes: [{routes}]
}}
"""


def start_nodes(tmp: Path, nodes: dict[str, NatsServer]) -> None:
    """Three JetStream nodes n1..n3 on free loopback ports, added to `nodes` as they start
    (so the caller's `finally` stops every one that did)."""
    client_ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    for i in range(3):
        name = f"n{i + 1}"
        config = tmp / f"{name}.conf"
        config.write_text(node_config(name, client_ports[i], cluster_ports, i, tmp / name))
        nodes[name] = NatsServer(port=client_ports[i], store_dir=tmp / name, config_file=config).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    nodes: dict[str, NatsServer] = {}
    try:
        start_nodes(tmp, nodes)
        url = ",".join(node.url for node in nodes.values())
        asyncio.run(wait_for_jetstream(url))
        yield url, nodes
    finally:
        for node in nodes.values():
            node.stop()


async def wait_for_jetstream(url: str, timeout_s: float = 30.0) -> None:
    """Until the cluster has elected a JetStream meta leader."""
    nc = await nats.connect(url.split(","))
    refusals: list[Exception] = []

    async def answers() -> bool:
        try:
            await nc.jetstream().account_info()
            return True
        except Exception as exc:  # noqa: BLE001 - any refusal means not yet; the last one is reported
            refusals[:] = [exc]
            return False

    try:
        await eventually(answers, timeout_s, every=0.2, what=lambda: f"no JetStream meta leader: {refusals}")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def mesh(cluster, index_dir, tmp_path_factory):
    url, _ = cluster
    settings = mesh_settings(tmp_path_factory.mktemp("cluster-mesh"), index_dir, ack_wait_s=2.0, max_deliver=20, stream_replicas=3)
    with running_mesh(url, settings, {"router": 2, "retriever": 1, "generator": 2, "guardrail": 2, "fallback": 1}) as running:
        yield running


async def stream_leader(url: str) -> str:
    nc = await nats.connect(url.split(","))
    try:
        info = await nc.jetstream().stream_info(subjects.STREAM)
        assert info.config.num_replicas == 3
        return info.cluster.leader
    finally:
        await nc.close()


async def test_killing_the_stream_leader_under_load_loses_nothing(cluster, mesh, capsys):
    url, nodes = cluster
    leader = await stream_leader(url)

    async def kill_leader_soon():
        await asyncio.sleep(DURATION_S / 3)
        nodes[leader].kill()

    killer = asyncio.create_task(kill_leader_soon())
    ledger = await run_load(url, REQUESTS, 8, DURATION_S, timeout_s=60)
    await killer
    new_leader = await stream_leader(url)
    with capsys.disabled():
        print(f"\n{ledger.line(f'leader {leader} killed (new leader {new_leader})')}")
    assert new_leader != leader
    assert ledger.lost == 0 and ledger.duplicates == 0
    assert ledger.accepted + ledger.refused == ledger.sent
    assert ledger.answered + ledger.errors == ledger.accepted
    # During the election new requests may be refused (explicitly, NotAccepted), never lost.
    assert ledger.answered >= 0.75 * ledger.sent


async def test_with_two_of_three_nodes_down_new_requests_fail_fast_and_clearly(cluster, mesh):
    url, nodes = cluster
    for node in nodes.values():
        if node.process and node.process.poll() is None:
            node.kill()
            break
    survivors = [n for n in nodes.values() if n.process and n.process.poll() is None]
    assert len(survivors) == 1
    async with BatonClient(survivors[0].url, timeout_s=20) as client:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(NotAccepted):
                await client.ask("How do I fix a puncture?")
            assert time.monotonic() - started < 10  # the client's acceptance window, not a hang
