"""Your own step in one file: the LangGraph agent of examples/agent_step.py, run by
`baton serve`, in the middle of a route, on a real nats-server, traced like a built-in."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
import yaml

from baton.client import BatonClient
from baton.processes import MeshProcesses
from shared.config import ConfigError, parse_config
from shared.settings import ROOT, Settings
from tests.conftest import ONE_OF_EACH, mesh_env, mesh_settings

pytestmark = pytest.mark.e2e

AGENT = str(ROOT / "examples" / "agent_step.py")


def agentic_config() -> dict:
    config = yaml.safe_load(Settings().config.read_text())
    config["steps"] = {"agent": {"service": "agent"}}
    config["routes"]["agentic"] = {
        "steps": ["guard.input", {"retrieve": {"top_k": 3}}, "guard.retrieval", {"agent": {"max_drafts": 2, "budget_ms": 5000}}, "guard.output"],
        "cache": {"enabled": False},
    }
    # Parameters outside the step's own model (max_drafts 1-5): checked where the step runs.
    config["routes"]["agentic_bad"] = {**config["routes"]["agentic"], "steps": ["guard.input", "retrieve", {"agent": {"max_drafts": 9}}, "guard.output"]}
    return config


@pytest.fixture(scope="module")
def mesh(nats_url, index_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom")
    (tmp / "config.yaml").write_text(yaml.safe_dump(agentic_config()))
    settings = mesh_settings(tmp, index_dir, config=tmp / "config.yaml")
    mesh = MeshProcesses(settings.model_copy(update={"nats_url": nats_url}), env=mesh_env(settings), step_modules={"agent": AGENT})
    try:
        mesh.start_collector()
        mesh.start({**ONE_OF_EACH, "agent": 2})  # replicas like any service
        yield mesh
    finally:
        mesh.stop()


async def test_the_agent_step_answers_in_its_route_and_is_traced_like_a_built_in(mesh):
    async with BatonClient(mesh.nats_url, timeout_s=20) as client:
        reply = await client.ask("How often should I replace my chain?", route="agentic", cache=False)
    assert reply.ok, reply.error
    assert reply.route == "agentic" and reply.answer and reply.citations
    assert [step.step for step in reply.steps][-3:] == ["guard.retrieval", "agent", "guard.output"]
    [agent] = [step for step in reply.steps if step.step == "agent"]
    assert agent.service == "agent" and agent.outcome == "ok"
    assert any(e.kind == "note" and e.step == "agent" and e.data.get("agent") == "langgraph" for e in reply.events)

    async with httpx.AsyncClient(base_url=mesh.collector_url, timeout=5) as http:
        for _ in range(50):  # the services' batch processors flush within a moment
            flow = await http.get(f"/api/flows/{reply.request_id}")
            hops = {hop["step"]: hop for hop in flow.json().get("hops", [])} if flow.status_code == 200 else {}
            if "agent" in hops and "guard.output" in hops:
                break
            await asyncio.sleep(0.2)
    assert hops["agent"]["service"] == "agent" and not hops["agent"]["status_code"] == 2
    assert hops["agent"]["parent_span_id"] == hops["guard.retrieval"]["span_id"]  # in the chain, between the built-ins


async def test_a_failing_custom_step_goes_to_the_fallback_like_a_built_in(mesh):
    async with BatonClient(mesh.nats_url, timeout_s=20) as client:
        reply = await client.ask("How do I fix a puncture?", route="agentic_bad", cache=False)
    [agent] = [step for step in reply.steps if step.step == "agent"]
    assert agent.outcome == "failed"
    [fallback] = [e for e in reply.events if e.kind == "fallback"]
    assert fallback.step == "agent" and fallback.data["reason"] == "internal"
    assert reply.ok and reply.degraded  # answered from the passages, as after any failed step


def test_an_undeclared_step_in_a_route_is_refused_naming_the_steps_section():
    config = agentic_config()
    del config["steps"]
    with pytest.raises(ConfigError, match=r"unknown step 'agent'.*declare it under `steps:`"):
        parse_config(yaml.safe_dump(config))


def test_baton_serve_refuses_a_step_the_config_does_not_declare(tmp_path):
    env = {"BATON_CONFIG": str(Settings().config), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "baton", "serve", AGENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "step 'agent' is not declared" in done.stderr and "Traceback" not in done.stderr


async def test_the_custom_step_runs_as_its_own_least_privilege_nats_user(index_dir, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(agentic_config()))
    settings = mesh_settings(tmp_path, index_dir, config=tmp_path / "config.yaml")
    mesh = MeshProcesses(settings, env=mesh_env(settings), step_modules={"agent": AGENT})
    try:
        mesh.start_nats(tmp_path / "nats", secure=True)
        assert "agent" in mesh.credentials  # the auth table has a user for the config's own step
        await asyncio.to_thread(mesh.start, {**ONE_OF_EACH, "agent": 1})
        async with BatonClient(mesh.nats_url, client_id="cli", timeout_s=20, user="cli", password=mesh.credentials["cli"]) as client:
            reply = await client.ask("How often should I replace my chain?", route="agentic", cache=False)
        assert reply.ok, reply.error
        assert [step.step for step in reply.steps][-2:] == ["agent", "guard.output"]
    finally:
        mesh.stop()
        if mesh.nats_server is not None:
            mesh.nats_server.stop()


def test_baton_up_refuses_a_step_module_the_config_does_not_declare_before_starting_anything(tmp_path):
    env = {"BATON_CONFIG": str(Settings().config), "BATON_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "baton", "up", "--step", AGENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "step 'agent'" in done.stderr and "is not declared" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "mesh.json").exists()


def test_baton_up_refuses_parameters_the_step_would_refuse_before_starting_anything(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(agentic_config()))  # its agentic_bad route asks for 9 drafts
    env = {"BATON_CONFIG": str(tmp_path / "config.yaml"), "BATON_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "baton", "up", "--step", AGENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "route 'agentic_bad', step 'agent': max_drafts: Input should be less than or equal to 5" in done.stderr
    assert "'agentic'" not in done.stderr and "Traceback" not in done.stderr  # the good route is not blamed
    assert not (tmp_path / "mesh.json").exists()
