"""CPU per hop span, in-process: the real SDK, a BatchSpanProcessor and OTLP protobuf
encoding (the exporter's work minus the network), around `Mesh.hop` + `Mesh.observe`
as a hop runs them. Not a timed test: a figure to compare before and after a change.

    .venv/bin/python -m bench.span_cost [--spans 20000]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from shared.mesh import Mesh
from shared.schema import Envelope, Event, Passage, Request, Step
from shared import telemetry


class EncodingSink(SpanExporter):
    """Serializes every batch as the OTLP exporter would, then drops it."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def fake_mesh(tracer, message) -> Mesh:
    """A Mesh without a broker: only what `hop` and `observe` read."""
    mesh = Mesh.__new__(Mesh)
    mesh.service = "guardrail"
    mesh.tracer = tracer
    mesh.current_message = lambda: message
    connection = SimpleNamespace(connected_url=SimpleNamespace(hostname="127.0.0.1", port=4222))
    mesh.broker = SimpleNamespace(config=SimpleNamespace(connection_state=SimpleNamespace(connection=connection)))
    return mesh


def measure(spans: int) -> dict[str, float]:
    sink = EncodingSink()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(sink, max_queue_size=spans + 1000, max_export_batch_size=512, schedule_delay_millis=200))
    tracer = provider.get_tracer("baton")
    with tracer.start_as_current_span("parent"):
        headers = telemetry.inject({"Nats-Msg-Id": "abc.0.2", "Baton-Request-Id": "abc"})
    message = SimpleNamespace(headers=headers, subject="baton.v1.step.guardrail", data=b"x" * 2400)
    mesh = fake_mesh(tracer, message)
    env = Envelope(request_id="abc", request=Request(prompt="How often should I replace my chain?"), route="factual",
                   slip=[Step(service="guardrail", name="guard.input")], deadline=time.time() + 60, config_version="v1")
    env.context.passages = [Passage(text="Replace it at 0.5% wear.", score=3.2, source="handbook/chain.md", title="Chains", corpus="handbook")]
    events = [Event(kind="gate", step="guard.input", data={"gate": "guard.input", "verdict": "pass", "score": 0.1, "reason": "clean"})]
    for _ in range(500):  # warm up
        with mesh.hop("guard.input", env) as span:
            mesh_observe(mesh, span, env, events)
    provider.force_flush()
    start = time.process_time()
    for _ in range(spans):
        with mesh.hop("guard.input", env) as span:
            mesh_observe(mesh, span, env, events)
    provider.force_flush()
    cpu = time.process_time() - start
    provider.shutdown()
    return {"spans": spans, "cpu_us_per_span": round(cpu / spans * 1e6, 1)}


def mesh_observe(mesh: Mesh, span, env: Envelope, events: list[Event]) -> None:
    telemetry.record_events(span, events) if telemetry.record_events.__code__.co_argcount == 2 else telemetry.record_events(span, events, env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = sorted(measure(args.spans)["cpu_us_per_span"] for _ in range(args.runs))
    print(f"CPU per hop span (hop + observe + batch export encoding): median {results[len(results) // 2]} us, runs {results}")


if __name__ == "__main__":
    main()
