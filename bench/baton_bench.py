"""Baton itself: the `bench` route end to end, through real service processes.

The mesh is started exactly as `baton up` and the end-to-end tests start it
(`baton.processes.MeshProcesses`), with the bench config (bench/config.yaml) whose
generate step calls the loopback stub model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from baton.client import BatonClient
from baton.processes import MeshProcesses
from shared import subjects
from shared.settings import Settings

from bench.load import rss_mb

BENCH_DIR = Path(__file__).resolve().parent
CONFIG = BENCH_DIR / "config.yaml"
ROUTE = "bench"
ROUTE_STEPS = ("guard.input", "retrieve", "generate", "guard.output")
STUB_KEY = "sk-bench-not-a-real-key"
SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")

QUESTIONS = [
    "How often should I replace my bike chain, and how do I know it is worn?",
    "What tyre pressure should I run on 40 mm gravel tyres?",
    "What fluid do Shimano hydraulic disc brakes use?",
    "How do I fix a puncture at the side of the road?",
    "Why do my disc brakes squeal when they get wet?",
    "How do I true a wheel with a small wobble?",
    "How often should I lube my chain when it rains a lot?",
    "What torque should I use on a carbon seatpost clamp?",
    "How can I tell if my cassette is worn out?",
    "What's the best way to clean a drivetrain at home?",
]


@dataclass
class BatonMesh:
    """One running mesh for the benchmark; `stop()` always leaves nothing behind."""

    workdir: Path
    index_dir: Path
    stub_url: str
    tracing: bool
    extra_env: dict[str, str] = field(default_factory=dict)
    name: str = ""  # its own state directory, when more than one mesh with the same tracing runs
    mesh: MeshProcesses | None = None
    envelope_bytes: dict[str, list[int]] = field(default_factory=dict)

    def start(self, counts: dict[str, int] | None = None) -> BatonMesh:
        state = self.workdir / (self.name or ("mesh-tracing-on" if self.tracing else "mesh-tracing-off"))
        state.mkdir(parents=True, exist_ok=True)
        settings = Settings(state_dir=state, index_dir=self.index_dir, config=CONFIG)
        env = {
            "BATON_STATE_DIR": str(state),
            "BATON_INDEX_DIR": str(self.index_dir),
            "BATON_CONFIG": str(CONFIG),
            "BENCH_STUB_URL": self.stub_url,
            "BENCH_STUB_KEY": STUB_KEY,
            **self.extra_env,
        }
        self.mesh = MeshProcesses(settings, env=env)
        try:
            self.mesh.start_nats(secure=False)  # as the earlier RESULTS were measured: no NATS users
            if self.tracing:
                self.mesh.start_collector()
            self.mesh.start(counts or {service: 1 for service in SERVICES})
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.stop()
            self.mesh = None

    @property
    def url(self) -> str:
        assert self.mesh is not None
        return self.mesh.nats_url

    def pids_by_service(self) -> dict[str, list[int]]:
        assert self.mesh is not None
        out: dict[str, list[int]] = {}
        for replica in self.mesh.replicas:
            out.setdefault(replica.service, []).append(replica.process.pid)
        return out

    def cpu_groups(self, stub_pid: int) -> dict[str, list[int]]:
        assert self.mesh is not None
        groups: dict[str, list[int]] = dict(self.pids_by_service())
        if self.mesh.nats_server and self.mesh.nats_server.process:
            groups["nats-server"] = [self.mesh.nats_server.process.pid]
        if self.mesh.collector is not None:
            groups["collector"] = [self.mesh.collector.process.pid]
        groups["stub model"] = [stub_pid]
        return groups

    def rss(self) -> dict[str, float]:
        """RSS in MB per service (summed over replicas), plus nats-server and the collector."""
        assert self.mesh is not None
        out: dict[str, float] = {}
        for service, pids in self.pids_by_service().items():
            out[service] = round(sum(rss_mb(pid) or 0.0 for pid in pids), 1)
        if self.mesh.nats_server and self.mesh.nats_server.process:
            out["nats-server"] = rss_mb(self.mesh.nats_server.process.pid) or 0.0
        if self.mesh.collector is not None:
            out["collector"] = rss_mb(self.mesh.collector.process.pid) or 0.0
        return out

    async def spawn_generators(self, total: int) -> None:
        """Grow the generator to `total` replicas on the same durable consumer."""
        assert self.mesh is not None
        mesh = self.mesh

        def grow() -> None:
            while sum(1 for r in mesh.replicas if r.service == "generator") < total:
                mesh.spawn("generator")
            mesh.wait_ready(60)

        await asyncio.to_thread(grow)


class BatonLoad:
    """A BatonClient whose `call` is one request on the bench route, checked."""

    def __init__(self, url: str):
        self.url = url
        self.client = BatonClient(url, timeout_s=30)
        self.bad: list[str] = []
        self.replies: list[tuple[Any, float]] | None = None  # (Reply, seconds) while recording

    async def __aenter__(self) -> BatonLoad:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def call(self, index: int) -> bool:
        started = time.perf_counter()
        reply = await self.client.ask(QUESTIONS[index % len(QUESTIONS)], route=ROUTE, timeout_s=30)
        if self.replies is not None:
            self.replies.append((reply, time.perf_counter() - started))
        # The whole route ran: not a cache hit, the stub generated, no fallback, no degrade.
        ok = reply.ok and not getattr(reply, "cached", False) and reply.models == ["stub"] and not reply.degraded and not reply.fallbacks and len(reply.steps) == len(ROUTE_STEPS)
        if not ok and len(self.bad) < 5:
            self.bad.append(reply.model_dump_json(include={"error", "models", "fallbacks", "degraded", "cached"}))
        return ok


async def capture_envelopes(url: str, run: Callable[[], Any]) -> tuple[dict[str, list[int]], dict[str, bytes]]:
    """Sizes of the messages on every hop subject while `run()` runs, and the largest one
    seen on each (a core NATS tap).

    A core subscription sees every message published on the subjects without taking
    anything from the work-queue stream.
    """
    sizes: dict[str, list[int]] = {}
    largest: dict[str, bytes] = {}
    nc = await nats.connect(url)
    try:

        async def tap(msg) -> None:
            sizes.setdefault(msg.subject, []).append(len(msg.data))
            if len(msg.data) > len(largest.get(msg.subject, b"")):
                largest[msg.subject] = msg.data

        sub = await nc.subscribe(f"{subjects.PREFIX}.>", cb=tap)
        await run()
        await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    finally:
        await nc.close()
    return sizes, largest


def env_without_otel() -> None:
    """The harness decides about tracing: a stray OTEL_* in the caller's shell must not."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            os.environ.pop(name)
