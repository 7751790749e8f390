"""The hand-written OTLP encoder against the SDK's own, on spans the real SDK made."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from shared import otlp_wire

EVERY_KIND = {
    "s": "route",
    "s.empty": "",
    "s.unicode": "café ☕ 𝄞",
    "s.long": "x" * 300,  # a length above 127: a two-byte varint
    "b.true": True,
    "b.false": False,
    "i.zero": 0,
    "i.small": 7,
    "i.big": 2**62,
    "i.negative": -5,
    "i.min": -(2**63),
    "f": 0.25,
    "f.zero": 0.0,
    "f.negative_zero": -0.0,
    "f.inf": float("inf"),
    "f.negative": -1e300,
    "seq.str": ("stop", "length"),
    "seq.bool": (True, False),
    "seq.int": (1, -2, 3),
    "seq.float": (0.5, 1.5),
    "seq.empty": (),
}


def provider(resource: Resource, **limits: int) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    made = TracerProvider(resource=resource, span_limits=SpanLimits(**limits) if limits else None)
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made, exporter


def remote_parent() -> trace.Context:
    context = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=TraceState([("vendor", "v1"), ("other", "x")]))
    return trace.set_span_in_context(NonRecordingSpan(context))


def make_spans() -> list:
    """Spans covering what an export can hold: attribute types, events, links, status,
    kinds, remote and local parents, trace state, two resources, scopes with and without
    version, schema and attributes, and dropped counts."""
    first, first_spans = provider(Resource.create({"service.name": "router", "openinference.project.name": "baton", "n": 3}))
    second, second_spans = provider(Resource({"service.name": "guardrail"}, schema_url="https://opentelemetry.io/schemas/1.21.0"), max_attributes=3, max_events=1, max_links=1)
    plain = first.get_tracer("baton")
    versioned = first.get_tracer("baton.gateway", "1.2.3", schema_url="https://example.org/schema", attributes={"scope.attr": "yes"})
    limited = second.get_tracer("baton")

    with plain.start_as_current_span("route", context=remote_parent(), kind=SpanKind.CONSUMER, attributes=EVERY_KIND) as root:
        root.add_event("gen_ai.retry", {"baton.retry.attempt": 1, "error.type": "timeout", "baton.retry.wait_s": 0.25})
        root.add_event("no attributes")
        with versioned.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER, links=[Link(root.get_span_context(), {"why": "follows"})]) as child:
            child.set_status(Status(StatusCode.ERROR, "HTTP 502: the model did not answer"))
        with plain.start_as_current_span("chat", kind=SpanKind.CLIENT) as ok:
            ok.set_status(Status(StatusCode.OK))
    for kind in SpanKind:
        plain.start_span(f"kind {kind.name}", kind=kind).end()
    with limited.start_as_current_span("guard.input", attributes={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}) as dropped:
        dropped.add_event("one")
        dropped.add_event("two")
    limited.start_span("linked", links=[Link(root.get_span_context()), Link(dropped.get_span_context(), {"x": 1})]).end()
    limited.start_span("").end()  # an empty name is left out, as upb leaves it
    return [*first_spans.get_finished_spans(), *second_spans.get_finished_spans()]


def test_bytes_equal_the_sdk_encoders_for_every_field_the_sdk_writes() -> None:
    spans = make_spans()
    assert otlp_wire.encode_spans(spans) == sdk_encode_spans(spans).SerializeToString()


def test_a_decoded_export_holds_every_span_field_by_field() -> None:
    spans = make_spans()
    ours = ExportTraceServiceRequest.FromString(otlp_wire.encode_spans(spans))
    theirs = sdk_encode_spans(spans)
    assert len(ours.resource_spans) == 2 == len(theirs.resource_spans)
    for mine, sdk in zip(ours.resource_spans, theirs.resource_spans, strict=True):
        assert mine.resource == sdk.resource and mine.schema_url == sdk.schema_url
        for my_scope, sdk_scope in zip(mine.scope_spans, sdk.scope_spans, strict=True):
            assert my_scope.scope == sdk_scope.scope and my_scope.schema_url == sdk_scope.schema_url
            for my_span, sdk_span in zip(my_scope.spans, sdk_scope.spans, strict=True):
                for field in ("trace_id", "span_id", "parent_span_id", "trace_state", "name", "kind", "start_time_unix_nano", "end_time_unix_nano",
                              "attributes", "events", "links", "status", "flags", "dropped_attributes_count", "dropped_events_count", "dropped_links_count"):
                    assert getattr(my_span, field) == getattr(sdk_span, field), field
    named = {span.name: span for resource in ours.resource_spans for scope in resource.scope_spans for span in scope.spans}
    assert {kv.key for kv in named["route"].attributes} == set(EVERY_KIND)
    assert named["route"].trace_state == "vendor=v1,other=x" and named["route"].flags == 0x300  # a remote parent
    assert [event.name for event in named["route"].events] == ["gen_ai.retry", "no attributes"]
    gateway = named["POST /v1/chat/completions"]
    assert gateway.status.code == 2 and gateway.links[0].attributes[0].key == "why" and gateway.parent_span_id == named["route"].span_id
    assert {scope.scope.version for scope in ours.resource_spans[0].scope_spans} == {"", "1.2.3"}
    assert (named["guard.input"].dropped_attributes_count, named["guard.input"].dropped_events_count) == (2, 1)


def test_equal_resources_from_two_providers_share_one_resource_spans() -> None:
    one, one_spans = provider(Resource({"service.name": "router"}))
    two, two_spans = provider(Resource({"service.name": "router"}))
    for made in (one, two, one):
        made.get_tracer("baton").start_span("hop").end()
    spans = [*one_spans.get_finished_spans(), *two_spans.get_finished_spans()]
    encoded = otlp_wire.encode_spans(spans)
    assert encoded == sdk_encode_spans(spans).SerializeToString()
    assert len(ExportTraceServiceRequest.FromString(encoded).resource_spans) == 1


def test_an_attribute_protobuf_cannot_hold_is_logged_and_left_out_like_the_sdk_does(caplog: pytest.LogCaptureFixture) -> None:
    made, exporter = provider(Resource({"service.name": "router"}))
    span = made.get_tracer("baton").start_span("hop", attributes={"ok": "kept"})
    span._attributes._dict["too.big"] = 2**64  # past the SDK's checks: a value no int64 holds
    span.end()
    spans = exporter.get_finished_spans()
    with caplog.at_level(logging.ERROR):
        encoded = otlp_wire.encode_spans(spans)
    assert "too.big" in caplog.text
    assert [kv.key for kv in ExportTraceServiceRequest.FromString(encoded).resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok"]


def test_the_attribute_cache_stays_bounded_and_tells_bool_from_int(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp_wire, "_CACHE_MAX", 16)
    made, exporter = provider(Resource({"service.name": "router"}))
    tracer = made.get_tracer("baton")
    for i in range(100):
        tracer.start_span("hop", attributes={"id": f"request-{i}", "flag": i % 2 == 1, "n": i % 2}).end()
    spans = exporter.get_finished_spans()
    assert otlp_wire.encode_spans(spans) == sdk_encode_spans(spans).SerializeToString()
    assert len(otlp_wire._cache) <= 16
