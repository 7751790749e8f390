"""`baton up`'s readiness wait: it gives up when start-up stops moving, not after a fixed time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from baton.processes import MeshProcesses, MeshStartError, Replica
from shared.settings import Settings


def fake_replica(mesh: MeshProcesses, service: str, code: str) -> Replica:
    """A process that never pulls from its consumer: idle, or busy (as a slow start is)."""
    log = mesh.settings.state_dir / f"{service}.log"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    replica = Replica(service, 0, process, log)
    mesh.replicas.append(replica)
    return replica


@pytest.fixture
def mesh(nats_url, tmp_path):
    mesh = MeshProcesses(Settings(state_dir=tmp_path, nats_url=nats_url))
    asyncio.run(mesh._provision())
    yield mesh
    mesh.stop(timeout_s=2)


def test_a_start_that_stops_moving_fails_after_the_stall_time(mesh):
    fake_replica(mesh, "router", "import time; time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(MeshStartError, match=r"nothing moved for 1s\): router"):
        mesh.wait_ready(stall_s=1.0, limit_s=60)
    assert time.monotonic() - started < 10


def test_a_slow_but_busy_start_is_waited_for_until_the_overall_limit(mesh):
    fake_replica(mesh, "router", "while True: pass")  # using CPU: making progress, as far as anyone can tell
    started = time.monotonic()
    with pytest.raises(MeshStartError, match=r"still starting after 4s\): router"):
        mesh.wait_ready(stall_s=1.0, limit_s=4.0)
    assert time.monotonic() - started >= 4.0
