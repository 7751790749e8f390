"""`baton up` as a user runs it: secure by default, one per state folder, and never an orphan.

Each run gets its own state folder; every process `baton up` starts inherits
BATON_STATE_DIR, so the processes it leaves behind (if any) are found by that variable
in /proc/<pid>/environ, whatever their parent became.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects
from shared.natsd import free_port
from shared.settings import ROOT
from tests.conftest import eventually, eventually_sync

pytestmark = pytest.mark.e2e


def own_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """This machine's environment, minus any NATS it names: `baton up` and the CLI find their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "NATS_USER", "NATS_PASSWORD")}
    return {**env, "BATON_STATE_DIR": str(state_dir), **extra}


def up(state_dir: Path, index_dir: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = own_env(state_dir, BATON_INDEX_DIR=str(index_dir), **(extra_env or {}))
    log = open(state_dir.parent / f"{state_dir.name}-up.log", "wb")
    # Its own session, as from a terminal: a signal to the test's group does not reach it.
    return subprocess.Popen([sys.executable, "-m", "baton", "up", "--nats-port", str(free_port()), "--gateway-port", str(free_port()), *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def left_behind(state_dir: Path) -> list[str]:
    marker = f"BATON_STATE_DIR={state_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker + b"\0" in (proc / "environ").read_bytes() + b"\0":
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command}")
        except OSError:
            continue
    return found


def wait_gone(state_dir: Path, timeout_s: float = 20.0) -> list[str]:
    """What is left of the mesh once everything has gone (fails, saying what is left, if it does not)."""
    eventually_sync(lambda: not left_behind(state_dir), timeout_s, every=0.2, what=lambda: f"left behind: {left_behind(state_dir)}\n{output(state_dir)}")
    return left_behind(state_dir)


def wait_up(state_dir: Path, process: subprocess.Popen, timeout_s: float = 120.0) -> dict:
    def addresses() -> dict | None:
        assert process.poll() is None, output(state_dir)
        mesh_file = state_dir / "mesh.json"  # written once every service is pulling
        return json.loads(mesh_file.read_text()) if mesh_file.exists() else None

    return eventually_sync(addresses, timeout_s, every=0.2, what="baton up did not come up")


def output(state_dir: Path) -> str:
    return (state_dir.parent / f"{state_dir.name}-up.log").read_text(errors="replace")


def test_the_default_mesh_has_users_a_second_up_is_refused_and_sigterm_leaves_nothing(tmp_path, index_dir):
    state = tmp_path / "state"
    state.mkdir()
    process = up(state, index_dir)
    try:
        mesh = wait_up(state, process)
        credentials = json.loads((state / "credentials.json").read_text())
        assert (state / "credentials.json").stat().st_mode & 0o077 == 0  # for this user's eyes only

        second = subprocess.run([sys.executable, "-m", "baton", "up"], env=own_env(state, BATON_INDEX_DIR=str(index_dir)), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and f"pid {process.pid}" in second.stderr and "state folder" in second.stderr

        asyncio.run(_client_is_refused_off_its_subjects(mesh["nats_url"], credentials["users"]["cli"]))
        # The CLI finds its user by itself.
        assert ask(state)["ok"] is True

        # nats-server is watched like any replica: killed, it is started again and the mesh answers.
        server = next(line for line in left_behind(state) if "nats-server" in line)
        os.kill(int(server.split(":")[0]), signal.SIGKILL)
        eventually_sync(lambda: "nats-server exited" in output(state), 30, every=0.2, what=lambda: output(state))
        assert ask(state)["ok"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert wait_gone(state) == []
    assert not (state / "credentials.json").exists()


def ask(state: Path) -> dict:
    asked = subprocess.run([sys.executable, "-m", "baton", "ask", "How do I fix a puncture?", "--json", "--timeout", "30"], env=own_env(state), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    return json.loads(asked.stdout)


async def _client_is_refused_off_its_subjects(url: str, password: str) -> None:
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    anonymous = None
    try:
        anonymous = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:
        pass
    assert anonymous is None, "a connection without a user was accepted"
    nc = await nats.connect(url, user="cli", password=password, inbox_prefix=b"_INBOX.cli", error_cb=on_error)
    try:
        await nc.publish(subjects.step("guardrail"), b'{"forged": true}')
        await nc.publish(subjects.request("someone-else"), b'{"prompt": "hi"}')
        await nc.flush()
        await eventually(lambda: len(refused) >= 2, 5, every=0.1, what=lambda: f"refused: {refused}")
        assert any(subjects.step("guardrail") in r for r in refused), refused
        assert any(subjects.request("someone-else") in r for r in refused), refused
    finally:
        await nc.close()


@pytest.mark.parametrize("after_s", [0.5, 2.0, 3.5, 6.0])
def test_sigterm_at_any_moment_of_start_up_leaves_no_process_behind(tmp_path, index_dir, after_s):
    state = tmp_path / "state"
    state.mkdir()
    process = up(state, index_dir)
    time.sleep(after_s)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    assert wait_gone(state) == [], output(state)


def test_a_failed_start_says_why_and_leaves_no_process_behind(tmp_path, index_dir):
    state = tmp_path / "state"
    state.mkdir()
    # Every service fails at start (its metrics endpoint cannot bind); the collector and NATS are up by then.
    process = up(state, index_dir, extra_env={"BATON_METRICS_HOST": "203.0.113.1"})
    assert process.wait(120) == 1
    assert "exited with code" in output(state) and "Traceback" not in output(state)
    assert wait_gone(state) == [], output(state)
