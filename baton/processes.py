"""Start and stop the mesh on one machine: a NATS server and one process per replica.

Used by `baton up`, the demo and the end-to-end tests, so all three run the mesh the
same way. Each service replica is `python -m shared.run <service>`; its output goes to
a log file, and a replica that dies at start-up is reported with its last lines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from shared import subjects
from shared.natsd import NatsServer
from shared.provision import provision
from shared.settings import ROOT, Settings

MESH_SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")


class MeshStartError(RuntimeError):
    pass


@dataclass
class Replica:
    service: str
    index: int
    process: subprocess.Popen
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class MeshProcesses:
    """The processes of one running mesh. `stop()` always leaves nothing behind."""

    settings: Settings
    env: dict[str, str] = field(default_factory=dict)
    nats_server: NatsServer | None = None
    replicas: list[Replica] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        return self.nats_server.url if self.nats_server else self.settings.nats_url

    def start_nats(self, store_dir: Path | None = None) -> str:
        self.nats_server = NatsServer(store_dir=store_dir).start()
        return self.nats_server.url

    def child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def spawn(self, service: str) -> Replica:
        index = sum(1 for r in self.replicas if r.service == service)
        log_dir = self.settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{service}-{index}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "shared.run", service],
                cwd=ROOT,
                env=self.child_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches `baton`, which stops us in order
            )
        replica = Replica(service, index, process, log_path)
        self.replicas.append(replica)
        return replica

    def start(self, counts: dict[str, int], timeout_s: float = 30.0) -> None:
        asyncio.run(self._provision())
        for service, count in counts.items():
            for _ in range(count):
                self.spawn(service)
        self.wait_ready(timeout_s)

    async def _provision(self) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            await provision(nc.jetstream(), self.settings)
        finally:
            await nc.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every replica is alive and pulling from its consumer."""
        asyncio.run(self._wait_ready(timeout_s))

    async def _wait_ready(self, timeout_s: float) -> None:
        wanted: dict[str, int] = {}
        for replica in self.replicas:
            wanted[replica.service] = wanted.get(replica.service, 0) + 1
        nc = await nats.connect(self.nats_url)
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        try:
            pending = dict(wanted)
            while pending:
                for replica in self.replicas:
                    if not replica.alive:
                        raise MeshStartError(f"{replica.service} exited with code {replica.process.returncode}:\n{replica.tail()}")
                for service in list(pending):
                    info = await js.consumer_info(subjects.STREAM, subjects.durable(service))
                    if (info.num_waiting or 0) >= 1:
                        pending.pop(service)
                if time.monotonic() > deadline:
                    raise MeshStartError(f"not ready within {timeout_s:.0f}s: {', '.join(pending)}; see logs in {self.settings.state_dir / 'logs'}")
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def kill(self, replica: Replica) -> None:
        """SIGKILL one replica (chaos)."""
        if replica.alive:
            os.kill(replica.process.pid, signal.SIGKILL)
            replica.process.wait(5)

    def stop(self, timeout_s: float = 10.0) -> None:
        for replica in self.replicas:
            if replica.alive:
                replica.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            try:
                replica.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait(5)
        self.replicas.clear()
        if self.nats_server:
            self.nats_server.stop()
            self.nats_server = None
