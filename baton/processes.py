"""Start and stop the mesh on one machine: a NATS server and one process per replica.

Used by `baton up`, the demo and the end-to-end tests, so all three run the mesh the
same way. Each service replica is `python -m shared.run <service>`; its output goes to
a log file, and a replica that dies at start-up is reported with its last lines.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from shared import subjects
from shared.natsd import NatsServer, free_port
from shared.live_config import publish_config
from shared.provision import provision
from shared.settings import ROOT, Settings, server_list

MESH_SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")


class MeshStartError(RuntimeError):
    pass


@dataclass
class Replica:
    service: str
    index: int
    process: subprocess.Popen
    log_path: Path
    metrics_port: int | None = None

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
    collector: Replica | None = None
    collector_url: str | None = None
    gateway: Replica | None = None
    gateway_url: str | None = None

    @property
    def nats_url(self) -> str:
        return self.nats_server.url if self.nats_server else self.settings.nats_url

    def start_nats(self, store_dir: Path | None = None, port: int = 0) -> str:
        self.nats_server = NatsServer(port=port, store_dir=store_dir).start()
        return self.nats_server.url

    def child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def spawn(self, service: str) -> Replica:
        index = sum(1 for r in self.replicas if r.service == service)
        metrics_port = free_port()
        replica = self._start_process(service, index, ["-m", "shared.run", service], {"BATON_METRICS_PORT": str(metrics_port)})
        replica.metrics_port = metrics_port
        self.replicas.append(replica)
        return replica

    def _start_process(self, name: str, index: int, args: list[str], extra_env: dict[str, str]) -> Replica:
        log_dir = self.settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}-{index}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**self.child_env(), **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches `baton`, which stops us in order
            )
        return Replica(name, index, process, log_path)

    def start_collector(self, db_path: Path | None = None, timeout_s: float = 15.0) -> str:
        """Start the trace collector and point every service started later at it."""
        port = free_port()
        env = {"BATON_COLLECTOR_PORT": str(port), "BATON_COLLECTOR_DB": str(db_path or self.settings.state_dir / "collector.sqlite3")}
        self.collector = self._start_process("collector", 0, ["-m", "services.collector"], env)
        self.collector_url = f"http://127.0.0.1:{port}"
        self._wait_http(self.collector, f"{self.collector_url}/healthz", timeout_s)
        self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.collector_url
        self.env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")  # spans reach `baton trace` within a moment
        return self.collector_url

    def start_gateway(self, port: int | None = None, timeout_s: float = 15.0) -> str:
        """Start the OpenAI-compatible HTTP gateway (after the mesh: it answers 503 until NATS is up)."""
        port = port or free_port()
        self.gateway = self._start_process("gateway", 0, ["-m", "services.gateway"], {"BATON_GATEWAY_PORT": str(port)})
        self.gateway_url = f"http://127.0.0.1:{port}"
        self._wait_http(self.gateway, f"{self.gateway_url}/healthz", timeout_s)
        return self.gateway_url

    @staticmethod
    def _wait_http(replica: Replica, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not replica.alive:
                raise MeshStartError(f"the {replica.service} exited with code {replica.process.returncode}:\n{replica.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise MeshStartError(f"the {replica.service} did not answer {url} within {timeout_s:.0f}s; see {replica.log_path}") from None
                time.sleep(0.1)

    def start(self, counts: dict[str, int], timeout_s: float = 30.0) -> None:
        asyncio.run(self._provision())
        for service, count in counts.items():
            for _ in range(count):
                self.spawn(service)
        self.wait_ready(timeout_s)

    async def _provision(self) -> None:
        """Create what the mesh needs and make the config file the active version."""
        nc = await nats.connect(server_list(self.nats_url))
        try:
            js = nc.jetstream()
            await provision(js, self.settings)
            await publish_config(await js.key_value(subjects.CONFIG_BUCKET), self.settings.config.read_text(), str(self.settings.config))
        finally:
            await nc.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every replica is alive and pulling from its consumer."""
        asyncio.run(self._wait_ready(timeout_s))

    async def _wait_ready(self, timeout_s: float) -> None:
        wanted: dict[str, int] = {}
        for replica in self.replicas:
            wanted[replica.service] = wanted.get(replica.service, 0) + 1
        nc = await nats.connect(server_list(self.nats_url))
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
        for extra in (self.gateway, self.collector):  # the collector last: the services' final spans land first
            if extra is not None and extra.alive:
                extra.process.send_signal(signal.SIGTERM)
                try:
                    extra.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    extra.process.kill()
                    extra.process.wait(5)
        self.gateway = self.collector = None
        if self.nats_server:
            self.nats_server.stop()
            self.nats_server = None
