"""The tracing helpers with the real OpenTelemetry SDK (spans captured in memory)."""

from __future__ import annotations

import json
import time

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from shared import attributes as A
from shared import telemetry
from shared.schema import Envelope, Error, ErrorCode, Event, Passage, Reply, Request, Step


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_the_resource_names_the_service_and_the_shared_project_unless_the_environment_does(monkeypatch):
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "BATON_TRACE_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    resource = Resource.create(telemetry.resource_attributes("router")).attributes
    assert resource[A.SERVICE_NAME] == "router" and resource[A.PROJECT_NAME] == "baton"

    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"{A.PROJECT_NAME}=shop,deployment.environment.name=prod")
    resource = Resource.create(telemetry.resource_attributes("router")).attributes
    assert resource[A.SERVICE_NAME] == "router-eu" and resource[A.PROJECT_NAME] == "shop"
    assert resource["deployment.environment.name"] == "prod"

    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    monkeypatch.setenv("BATON_TRACE_PROJECT", "bikes")
    assert Resource.create(telemetry.resource_attributes("router")).attributes[A.PROJECT_NAME] == "bikes"


@pytest.mark.parametrize("step, kind", [("route", "CHAIN"), ("guard.input", "GUARDRAIL"), ("guard.output", "GUARDRAIL"), ("retrieve", "RETRIEVER"), ("generate", "CHAIN"), ("fallback", "CHAIN"), ("embed", "EMBEDDING")])
def test_each_step_has_its_openinference_kind(step, kind):
    assert telemetry.step_kind(step) == kind


def envelope() -> Envelope:
    env = Envelope(request_id="r1", request=Request(prompt="q"), route="factual", slip=[Step(service="retriever", name="retrieve")], deadline=time.time() + 30)
    env.context.question = "How do I fix a puncture?"
    env.context.passages = [Passage(text="Find the hole.", score=2.5, source="handbook/puncture-repair.md", title="Puncture", corpus="handbook")]
    return env


def test_retrieved_documents_carry_text_only_with_content_tracing(spans, monkeypatch):
    tracer, exporter = spans
    event = Event(kind="retrieval", step="retrieve", data={"count": 1, "top_score": 2.5})
    monkeypatch.delenv("BATON_TRACE_CONTENT", raising=False)
    with tracer.start_as_current_span("retrieve") as span:
        telemetry.record_events(span, [event], envelope())
    monkeypatch.setenv("BATON_TRACE_CONTENT", "1")
    with tracer.start_as_current_span("retrieve") as span:
        telemetry.record_events(span, [event], envelope())
    off, on = (s.attributes for s in exporter.get_finished_spans())
    prefix = f"{A.RETRIEVAL_DOCUMENTS}.0."
    assert off[prefix + A.DOCUMENT_ID] == "handbook/puncture-repair.md" and off[prefix + A.DOCUMENT_SCORE] == 2.5
    assert prefix + A.DOCUMENT_CONTENT not in off and A.INPUT_VALUE not in off
    assert json.loads(on[prefix + A.DOCUMENT_METADATA])["corpus"] == "handbook"
    assert on[prefix + A.DOCUMENT_CONTENT] == "Find the hole." and on[A.INPUT_VALUE] == "How do I fix a puncture?"


def test_a_root_is_an_error_when_the_request_was_refused_or_degraded(spans):
    tracer, exporter = spans
    refused = Reply(request_id="r1", ok=False, error=Error(code=ErrorCode.INPUT_REJECTED, message="guard.input refused"))
    degraded = Reply(request_id="r2", ok=True, answer="a", degraded=True, fallbacks=["model_error"])
    answered = Reply(request_id="r3", ok=True, answer="a")
    for reply in (refused, degraded, answered):
        with tracer.start_as_current_span("baton ask") as span:
            telemetry.record_request_outcome(span, reply)
    r1, r2, r3 = exporter.get_finished_spans()
    assert r1.status.status_code == StatusCode.ERROR and r1.attributes[A.ERROR_TYPE] == "input_rejected"
    assert r2.status.status_code == StatusCode.ERROR and "model_error" in r2.status.description
    assert r3.status.status_code == StatusCode.UNSET
    assert A.OUTCOME not in r1.attributes  # the replying hop's mark: the collector's "finished"


def test_a_retry_is_an_event_on_the_model_span_and_a_failure_its_error(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span("chat m") as span:
        telemetry.record_retry(span, 1, "rate_limited", 0.25)
        telemetry.record_retry(span, 2, "server_error", 0.5)
        telemetry.mark_model_failed(span, "server_error", "HTTP 500")
    [model] = exporter.get_finished_spans()
    assert [(e.name, e.attributes[A.RETRY_ATTEMPT], e.attributes[A.ERROR_TYPE]) for e in model.events] == [
        (A.RETRY_EVENT, 1, "rate_limited"), (A.RETRY_EVENT, 2, "server_error")]
    assert model.status.status_code == StatusCode.ERROR and model.attributes[A.ERROR_TYPE] == "server_error"


def test_the_embedding_helper_makes_an_embedding_span(spans):
    tracer, exporter = spans
    with telemetry.embedding_span(tracer, "bge-small", 3):
        pass
    [span] = exporter.get_finished_spans()
    assert span.attributes[A.OI_KIND] == "EMBEDDING" and span.attributes[A.EMBEDDING_MODEL_NAME] == "bge-small"


def test_hop_spans_continue_the_publishers_traceparent(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span("publish") as parent:
        headers = telemetry.inject({})
    attributes = telemetry.messaging_attributes("process", "baton.v1.step.retriever", "r1.0.1", 100, "127.0.0.1")
    with telemetry.hop_span(tracer, "retrieve", headers, "baton.v1.step.retriever", attributes):
        pass
    hop = exporter.get_finished_spans()[-1]
    assert hop.parent.span_id == parent.get_span_context().span_id
    assert hop.attributes[A.MESSAGING_MESSAGE_ID] == "r1.0.1" and hop.attributes[A.MESSAGING_OPERATION] == "process"
    publish = telemetry.messaging_attributes("publish", "baton.v1.request.c", "r1", 10, None)
    assert publish[A.MESSAGING_OPERATION] == "send" and publish[A.MESSAGING_OPERATION_NAME] == "publish"


TRACEPARENTS = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",  # not sampled
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",  # random trace id
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case: invalid
    " \t00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",  # whitespace around
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # version 00 with more: invalid
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # a later version may have more
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff: invalid
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short span id
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "x" * 500,  # too long
    "",
]


@pytest.mark.parametrize("traceparent", TRACEPARENTS)
@pytest.mark.parametrize("tracestate", [None, "vendor=v1,other=x", "bad member"])
def test_extract_reads_a_traceparent_as_the_w3c_propagator_does(traceparent, tracestate):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    headers = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate is not None else {})}
    ours = telemetry.extract(headers)
    theirs = TraceContextTextMapPropagator().extract(headers)
    assert ours == theirs or trace.get_current_span(ours).get_span_context() == trace.get_current_span(theirs).get_span_context()
    assert set(ours) == set(theirs)
    assert telemetry.extract(None) == telemetry.extract({}) == TraceContextTextMapPropagator().extract({})


@pytest.mark.parametrize("traceparent", TRACEPARENTS[:3])
@pytest.mark.parametrize("tracestate", [None, "vendor=v1,other=x"])
def test_inject_writes_what_the_w3c_propagator_writes(spans, traceparent, tracestate):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer, _ = spans
    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})})
    with tracer.start_as_current_span("hop", context=parent):
        theirs: dict[str, str] = {"Nats-Msg-Id": "r1"}
        propagator.inject(theirs)
        assert telemetry.inject({"Nats-Msg-Id": "r1"}) == theirs
    assert telemetry.inject({}) == {}  # no current span: nothing to carry
