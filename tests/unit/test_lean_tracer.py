"""The lean tracer against the OpenTelemetry SDK's: the same calls through the OpenTelemetry
API, under the same random ids and clock, must put the same spans on the wire."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterator

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from shared import attributes as A
from shared import lean_tracer, otlp_wire, telemetry
from shared.lean_tracer import LeanSpan, LeanTracerProvider
from shared.schema import Error, ErrorCode, Event

RESOURCE = Resource.create({"service.name": "guardrail", "openinference.project.name": "baton"})


class Opaque:
    """A value of no attribute type: the SDK keeps its str()."""

    def __str__(self) -> str:
        return "opaque"


def hop_scenario(tracer: trace.Tracer) -> list[dict[str, str]]:
    """What a request does with spans, through the API only: a root, hops on remote parents
    from `traceparent`, nested spans found through the current context, every span call,
    failures. Returns the headers injected on the way (they must match too)."""
    injected = []
    with tracer.start_as_current_span("baton ask", kind=SpanKind.CLIENT, attributes={A.REQUEST_ID: "r1", "seq": ["a", "b"], "ints": (1, 2), "": "no key", "obj": Opaque()}) as root:
        injected.append(telemetry.inject({}))
    headers = injected[0]
    attributes = {**telemetry.messaging_attributes("process", "baton.v1.step.guardrail", "r1.0.1", 2400, "127.0.0.1"), A.STEP: "guard.input"}
    with telemetry.hop_span(tracer, "guard.input", headers, "baton.v1.step.guardrail", attributes) as span:
        assert trace.get_current_span() is span
        events = [Event(kind="gate", step="guard.input", data={"gate": "guard.input", "verdict": "fail", "score": 0.9, "reason": "injection"})]
        telemetry.record_events(span, events, None, {A.STEP_OUTCOME: "refused"})
        span.set_attribute(A.STEP, "guard.input.again")  # a re-set attribute moves last
        span.set_attributes({A.MESSAGING_SYSTEM: "nats", "new": 1})  # the same through set_attributes
        span.set_attribute("none", None)
        span.set_attribute("mapping", {"k": 1})
        span.set_attribute("", "dropped")
        span.add_event("gen_ai.retry", {"baton.retry.attempt": 1, "list": [1.5, 2.5]})
        span.add_event("stamped", timestamp=123)
        span.update_name("guard.input refused")
        telemetry.mark_failed(span, Error(code=ErrorCode.INPUT_REJECTED, message="prompt injection"))
        span.set_status(StatusCode.UNSET)  # ignored
        span.set_status(StatusCode.OK)  # ERROR is not final: OK wins, then stays
        span.set_status(Status(StatusCode.ERROR, "ignored after OK"))
        with telemetry.embedding_span(tracer, "bge-small", 2):
            trace.get_current_span().set_attribute("inner", True)
        injected.append(telemetry.inject({}))
    with telemetry.hop_span(tracer, "generate", injected[-1], "baton.v1.step.generator", {}) as span:
        trace.get_current_span().set_attributes(telemetry.llm_request_attributes(provider="openai", model="gpt-4o-mini", max_tokens=64, session_id="s1", messages=None))
        telemetry.record_retry(span, 1, "timeout", 0.25)
        with pytest.raises(ValueError), tracer.start_as_current_span("shadow chat", kind=SpanKind.CLIENT):
            raise ValueError("the shadow model failed")
        with pytest.raises(KeyError), tracer.start_span("start_span as a context manager") as direct:
            direct.set_attribute("x", 1)
            raise KeyError("missing")
        with pytest.raises(asyncio.CancelledError), tracer.start_as_current_span("cancelled"):
            raise asyncio.CancelledError()  # a BaseException: ended, not recorded as an error
        with pytest.raises(RuntimeError), tracer.start_as_current_span("not recorded", record_exception=False, set_status_on_exception=False):
            raise RuntimeError("kept out")
    unsampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    with telemetry.hop_span(tracer, "not sampled", unsampled, "baton.v1.step.router", {}) as span:
        assert not span.is_recording()
        injected.append(telemetry.inject({}))
    state = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
    linked = tracer.start_span("linked", context=telemetry.extract(state), kind=SpanKind.PRODUCER, links=[Link(root.get_span_context(), {"why": "follows"})], start_time=5)
    with trace.use_span(linked, end_on_exit=True):
        injected.append(telemetry.inject({}))
    ended = tracer.start_span("ended")
    ended.end(end_time=ended.get_span_context().span_id % 1000 + 10**18)
    ended.set_attribute("late", 1)
    ended.end()

    @tracer.start_as_current_span("decorated")
    def decorated() -> None:
        trace.get_current_span().set_attribute("called", True)

    decorated()
    decorated()
    return injected


def limits_scenario(tracer: trace.Tracer) -> list[dict[str, str]]:
    span = tracer.start_span("limited", attributes={"a": "long string value", "b": 2, "c": 3, "d": 4})
    span.set_attributes({"e": ["long", "longer string"], "b": 5})
    span.add_event("one", {"x": "long string value", "y": 1, "z": 2, "w": 3})
    span.add_event("two")
    span.add_link(span.get_span_context(), {"l": 1})
    span.add_link(span.get_span_context())
    span.end()
    return []


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One deterministic clock for both tracers."""
    import opentelemetry.sdk.trace as sdk_trace

    def install() -> None:
        ticks = itertools.count(1_700_000_000_000_000_000, 1000)
        tick: Callable[[], int] = lambda: next(ticks)  # noqa: E731
        monkeypatch.setattr(sdk_trace, "time_ns", tick)
        monkeypatch.setattr(lean_tracer, "time_ns", tick)

    install()
    yield install  # type: ignore[misc]


def run(scenario: Callable[[trace.Tracer], list[dict[str, str]]], lean: bool, reset: Callable[[], None], limits: SpanLimits | None = None) -> tuple[bytes, list[dict[str, str]], list]:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    reset()
    random.seed(1234)
    if lean:
        provider: object = LeanTracerProvider(RESOURCE, processor, limits=limits)
    else:
        provider = TracerProvider(resource=RESOURCE, span_limits=limits)
        provider.add_span_processor(processor)  # type: ignore[attr-defined]
    tracer = provider.get_tracer("baton")  # type: ignore[attr-defined]
    token = context_api.attach(context_api.Context())
    try:
        injected = scenario(tracer)
    finally:
        context_api.detach(token)
    spans = list(exporter.get_finished_spans())
    provider.shutdown()  # type: ignore[attr-defined]
    body = otlp_wire.encode_spans(spans) if lean else sdk_encode_spans(spans).SerializeToString()
    return body, injected, spans


def without_stacktraces(body: bytes) -> tuple[ExportTraceServiceRequest, list[str]]:
    """The export, with each exception event's stack trace taken out (it lists the
    frames of the context manager that caught it, which differ) and returned apart."""
    decoded = ExportTraceServiceRequest.FromString(body)
    traces = []
    for resource in decoded.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                for event in span.events:
                    for kv in event.attributes:
                        if kv.key == "exception.stacktrace":
                            traces.append(kv.value.string_value)
                            kv.value.string_value = ""
    return decoded, traces


@pytest.mark.parametrize("scenario,limits", [(hop_scenario, None), (limits_scenario, SpanLimits(max_span_attributes=3, max_events=1, max_links=1, max_attribute_length=6, max_event_attributes=2))], ids=["hops", "limits"])
def test_the_lean_tracer_puts_the_sdks_spans_on_the_wire(scenario, limits, clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sdk_body, sdk_headers, sdk_spans = run(scenario, False, clock, limits)
        sdk_log = sorted((r.name, r.getMessage()) for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lean_body, lean_headers, lean_spans = run(scenario, True, clock, limits)
        lean_log = sorted((r.name, r.getMessage()) for r in caplog.records)
    assert all(isinstance(span, LeanSpan) for span in lean_spans) and lean_spans
    assert lean_headers == sdk_headers
    lean, lean_traces = without_stacktraces(lean_body)
    sdk, sdk_traces = without_stacktraces(sdk_body)
    assert lean == sdk
    assert len(lean_traces) == len(sdk_traces)
    for ours, theirs in zip(lean_traces, sdk_traces, strict=True):  # the same exception, raised at the same line
        assert ours.splitlines()[-1] == theirs.splitlines()[-1] and ours.splitlines()[-2] == theirs.splitlines()[-2]
    assert lean_log == sdk_log  # the same warnings (ended span, dropped key, limits)
    if scenario is hop_scenario:
        names = [span.name for resource in lean.resource_spans for scope in resource.scope_spans for span in scope.spans]
        assert "guard.input refused" in names and "not sampled" not in names and names.count("decorated") == 2
    else:
        span = lean.resource_spans[0].scope_spans[0].spans[0]
        assert (span.dropped_attributes_count, span.dropped_events_count, span.dropped_links_count) == (3, 1, 1)  # a, b (re-set afterwards), c; two; the second link


def test_the_bytes_are_the_sdk_encoders_for_lean_spans_too(clock) -> None:
    """The exporter's encoder reads a LeanSpan as it reads a ReadableSpan."""
    _body, _headers, spans = run(hop_scenario, True, clock)
    assert otlp_wire.encode_spans(spans) == sdk_encode_spans(spans).SerializeToString()


def test_the_lean_tracer_is_used_with_the_lean_exporter_and_the_sdks_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    for name in ("BATON_TRACE_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)

    def made(**environ: str) -> object:
        with monkeypatch.context() as patch:
            for name, value in environ.items():
                patch.setenv(name, value)
            provider = telemetry.tracer_provider("router")
            provider.shutdown()  # type: ignore[attr-defined]
            return provider

    assert isinstance(made(), LeanTracerProvider)
    assert isinstance(made(OTEL_TRACES_SAMPLER="parentbased_always_on"), LeanTracerProvider)
    assert isinstance(made(OTEL_TRACES_SAMPLER="always_on"), LeanTracerProvider)
    assert isinstance(made(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.5"), TracerProvider)
    assert isinstance(made(BATON_TRACE_EXPORTER="otlp"), TracerProvider)
    assert isinstance(made(OTEL_EXPORTER_OTLP_ENDPOINT="https://127.0.0.1:9"), TracerProvider)


def test_always_on_records_under_a_parent_that_was_not_sampled() -> None:
    exporter = InMemorySpanExporter()
    provider = LeanTracerProvider(RESOURCE, SimpleSpanProcessor(exporter), sampler="always_on")
    context = telemetry.extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"})
    span = provider.get_tracer("baton").start_span("hop", context=context)
    assert span.is_recording() and span.get_span_context().trace_flags.sampled
    span.end()
    provider.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["hop"]
    with pytest.raises(ValueError, match="traceidratio"):
        LeanTracerProvider(RESOURCE, SimpleSpanProcessor(exporter), sampler="traceidratio")
