"""Baton's benchmark harness: one run, one machine, every figure side by side.

    python -m bench.run              # full run (~10-15 min)
    python -m bench.run --quick      # smoke check (< 3 min)
    python -m bench.run --profile    # also: py-spy on each service under load

What it measures, in this order, and writes to bench/RESULTS.md and bench/results.json:

1. Baton, the `bench` route (router + guard.input, retrieve, generate, guard.output),
   instant stub model, durable hops: sequential latency, closed-loop throughput at fixed
   concurrencies, CPU per request over every process, RSS per service; tracing on
   (collector running), then off. Then generator scaling with a 200 ms stub.
2. The transport floor: raw nats-py 5-hop chains (core request/reply and JetStream),
   one process per hop, Baton's envelope size.
3. The peer: LiteLLM's proxy (one worker) on the same stub, same httpx load and body.
4. BM25 search latency on a generated 100k-chunk corpus, and collector ingestion.

Every load loop is bounded by a count and a deadline; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from bench import collector_bench, profile, report, retrieval_bench
from bench.baton_bench import SERVICES, BatonLoad, BatonMesh, capture_envelopes, env_without_otel
from bench.load import CpuMeter, LoadResult, children_of, concurrent, percentile, rss_mb, sequential
from bench.peer import ChatLoad, LiteLLMProxy, PeerUnavailable, ensure_litellm, litellm_version
from bench.transport import HOPS, PULL_BATCH, Chain, CoreClient, JetStreamClient, provision_js
from shared.natsd import NatsServer, free_port
from shared.settings import ROOT

BENCH_DIR = Path(__file__).resolve().parent

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "name": "full",
        "sequential": 300,
        "sequential_max_s": 60,
        "concurrencies": [16, 64],
        "duration_s": 10,
        "max_count": 50_000,
        "warmup": 40,
        "warmup_s": 2,
        "scaling_replicas": [1, 2, 4],
        "scaling_concurrency": 32,
        "scaling_latency_ms": 200,
        "scaling_duration_s": 10,
        "bm25_chunks": 100_000,
        "bm25_queries": 500,
        "collector_traces": 10_000,
        "collector_concurrency": 4,
        "collector_max_s": 60,
        "profile_s": 8,
    },
    "quick": {
        "name": "quick",
        "sequential": 60,
        "sequential_max_s": 15,
        "concurrencies": [16, 64],
        "duration_s": 2.5,
        "max_count": 10_000,
        "warmup": 15,
        "warmup_s": 1,
        "scaling_replicas": [1, 2, 4],
        "scaling_concurrency": 32,
        "scaling_latency_ms": 200,
        "scaling_duration_s": 2.5,
        "bm25_chunks": 10_000,
        "bm25_queries": 100,
        "collector_traces": 1_000,
        "collector_concurrency": 4,
        "collector_max_s": 20,
        "profile_s": 3,
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
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            if self.process.stdout:
                self.process.stdout.close()
            self.process = None


# --------------------------------------------------------------------------- the harness


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
        self.chat_body: bytes | None = None
        self.envelope_size: int | None = None

    # -- output ---------------------------------------------------------------------

    def section(self, title: str) -> None:
        self.console.rule(f"[bold cyan]{title}")

    def say(self, text: str) -> None:
        self.console.print(text)

    def show(self, label: str, result: LoadResult | dict[str, Any]) -> None:
        data = result.to_dict() if isinstance(result, LoadResult) else result
        lat = data.get("latency", {})
        errors = f" [red]{data['errors']} errors: {data.get('first_error')}[/red]" if data.get("errors") else ""
        per = data.get("cpu", {}).get("cpu_ms_per_request", {})
        own = sum(v for k, v in per.items() if k in SERVICES) or per.get("hops") or per.get("litellm")
        cpu = f"  cpu {own:.2f} ms/req" if own else ""
        self.say(
            f"  [green]{label:<28}[/green] p50 [bold]{lat.get('p50_ms', float('nan')):8.2f}[/bold] ms  p99 {lat.get('p99_ms', float('nan')):8.2f} ms  "
            f"[bold yellow]{data['throughput_rps']:8.1f}[/bold yellow] req/s  n={data['completed']}{cpu}{errors}"
        )

    # -- load -------------------------------------------------------------------------

    async def measure(self, label: str, call: Callable[[int], Awaitable[bool]], groups: dict[str, list[int]], *, concurrency: int = 0, count: int = 0, duration_s: float = 0.0) -> dict[str, Any]:
        meter = CpuMeter(groups).start()
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
        return result.to_dict()

    async def standard(self, name: str, call: Callable[[int], Awaitable[bool]], groups: dict[str, list[int]]) -> dict[str, Any]:
        out = {"sequential": await self.measure(f"{name} sequential", call, groups, count=self.P["sequential"])}
        for c in self.P["concurrencies"]:
            out[f"c{c}"] = await self.measure(f"{name} {c} in flight", call, groups, concurrency=c, duration_s=self.P["duration_s"])
        return out

    async def warm(self, name: str, call: Callable[[int], Awaitable[bool]], bad: Callable[[], list[str]] | None = None) -> None:
        """Warm up, and refuse to measure something that answers wrongly."""
        with self.progress_task(f"{name} warm-up"):
            first = await sequential(call, self.P["warmup"], 60)
            burst = await concurrent(call, 16, self.P["warmup_s"], 5000)
        errors = first.errors + burst.errors
        if errors:
            detail = (bad() if bad else []) or [first.first_error or burst.first_error]
            raise BenchError(f"{name}: {errors} of {first.completed + burst.completed + errors} warm-up requests failed: {detail[:2]}")

    @contextlib.contextmanager
    def progress_task(self, label: str):
        task = self.progress.add_task(label, total=None, info="")
        try:
            yield task
        finally:
            self.progress.remove_task(task)

    async def guarded(self, name: str, coro: Callable[[], Awaitable[Any]]) -> Any:
        """Run one section; a failure is recorded and the run goes on with the next."""
        try:
            return await coro()
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported in RESULTS.md
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.say(f"[bold red]{name} failed:[/bold red] {type(exc).__name__}: {exc}")
            (self.workdir / f"error-{name.replace(' ', '_')}.txt").write_text(traceback.format_exc())
            return None

    # -- sections ---------------------------------------------------------------------

    async def baton(self, tracing: bool) -> dict[str, Any]:
        label = "Baton (tracing on)" if tracing else "Baton (tracing off)"
        self.section(f"1. {label}: 5 durable hops, instant stub model")
        index_dir = self.workdir / "index"
        mesh = BatonMesh(self.workdir, index_dir, self.stub.base_url, tracing)
        with self.progress_task("starting nats-server" + (", collector" if tracing else "") + " and 5 services"):
            started = time.perf_counter()
            await asyncio.to_thread(mesh.start)
        out: dict[str, Any] = {"startup_s": round(time.perf_counter() - started, 2)}
        try:
            async with BatonLoad(mesh.url) as load:
                sizes = await capture_envelopes(mesh.url, lambda: self.warm(label, load.call, lambda: load.bad))
                envelope = {subject: round(statistics.fmean(v)) for subject, v in sorted(sizes.items()) if ".step." in subject or ".request." in subject}
                out["envelope_bytes"] = envelope
                steps = [size for subject, size in envelope.items() if ".step." in subject]
                if steps and self.envelope_size is None:
                    self.envelope_size = round(statistics.fmean(steps))
                if self.chat_body is None:
                    self.chat_body = await self.stub.last_body()
                groups = mesh.cpu_groups(self.stub.pid)
                load.replies = []
                out["sequential"] = await self.measure(f"{label} sequential", load.call, groups, count=self.P["sequential"])
                out["steps"] = step_breakdown(load.replies)
                load.replies = None
                for c in self.P["concurrencies"]:
                    out[f"c{c}"] = await self.measure(f"{label} {c} in flight", load.call, groups, concurrency=c, duration_s=self.P["duration_s"])
                out["rss_mb"] = mesh.rss()
                if tracing and self.args.profile:
                    self.results["profiles"] = await self.profile_services(mesh, load)
                if not tracing:
                    self.results["scaling"] = await self.guarded("scaling", lambda: self.scaling(mesh, load))
        finally:
            with self.progress_task("stopping the mesh"):
                await asyncio.to_thread(mesh.stop)
        return out

    async def scaling(self, mesh: BatonMesh, load: BatonLoad) -> dict[str, Any]:
        P = self.P
        self.section(f"4. Scaling: generator replicas {P['scaling_replicas']}, {P['scaling_latency_ms']} ms stub, {P['scaling_concurrency']} in flight")
        await self.stub.set_latency(P["scaling_latency_ms"])
        runs = []
        try:
            for replicas in P["scaling_replicas"]:
                with self.progress_task(f"generator replicas → {replicas}"):
                    await mesh.spawn_generators(replicas)
                    await concurrent(load.call, P["scaling_concurrency"], 1.5, 5000)  # let the new replica settle
                groups = mesh.cpu_groups(self.stub.pid)
                run = await self.measure(f"{replicas} generator(s)", load.call, groups, concurrency=P["scaling_concurrency"], duration_s=P["scaling_duration_s"])
                run["generators"] = replicas
                runs.append(run)
        finally:
            await self.stub.set_latency(0)
        return {
            "stub_latency_ms": P["scaling_latency_ms"],
            "concurrency": P["scaling_concurrency"],
            "duration_s": P["scaling_duration_s"],
            "ideal_rps": P["scaling_concurrency"] / (P["scaling_latency_ms"] / 1000),
            "runs": runs,
        }

    async def profile_services(self, mesh: BatonMesh, load: BatonLoad) -> dict[str, Any]:
        self.section("Profile: py-spy on each service under load (tracing on)")
        if profile.available() is None:
            self.say("[yellow]py-spy is not installed: pip install -r bench/requirements.txt[/yellow]")
            return {}
        out_dir = BENCH_DIR / "profiles"
        out_dir.mkdir(exist_ok=True)
        seconds = self.P["profile_s"]
        c = max(self.P["concurrencies"])
        results = {}
        for service, pids in mesh.pids_by_service().items():
            if service == "fallback":
                continue  # idle on the happy path
            raw = out_dir / f"{service}.raw.txt"
            spy = profile.record(pids[0], seconds, raw)
            await asyncio.sleep(0.3)
            await self.measure(f"load while sampling {service}", load.call, mesh.cpu_groups(self.stub.pid), concurrency=c, duration_s=seconds + 0.5)
            try:
                _, err = await asyncio.to_thread(spy.communicate, timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.communicate()
                err = b"py-spy did not finish"
            if raw.exists():
                results[service] = profile.analyse(raw, seconds)
                (out_dir / f"{service}.summary.json").write_text(json.dumps(results[service], indent=2))
                shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in list(results[service].get("self_share", {}).items())[:6])
                self.say(f"  [magenta]{service:<10}[/magenta] {shares}")
            else:
                results[service] = {"samples": 0, "error": (err or b"").decode(errors="replace")[-300:]}
        return results

    async def transport(self) -> dict[str, Any]:
        size = self.envelope_size or 4096
        self.section(f"2. Transport floor: raw nats-py, {HOPS} hops in {HOPS} processes, {size}-byte payload")
        payload = (b'{"bench":"' + b"x" * size)[: size - 2] + b'"}'
        out: dict[str, Any] = {"payload_bytes": len(payload), "pull_batch": PULL_BATCH, "hops": HOPS}
        server = NatsServer()
        await asyncio.to_thread(server.start)
        try:
            assert server.process is not None
            for kind, client_type in (("core", CoreClient), ("jetstream", JetStreamClient)):
                if kind == "jetstream":
                    await provision_js(server.url)
                chain = Chain("core" if kind == "core" else "js", server.url)
                with self.progress_task(f"starting {HOPS} {kind} hop processes"):
                    await asyncio.to_thread(chain.start)
                try:
                    groups = {"hops": chain.pids, "nats-server": [server.process.pid]}
                    async with client_type(server.url, payload) as client:
                        await self.warm(f"raw {kind}", client.call)
                        out[kind] = await self.standard(f"raw {kind}", client.call, groups)
                finally:
                    await asyncio.to_thread(chain.stop)
        finally:
            await asyncio.to_thread(server.stop)
        return out

    async def peer(self) -> dict[str, Any]:
        self.section("3. Peer: LiteLLM proxy (1 worker) on the same stub model")
        body = self.chat_body
        if not body:
            raise BenchError("no chat-completions body was captured from Baton's generator (did section 1 run?)")
        out: dict[str, Any] = {"body_bytes": len(body)}
        async with ChatLoad(f"{self.stub.base_url}/chat/completions", body) as direct:
            await self.warm("httpx → stub", direct.call)
            out["direct"] = await self.standard("httpx → stub", direct.call, {"stub model": [self.stub.pid]})
        try:
            with self.progress_task("LiteLLM: ensuring its venv (bench/.venv-litellm; first run installs it)"):
                _, install_s = await asyncio.to_thread(ensure_litellm, 900.0, self.workdir / "litellm-install.log")
        except PeerUnavailable as exc:
            out["litellm"] = {"unavailable": str(exc)}
            self.say(f"[bold red]LiteLLM unavailable:[/bold red] {exc}")
            return out
        proxy = LiteLLMProxy(self.workdir, self.stub.base_url, free_port())
        try:
            with self.progress_task("starting the LiteLLM proxy"):
                started = time.perf_counter()
                try:
                    await asyncio.to_thread(proxy.start)
                except PeerUnavailable as exc:
                    out["litellm"] = {"unavailable": str(exc), "install_s": round(install_s, 1)}
                    self.say(f"[bold red]LiteLLM did not start:[/bold red] {exc}")
                    return out
            startup_s = time.perf_counter() - started
            assert proxy.process is not None
            pids = [proxy.process.pid, *children_of(proxy.process.pid)]
            async with ChatLoad(f"{proxy.base_url}/v1/chat/completions", body, proxy.master_key) as load:
                await self.warm("LiteLLM", load.call)
                lite = await self.standard("LiteLLM", load.call, {"litellm": pids, "stub model": [self.stub.pid]})
            lite.update({"version": litellm_version(), "install_s": round(install_s, 1), "startup_s": round(startup_s, 1), "rss_mb": round(sum(rss_mb(p) or 0 for p in pids), 1), "processes": len(pids)})
            out["litellm"] = lite
        finally:
            await asyncio.to_thread(proxy.stop)
        return out

    async def bm25(self) -> dict[str, Any]:
        chunks = self.P["bm25_chunks"]
        self.section(f"5a. BM25: {chunks:,}-chunk generated corpus")
        with self.progress_task("BM25") as task:
            result = await asyncio.to_thread(retrieval_bench.run, self.workdir, chunks, self.P["bm25_queries"], lambda text: self.progress.update(task, description=f"BM25: {text}"))
        self.say(f"  [green]ingest[/green] {result['chunks_indexed']:,} chunks in [bold]{result['ingest_s']:.1f} s[/bold]   "
                 f"[green]search[/green] p50 [bold]{result['search']['p50_ms']:.2f}[/bold] ms  p99 {result['search']['p99_ms']:.2f} ms")
        return result

    async def collector(self) -> dict[str, Any]:
        traces = self.P["collector_traces"]
        self.section(f"5b. Collector ingestion: {traces * len(collector_bench.HOPS):,} spans, OTLP protobuf")
        task = self.progress.add_task("collector: building batches, then POSTing", total=traces * len(collector_bench.HOPS), info="spans")
        try:
            result = await collector_bench.run(self.workdir, free_port(), traces, self.P["collector_concurrency"], self.P["collector_max_s"], tick=lambda n: self.progress.advance(task, n))
        finally:
            self.progress.remove_task(task)
        self.say(f"  [green]collector[/green] [bold yellow]{result['spans_per_s']:,.0f}[/bold yellow] spans/s  ({result['spans_accepted']:,} accepted, {result['spans_rejected']} rejected)")
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
            try:
                with self.progress_task("starting the stub model; ingesting the sample corpus"):
                    await asyncio.to_thread(self.stub.start)
                    from services.retriever.index import ingest

                    await asyncio.to_thread(ingest, ROOT / "corpus", self.workdir / "index")
                self.say(f"  stub model at {self.stub.base_url}")
                baton = self.results.setdefault("baton", {})
                baton["tracing_on"] = await self.guarded("baton tracing on", lambda: self.baton(True))
                baton["tracing_off"] = await self.guarded("baton tracing off", lambda: self.baton(False))
                self.results["transport"] = await self.guarded("transport", self.transport)
                self.results["peer"] = await self.guarded("peer", self.peer)
            finally:
                with self.progress_task("stopping the stub model"):
                    await asyncio.to_thread(self.stub.stop)
            self.results["bm25"] = await self.guarded("bm25", self.bm25)
            self.results["collector"] = await self.guarded("collector", self.collector)
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
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    harness = Harness(args)
    try:
        results = asyncio.run(harness.run())
    except KeyboardInterrupt:
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
