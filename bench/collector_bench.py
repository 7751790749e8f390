"""Collector ingestion: OTLP/HTTP protobuf batches, encoded as the services' exporter does
(shared/otlp_wire.py: the bytes of the OpenTelemetry SDK's encoder), POSTed to Baton's collector (`create_app` served by uvicorn, its own process).

The spans look like Baton's: one trace per request, a chain of hop spans
(publish → route → guard.input → retrieve → generate → chat → guard.output) with the
declared attributes, one TracerProvider (resource) per service, exported in batches
of 512 spans per service, as the BatchSpanProcessor does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shared import children
from bench.load import CpuMeter, rss_mb, summarize

ROOT = Path(__file__).resolve().parent.parent
BATCH = 512  # the BatchSpanProcessor's default max_export_batch_size

HOPS = [
    ("client", "publish baton.v1.request"),
    ("router", "route"),
    ("guardrail", "guard.input"),
    ("retriever", "retrieve"),
    ("generator", "generate"),
    ("generator", "chat stub"),
    ("guardrail", "guard.output"),
]


def build_batches(traces: int) -> tuple[list[bytes], int]:
    """Serialized ExportTraceServiceRequest bodies holding `traces` Baton-like traces."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from shared import attributes as A
    from shared.otlp_wire import encode_spans

    exporters: dict[str, InMemorySpanExporter] = {}
    tracers = {}
    for service in {service for service, _ in HOPS}:
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        exporters[service] = exporter
        tracers[service] = provider.get_tracer("baton")
    for _ in range(traces):
        request_id = uuid.uuid4().hex
        context = None
        for index, (service, name) in enumerate(HOPS):
            attributes = {
                A.MESSAGING_SYSTEM: "nats",
                A.MESSAGING_DESTINATION: f"baton.v1.step.{service}",
                A.MESSAGING_OPERATION: "process",
                A.REQUEST_ID: request_id,
                A.ROUTE: "bench",
                A.CONFIG_VERSION: "bench-1",
                A.STEP: name,
                A.STEP_INDEX: index,
                A.QUEUED_MS: 0.4,
                A.STEP_OUTCOME: "ok",
            }
            kind = SpanKind.PRODUCER if index == 0 else SpanKind.CLIENT if name.startswith("chat") else SpanKind.CONSUMER
            span = tracers[service].start_span(name, context=context, kind=kind, attributes=attributes)
            span.end()
            context = trace.set_span_in_context(span)
    bodies, total = [], 0
    for exporter in exporters.values():
        spans = exporter.get_finished_spans()
        total += len(spans)
        for start in range(0, len(spans), BATCH):
            bodies.append(encode_spans(spans[start : start + BATCH]))
    bodies.sort(key=len)  # deterministic order across services; every body is independent
    return bodies, total


def _spans_in(body: bytes) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


def start_collector(workdir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "BATON_COLLECTOR_PORT": str(port), "BATON_COLLECTOR_DB": str(workdir / "collector-bench.sqlite3"), "PYTHONPATH": str(ROOT)}
    log = open(workdir / "collector-bench.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "services.collector"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the collector exited with {process.returncode}; see {workdir / 'collector-bench.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                process.wait(5)
                raise RuntimeError("the collector did not answer within 20s") from None
            time.sleep(0.1)



async def run(workdir: Path, port: int, traces: int, concurrency: int, max_s: float, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    built = time.perf_counter()
    bodies, total_spans = await asyncio.to_thread(build_batches, traces)
    build_s = time.perf_counter() - built
    counts = [_spans_in(body) for body in bodies]
    process = await asyncio.to_thread(start_collector, workdir, port)
    try:
        url = f"http://127.0.0.1:{port}/v1/traces"
        accepted = rejected = 0
        latencies: list[float] = []
        queue = list(zip(bodies, counts))
        queue.reverse()
        meter = CpuMeter({"collector": [process.pid]}).start()
        started = time.perf_counter()
        deadline = started + max_s
        async with httpx.AsyncClient(timeout=30) as client:

            async def worker() -> None:
                nonlocal accepted, rejected
                while queue and time.perf_counter() < deadline:
                    body, spans = queue.pop()
                    sent = time.perf_counter()
                    response = await client.post(url, content=body, headers={"Content-Type": "application/x-protobuf"})
                    latencies.append(time.perf_counter() - sent)
                    if response.status_code == 200:
                        accepted += spans
                    else:
                        rejected += spans
                    if tick:
                        tick(spans)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = meter.stop(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            import json

            stored = json.loads(response.read()).get("spans")
        return {
            "spans_built": total_spans,
            "batches": len(bodies),
            "batch_spans": BATCH,
            "mean_body_kb": round(sum(map(len, bodies)) / len(bodies) / 1024, 1),
            "build_s": round(build_s, 2),
            "concurrency": concurrency,
            "spans_accepted": accepted,
            "spans_rejected": rejected,
            "spans_stored": stored,
            "elapsed_s": round(elapsed, 3),
            "spans_per_s": round(accepted / elapsed, 1) if elapsed else 0.0,
            "post_latency": summarize(latencies),
            "collector_cpu_s": cpu["cpu_s"]["collector"],
            "collector_rss_mb": rss_mb(process.pid),
            "foreign_cpu_share": cpu["foreign_cpu_share"],
        }
    finally:
        await asyncio.to_thread(children.stop, process)


def main() -> None:
    """Just this benchmark, e.g. for a before/after on one change (the full run is `bench.run`)."""
    import argparse
    import json
    import tempfile

    from shared.natsd import free_port

    parser = argparse.ArgumentParser(prog="python -m bench.collector_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=10_000, help="Baton-like traces, 7 spans each (the full profile's figure)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-s", type=float, default=60.0)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as workdir:
        result = asyncio.run(run(Path(workdir), port, args.traces, args.concurrency, args.max_s))
    result["collector_cpu_us_per_span"] = round(result["collector_cpu_s"] / max(1, result["spans_accepted"]) * 1e6, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
