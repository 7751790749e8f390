"""CPU per hop span, in-process: the real SDK, a BatchSpanProcessor and OTLP protobuf
encoding (the exporter's work minus the network), around `HopRuntime.hop` + `observe`
as a hop runs them. Not a timed test: a figure to compare before and after a change.

    .venv/bin/python -m bench.span_cost [--spans 20000] [--encoder wire|sdk] [--tracer lean|sdk]

`--encoder wire` (the default) encodes as the services' exporter does (shared/otlp_wire.py);
`sdk` as the OpenTelemetry SDK's OTLP exporter does (the exporter before it).
`--tracer lean` (the default) makes the spans as the services do with that exporter
(shared/lean_tracer.py); `sdk` with the OpenTelemetry SDK's tracer (the tracer before it).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from shared.runtime import _MESSAGE, HopRuntime
from shared.schema import Envelope, Event, Passage, Request, Step
from shared import otlp_wire, telemetry


ENCODERS = {"wire": otlp_wire.encode_spans, "sdk": lambda spans: encode_spans(spans).SerializeToString()}
ENCODER = "wire"
TRACER = "lean"


class EncodingSink(SpanExporter):
    """Serializes every batch as the exporter would, then drops it."""

    def __init__(self) -> None:
        self.spans = 0
        self.encode = ENCODERS[ENCODER]

    def export(self, spans) -> SpanExportResult:
        self.encode(spans)
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_provider(sink: SpanExporter, queue: int):
    """The services' provider (shared/telemetry.py) around `sink`, with the tracer chosen."""
    processor = BatchSpanProcessor(sink, max_queue_size=queue, max_export_batch_size=512, schedule_delay_millis=200)
    resource = Resource.create({"service.name": "bench"})
    if TRACER == "lean":
        from shared.lean_tracer import LeanTracerProvider

        return LeanTracerProvider(resource, processor)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return provider


def fake_mesh(tracer, message) -> HopRuntime:
    """A runtime without a connection: only what `hop` and `observe` read."""
    mesh = HopRuntime.__new__(HopRuntime)
    mesh.service = "guardrail"
    mesh.tracer = tracer
    mesh._hop_static = None
    _MESSAGE.set(message)
    mesh.nc = SimpleNamespace(connected_url=SimpleNamespace(hostname="127.0.0.1", port=4222))
    return mesh


def measure(spans: int) -> dict[str, float]:
    sink = EncodingSink()
    provider = make_provider(sink, spans + 1000)
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


def model_span(mesh: HopRuntime, env: Envelope) -> None:
    """The generate hop's model call, as each version of generator/app.py writes it (inside the hop's span)."""
    from opentelemetry.trace import SpanKind

    from services.generator.providers import Generation
    from shared import attributes as A
    from shared.schema import Usage

    generation = Generation(text="Replace it at 0.5% wear.", model="gpt-4o-mini", provider="openai", usage=Usage(input_tokens=120, output_tokens=12))
    if hasattr(telemetry, "record_generation"):  # this branch
        from opentelemetry import trace

        span = trace.get_current_span()  # the generate hop's span is the model call's
        span.set_attributes(telemetry.llm_request_attributes(provider="openai", model="gpt-4o-mini", max_tokens=512, session_id=env.request.session_id, messages=None))
        telemetry.record_generation(span, generation, 0.0001)
    else:  # the code before: generator/app.py's inline attributes
        attributes = {A.GEN_AI_OPERATION: "chat", A.GEN_AI_PROVIDER: "openai", A.GEN_AI_REQUEST_MODEL: "gpt-4o-mini"}
        with mesh.tracer.start_as_current_span("chat gpt-small", kind=SpanKind.CLIENT, attributes=attributes) as span:
            span.set_attributes({A.GEN_AI_RESPONSE_MODEL: generation.model, A.GEN_AI_INPUT_TOKENS: 120, A.GEN_AI_OUTPUT_TOKENS: 12, A.USAGE_ESTIMATED: False, A.COST_USD: 0.0001})


def one_request(mesh: HopRuntime, env: Envelope, message: SimpleNamespace) -> None:
    """The spans of one request through the mesh (6 hops and the model call), as the services make them."""
    from shared import attributes as A
    from shared.replies import answer_reply

    headers = telemetry.inject({"Nats-Msg-Id": env.request_id, "Baton-Request-Id": env.request_id})
    route_event = Event(kind="route", step="route", data={"route": "factual", "reason": "keywords", "confidence": 0.9, "complexity": 0.2})
    for cursor, (step, subject) in enumerate([("route", "baton.v1.request.c"), ("guard.input", "baton.v1.step.guardrail"), ("retrieve", "baton.v1.step.retriever"),
                                              ("guard.retrieval", "baton.v1.step.guardrail"), ("generate", "baton.v1.step.generator"), ("guard.output", "baton.v1.step.guardrail")]):
        message.headers, message.subject = headers, subject
        if step == "route":
            with mesh.hop("route", **{A.REQUEST_ID: env.request_id}) as span:
                extra = {A.CONFIG_VERSION: env.config_version} if hasattr(A, "OI_KIND") else {}
                span.set_attributes({**telemetry.envelope_attributes(env), **extra})
                mesh_observe(mesh, span, env, [route_event])
                headers = telemetry.inject({"Nats-Msg-Id": f"{env.request_id}.0.0", "Baton-Request-Id": env.request_id})
            continue
        env.cursor = cursor - 1
        with mesh.hop(step, env, **{A.QUEUED_MS: 0.4}) as span:
            if step == "generate":
                model_span(mesh, env)
                events = []
            elif step == "retrieve":
                events = [Event(kind="retrieval", step=step, data={"count": 1, "top_score": 3.2})]
            else:
                events = [Event(kind="gate", step=step, data={"gate": step, "verdict": "pass", "score": 0.1, "reason": "clean"})]
            mesh_observe(mesh, span, env, events, {A.STEP_OUTCOME: "ok"})
            if step == "guard.output":
                telemetry.record_reply(span, answer_reply(env, telemetry.trace_id_of(span)))
            else:
                headers = telemetry.inject({"Nats-Msg-Id": f"{env.request_id}.0.{cursor}", "Baton-Request-Id": env.request_id})


def measure_requests(requests: int) -> float:
    sink = EncodingSink()
    provider = make_provider(sink, requests * 8 + 1000)
    message = SimpleNamespace(headers={}, subject="", data=b"x" * 2400)
    mesh = fake_mesh(provider.get_tracer("baton"), message)
    env = Envelope(request_id="abc", request=Request(prompt="How often should I replace my chain?"), route="factual",
                   slip=[Step(service="guardrail", name="guard.input")] * 5, deadline=time.time() + 60, config_version="v1")
    env.context.passages = [Passage(text="Replace it at 0.5% wear.", score=3.2, source="handbook/chain.md", title="Chains", corpus="handbook")]
    env.context.outputs["answer"] = "Replace it at 0.5% wear."
    for _ in range(100):
        one_request(mesh, env, message)
    provider.force_flush()
    start = time.process_time()
    for _ in range(requests):
        one_request(mesh, env, message)
    provider.force_flush()
    cpu = time.process_time() - start
    assert sink.spans >= requests * 6
    provider.shutdown()
    return round(cpu / requests * 1e6, 1)


def mesh_observe(mesh: HopRuntime, span, env: Envelope, events: list[Event], attributes: dict | None = None) -> None:
    """`HopRuntime.observe` minus the metrics, as each version of telemetry.py takes it."""
    arguments = telemetry.record_events.__code__.co_argcount
    if arguments == 4:  # the hop's own attributes go with the events, in one call
        telemetry.record_events(span, events, env, attributes)
        return
    if attributes:
        span.set_attributes(attributes)
    telemetry.record_events(span, events) if arguments == 2 else telemetry.record_events(span, events, env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="wire")
    parser.add_argument("--tracer", choices=("lean", "sdk"), default="lean")
    args = parser.parse_args()
    global ENCODER, TRACER
    ENCODER, TRACER = args.encoder, args.tracer
    results = sorted(measure(args.spans)["cpu_us_per_span"] for _ in range(args.runs))
    print(f"CPU per hop span (hop + observe + batch export encoding): min {results[0]} us, median {results[len(results) // 2]} us, runs {results}")
    per_request = sorted(measure_requests(args.requests) for _ in range(args.runs))
    print(f"CPU per request (6 hop spans, the model call's attributes, 6 injects): min {per_request[0]} us, median {per_request[len(per_request) // 2]} us, runs {per_request}")


if __name__ == "__main__":
    main()
