"""Start and stop the mesh on one machine: a NATS server and one process per replica.

Used by `baton up`, the demo and the end-to-end tests, so all three run the mesh the
same way. Each service replica is `python -m shared.run <service>`; its output goes to
a log file, and a replica that dies at start-up is reported with its last lines.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import urllib.request
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from shared import children
from shared import subjects
from shared.natsd import AUTH_CONF_FILE, CREDENTIALS_FILE, NatsServer, free_port, write_credentials, write_local_auth
from shared.config import load_config
from shared.live_config import publish_config
from shared.provision import provision
from shared.settings import ROOT, Settings, server_list

MESH_SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READY_STALL_S = 30.0  # start-up fails when nothing has moved for this long
READY_LIMIT_S = 600.0  # ... or after this long, however busy the machine


class MeshStartError(RuntimeError):
    pass


class Stopped(Exception):
    """A stop signal arrived (SIGTERM, SIGINT, SIGHUP): unwind to the `finally` that stops the mesh."""


class StopSignals:
    """Stop signals, noted by the handler and acted on where `baton up` waits.

    The handler only notes the signal: an exception raised from a signal handler lands
    wherever the interpreter happens to be, and there it can be swallowed (a weakref
    callback during garbage collection prints "Exception ignored" and carries on), which
    left `baton up` running with everything it had started. Every wait of the start-up
    and the supervising loop checks the note at least every 0.1-0.5 s instead."""

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum

    def check(self) -> None:
        """Raise Stopped once a stop signal has arrived."""
        if self.received is not None:
            raise Stopped(signal.Signals(self.received).name)


STOP = StopSignals()


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
    # name -> password of every NATS user, when this mesh started its NATS with users.
    credentials: dict[str, str] = field(default_factory=dict)
    # The router seals envelopes with it and the services check them (shared/envelopes.py).
    envelope_key: str = field(default_factory=lambda: secrets.token_hex(32))
    # service -> the module of its custom step (shared/steps.py), started with `baton serve`.
    step_modules: dict[str, str] = field(default_factory=dict)

    @property
    def nats_url(self) -> str:
        return self.nats_server.url if self.nats_server else self.settings.nats_url

    def start_nats(self, store_dir: Path | None = None, *, port: int = 0, secure: bool = True, clients: tuple[str, ...] = (), timeout_s: float = 10.0) -> str:
        """A nats-server for this mesh; `secure`: with the generated least-privilege users and
        fresh passwords (kept in the state folder: credentials.json, mode 0600)."""
        config_file = None
        if secure:
            steps = tuple(load_config(self.settings.config).custom_steps.values())  # users for the config's own steps
            config_file, self.credentials = write_local_auth(self.settings.state_dir, clients, steps)
        server = NatsServer(port=port, store_dir=store_dir, config_file=config_file, log_path=self.settings.state_dir / "logs" / "nats-server.log")
        self.nats_server = server
        server.launch()
        server.wait_ready(timeout_s, check=STOP.check)
        if secure:
            write_credentials(self.settings.state_dir, server.url, self.credentials)
        return server.url

    def restart_nats(self) -> None:
        """The server died: start it again on the same port, store and users."""
        self.nats_server.stop(keep_store=True)
        self.nats_server.launch()
        self.nats_server.wait_ready(check=STOP.check)

    def connect_options(self, user: str) -> dict[str, str]:
        """How `user` connects to this mesh's NATS (nothing to add when it has no users)."""
        return {"user": user, "password": self.credentials[user]} if self.credentials else {}

    def child_env(self, user: str | None = None) -> dict[str, str]:
        env = {**os.environ, **self.env, "NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1"}
        env.setdefault("BATON_ENVELOPE_KEY", self.envelope_key)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.credentials and user:
            # Each process as its own least-privilege user; `baton up` has provisioned as admin.
            env.update({"NATS_USER": user, "NATS_PASSWORD": self.credentials[user], "BATON_PROVISION": "0"})
        return env

    def spawn(self, service: str) -> Replica:
        index = sum(1 for r in self.replicas if r.service == service)
        metrics_port = free_port()
        module = self.step_modules.get(service)  # a custom step: `baton serve <module>`
        args = ["-m", "baton", "serve", module] if module else ["-m", "shared.run", service]
        replica = self._start_process(service, index, args, {"BATON_METRICS_PORT": str(metrics_port)}, user=service)
        replica.metrics_port = metrics_port
        self.replicas.append(replica)
        return replica

    def _start_process(self, name: str, index: int, args: list[str], extra_env: dict[str, str], user: str | None = None) -> Replica:
        log_dir = self.settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}-{index}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**self.child_env(user), **extra_env},
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
        self.gateway = self._start_process("gateway", 0, ["-m", "services.gateway"], {"BATON_GATEWAY_PORT": str(port)}, user="gateway")
        self.gateway_url = f"http://127.0.0.1:{port}"
        self._wait_http(self.gateway, f"{self.gateway_url}/healthz", timeout_s)
        return self.gateway_url

    @staticmethod
    def _wait_http(replica: Replica, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            STOP.check()
            if not replica.alive:
                raise MeshStartError(f"the {replica.service} exited with code {replica.process.returncode}:\n{replica.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise MeshStartError(f"the {replica.service} did not answer {url} within {timeout_s:.0f}s; see {replica.log_path}") from None
                time.sleep(0.1)

    def start(self, counts: dict[str, int], stall_s: float = READY_STALL_S) -> None:
        asyncio.run(self._provision())
        for service, count in counts.items():
            for _ in range(count):
                STOP.check()
                self.spawn(service)
        self.wait_ready(stall_s)

    async def _connect_admin(self) -> nats.NATS:
        inbox = {"inbox_prefix": subjects.inbox_prefix("admin").encode()} if self.credentials else {}
        return await nats.connect(server_list(self.nats_url), **self.connect_options("admin"), **inbox)

    async def _provision(self) -> None:
        """Create what the mesh needs and make the config file the active version."""
        nc = await self._connect_admin()
        try:
            js = nc.jetstream()
            await provision(js, self.settings)
            await publish_config(await js.key_value(subjects.CONFIG_BUCKET), self.settings.config.read_text(), str(self.settings.config))
        finally:
            await nc.close()

    def wait_ready(self, stall_s: float = READY_STALL_S, limit_s: float = READY_LIMIT_S) -> None:
        """Wait until every replica is alive and pulling from its consumer.

        On a loaded machine start-up can take long: it fails only when nothing moved for
        `stall_s` (no service became ready, no waiting replica used CPU), or after `limit_s`."""
        asyncio.run(self._wait_ready(stall_s, limit_s))

    async def _wait_ready(self, stall_s: float, limit_s: float) -> None:
        pending = {replica.service for replica in self.replicas}
        nc = await self._connect_admin()
        js = nc.jetstream()
        started = last_moved = time.monotonic()
        cpu = -1
        try:
            while pending:
                STOP.check()
                for replica in self.replicas:
                    if not replica.alive:
                        raise MeshStartError(f"{replica.service} exited with code {replica.process.returncode}:\n{replica.tail()}")
                for service in list(pending):
                    info = await js.consumer_info(subjects.STREAM, subjects.durable(service))
                    if (info.num_waiting or 0) >= 1:
                        pending.discard(service)
                        last_moved = time.monotonic()
                now_cpu = sum(_cpu_ticks(r.process.pid) for r in self.replicas if r.service in pending)
                if now_cpu != cpu:
                    cpu, last_moved = now_cpu, time.monotonic()
                now = time.monotonic()
                if pending and (now - last_moved > stall_s or now - started > limit_s):
                    why = f"nothing moved for {stall_s:.0f}s" if now - last_moved > stall_s else f"still starting after {limit_s:.0f}s"
                    raise MeshStartError(f"not ready ({why}): {', '.join(sorted(pending))}; see logs in {self.settings.state_dir / 'logs'}")
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def kill(self, replica: Replica) -> None:
        """SIGKILL one replica (chaos)."""
        if replica.alive:
            os.kill(replica.process.pid, signal.SIGKILL)
            replica.process.wait(5)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop(timeout_s)  # signals now only add to the note: the stop is never cut short
        for private in (CREDENTIALS_FILE, AUTH_CONF_FILE):  # passwords of a mesh that is gone
            (self.settings.state_dir / private).unlink(missing_ok=True)

    def _stop(self, timeout_s: float) -> None:
        children.stop_all((replica.process for replica in self.replicas), timeout_s)
        self.replicas.clear()
        for extra in (self.gateway, self.collector):  # the collector last: the services' final spans land first
            if extra is not None:
                children.stop(extra.process, timeout_s)
        self.gateway = self.collector = None
        if self.nats_server:
            self.nats_server.stop()
            self.nats_server = None


def _cpu_ticks(pid: int) -> int:
    """CPU time a process has used (Linux /proc), to tell a slow start from a stuck one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0
