"""Baton's benchmark harness: one run, one machine, every figure side by side.

    python -m bench.run              # full run (~10-15 min)
    python -m bench.run --quick      # smoke check (< 3 min)
    python -m bench.run --profile    # also: py-spy on each service under load

What it measures, and writes to bench/RESULTS.md and bench/results.json:

1. Baton, the `bench` route (router + guard.input, retrieve, generate, guard.output),
   instant stub model, durable hops: sequential latency, closed-loop throughput at fixed
   concurrencies, CPU per request over every process, RSS per service; with tracing on
   (collector running) and off (no collector).
2. The transport floor: raw nats-py 5-hop chains (core request/reply and JetStream),
   one process per hop, Baton's envelope size.
3. The peer: LiteLLM's proxy (one worker) on the same stub, same httpx load and body
   (and httpx straight to the stub: the client's own ceiling).
4. Generator scaling (1, 2, 4 replicas) with a 200 ms stub.
5. BM25 search latency on a generated 100k-chunk corpus, and collector ingestion.

All systems of 1-3 are started up front and idle while another is measured; the
phases (sequential, then each concurrency) alternate between them in rounds, so the
noise of a shared machine falls on all of them alike. Rounds are pooled per phase.

Every load loop is bounded by a count and a deadline; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from shared import children
from bench import collector_bench, decision_cost, profile, report, retrieval_bench
from bench.baton_bench import SERVICES, BatonLoad, BatonMesh, capture_envelopes, env_without_otel
from bench.load import CpuMeter, LoadResult, children_of, concurrent, merge, percentile, rss_mb, sequential
from bench.peer import ChatLoad, LiteLLMProxy, PeerUnavailable, ensure_litellm, litellm_version
from bench.transport import HOPS, PULL_BATCH, Chain, CoreClient, JetStreamClient, provision_js
from shared.natsd import NatsServer, free_port
from shared.settings import ROOT

BENCH_DIR = Path(__file__).resolve().parent

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "name": "full",
        "rounds": 3,  # every phase runs once per round, systems alternating: noise hits them alike
        "sequential": 100,  # per round
        "sequential_max_s": 60,
        "concurrencies": [16, 64],
        "duration_s": 6,  # per round and concurrency
        "max_count": 50_000,
        "warmup": 40,
        "warmup_s": 2,
        "scaling_replicas": [1, 2, 4],
        "scaling_concurrency": 64,
        "scaling_workers": 16,
        "scaling_latency_ms": 200,
        "scaling_duration_s": 10,
        "bm25_chunks": 100_000,
        "bm25_queries": 500,
        "collector_traces": 10_000,
        "collector_concurrency": 4,
        "collector_max_s": 60,
        "profile_s": 8,
        "idle_probes": 15,
    },
    "quick": {
        "name": "quick",
        "rounds": 1,
        "sequential": 40,
        "sequential_max_s": 15,
        "concurrencies": [16, 64],
        "duration_s": 2,
        "max_count": 10_000,
        "warmup": 15,
        "warmup_s": 1,
        "scaling_replicas": [1, 2, 4],
        "scaling_concurrency": 64,
        "scaling_workers": 16,
        "scaling_latency_ms": 200,
        "scaling_duration_s": 2,
        "bm25_chunks": 10_000,
        "bm25_queries": 100,
        "collector_traces": 1_000,
        "collector_concurrency": 4,
        "collector_max_s": 20,
        "profile_s": 3,
        "idle_probes": 5,
    },
}


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- the stub model


class Stub:
    """bench.stub_model in its own process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> Stub:
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.stub_model", "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        line = self.process.stdout.readline().decode().strip() if self.process.stdout else ""
        if not line.startswith("ready "):
            self.stop()
            raise BenchError(f"the stub model did not start (said {line!r})")
        self.base_url = line.split(" ", 1)[1]
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    async def set_latency(self, ms: float) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            (await client.post(f"{self.root}/_bench/latency", content=str(ms).encode())).raise_for_status()

    async def last_body(self) -> bytes:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(f"{self.root}/_bench/last")).content

    def stop(self) -> None:
        if self.process is not None:
            children.stop(self.process, grace_s=5)
            if self.process.stdout:
                self.process.stdout.close()
            self.process = None


# --------------------------------------------------------------------------- the systems under load


@dataclass
class System:
    """One thing measured under the same client load: Baton, a raw chain, the peer, ..."""

    key: str
    label: str
    call: Callable[[int], Awaitable[bool]]
    groups: Callable[[], dict[str, list[int]]]  # the processes whose CPU is this system's
    rounds: dict[str, list[LoadResult]] = field(default_factory=dict)


class Harness:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.P = PROFILES["quick" if args.quick else "full"]
        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
        self.stub = Stub()
        self.results: dict[str, Any] = {"errors": {}, "caveats": []}
        self.foreign: list[float] = []
        self.systems: list[System] = []
        self.meshes: dict[str, BatonMesh] = {}
        self.loads: dict[str, BatonLoad] = {}
        self.chat_body: bytes | None = None
        self.envelope: dict[str, int] = {}
        self.sample_envelope = b""
        self.baton_env = dict(item.split("=", 1) for item in args.baton_env if "=" in item)
        self._replies: dict[str, list] = {}  # Baton Replies of the sequential phases, per system
        self._litellm_pids: list[int] = []

    # -- output ---------------------------------------------------------------------

    def section(self, title: str) -> None:
        self.console.rule(f"[bold cyan]{title}")

    def say(self, text: str) -> None:
        self.console.print(text)

    def show(self, label: str, result: LoadResult) -> None:
        data = result.to_dict()
        lat = data.get("latency", {})
        errors = f" [red]{data['errors']} errors: {data.get('first_error')}[/red]" if data.get("errors") else ""
        per = data.get("cpu", {}).get("cpu_ms_per_request", {})
        own = sum(v for k, v in per.items() if k in SERVICES) or per.get("hops") or per.get("litellm")
        cpu = f"  cpu {own:5.2f} ms/req" if own else ""
        foreign = data.get("cpu", {}).get("foreign_cpu_share")
        noise = f"  [dim]others {foreign * 100:3.0f}%[/dim]" if foreign is not None else ""
        self.say(
            f"  [green]{label:<34}[/green] p50 [bold]{lat.get('p50_ms', float('nan')):8.2f}[/bold] ms  p99 {lat.get('p99_ms', float('nan')):8.2f} ms  "
            f"[bold yellow]{data['throughput_rps']:7.1f}[/bold yellow] req/s  n={data['completed']:<5}{cpu}{noise}{errors}"
        )

    @contextlib.contextmanager
    def progress_task(self, label: str):
        task = self.progress.add_task(label, total=None, info="")
        try:
            yield task
        finally:
            self.progress.remove_task(task)

    async def guarded(self, name: str, coro: Callable[[], Awaitable[Any]]) -> Any:
        """Run one part; a failure is recorded in the results and the run goes on."""
        try:
            return await coro()
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported in RESULTS.md
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.say(f"[bold red]{name} failed:[/bold red] {type(exc).__name__}: {exc}")
            (self.workdir / f"error-{name.replace(' ', '_')}.txt").write_text(traceback.format_exc())
            return None

    # -- load -------------------------------------------------------------------------

    def all_pids(self) -> set[int]:
        pids: set[int] = set()
        for system in self.systems:
            for group in system.groups().values():
                pids.update(group)
        return pids

    async def measure(self, label: str, call: Callable[[int], Awaitable[bool]], groups: dict[str, list[int]], *, concurrency: int = 0, count: int = 0, duration_s: float = 0.0) -> LoadResult:
        # What the other (idle) systems burn meanwhile is ours, not the machine's noise.
        idle = sorted(self.all_pids() - {pid for group in groups.values() for pid in group})
        # Two unmeasured requests first: the system sat idle while the others ran, and its
        # first request after idle can stall (measured on its own under "sparse traffic").
        for index in range(2):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call(index), 30)
        meter = CpuMeter({**groups, "idle bench processes": idle}).start()
        if concurrency == 0:
            task = self.progress.add_task(label, total=count, info="")
            result = await sequential(call, count, self.P["sequential_max_s"], tick=lambda: self.progress.advance(task))
        else:
            task = self.progress.add_task(label, total=duration_s, info="")
            started = time.perf_counter()
            done = [0]

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(0.25)
                    self.progress.update(task, completed=min(duration_s, time.perf_counter() - started), info=f"{done[0]} req")

            ticking = asyncio.create_task(ticker())
            try:
                result = await concurrent(call, concurrency, duration_s, self.P["max_count"], tick=lambda: done.__setitem__(0, done[0] + 1))
            finally:
                ticking.cancel()
        result.cpu = meter.stop(result.completed)
        self.progress.remove_task(task)
        if result.cpu.get("foreign_cpu_share") is not None:
            self.foreign.append(result.cpu["foreign_cpu_share"])
        self.show(label, result)
        return result

    async def warm(self, name: str, call: Callable[[int], Awaitable[bool]], bad: Callable[[], list[str]] | None = None) -> None:
        """Warm up, and refuse to measure something that answers wrongly."""
        with self.progress_task(f"{name}: warm-up"):
            first = await sequential(call, self.P["warmup"], 60)
            burst = await concurrent(call, 16, self.P["warmup_s"], 5000)
        errors = first.errors + burst.errors
        if errors:
            detail = (bad() if bad else []) or [first.first_error or burst.first_error]
            raise BenchError(f"{name}: {errors} of {first.completed + burst.completed + errors} warm-up requests failed: {detail[:2]}")

    # -- starting everything --------------------------------------------------------------

    async def start_all(self, stack: contextlib.AsyncExitStack) -> None:
        """Every system up at once (idle ones cost next to nothing), so phases can alternate."""
        self.section("Starting: stub model, Baton ×2 (tracing on / off), raw chains, LiteLLM")
        with self.progress_task("stub model; sample corpus index"):
            await asyncio.to_thread(self.stub.start)
            stack.callback(self.stub.stop)
            from services.retriever.index import ingest

            await asyncio.to_thread(ingest, ROOT / "corpus", self.workdir / "index")
        self.say(f"  stub model at {self.stub.base_url}")
        baton: dict[str, Any] = self.results.setdefault("baton", {})
        for key, tracing in (("tracing_on", True), ("tracing_off", False)):
            await self.guarded(f"baton {key.replace('_', ' ')}", lambda key=key, tracing=tracing: self.start_baton(stack, key, tracing, baton))
        if self.chat_body is None:
            self.results["errors"].setdefault("peer", "no chat body was captured from Baton's generator, so the peer has no payload")
        self.results["transport"] = {}
        await self.guarded("transport", lambda: self.start_transport(stack))
        self.results["peer"] = {}
        await self.guarded("peer", lambda: self.start_peer(stack))

    async def start_baton(self, stack: contextlib.AsyncExitStack, key: str, tracing: bool, out: dict[str, Any]) -> None:
        label = "Baton, tracing on" if tracing else "Baton, tracing off"
        mesh = BatonMesh(self.workdir, self.workdir / "index", self.stub.base_url, tracing, extra_env=self.baton_env)
        with self.progress_task(f"{label}: nats-server{', collector' if tracing else ''}, 5 services"):
            started = time.perf_counter()
            await asyncio.to_thread(mesh.start)
        stack.push_async_callback(asyncio.to_thread, mesh.stop)
        self.meshes[key] = mesh
        load = await stack.enter_async_context(BatonLoad(mesh.url))
        self.loads[key] = load
        sizes, largest = await capture_envelopes(mesh.url, lambda: self.warm(label, load.call, lambda: load.bad))
        envelope = {subject.replace(load.client.client_id, "<client>"): round(statistics.fmean(v)) for subject, v in sorted(sizes.items()) if ".step." in subject or ".request." in subject}
        self.envelope = self.envelope or envelope
        # The checked chain carries a real envelope: the largest one the generator received.
        self.sample_envelope = self.sample_envelope or max((body for subject, body in largest.items() if ".step." in subject), key=len, default=b"")
        if self.chat_body is None:
            self.chat_body = await self.stub.last_body()
        out[key] = {"startup_s": round(time.perf_counter() - started, 2), "envelope_bytes": envelope}

        self.systems.append(System(key, label, load.call, lambda: mesh.cpu_groups(self.stub.pid)))

    async def start_transport(self, stack: contextlib.AsyncExitStack) -> None:
        steps = [size for subject, size in self.envelope.items() if ".step." in subject]
        size = max(steps) if steps else 4096
        payload = (b'{"bench":"' + b"x" * size)[: size - 2] + b'"}'
        self.results["transport"].update({"payload_bytes": len(payload), "pull_batch": PULL_BATCH, "hops": HOPS})
        server = NatsServer()
        with self.progress_task("transport floor: nats-server, 5 core + 5 JetStream hop processes"):
            await asyncio.to_thread(server.start)
            stack.push_async_callback(asyncio.to_thread, server.stop)
            await provision_js(server.url)
            for kind, client_type in (("core", CoreClient), ("jetstream", JetStreamClient)):
                chain = Chain("core" if kind == "core" else "js", server.url)
                stack.push_async_callback(asyncio.to_thread, chain.stop)
                await asyncio.to_thread(chain.start)
                client = await stack.enter_async_context(client_type(server.url, payload))
                await self.warm(f"raw {kind} chain", client.call)
                server_pid = server.process.pid if server.process else 0
                self.systems.append(System(kind, f"raw {kind} chain", client.call, lambda chain=chain, pid=server_pid: {"hops": chain.pids, "nats-server": [pid]}))
            await self.start_checked_chain(stack, server)

    async def start_checked_chain(self, stack: contextlib.AsyncExitStack, server: NatsServer) -> None:
        """The JetStream chain plus the schema and a span per hop (bench/transport.py):
        what any durable, validated, traced hop costs before its step does anything."""
        traced = self.meshes.get("tracing_on")
        if not self.sample_envelope or traced is None or traced.mesh is None or traced.mesh.collector is None:
            self.results["errors"].setdefault("checked", "no envelope or collector from Baton (tracing on), so no checked chain")
            return
        mesh = traced.mesh
        chain = Chain("checked", server.url, env={"OTEL_EXPORTER_OTLP_ENDPOINT": mesh.collector_url, "OTEL_BSP_SCHEDULE_DELAY": mesh.env.get("OTEL_BSP_SCHEDULE_DELAY", "200")})
        stack.push_async_callback(asyncio.to_thread, chain.stop)
        await asyncio.to_thread(chain.start)
        client = await stack.enter_async_context(JetStreamClient(server.url, self.sample_envelope, kind="checked"))
        await self.warm("checked chain", client.call)
        self.results["transport"]["checked_payload_bytes"] = len(self.sample_envelope)
        groups = {"hops": chain.pids, "nats-server": [server.process.pid if server.process else 0], "collector": [mesh.collector.process.pid]}
        self.systems.append(System("checked", "checked JetStream chain (schema + span per hop)", client.call, lambda: groups))

    async def start_peer(self, stack: contextlib.AsyncExitStack) -> None:
        body = self.chat_body
        if not body:
            raise BenchError("no chat-completions body was captured from Baton's generator")
        peer = self.results["peer"]
        peer["body_bytes"] = len(body)
        direct = await stack.enter_async_context(ChatLoad(f"{self.stub.base_url}/chat/completions", body))
        await self.warm("httpx → stub", direct.call)
        self.systems.append(System("direct", "httpx → stub directly", direct.call, lambda: {"stub model": [self.stub.pid]}))
        try:
            with self.progress_task("LiteLLM: its venv (bench/.venv-litellm; a first run installs it)"):
                _, install_s = await asyncio.to_thread(ensure_litellm, 900.0, self.workdir / "litellm-install.log")
            proxy = LiteLLMProxy(self.workdir, self.stub.base_url, free_port())
            with self.progress_task("starting the LiteLLM proxy"):
                started = time.perf_counter()
                stack.push_async_callback(asyncio.to_thread, proxy.stop)
                await asyncio.to_thread(proxy.start)
        except PeerUnavailable as exc:
            peer["litellm"] = {"unavailable": str(exc)}
            self.say(f"[bold red]LiteLLM unavailable:[/bold red] {exc}")
            return
        assert proxy.process is not None
        pids = [proxy.process.pid, *children_of(proxy.process.pid)]
        peer["litellm"] = {"version": litellm_version(), "install_s": round(install_s, 1), "startup_s": round(time.perf_counter() - started, 1), "processes": len(pids)}
        load = await stack.enter_async_context(ChatLoad(f"{proxy.base_url}/v1/chat/completions", body, proxy.master_key))
        await self.warm("LiteLLM", load.call)
        self.systems.append(System("litellm", "LiteLLM proxy", load.call, lambda: {"litellm": pids, "stub model": [self.stub.pid]}))
        self._litellm_pids = pids

    # -- the interleaved rounds -------------------------------------------------------------

    async def rounds(self) -> None:
        P = self.P
        phases = [("sequential", 0)] + [(f"c{c}", c) for c in P["concurrencies"]]
        for number in range(P["rounds"]):
            self.section(f"Round {number + 1} of {P['rounds']}: every system, phase by phase, alternating")
            order = self.systems[number % len(self.systems) :] + self.systems[: number % len(self.systems)]
            for phase, concurrency in phases:
                for system in order:
                    load = self.loads.get(system.key)
                    if phase == "sequential" and load is not None:
                        load.replies = []
                    result = await self.measure(
                        f"{system.label} · {'sequential' if not concurrency else f'{concurrency} in flight'}",
                        system.call,
                        system.groups(),
                        concurrency=concurrency,
                        count=P["sequential"],
                        duration_s=P["duration_s"],
                    )
                    if phase == "sequential" and load is not None:
                        self._replies.setdefault(system.key, []).extend(load.replies or [])
                        load.replies = None
                    system.rounds.setdefault(phase, []).append(result)

    def collect(self) -> None:
        """Pool the rounds of every phase into the results."""
        places = {
            "tracing_on": self.results.setdefault("baton", {}),
            "tracing_off": self.results.setdefault("baton", {}),
            "core": self.results["transport"],
            "jetstream": self.results["transport"],
            "checked": self.results["transport"],
            "direct": self.results["peer"],
            "litellm": self.results["peer"],
        }
        for system in self.systems:
            target = places[system.key].setdefault(system.key, {})
            for phase, results in system.rounds.items():
                target[phase] = merge(results).to_dict()
            if system.key in self.meshes:
                target["rss_mb"] = self.meshes[system.key].rss()
                target["steps"] = step_breakdown(self._replies.get(system.key, []))
            if system.key == "litellm":
                target["rss_mb"] = round(sum(rss_mb(p) or 0 for p in self._litellm_pids), 1)

    # -- after the rounds -----------------------------------------------------------------

    async def after_idle(self) -> dict[str, Any]:
        """Sparse traffic: one request to each durable system after 1.1-2.9 s of silence.

        The pull consumers fetch with a 1 s timeout; a request that lands just as a fetch
        expires can wait for the next one. Continuous load never shows it; sparse traffic does.
        """
        targets = [system for system in self.systems if system.key in ("tracing_on", "tracing_off", "jetstream", "core")]
        if not targets:
            raise BenchError("no system to probe")
        count = self.P["idle_probes"]
        self.section(f"Sparse traffic: {count} requests, each after 1.1-2.9 s of idle, to {', '.join(s.label for s in targets)}")
        latencies: dict[str, list[float]] = {system.key: [] for system in targets}
        errors = dict.fromkeys(latencies, 0)
        task = self.progress.add_task("idle, then one request each", total=count, info="")
        for key in ("tracing_on", "tracing_off"):
            if key in self.loads:
                self.loads[key].replies = []  # keep the Replies: their step records say which hop waited
        try:
            for index in range(count):
                await asyncio.sleep(1.1 + (index * 0.37) % 1.8)

                async def one(system: System, index: int = index) -> None:
                    started = time.perf_counter()
                    try:
                        ok = await asyncio.wait_for(system.call(index), 30)
                    except Exception:  # noqa: BLE001 - counted
                        ok = False
                    if ok:
                        latencies[system.key].append(time.perf_counter() - started)
                    else:
                        errors[system.key] += 1

                await asyncio.gather(*(one(system) for system in targets))
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)
        slow_steps: dict[str, dict[str, int]] = {}
        for key in ("tracing_on", "tracing_off"):
            load = self.loads.get(key)
            if load is None:
                continue
            for reply, seconds in load.replies or []:
                if seconds > 0.1 and reply.steps:
                    worst = max(reply.steps, key=lambda step: step.queued_ms)
                    slow_steps.setdefault(key, {})
                    slow_steps[key][worst.step] = slow_steps[key].get(worst.step, 0) + 1
            load.replies = None
        out = {}
        for system in targets:
            ms = [value * 1000 for value in latencies[system.key]]
            out[system.key] = {
                "label": system.label,
                "requests": len(ms),
                "errors": errors[system.key],
                "p50_ms": round(percentile(ms, 50), 2) if ms else None,
                "max_ms": round(max(ms), 2) if ms else None,
                "over_100ms": sum(1 for value in ms if value > 100),
                # For Baton: in the slow probes, the step whose queue wait was longest.
                "slow_probes_longest_queue_at": slow_steps.get(system.key, {}),
            }
            self.say(f"  [green]{system.label:<34}[/green] p50 [bold]{out[system.key]['p50_ms']:8.2f}[/bold] ms  max {out[system.key]['max_ms']:8.2f} ms  "
                     f"[bold]{out[system.key]['over_100ms']}[/bold] of {len(ms)} over 100 ms")
        return out

    async def scaling(self) -> dict[str, Any]:
        """Generator replicas on one durable consumer, each taking at most `scaling_workers`
        calls at once (as a replica in front of a rate-limited model endpoint would): with
        more requests in flight than one replica takes, throughput should grow with replicas."""
        P = self.P
        workers = P["scaling_workers"]
        self.section(f"Scaling: generator replicas {P['scaling_replicas']}, {workers} calls each, {P['scaling_latency_ms']} ms stub, {P['scaling_concurrency']} in flight, tracing off")
        mesh = BatonMesh(self.workdir, self.workdir / "index", self.stub.base_url, False, extra_env={**self.baton_env, "BATON_MAX_WORKERS": str(workers)}, name="mesh-scaling")
        with self.progress_task("a mesh for the scaling run"):
            await asyncio.to_thread(mesh.start)
        await self.stub.set_latency(P["scaling_latency_ms"])
        runs = []
        try:
            async with BatonLoad(mesh.url) as load:
                for replicas in P["scaling_replicas"]:
                    with self.progress_task(f"generator replicas → {replicas}"):
                        await mesh.spawn_generators(replicas)
                        await concurrent(load.call, P["scaling_concurrency"], 1.5, 5000)  # let the new replica settle
                    result = await self.measure(f"{replicas} generator replica(s)", load.call, mesh.cpu_groups(self.stub.pid), concurrency=P["scaling_concurrency"], duration_s=P["scaling_duration_s"])
                    run = result.to_dict()
                    run["generators"] = replicas
                    runs.append(run)
        finally:
            await self.stub.set_latency(0)
            await asyncio.to_thread(mesh.stop)
        return {
            "stub_latency_ms": P["scaling_latency_ms"],
            "concurrency": P["scaling_concurrency"],
            "workers_per_replica": workers,
            "duration_s": P["scaling_duration_s"],
            "ideal_rps": P["scaling_concurrency"] / (P["scaling_latency_ms"] / 1000),
            "runs": runs,
        }

    async def profile_services(self) -> dict[str, Any]:
        mesh, load = self.meshes.get("tracing_on"), self.loads.get("tracing_on")
        if mesh is None or load is None:
            raise BenchError("the tracing-on mesh did not start")
        self.section("Profile: py-spy on each service in turn, tracing on, under load")
        if profile.available() is None:
            raise BenchError("py-spy is not installed: pip install -r bench/requirements.txt")
        out_dir = BENCH_DIR / "profiles"
        out_dir.mkdir(exist_ok=True)
        seconds = self.P["profile_s"]
        concurrency = max(self.P["concurrencies"])
        results = {}
        for service, pids in mesh.pids_by_service().items():
            if service == "fallback":
                continue  # idle on the happy path
            raw = out_dir / f"{service}.raw.txt"
            raw.unlink(missing_ok=True)
            spy = profile.record(pids[0], seconds, raw, gil_only=True)
            await asyncio.sleep(0.3)
            await self.measure(f"load while sampling {service}", load.call, mesh.cpu_groups(self.stub.pid), concurrency=concurrency, duration_s=seconds + 0.5)
            try:
                _, err = await asyncio.to_thread(spy.communicate, None, seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if raw.exists():
                results[service] = profile.analyse(raw, seconds)
                (out_dir / f"{service}.summary.json").write_text(json.dumps(results[service], indent=2))
                shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in list(results[service].get("self_share", {}).items())[:7])
                self.say(f"  [magenta]{service:<10}[/magenta] {shares}")
            else:
                results[service] = {"samples": 0, "error": (err or b"").decode(errors="replace")[-300:]}
        return results

    async def bm25(self) -> dict[str, Any]:
        chunks = self.P["bm25_chunks"]
        self.section(f"BM25: {chunks:,}-chunk generated corpus")
        meter = CpuMeter({})
        meter.start()
        with self.progress_task("BM25") as task:
            result = await asyncio.to_thread(retrieval_bench.run, self.workdir, chunks, self.P["bm25_queries"], lambda text: self.progress.update(task, description=f"BM25: {text}"))
        result["foreign_cpu_share"] = meter.stop(0)["foreign_cpu_share"]
        self.say(f"  [green]ingest[/green] {result['chunks_indexed']:,} chunks in [bold]{result['ingest_s']:.1f} s[/bold]   "
                 f"[green]search[/green] p50 [bold]{result['search']['p50_ms']:.2f}[/bold] ms  p99 {result['search']['p99_ms']:.2f} ms")
        return result

    async def collector(self) -> dict[str, Any]:
        traces = self.P["collector_traces"]
        self.section(f"Collector ingestion: {traces * len(collector_bench.HOPS):,} spans, OTLP protobuf")
        task = self.progress.add_task("collector: building batches, then POSTing", total=traces * len(collector_bench.HOPS), info="spans")
        try:
            result = await collector_bench.run(self.workdir, free_port(), traces, self.P["collector_concurrency"], self.P["collector_max_s"], tick=lambda n: self.progress.advance(task, n))
        finally:
            self.progress.remove_task(task)
        self.say(f"  [green]collector[/green] [bold yellow]{result['spans_per_s']:,.0f}[/bold yellow] spans/s  ({result['spans_accepted']:,} accepted, {result['spans_rejected']} rejected)")
        return result

    async def decisions(self) -> dict[str, Any]:
        self.section("Decisions in-process: the router's and the gates' CPU per call (default config)")
        with self.progress_task("router start-up and decisions, gates, local model"):
            result = await asyncio.to_thread(decision_cost.run)
        self.say(f"  [green]router[/green] decide p50 [bold]{result['decide_p50_us']:.0f} µs[/bold] (mean {result['decide_mean_us']:.0f}; "
                 f"encoder read {result['encoder_read_share'] * 100:.1f}% of {result['prompts']} prompts)   "
                 f"[green]input gate[/green] [bold]{result['input_gate_question_us']:.0f} µs[/bold] per bench question")
        return result

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        machine = report.machine_info()
        self.results.update(
            {
                "meta": {
                    "command": "python -m bench.run" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:])),
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "loadavg_before": list(os.getloadavg()),
                    "baton_env": self.baton_env,
                    "code": report.code_fingerprint(),
                    "baton_pull_sub": report.baton_pull_sub(),
                },
                "machine": machine,
                "profile": self.P,
            }
        )
        self.section("Baton benchmark" + (" (quick)" if self.args.quick else ""))
        self.say(f"[dim]{machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB; Python {machine['python']}; "
                 f"faststream {machine['versions']['faststream']}, nats-py {machine['versions']['nats-py']}, nats-server {machine['versions']['nats-server']}; "
                 f"load average {os.getloadavg()[0]:.2f}; workdir {self.workdir}[/dim]")
        env_without_otel()
        with self.progress:
            async with contextlib.AsyncExitStack() as stack:
                await self.start_all(stack)
                await self.rounds()
                self.collect()
                self.results["idle"] = await self.guarded("sparse traffic", self.after_idle)
                if self.args.profile:
                    self.results["profiles"] = await self.guarded("profile", self.profile_services)
                self.results["scaling"] = await self.guarded("scaling", self.scaling)
                self.say("[dim]stopping every process started[/dim]")
            self.results["bm25"] = await self.guarded("bm25", self.bm25)
            self.results["collector"] = await self.guarded("collector", self.collector)
            self.results["decisions"] = await self.guarded("decisions", self.decisions)
        meta = self.results["meta"]
        meta["loadavg_after"] = list(os.getloadavg())
        meta["duration_s"] = round(time.perf_counter() - started, 1)
        meta["foreign_cpu_share_mean"] = round(statistics.fmean(self.foreign), 3) if self.foreign else None
        self.results["machine"]["versions"]["litellm"] = get_litellm_version()
        self.results["headline"] = report.headline(self.results)
        self.results["caveats"] = caveats(self.results)
        return self.results


def get_litellm_version() -> str | None:
    with contextlib.suppress(Exception):
        return litellm_version()
    return None


def step_breakdown(replies: list[Any]) -> dict[str, Any] | None:
    """Median queue and work time of each step, from the Replies' own step records."""
    if not replies:
        return None
    names: list[str] = []
    queued: dict[str, list[float]] = {}
    work: dict[str, list[float]] = {}
    for reply, _ in replies:
        for step in reply.steps:
            if step.step not in names:
                names.append(step.step)
            queued.setdefault(step.step, []).append(step.queued_ms)
            work.setdefault(step.step, []).append(step.duration_ms)
    return {
        "per_step": [{"step": name, "queued_p50_ms": round(percentile(queued[name], 50), 3), "duration_p50_ms": round(percentile(work[name], 50), 3)} for name in names],
        "e2e_p50_ms": round(percentile([e2e * 1000 for _, e2e in replies], 50), 3),
        # Reply.latency_ms: from the router's envelope creation to the last hop's reply.
        "mesh_p50_ms": round(percentile([reply.latency_ms or 0.0 for reply, _ in replies], 50), 3),
    }


def caveats(results: dict[str, Any]) -> list[str]:
    out = []
    share = results["meta"].get("foreign_cpu_share_mean")
    if share is not None and share > 0.1:
        out.append(f"The machine was not quiet: on average {share * 100:.0f}% of its CPU went to processes this run did not start (other engineers' test runs). "
                   "Absolute latencies and throughputs are pessimistic and noisy; the ratios compare phases run minutes apart under similar noise.")
    out += [
        "One machine, 2 cores: the load generator (the harness process), nats-server, every service, the stub and the peer compete for the same cores, so throughput is CPU-bound and CPU per request is the portable figure.",
        "The stub model answers instantly with a fixed body; real models add their own latency (seconds), which dwarfs the mesh's milliseconds. The 200 ms scaling run shows the mesh when the model dominates.",
        "Baton vs LiteLLM is not like for like: Baton runs 5 durable hops (router, input gate, BM25 retrieval, generation, output gate), stores each Reply in KV and records every step; LiteLLM's proxy forwards one HTTP call. The ratio is the price of the pipeline and durability, not of routing alone.",
        "The raw JetStream chain has 5 durable writes per request (request + 4 forwards); Baton has 6 (it also stores the Reply in the results KV bucket). The chain carries the same ~envelope size on every hop; Baton's request message is small and its envelope grows along the route.",
        "Tracing on means the services export spans (BatchSpanProcessor, 200 ms schedule) to Baton's collector, which stores them in SQLite on this machine: its CPU is reported separately, not in the services' figure.",
        "Services log at their default level (INFO): the router writes one log line per request to its log file, as `baton up` does.",
        "Closed-loop load (each of N workers sends its next request when the previous one answers): p99 under load includes queueing in the mesh; it is not an open-loop arrival rate.",
        "Each measured phase starts with 2 unmeasured requests: a system sat idle while the others were measured, and a first request after idle can be slow (measured on its own under 'Sparse traffic'). Sequential figures are therefore steady back-to-back traffic.",
        "The mesh's code changed while this harness was being built (other engineers work in parallel): compare runs only with the same code hash (top of this file). Figures moved by tens of percent between runs minutes apart, from code changes and from the machine's other load.",
        "The HTTP load client is httpx sharded over 16 AsyncClients: one AsyncClient with 64 connections degraded to 50-200 req/s at 2-8 ms of client CPU per request here (httpcore's pool), which would have measured httpx instead of the peer. The `httpx → stub directly` row is the client's own ceiling.",
        "CPU per request = utime+stime deltas from /proc/<pid>/stat over the phase, divided by requests completed in it; RSS = VmRSS after the load.",
    ]
    lite = results.get("peer", {}) or {}
    if lite.get("litellm", {}).get("unavailable"):
        out.append(f"LiteLLM could not be measured here: {lite['litellm']['unavailable'].splitlines()[0]}")
    elif lite.get("litellm"):
        out.append("LiteLLM runs from its own venv (bench/.venv-litellm): `litellm[proxy]` pins older `openai` and `rich` than the mesh uses, so it is kept out of the project's venv. It runs with a master key (it refuses to start without one) and no database, so auth is an in-memory comparison.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Baton's benchmark harness (writes bench/RESULTS.md and bench/results.json).")
    parser.add_argument("--quick", action="store_true", help="shrink every count and duration (< 3 minutes; a smoke check)")
    parser.add_argument("--profile", action="store_true", help="also sample each service with py-spy under load")
    parser.add_argument("--output", type=Path, default=BENCH_DIR, help="where RESULTS.md and results.json go (default: bench/)")
    parser.add_argument("--baton-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for Baton's processes, e.g. BATON_MAX_WORKERS=16 (repeatable; recorded in the results)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    harness = Harness(args)

    async def run_until_signalled() -> dict[str, Any]:
        # SIGTERM/SIGINT/SIGHUP cancel the run: the exit stack then stops every process it started.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        return await harness.run()

    try:
        results = asyncio.run(run_until_signalled())
    except (KeyboardInterrupt, asyncio.CancelledError):
        import shutil

        shutil.rmtree(harness.workdir, ignore_errors=True)
        harness.console.print("[bold red]interrupted; every process started has been stopped[/bold red]")
        sys.exit(130)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.output / "RESULTS.md").write_text(report.render(results))
    h = results["headline"]
    rates = ", ".join(f"{report.fmt(v, '', 0)} req/s @{k[1:]}" for k, v in (h["baton_rps"] or {}).items())
    harness.section("Headline")
    harness.say(
        f"Baton p50 [bold]{report.fmt(h['baton_p50_ms'], ' ms')}[/bold] = [bold]{report.fx(h['baton_vs_raw_js_p50'])}[/bold] the raw JetStream chain ({report.fmt(h['raw_js_p50_ms'], ' ms')}); "
        f"throughput {rates}; "
        f"vs LiteLLM: throughput {report.fx(h['baton_vs_litellm_rps'])}, p50 {report.fx(h['baton_vs_litellm_p50'])}; "
        f"tracing on/off: throughput {report.fx(h['tracing_on_vs_off_rps'])}, p50 {report.fx(h['tracing_on_vs_off_p50'])}"
    )
    harness.say(f"wrote {args.output / 'RESULTS.md'} and {args.output / 'results.json'} in {results['meta']['duration_s']:.0f} s")
    if results["errors"]:
        harness.say(f"[bold red]sections that failed: {', '.join(results['errors'])}[/bold red] (tracebacks in {harness.workdir})")
    else:
        import shutil

        shutil.rmtree(harness.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
