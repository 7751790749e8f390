"""Tracing, set up in one place for every service and the client.

One span per hop, parented on the previous hop's span through the W3C `traceparent`
header, so a request reads as one chain: client request (publish → Reply) → route →
guard.input → retrieve → guard.retrieval → generate (whose span is the model call's:
LLM) → guard.output (→ fallback when one runs). That is deliberately leaner than one span per publish and per consume:
span creation is a large share of a hop's CPU.

Every span says what it is in OpenInference terms (CHAIN, GUARDRAIL, RETRIEVER, LLM,
EMBEDDING) beside the OpenTelemetry messaging and GenAI conventions, so Jaeger and the
LLM backends (Phoenix, Arize, ...) both read a pipeline. Every process shares one
resource setting: `service.name` (OTEL_SERVICE_NAME wins) and the OpenInference
project (BATON_TRACE_PROJECT, default "baton"; OTEL_RESOURCE_ATTRIBUTES wins).

Tracing is on when an OTLP endpoint is configured with the standard variables
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and
OTEL_SDK_DISABLED is not true. Export is batched, off the hot path; a collector that
is down costs dropped spans, never a failed request. The exporter is Baton's lean
OTLP/HTTP one (shared/span_export.py), which honours the same OTEL_EXPORTER_OTLP_*
variables; BATON_TRACE_EXPORTER=otlp, a gRPC protocol, TLS certificates or a credential
provider select the SDK's own exporter instead. With the lean exporter, spans are made
by the lean tracer (shared/lean_tracer.py), which implements the OpenTelemetry API
without the SDK's span objects; with the SDK's exporter, or a sampler other than the
default (parent-based) always-on, by the SDK's tracer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, NoOpTracer, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import attributes as A
from shared.schema import ChatMessage, Envelope, Error, Event, Passage, Reply

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from shared.lean_tracer import LeanTracerProvider

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "baton"

_provider: TracerProvider | LeanTracerProvider | None = None


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
        _provider = tracer_provider(service)
    return _provider.get_tracer("baton")


def tracer_provider(service: str) -> TracerProvider | LeanTracerProvider:
    """The lean tracer (shared/lean_tracer.py: the same spans without the SDK's span
    objects) when the lean exporter sends them; the SDK's otherwise, or when a setting asks
    for what only the SDK's tracer does (another sampler, the SDK's internal metrics)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from shared.lean_tracer import LeanTracerProvider, sdk_tracer_reason
    from shared.span_export import LeanSpanExporter

    resource = Resource.create(resource_attributes(service))
    exporter = span_exporter()
    reason = sdk_tracer_reason()
    if isinstance(exporter, LeanSpanExporter) and reason is None:
        return LeanTracerProvider(resource, BatchSpanProcessor(exporter))
    if reason is not None:
        log.info("spans made by the OpenTelemetry SDK's tracer (%s)", reason)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporter() -> SpanExporter:
    """The lean OTLP/HTTP exporter (shared/span_export.py: the same bytes, a quarter of
    the CPU), or the SDK's own when a setting asks for what only it does."""
    from shared.span_export import LeanSpanExporter, standard_exporter_reason

    reason = standard_exporter_reason()
    if reason is None:
        return LeanSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol.strip().lower() == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
        except ImportError:
            log.warning("OTLP protocol grpc asked for, but opentelemetry-exporter-otlp-proto-grpc is not installed: exporting http/protobuf")
        else:
            return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    log.info("spans exported by the OpenTelemetry SDK's OTLP exporter (%s)", reason)
    return OTLPSpanExporter()


def resource_attributes(service: str) -> dict[str, str]:
    """Baton's defaults for the resource, minus what the standard variables already set.

    Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself, but
    the attributes passed to it win; so a default is passed only where the environment
    is silent."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    configured = OTELResourceDetector().detect().attributes
    defaults = {A.SERVICE_NAME: service, A.PROJECT_NAME: os.environ.get("BATON_TRACE_PROJECT") or DEFAULT_PROJECT}
    if os.environ.get("OTEL_SERVICE_NAME"):
        configured = {**configured, A.SERVICE_NAME: os.environ["OTEL_SERVICE_NAME"]}
    return {key: value for key, value in defaults.items() if key not in configured}


def shutdown_tracing() -> None:
    """Flush what is queued (bounded by the exporter's timeout)."""
    if _provider is not None:
        _provider.shutdown()


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's `traceparent` (and `tracestate`) to outgoing headers: what
    the W3C propagator writes, without its getter/setter layers (a third of its CPU)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context == INVALID_SPAN_CONTEXT:
        return headers
    headers["traceparent"] = f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    if span_context.trace_state:
        headers["tracestate"] = span_context.trace_state.to_header()
    return headers


# The W3C propagator itself, not the global composite: no hop reads or writes baggage.
_TRACE_CONTEXT = TraceContextTextMapPropagator()
# The traceparent Baton writes (version 00, lower-case hex, nothing around it); any other
# form, and any tracestate, is read by the propagator itself.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_TRACE_FLAGS = [TraceFlags(flags) for flags in range(256)]


def _extract(headers: Mapping[str, str] | None) -> Context:
    """The publisher's span context from `traceparent`: the propagator's result, a fifth of its CPU."""
    if not headers:
        return Context()
    header = headers.get("traceparent")
    if type(header) is str and "tracestate" not in headers:
        match = _TRACEPARENT.fullmatch(header)
        if match is not None:
            trace_id, span_id, flags = match.groups()
            if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
                parent = SpanContext(int(trace_id, 16), int(span_id, 16), True, _TRACE_FLAGS[int(flags, 16)], None)
                return Context({_SPAN_KEY: NonRecordingSpan(parent)})
    return _TRACE_CONTEXT.extract(headers)


def extract(headers: Mapping[str, str] | None):
    """The caller's context from W3C `traceparent`/`tracestate` (e.g. an HTTP request's headers)."""
    return _extract(headers)


_KINDS = {"route": A.CHAIN, "generate": A.CHAIN, "fallback": A.CHAIN, "retrieve": A.RETRIEVER}


def step_kind(step: str) -> str:
    """The OpenInference kind of a hop's span, from its step name."""
    kind = _KINDS.get(step)
    if kind is not None:
        return kind
    if step.startswith("guard"):
        return A.GUARDRAIL
    if step.startswith("retrieve"):
        return A.RETRIEVER
    if step.startswith("embed"):
        return A.EMBEDDING
    return A.CHAIN  # route, fallback; generate until its model call makes it LLM


def messaging_attributes(operation: str, subject: str, message_id: str | None, body_size: int, server: str | None) -> dict[str, Any]:
    """OpenTelemetry messaging attributes of a publish ("publish") or a hop ("process")."""
    attributes: dict[str, Any] = {
        A.MESSAGING_SYSTEM: "nats",
        A.MESSAGING_DESTINATION: subject,
        A.MESSAGING_OPERATION_NAME: operation,
        A.MESSAGING_OPERATION: "send" if operation == "publish" else operation,
        A.MESSAGING_BODY_SIZE: body_size,
    }
    if message_id:
        attributes[A.MESSAGING_MESSAGE_ID] = message_id
    if server:
        attributes[A.SERVER_ADDRESS] = server
    return attributes


def hop_span(tracer: trace.Tracer, name: str, headers: Mapping[str, str] | None, subject: str, attributes: dict[str, Any]) -> AbstractContextManager[Span]:
    """The span of one hop, a child of the span that published the message.

    `attributes` carries the messaging ones (see `messaging_attributes`); only the
    destination is filled in here when missing. The tracer's context manager is returned
    as it is: one generator less per hop."""
    if A.MESSAGING_DESTINATION not in attributes:
        attributes = {A.MESSAGING_SYSTEM: "nats", A.MESSAGING_DESTINATION: subject, A.MESSAGING_OPERATION: "process", A.MESSAGING_OPERATION_NAME: "process", **attributes}
    return tracer.start_as_current_span(name, context=_extract(headers), kind=SpanKind.CONSUMER, attributes=attributes)


def trace_id_of(span: Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def envelope_attributes(env: Envelope) -> dict[str, Any]:
    # Only what a reader needs on every hop: the route and config version are on the route
    # span (and the root), the cursor is in messaging.message.id. Each attribute costs CPU
    # per span (SDK checks, export encoding), so the messaging ones pay for themselves here.
    attributes: dict[str, Any] = {A.REQUEST_ID: env.request_id}
    if env.request.session_id:  # Phoenix's sessions view; the GenAI conversation
        attributes[A.SESSION_ID] = attributes[A.GEN_AI_CONVERSATION_ID] = env.request.session_id
    return attributes


def record_events(span: Span, events: list[Event], env: Envelope | None = None, attributes: Mapping[str, Any] | None = None) -> None:
    """Put the decisions taken in this hop on its span, under the declared names, with
    `attributes` (the hop's own, e.g. its outcome) before them: one call into the SDK.

    With `env`, a retrieval also lists its documents and, with content tracing on, a
    gate shows the text it let through (the input gate's is the redacted question)."""
    if not span.is_recording():
        return
    collected = event_attributes(events, env)
    if attributes:
        collected = {**attributes, **collected}
    if collected:
        span.set_attributes(collected)


def event_attributes(events: list[Event], env: Envelope | None = None) -> dict[str, Any]:
    """The span attributes of a hop's decisions (see `record_events`)."""
    attributes: dict[str, Any] = {}
    for event in events:
        data = event.data
        if event.kind == "route":
            attributes.update({A.ROUTE: data["route"], A.ROUTE_REASON: data["reason"], A.ROUTE_CONFIDENCE: data["confidence"], A.ROUTE_COMPLEXITY: data.get("complexity", 0.0)})
            if data.get("variant"):
                attributes[A.VARIANT] = data["variant"]
        elif event.kind == "retrieval":
            attributes.update({A.RETRIEVAL_COUNT: data["count"], A.RETRIEVAL_TOP_SCORE: data["top_score"]})
            if env is not None:
                attributes.update(document_attributes(env.context.passages, content_tracing()))
                if content_tracing():
                    attributes[A.INPUT_VALUE] = env.context.question
        elif event.kind == "gate":
            verdict = data.get("verdict", "")
            attributes.update({A.GATE_NAME: data.get("gate", event.step or ""), A.GATE_VERDICT: verdict, A.GATE_SCORE: float(data.get("score") or 0.0), A.GATE_REASON: str(data.get("reason", ""))})
            if verdict != "fail" and env is not None and content_tracing():
                attributes[A.OUTPUT_VALUE] = gate_output(event.step or "", env)
        elif event.kind == "fallback":
            attributes.update({A.FALLBACK_REASON: data["reason"], A.FALLBACK_ACTION: data["action"]})
    return attributes


def gate_output(step: str, env: Envelope) -> str:
    """What a gate passed on: the question after the input gate, the answer after the output gate."""
    if step == "guard.output":
        return env.context.answer
    if step == "guard.retrieval":
        return "\n\n".join(p.text for p in env.context.passages)
    return env.context.question


def document_attributes(passages: Sequence[Passage], with_content: bool) -> dict[str, Any]:
    """OpenInference `retrieval.documents`: id (= source) and score of each; text and title only when asked."""
    attributes: dict[str, Any] = {}
    for i, passage in enumerate(passages):
        prefix = f"{A.RETRIEVAL_DOCUMENTS}.{i}."
        attributes[prefix + A.DOCUMENT_ID] = passage.source  # the source file: where the passage came from
        attributes[prefix + A.DOCUMENT_SCORE] = passage.score
        if with_content:
            attributes[prefix + A.DOCUMENT_METADATA] = json.dumps({"title": passage.title, "corpus": passage.corpus})
            attributes[prefix + A.DOCUMENT_CONTENT] = passage.text
    return attributes


def message_attributes(prefix: str, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> dict[str, Any]:
    """OpenInference messages (`llm.input_messages.<i>.message.role|content`) and the GenAI JSON form.

    Content tracing only: the caller checks `content_tracing()`."""
    attributes: dict[str, Any] = {}
    wire = []
    for i, message in enumerate(messages):
        role, content = (message.role, message.content) if isinstance(message, ChatMessage) else (str(message.get("role")), str(message.get("content")))
        attributes[f"{prefix}.{i}.{A.MESSAGE_ROLE}"] = role
        attributes[f"{prefix}.{i}.{A.MESSAGE_CONTENT}"] = content
        wire.append({"role": role, "parts": [{"type": "text", "content": content}]})
    genai = A.GEN_AI_INPUT_MESSAGES if prefix == A.LLM_INPUT_MESSAGES else A.GEN_AI_OUTPUT_MESSAGES
    attributes[genai] = json.dumps(wire)
    return attributes


def mark_failed(span: Span, error: Error) -> None:
    """A failed step (a refusing gate, a model error) is an error on its own span."""
    if span.is_recording():
        span.set_attribute(A.ERROR_TYPE, error.code.value)
        span.set_status(Status(StatusCode.ERROR, error.message))


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
        span.set_attribute(A.OUTPUT_VALUE, reply.answer)


def record_request_outcome(span: Span, reply: Reply) -> None:
    """On a request's root span: ERROR when it was refused or degraded, and the answer
    with content tracing on. (`baton.outcome` stays on the hop that replied: the
    collector reads a flow as finished when that span arrives.)

    A degraded answer is an answer, but not the one the route promised: backends should
    count it among the failures, with the reason in the status."""
    if not span.is_recording():
        return
    span.set_attributes({A.REQUEST_ID: reply.request_id, A.ROUTE: reply.route or ""})
    if reply.error is not None:
        span.set_attribute(A.ERROR_TYPE, reply.error.code.value)
        span.set_status(Status(StatusCode.ERROR, reply.error.message))
    elif reply.degraded:
        span.set_attribute(A.ERROR_TYPE, "degraded")
        span.set_status(Status(StatusCode.ERROR, f"degraded: {', '.join(reply.fallbacks) or 'fallback'}"))
    if content_tracing() and reply.answer:
        span.set_attribute(A.OUTPUT_VALUE, reply.answer)


def llm_request_attributes(*, provider: str, model: str, max_tokens: int, session_id: str | None, messages: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """A model call's span before the call: GenAI and OpenInference LLM attributes.

    Lean on purpose (each attribute costs CPU on every model call): one name per fact
    unless the two vocabularies need it twice (model, provider, tokens)."""
    attributes: dict[str, Any] = {
        A.OI_KIND: A.LLM,
        A.GEN_AI_OPERATION: "chat",
        A.GEN_AI_PROVIDER: provider,
        A.GEN_AI_REQUEST_MODEL: model,
        A.GEN_AI_MAX_TOKENS: max_tokens,
        A.LLM_PROVIDER: provider,
        A.LLM_MODEL_NAME: model,
    }
    if session_id:
        attributes[A.SESSION_ID] = attributes[A.GEN_AI_CONVERSATION_ID] = session_id
    if messages is not None:
        attributes.update(message_attributes(A.LLM_INPUT_MESSAGES, messages))
    return attributes


def record_generation(span: Span, generation: Any, cost_usd: float, output_text: str | None = None) -> None:
    """A model's answer on its span: the model the provider named, the id, why it stopped, tokens.

    `output_text` is the answer as it may be shown (redacted by the caller), for content tracing."""
    if not span.is_recording():
        return
    usage = generation.usage
    attributes: dict[str, Any] = {
        A.GEN_AI_RESPONSE_MODEL: generation.response_model,
        A.GEN_AI_FINISH_REASONS: (generation.finish_reason,),
        A.GEN_AI_INPUT_TOKENS: usage.input_tokens,
        A.GEN_AI_OUTPUT_TOKENS: usage.output_tokens,
        A.LLM_PROMPT_TOKENS: usage.input_tokens,
        A.LLM_COMPLETION_TOKENS: usage.output_tokens,
        A.LLM_TOTAL_TOKENS: usage.input_tokens + usage.output_tokens,
        A.COST_USD: cost_usd,
    }
    if usage.estimated:
        attributes[A.USAGE_ESTIMATED] = True
    if generation.response_id:
        attributes[A.GEN_AI_RESPONSE_ID] = generation.response_id
    if generation.response_model != generation.model:
        attributes[A.LLM_MODEL_NAME] = generation.response_model  # OpenInference: the model that answered
    if output_text is not None:
        attributes[A.OUTPUT_VALUE] = output_text
        attributes.update(message_attributes(A.LLM_OUTPUT_MESSAGES, [{"role": "assistant", "content": output_text}]))
    span.set_attributes(attributes)


def record_retry(span: Span, attempt: int, error: str, wait_s: float) -> None:
    """One event per failed attempt that is tried again."""
    if span.is_recording():
        span.add_event(A.RETRY_EVENT, {A.RETRY_ATTEMPT: attempt, A.ERROR_TYPE: error, A.RETRY_WAIT_S: round(wait_s, 3)})


def mark_model_failed(span: Span, kind: str, message: str) -> None:
    if span.is_recording():
        span.set_attribute(A.ERROR_TYPE, kind)
        span.set_status(Status(StatusCode.ERROR, message))


def mark_refused(span: Span, reply: Reply) -> None:
    """The mesh refused the request (an error Reply): an error on the span that received it."""
    if span.is_recording() and reply.error is not None:
        span.set_attributes({A.ERROR_TYPE: reply.error.code.value, A.REQUEST_ID: reply.request_id})
        span.set_status(Status(StatusCode.ERROR, reply.error.message))


def record_http_status(span: Span, status: int) -> None:
    """HTTP semconv for a server span: 5xx is an error; a 4xx only when the mesh refused (set before)."""
    if not span.is_recording():
        return
    span.set_attribute(A.HTTP_STATUS, status)
    already = getattr(getattr(span, "status", None), "status_code", None) == StatusCode.ERROR
    if status >= 500 and not already:
        span.set_attribute(A.ERROR_TYPE, str(status))
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def embedding_span(tracer: trace.Tracer, model: str, count: int):
    """The span of an embedding computation (OpenInference EMBEDDING), for any embedder.

        with telemetry.embedding_span(mesh.tracer, "bge-small", len(texts)):
            vectors = embedder.embed(texts)

    Vectors never go on spans (they are large and say nothing to a reader)."""
    attributes: dict[str, Any] = {A.OI_KIND: A.EMBEDDING, A.EMBEDDING_MODEL_NAME: model, A.GEN_AI_OPERATION: "embeddings", A.GEN_AI_REQUEST_MODEL: model, "baton.embedding.count": count}
    return tracer.start_as_current_span(f"embeddings {model}", kind=SpanKind.INTERNAL, attributes=attributes)
