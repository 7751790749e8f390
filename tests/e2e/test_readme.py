"""The README's snippets, run as written against a mesh started the way the README says.

`baton up` runs as its own process (on free ports, through its documented flags); each
Python block of the README runs in a fresh interpreter with only the environment a user
would have: the state folder `baton up` wrote (BatonClient finds the mesh there) and, for
the raw nats-py and OpenAI snippets, the address variables those snippets read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from shared import children
from shared.natsd import free_port
from shared.settings import ROOT
from tests.conftest import eventually_sync

pytestmark = pytest.mark.e2e

README = (ROOT / "README.md").read_text()
BATON = [sys.executable, "-m", "baton"]


def python_blocks() -> dict[str, str]:
    """The README's ```python blocks, named by what they import."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    named = {}
    for code in blocks:
        name = "client" if "BatonClient" in code else "openai" if "from openai" in code else "nats-py" if "import nats" in code else "step" if "from shared.steps" in code else None
        assert name is not None, f"a README snippet this test does not know how to run:\n{code}"
        named[name] = code
    return named


@pytest.fixture(scope="module")
def baton_up(index_dir, tmp_path_factory):
    """`baton up` as the README says, with --nats-port / --gateway-port on free ports."""
    state = tmp_path_factory.mktemp("readme-state")
    nats_port, gateway_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "BATON_CLIENT_ID")}
    env.update(BATON_STATE_DIR=str(state), BATON_INDEX_DIR=str(index_dir))
    log = open(state / "baton-up.log", "w")
    process = subprocess.Popen([*BATON, "up", "--nats-port", str(nats_port), "--gateway-port", str(gateway_port), "--client", "my-app"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    mesh_file = state / "mesh.json"

    def written() -> bool:  # once every service is pulling
        assert process.poll() is None, (state / "baton-up.log").read_text()
        return mesh_file.exists()

    eventually_sync(written, 90, every=0.2, what="baton up did not come up")
    addresses = json.loads(mesh_file.read_text())
    try:
        yield {"env": env, "addresses": addresses, "state": state, "process": process}
    finally:
        children.stop(process, grace_s=60, sig=signal.SIGINT)  # Ctrl-C, as the README says
        log.close()


def run_snippet(code: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def test_baton_up_listens_where_asked_and_says_where(baton_up):
    addresses = baton_up["addresses"]
    assert addresses["nats_url"].startswith("nats://127.0.0.1:") and addresses["gateway_url"].startswith("http://127.0.0.1:")
    assert addresses["pid"] == baton_up["process"].pid


def test_the_python_client_snippet_runs_and_finds_the_mesh_without_being_told(baton_up):
    done = run_snippet(python_blocks()["client"], baton_up["env"])  # no NATS_URL: mesh.json says where
    assert done.returncode == 0, done.stderr
    assert "factual" in done.stdout and "local-extractive" in done.stdout
    assert "mineral oil" in done.stdout.lower()  # the streamed brake-bleeding answer


def test_the_raw_nats_py_snippet_runs_and_prints_the_answer(baton_up):
    password = json.loads((baton_up["state"] / "credentials.json").read_text())["users"]["my-app"]  # as the README says
    env = {**baton_up["env"], "NATS_URL": baton_up["addresses"]["nats_url"], "MY_APP_PASSWORD": password}
    done = run_snippet(python_blocks()["nats-py"], env)
    assert done.returncode == 0, done.stderr
    assert "mineral oil" in done.stdout.lower()


def test_the_openai_snippet_runs_against_the_gateway(baton_up):
    env = {**baton_up["env"], "BATON_GATEWAY_URL": baton_up["addresses"]["gateway_url"]}
    done = run_snippet(python_blocks()["openai"], env)
    assert done.returncode == 0, done.stderr
    assert "factual" in done.stdout and "spoke" in done.stdout.lower()


def test_the_cli_finds_the_running_mesh_through_its_state_folder(baton_up):
    done = subprocess.run([*BATON, "status"], env=baton_up["env"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "router" in done.stdout


def test_a_taken_nats_port_is_refused_at_once_with_the_flag_to_use(baton_up, index_dir, tmp_path):
    taken = int(baton_up["addresses"]["nats_url"].rsplit(":", 1)[1])
    env = {**baton_up["env"], "BATON_STATE_DIR": str(tmp_path)}
    started = time.monotonic()
    done = subprocess.run([*BATON, "up", "--nats-port", str(taken), "--gateway-port", str(free_port())], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {taken} is taken" in done.stderr and "--nats-port" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


def test_nothing_listening_is_reported_fast_with_the_next_step(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{port}"}
    done = subprocess.run([*BATON, "ask", "hi"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot reach NATS" in done.stderr and "baton up" in done.stderr and "Traceback" not in done.stderr
    # One look for a listener instead of nats-py's connect retries (6-9 s before): the
    # message comes from that look, not from a connect attempt that timed out.
    assert "nothing listens there" in done.stderr


def test_the_mesh_stops_cleanly_and_forgets_its_address(baton_up):
    process, state = baton_up["process"], baton_up["state"]
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait(60)
    stopped_s = time.monotonic() - started
    assert not (state / "mesh.json").exists()
    assert "mesh stopped" in (state / "baton-up.log").read_text()
    print(f"baton up stopped in {stopped_s:.2f}s")  # a figure to read, not a timed assertion


def test_make_install_says_what_it_is_doing():
    dry = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    pip = next(line for line in dry.stdout.splitlines() if "pip install" in line)
    assert "--quiet" not in pip and " -q " not in pip
    assert "echo" in dry.stdout and "installing" in dry.stdout


def test_the_readme_step_is_a_step_that_runs():
    from shared.schema import Passage
    from shared.steps import REGISTRY, StepInput, StepOutput

    namespace: dict = {}
    exec(compile(python_blocks()["step"], "README.md", "exec"), namespace)
    assert "agent" in REGISTRY
    passages = [Passage(source="a", text="Oil the chain.", score=1.0), Passage(source="b", text="Wipe it first.", score=0.9)]
    data = StepInput(request_id="q-1", route="agentic", question="How do I care for my chain?", passages=passages, time_left_s=5)
    out = namespace["agent"](data, namespace["Params"]())
    assert isinstance(out, StepOutput) and out.answer == "Oil the chain. Wipe it first."
