"""Tracing, set up in one place for every service and the client.

One span per hop, parented on the previous hop's span through the W3C `traceparent`
header, so a request reads as one chain: client publish → route → guard.input →
retrieve → generate (→ its model call) → guard.output (→ fallback when one runs).
That is deliberately leaner than one span per publish and per consume: span creation
is a large share of a hop's CPU.

Tracing is on when an OTLP endpoint is configured with the standard variables
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and
OTEL_SDK_DISABLED is not true. Export is batched, off the hot path; a collector that
is down costs dropped spans, never a failed request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode

from shared import attributes as A
from shared.schema import Envelope, Event, Reply

_provider = None


def tracing_enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def content_tracing() -> bool:
    return os.environ.get("BATON_TRACE_CONTENT", "") in ("1", "true")


def setup_tracing(service: str) -> trace.Tracer:
    """The tracer for `service`; a no-op tracer when tracing is off."""
    global _provider
    if not tracing_enabled():
        return NoOpTracer()
    if _provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        _provider = TracerProvider(resource=Resource.create({"service.name": service}))
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return _provider.get_tracer("baton")


def shutdown_tracing() -> None:
    """Flush what is queued (bounded by the exporter's timeout)."""
    if _provider is not None:
        _provider.shutdown()


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's `traceparent` to outgoing headers."""
    propagate.inject(headers)
    return headers


@contextmanager
def hop_span(tracer: trace.Tracer, name: str, headers: Mapping[str, str] | None, subject: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """The span of one hop, a child of the span that published the message."""
    parent = propagate.extract(dict(headers or {}))
    base = {A.MESSAGING_SYSTEM: "nats", A.MESSAGING_DESTINATION: subject, A.MESSAGING_OPERATION: "process"}
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.CONSUMER, attributes={**base, **attributes}) as span:
        yield span


def trace_id_of(span: Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def envelope_attributes(env: Envelope) -> dict[str, Any]:
    return {
        A.REQUEST_ID: env.request_id,
        A.ROUTE: env.route,
        A.CONFIG_VERSION: env.config_version,
        A.STEP_INDEX: env.cursor,
    }


def record_events(span: Span, events: list[Event]) -> None:
    """Put the decisions taken in this hop on its span, under the declared names."""
    if not span.is_recording():
        return
    for event in events:
        data = event.data
        if event.kind == "route":
            span.set_attributes({A.ROUTE: data["route"], A.ROUTE_REASON: data["reason"], A.ROUTE_CONFIDENCE: data["confidence"], A.ROUTE_COMPLEXITY: data.get("complexity", 0.0)})
            if data.get("variant"):
                span.set_attribute(A.VARIANT, data["variant"])
        elif event.kind == "retrieval":
            span.set_attributes({A.RETRIEVAL_COUNT: data["count"], A.RETRIEVAL_TOP_SCORE: data["top_score"]})
        elif event.kind == "gate":
            span.set_attributes({A.GATE_NAME: data.get("gate", event.step or ""), A.GATE_VERDICT: data.get("verdict", ""), A.GATE_SCORE: float(data.get("score") or 0.0), A.GATE_REASON: str(data.get("reason", ""))})
        elif event.kind == "fallback":
            span.set_attributes({A.FALLBACK_REASON: data["reason"], A.FALLBACK_ACTION: data["action"]})


def record_reply(span: Span, reply: Reply) -> None:
    """The end of the request, on the span of the hop that replied."""
    if not span.is_recording():
        return
    outcome = "error" if not reply.ok else "degraded" if reply.degraded else "answered"
    span.set_attributes({A.OUTCOME: outcome, A.REQUEST_COST_USD: reply.cost_usd, A.REQUEST_LATENCY_MS: reply.latency_ms or 0.0, A.CACHED: reply.cached})
    if reply.error is not None:
        span.set_attribute(A.ERROR_CODE, reply.error.code.value)
        span.set_status(Status(StatusCode.ERROR, reply.error.message))
    if content_tracing() and reply.answer:
        span.set_attribute(A.CONTENT_ANSWER, reply.answer)
