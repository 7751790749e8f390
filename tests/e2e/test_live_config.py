"""Live config on a running mesh: apply while requests flow, refuse broken versions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import yaml

from shared import subjects
from shared.config import parse_config
from shared.live_config import ACTIVE
from shared.settings import ROOT, Settings
from tests.conftest import MeshSpec, eventually

pytestmark = pytest.mark.e2e

GREETING = "hi there!"


MESH = MeshSpec("live")


def without_smalltalk_rules(tmp_path) -> tuple[str, str]:
    """A new version in which greetings no longer match the smalltalk route."""
    config = yaml.safe_load(Settings().config.read_text())
    config["routes"]["smalltalk"]["match"] = {}
    config["routes"]["smalltalk"]["examples"] = []
    config["routing"] = {**config.get("routing", {}), "classifier": "off"}
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), parse_config(path.read_text()).digest


def baton(*args: str, mesh) -> subprocess.CompletedProcess:
    env = {**os.environ, "NATS_URL": mesh.nats_url}
    return subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


async def test_a_new_version_applies_while_requests_flow_and_none_fails(client, mesh, tmp_path):
    before = await client.ask(GREETING)
    assert before.route == "smalltalk"
    path, new_digest = without_smalltalk_rules(tmp_path)

    async def traffic():
        return await asyncio.gather(*(client.ask("How do I fix a puncture?") for _ in range(20)))

    flowing = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    applied = await asyncio.to_thread(baton, "config", "apply", path, mesh=mesh)
    assert applied.returncode == 0, applied.stderr
    assert new_digest in applied.stdout
    replies = await flowing
    assert all(r.ok for r in replies)
    # Each request ran on one version, whichever it started with.
    assert {r.config_version for r in replies} <= {before.config_version, new_digest}

    async def on_the_new_version():  # the watchers see it within moments
        after = await client.ask(GREETING)
        return after if after.config_version == new_digest else None

    after = await eventually(on_the_new_version, 15, every=0.1)
    assert after.route == "factual"  # no rule claims greetings any more: the default route


async def test_a_broken_file_is_refused_naming_the_key_and_the_running_version_stays(client, mesh, tmp_path):
    running = (await client.ask("How do I fix a puncture?")).config_version
    broken = tmp_path / "broken.yaml"
    broken.write_text(Settings().config.read_text().replace("default_route: factual", "default_route: nowhere"))
    refused = await asyncio.to_thread(baton, "config", "apply", str(broken), mesh=mesh)
    assert refused.returncode == 2
    assert "default_route" in refused.stderr and "unchanged" in refused.stderr
    assert (await client.ask("How do I fix a puncture?")).config_version == running


async def test_garbage_written_straight_into_the_bucket_is_refused_by_every_replica(client, mesh):
    running = (await client.ask("How do I fix a puncture?")).config_version
    kv = await client.js.key_value(subjects.CONFIG_BUCKET)
    await kv.put(ACTIVE, b"routes: [this is not a config")
    await asyncio.sleep(0.5)
    reply = await client.ask("How do I fix a puncture?")
    assert reply.ok and reply.config_version == running
    assert all(r.alive for r in mesh.replicas)
