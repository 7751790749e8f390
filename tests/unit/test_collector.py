"""Collector tests: real OTel SDK spans over the real OTLP/HTTP exporter into a live collector.

Two traces are produced the way Baton's services do it: one TracerProvider per service
(resource service.name), each hop's context propagated by hand through a W3C carrier
dict (standing in for NATS headers), explicit timestamps so offsets are exact.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import socket
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from rich.console import Console
from starlette.testclient import TestClient

from services.collector.app import create_app
from services.collector.flows import Flow, GateResult, Hop, flow_stats, nearest_rank, stitch
from services.collector.forward import Forwarder
from services.collector.otlp import OTLPDecodeError, SpanRow, decode
from services.collector.render import stats_table, waterfall
from services.collector.store import SpanStore
from shared import attributes as A
from tests.conftest import eventually, eventually_sync

PROPAGATOR = TraceContextTextMapPropagator()
T1 = 1_700_000_000_000_000_000  # flow 1 starts here (ns)
T2 = T1 + 1_000_000_000  # flow 2 a second later
MS = 1_000_000


# ---------------------------------------------------------------- harness


class Capture:
    """ASGI wrapper recording every accepted (HTTP 200) POST /v1/traces exactly as it arrived."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.accepted: list[tuple[bytes, str | None, str | None]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/traces":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        status: list[int] = []

        async def rx() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
            return msg

        async def tx(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)

        await self.app(scope, rx, tx)
        if status == [200]:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.accepted.append(
                (b"".join(chunks), headers.get("content-type"), headers.get("content-encoding"))
            )


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # we own the socket, so there is no pick-a-port race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually_sync(lambda: server.started, 5, every=0.01, what="the collector did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@dataclass
class Mesh:
    base: str
    target_base: str
    app_capture: Capture
    target_capture: Capture
    store: SpanStore
    target_store: SpanStore
    sdk_spans: list[ReadableSpan] = field(default_factory=list)
    trace_ids: dict[str, str] = field(default_factory=dict)  # request id -> trace id


def make_provider(service: str, endpoint: str, memory: InMemorySpanExporter, compression: Compression) -> TracerProvider:
    tp = TracerProvider(resource=Resource.create({"service.name": service}))
    tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, compression=compression, timeout=5)))
    tp.add_span_processor(SimpleSpanProcessor(memory))  # the same spans, kept for the JSON re-post
    return tp


def span(
    tp: TracerProvider,
    name: str,
    start_ms: float,
    end_ms: float,
    attrs: dict[str, Any],
    *,
    t0: int,
    carrier: dict[str, str] | None = None,
    parent: trace.Span | None = None,
    error: str | None = None,
) -> trace.Span:
    """Start and end one span; the parent is a remote carrier (next hop) or a local span (child)."""
    if carrier is not None:
        ctx = PROPAGATOR.extract(carrier)
    elif parent is not None:
        ctx = trace.set_span_in_context(parent)
    else:
        ctx = None
    kind = SpanKind.CONSUMER if A.STEP in attrs else SpanKind.INTERNAL
    s = tp.get_tracer("baton.test").start_span(
        name, context=ctx, kind=kind, attributes=attrs, start_time=t0 + int(start_ms * MS)
    )
    if error:
        s.set_status(Status(StatusCode.ERROR, error))
    s.end(end_time=t0 + int(end_ms * MS))
    return s


def carrier_of(s: trace.Span) -> dict[str, str]:
    """What a hop puts in the NATS headers of the message it publishes."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(s))
    return carrier


def produce(endpoint: str) -> tuple[list[ReadableSpan], dict[str, str]]:
    memory = InMemorySpanExporter()
    gz, plain = Compression.Gzip, Compression.NoCompression
    router = make_provider("router", endpoint, memory, gz)
    retriever = make_provider("retriever", endpoint, memory, plain)
    generator = make_provider("generator", endpoint, memory, gz)
    guardrail = make_provider("guardrail", endpoint, memory, plain)
    fallback = make_provider("fallback", endpoint, memory, gz)

    # Flow 1: factual, retrieve -> generate -> guard (one gate fixes, one passes) -> answered.
    r1 = {A.REQUEST_ID: "req-1"}
    t = T1
    s_route = span(router, "route", 0, 2, r1 | {A.STEP: "route", A.ROUTE: "factual",
                   A.ROUTE_REASON: "keywords", A.QUEUED_MS: 0.5, A.STEP_INDEX: 0}, t0=t)
    s_ret = span(retriever, "retrieve", 3, 10, r1 | {A.STEP: "retrieve", A.RETRIEVAL_COUNT: 4,
                 A.RETRIEVAL_TOP_SCORE: 0.82, A.STEP_INDEX: 1}, t0=t, carrier=carrier_of(s_route))
    # The generator's hop span must be the parent of its GenAI span, so start it by hand.
    gen_ctx = PROPAGATOR.extract(carrier_of(s_ret))
    s_gen = generator.get_tracer("baton.test").start_span(
        "generate", context=gen_ctx, kind=SpanKind.CONSUMER, start_time=t + 12 * MS,
        attributes=r1 | {A.STEP: "generate", A.QUEUED_MS: 1.5, A.STEP_INDEX: 2, A.COST_USD: 0.0004},
    )
    span(generator, "chat gpt-4o-mini", 13, 39, r1 | {A.GEN_AI_OPERATION: "chat", A.GEN_AI_PROVIDER: "openai",
         A.GEN_AI_REQUEST_MODEL: "gpt-4o-mini", A.GEN_AI_RESPONSE_MODEL: "gpt-4o-mini-2024",
         A.GEN_AI_INPUT_TOKENS: 100, A.GEN_AI_OUTPUT_TOKENS: 20, A.USAGE_ESTIMATED: False}, t0=t, parent=s_gen)
    s_gen.end(end_time=t + 40 * MS)
    guard_ctx = PROPAGATOR.extract(carrier_of(s_gen))
    s_guard = guardrail.get_tracer("baton.test").start_span(
        "guard.output", context=guard_ctx, kind=SpanKind.CONSUMER, start_time=t + 41 * MS,
        attributes=r1 | {A.STEP: "guard.output", A.STEP_INDEX: 3, A.OUTCOME: "answered",
                         A.REQUEST_COST_USD: 0.0005, A.REQUEST_LATENCY_MS: 50.0},
    )
    span(guardrail, "gate faithfulness", 42, 45, r1 | {A.GATE_NAME: "faithfulness", A.GATE_VERDICT: "fixed",
         A.GATE_SCORE: 0.61, A.GATE_REASON: "unsupported sentence dropped"}, t0=t, parent=s_guard)
    span(guardrail, "gate pii", 45, 49, r1 | {A.GATE_NAME: "pii", A.GATE_VERDICT: "pass",
         "baton.test.tags": ["a", "b"]}, t0=t, parent=s_guard)
    s_guard.end(end_time=t + 50 * MS)

    # Flow 2: creative, generation fails -> fallback degrades. Plus an orphan span whose
    # parent was never exported (as when a service crashes before its span ends).
    r2 = {A.REQUEST_ID: "req-2"}
    t = T2
    s_route2 = span(router, "route", 0, 1, r2 | {A.STEP: "route", A.ROUTE: "creative", A.QUEUED_MS: 0.25}, t0=t)
    s_gen2 = span(generator, "generate", 2, 20, r2 | {A.STEP: "generate", A.STEP_OUTCOME: "failed",
                  A.ERROR_CODE: "provider_timeout"}, t0=t, carrier=carrier_of(s_route2), error="provider timed out")
    span(fallback, "fallback", 21, 30, r2 | {A.STEP: "fallback", A.FALLBACK_REASON: "provider_timeout",
         A.FALLBACK_ACTION: "degrade", A.OUTCOME: "degraded", A.REQUEST_COST_USD: 0.0001},
         t0=t, carrier=carrier_of(s_gen2))
    lost = SpanContext(s_route2.get_span_context().trace_id, 0xDEADBEEF00000001, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))
    span(guardrail, "late publish", 25, 26, r2, t0=t, parent=NonRecordingSpan(lost))

    for tp in (router, retriever, generator, guardrail, fallback):
        tp.shutdown()
    ids = {
        "req-1": f"{s_route.get_span_context().trace_id:032x}",
        "req-2": f"{s_route2.get_span_context().trace_id:032x}",
    }
    return list(memory.get_finished_spans()), ids


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    target_app = create_app(":memory:")
    target_capture = Capture(target_app)
    with serve(target_capture) as target_base:
        app = create_app(":memory:", forward_url=target_base)
        app_capture = Capture(app)
        with serve(app_capture) as base:
            m = Mesh(base, target_base, app_capture, target_capture, app.state.store, target_app.state.store)
            m.sdk_spans, m.trace_ids = produce(f"{base}/v1/traces")
            yield m


def expected_row(s: ReadableSpan) -> SpanRow:
    """What the collector must store for an SDK span."""
    return SpanRow(
        trace_id=f"{s.context.trace_id:032x}",
        span_id=f"{s.context.span_id:016x}",
        parent_span_id=f"{s.parent.span_id:016x}" if s.parent else None,
        name=s.name,
        service=s.resource.attributes["service.name"],
        start_ns=s.start_time,
        end_ns=s.end_time,
        status_code=s.status.status_code.value,  # API and OTLP agree: 0 unset, 1 ok, 2 error
        kind=s.kind.value + 1,  # OTLP SpanKind is the API's shifted by one (0 = unspecified)
        status_message=s.status.description or "",
        attributes={k: list(v) if isinstance(v, tuple) else v for k, v in s.attributes.items()},
    )


def by_span(rows: list[SpanRow]) -> dict[str, SpanRow]:
    return {r.span_id: r for r in rows}


def otlp_json(spans: list[ReadableSpan]) -> bytes:
    """OTLP JSON as the spec defines it: camelCase, int enums, int64 as strings, hex ids."""
    doc = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in sp:
                        sp[key] = base64.b64decode(sp[key]).hex()
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- end to end


def test_exported_spans_are_stored_exactly(mesh: Mesh) -> None:
    expected = [expected_row(s) for s in mesh.sdk_spans]
    assert len(expected) == 11
    stored = mesh.store.spans(mesh.trace_ids["req-1"]) + mesh.store.spans(mesh.trace_ids["req-2"])
    assert by_span(stored) == by_span(expected)

    rows = by_span(mesh.store.spans(mesh.trace_ids["req-1"]))
    named = {(r.service, r.name): r for r in rows.values()}
    route, ret = named[("router", "route")], named[("retriever", "retrieve")]
    gen, chat = named[("generator", "generate")], named[("generator", "chat gpt-4o-mini")]
    guard, gate = named[("guardrail", "guard.output")], named[("guardrail", "gate faithfulness")]
    # Every hop nests under the previous one, across services.
    assert route.parent_span_id is None
    assert ret.parent_span_id == route.span_id
    assert gen.parent_span_id == ret.span_id
    assert chat.parent_span_id == gen.span_id
    assert guard.parent_span_id == gen.span_id
    assert gate.parent_span_id == guard.span_id
    # Typed attribute values survive protobuf -> SQLite.
    assert chat.attributes[A.GEN_AI_INPUT_TOKENS] == 100
    assert chat.attributes[A.USAGE_ESTIMATED] is False
    assert route.attributes[A.QUEUED_MS] == 0.5
    assert named[("guardrail", "gate pii")].attributes["baton.test.tags"] == ["a", "b"]


def test_flow_is_stitched_in_order_with_decisions(mesh: Mesh) -> None:
    flow = httpx.get(f"{mesh.base}/api/flows/req-1").json()
    assert flow["trace_id"] == mesh.trace_ids["req-1"]
    assert (flow["route"], flow["outcome"], flow["cost_usd"]) == ("factual", "answered", 0.0005)
    assert flow["latency_ms"] == 50.0
    assert flow["started_ns"] == T1
    assert (flow["fallback"], flow["gate_failed"], flow["orphans"]) == (False, False, [])
    assert flow["model"] == "gpt-4o-mini-2024"
    assert (flow["input_tokens"], flow["output_tokens"]) == (100, 20)
    hops = [
        (h["service"], h["step"], h["start_offset_ms"], h["duration_ms"], h["queued_ms"], h["decisions"])
        for h in flow["hops"]
    ]
    assert hops == [
        ("router", "route", 0.0, 2.0, 0.5, ["route=factual"]),
        ("retriever", "retrieve", 3.0, 7.0, 1.0, []),  # no queued_ms attribute: gap after the router span
        ("generator", "generate", 12.0, 28.0, 1.5, ["model=gpt-4o-mini-2024"]),
        ("guardrail", "guard.output", 41.0, 9.0, 1.0, ["verdict=fixed (faithfulness)", "verdict=pass (pii)"]),
    ]
    assert [(g["name"], g["verdict"]) for g in flow["gates"]] == [("faithfulness", "fixed"), ("pii", "pass")]


def test_fallback_flow_and_orphan(mesh: Mesh) -> None:
    flow = httpx.get(f"{mesh.base}/api/flows/req-2").json()
    assert (flow["route"], flow["outcome"], flow["fallback"], flow["cost_usd"]) == ("creative", "degraded", True, 0.0001)
    assert [(h["service"], h["step"]) for h in flow["hops"]] == [
        ("router", "route"), ("generator", "generate"), ("fallback", "fallback")
    ]
    assert flow["hops"][1]["status_code"] == 2
    assert flow["hops"][2]["decisions"] == ["fallback=degrade (provider_timeout)"]
    late = next(r for r in mesh.store.spans(mesh.trace_ids["req-2"]) if r.name == "late publish")
    assert late.parent_span_id == f"{0xDEADBEEF00000001:016x}"  # never exported
    assert flow["orphans"] == [late.span_id]
    assert flow["latency_ms"] == 30.0


def test_list_trace_stats_and_404(mesh: Mesh) -> None:
    flows = httpx.get(f"{mesh.base}/api/flows", params={"limit": 10}).json()
    assert [f["request_id"] for f in flows] == ["req-2", "req-1"]  # newest first
    assert httpx.get(f"{mesh.base}/api/flows", params={"limit": 1}).json()[0]["request_id"] == "req-2"
    assert httpx.get(f"{mesh.base}/api/flows", params={"limit": "x"}).status_code == 400

    trace_doc = httpx.get(f"{mesh.base}/api/traces/{mesh.trace_ids['req-1'].upper()}").json()
    assert len(trace_doc["spans"]) == 7 and trace_doc["orphans"] == []

    stats = httpx.get(f"{mesh.base}/api/stats").json()
    assert stats["count"] == 2
    assert stats["routes"] == {"creative": {"count": 1, "share": 0.5}, "factual": {"count": 1, "share": 0.5}}
    assert stats["fallback_rate"] == 0.5
    assert (stats["gate_spans"], stats["gate_failures"]) == (2, 0)
    assert stats["latency_ms"] == {"n": 2, "p50": 30.0, "p95": 50.0, "p99": 50.0}

    assert httpx.get(f"{mesh.base}/api/flows/nope").status_code == 404
    assert httpx.get(f"{mesh.base}/api/traces/{'0' * 32}").status_code == 404
    health = httpx.get(f"{mesh.base}/healthz").json()
    assert health["status"] == "ok" and health["spans"] >= 11


def test_otlp_json_gives_identical_rows(mesh: Mesh) -> None:
    pb = encode_spans(mesh.sdk_spans).SerializeToString()
    body = otlp_json(mesh.sdk_spans)
    assert decode(body, "application/json") == decode(pb, "application/x-protobuf")

    # Through another collector's HTTP endpoint, JSON in, JSON out.
    with TestClient(create_app(":memory:")) as client:
        resp = client.post("/v1/traces", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json") and resp.json() == {}
        store: SpanStore = client.app.state.store  # type: ignore[attr-defined]
        for trace_id in mesh.trace_ids.values():
            assert by_span(store.spans(trace_id)) == by_span(mesh.store.spans(trace_id))


def test_otlp_json_literal_uses_hex_ids() -> None:
    # Shaped like the OTLP spec's example: hex ids, int64 as strings, int enums, unknown field.
    doc = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "router"}}]},
            "scopeSpans": [{
                "scope": {"name": "x"},
                "spans": [{
                    "traceId": "5b8efff798038103d269b633813fc60c",
                    "spanId": "eee19b7ec3c1b174",
                    "parentSpanId": "eee19b7ec3c1b173",
                    "name": "route",
                    "kind": 5,
                    "startTimeUnixNano": "1544712660000000000",
                    "endTimeUnixNano": "1544712661000000000",
                    "attributes": [
                        {"key": "n", "value": {"intValue": "42"}},
                        {"key": "f", "value": {"doubleValue": 1.5}},
                        {"key": "b", "value": {"boolValue": True}},
                        {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"stringValue": "v"}}]}}},
                    ],
                    "status": {"code": 2, "message": "boom"},
                    "futureField": {"ignored": True},
                }],
            }],
        }]
    }
    (row,) = decode(json.dumps(doc).encode(), "application/json")
    assert (row.trace_id, row.span_id, row.parent_span_id) == (
        "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "eee19b7ec3c1b173"
    )
    assert (row.service, row.kind, row.status_code, row.status_message) == ("router", 5, 2, "boom")
    assert (row.start_ns, row.end_ns) == (1544712660000000000, 1544712661000000000)
    assert row.attributes == {"n": 42, "f": 1.5, "b": True, "kv": {"k": "v"}}


def test_garbage_is_rejected_and_server_keeps_serving(mesh: Mesh) -> None:
    url = f"{mesh.base}/v1/traces"
    pb = {"content-type": "application/x-protobuf"}
    js = {"content-type": "application/json"}
    cases = [
        (b"\x00\xffgarbage", pb, 400),
        (b"{not json", js, 400),
        (b"[1, 2]", js, 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "01"}]}]}]}', js, 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "0102", "spanId": "0102"}]}]}]}', js, 400),
        (b"hello", {"content-type": "text/plain"}, 415),
        (b"hello", {}, 415),
        (b"not gzip", pb | {"content-encoding": "gzip"}, 400),
        (gzip.compress(b"{}")[:-4], js | {"content-encoding": "gzip"}, 400),
        (b"{}", js | {"content-encoding": "br"}, 415),
    ]
    for body, headers, status in cases:
        resp = httpx.post(url, content=body, headers=headers)
        assert resp.status_code == status, (body, headers, resp.text)
        assert resp.content  # an explanation, not an empty error
    bad = httpx.post(url, content=b"{not json", headers=js).json()
    assert bad["code"] == 3 and "not JSON" in bad["message"]

    assert httpx.get(f"{mesh.base}/healthz").status_code == 200
    ok = httpx.post(url, content=gzip.compress(otlp_json(mesh.sdk_spans[:1])), headers=js | {"content-encoding": "gzip"})
    assert ok.status_code == 200 and ok.json() == {}
    empty = httpx.post(url, content=b"", headers=pb)
    assert empty.status_code == 200 and empty.headers["content-type"] == "application/x-protobuf"


def test_forwarding_sends_identical_bytes(mesh: Mesh) -> None:
    # Also forward a JSON body so both encodings are covered.
    body = otlp_json(mesh.sdk_spans[:2])
    assert httpx.post(f"{mesh.base}/v1/traces", content=body, headers={"content-type": "application/json"}).status_code == 200
    sent = list(mesh.app_capture.accepted)
    assert len(sent) >= 12 and any(enc == "gzip" for _, _, enc in sent) and any(enc is None for _, _, enc in sent)
    eventually_sync(lambda: len(mesh.target_capture.accepted) >= len(sent), 5)
    assert mesh.target_capture.accepted[: len(sent)] == sent  # bytes, content-type, content-encoding; in order
    # And the target stored the same spans.
    for trace_id in mesh.trace_ids.values():
        assert by_span(mesh.target_store.spans(trace_id)) == by_span(mesh.store.spans(trace_id))
    fwd = httpx.get(f"{mesh.base}/healthz").json()["forward"]
    assert fwd["forwarded"] >= len(sent) and fwd["dropped"] == 0 and fwd["failed"] == 0


def test_encodings_and_size_limit() -> None:
    body = otlp_json([])  # a valid, empty export
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    variants = {
        "gzip": gzip.compress(body[:5]) + gzip.compress(body[5:]),  # two gzip members
        "deflate": zlib.compress(body),
        "Deflate": raw_deflate.compress(body) + raw_deflate.flush(),  # raw deflate, odd casing
        "identity": body,
    }
    with TestClient(create_app(":memory:", max_body_bytes=1024)) as client:
        for encoding, content in variants.items():
            headers = {"content-type": "application/json", "content-encoding": encoding}
            assert client.post("/v1/traces", content=content, headers=headers).status_code == 200, encoding
        bomb = gzip.compress(b"{" + b" " * 100_000 + b"}")
        resp = client.post("/v1/traces", content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert resp.status_code == 413
        resp = client.post("/v1/traces", content=b"x" * 2048, headers={"content-type": "application/x-protobuf"})
        assert resp.status_code == 413


def test_forwarder_drops_oldest_when_full() -> None:
    f = Forwarder("http://127.0.0.1:9/", max_queue=2)
    for i in range(3):
        f.submit(bytes([i]), {"content-type": "application/x-protobuf"})
    assert (f.queued, f.dropped) == (2, 1)
    assert [o.body for o in f._queue] == [b"\x01", b"\x02"]
    assert f.endpoint == "http://127.0.0.1:9/v1/traces"


def test_dead_forward_target_never_blocks_ingest() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        with TestClient(create_app(":memory:", forward_url=dead)) as client:
            resp = client.post("/v1/traces", content=b"", headers={"content-type": "application/x-protobuf"})
            assert resp.status_code == 200
            eventually_sync(lambda: client.get("/healthz").json()["forward"]["failed"] == 1, 15)  # after its retries


# ---------------------------------------------------------------- store


def _row(span_id: str, parent: str | None, start_ms: float, end_ms: float, trace_id: str = "a" * 32,
         service: str = "svc", name: str = "", **attrs: Any) -> SpanRow:
    return SpanRow(trace_id, span_id, parent, name or span_id, service, int(start_ms * MS), int(end_ms * MS),
                   attributes=attrs)


def test_store_is_idempotent_and_indexes_requests(tmp_path: Any) -> None:
    path = tmp_path / "nested" / "collector.sqlite3"
    store = SpanStore(path)
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = [
        _row("01" * 8, None, 5, 6, **{A.REQUEST_ID: "r1"}),
        _row("02" * 8, "01" * 8, 1, 2, **{A.REQUEST_ID: "r1"}),  # earlier span, arriving later
        _row("03" * 8, None, 9, 10, trace_id="b" * 32, **{A.REQUEST_ID: "r2"}),
    ]
    assert store.insert(rows[:1]) == 1
    assert store.insert(rows) == 2
    assert store.insert(rows) == 0  # exporter retry: nothing new
    assert store.span_count() == 3
    assert [s.span_id for s in store.spans("A" * 32)] == ["02" * 8, "01" * 8]
    assert store.trace_id_for_request("r1") == "a" * 32 and store.trace_id_for_request("x") is None
    assert [(r.request_id, r.started_ns) for r in store.requests(10)] == [("r2", 9 * MS), ("r1", 1 * MS)]
    store.close()
    assert SpanStore(path).span_count() == 3  # durable in the file


# ---------------------------------------------------------------- stitching


def test_stitch_rules() -> None:
    rid = {A.REQUEST_ID: "r"}
    rows = [
        # A gateway span without baton.step: counts for latency, is not a hop.
        _row("00" * 8, None, 0, 100, name="gateway", **rid),
        _row("01" * 8, "00" * 8, 10, 20, service="router", **rid, **{A.STEP: "route", A.ROUTE: "factual"}),
        # Starts while its parent runs (synchronous call): queued clamps to 0.
        _row("02" * 8, "01" * 8, 15, 40, service="generator", **rid, **{A.STEP: "generate", A.COST_USD: 0.25}),
        # A nested non-hop span: its decision lands on the generate hop.
        _row("03" * 8, "02" * 8, 16, 39, **{A.GEN_AI_REQUEST_MODEL: "m1"}),
        # Same start as its parent: parent still listed first.
        _row("04" * 8, "02" * 8, 45, 60, service="guardrail", **rid, **{A.STEP: "guard.output", A.COST_USD: 0.5}),
        _row("05" * 8, "04" * 8, 45, 50, service="guardrail", **{A.STEP: "guard.inner", A.GATE_NAME: "g", A.GATE_VERDICT: "fail"}),
        _row("06" * 8, "ff" * 8, 70, 80, service="orphaned", **{A.STEP: "late"}),
    ]
    flow = stitch(list(reversed(rows)))
    assert [(h.step, h.queued_ms) for h in flow.hops] == [
        ("route", 0.0), ("generate", 0.0), ("guard.output", 5.0), ("guard.inner", 0.0), ("late", None)
    ]
    assert [d.label() for d in flow.hops[1].decisions] == ["model=m1"]
    assert flow.orphans == ("06" * 8,)
    assert (flow.latency_ms, flow.route, flow.outcome, flow.request_id) == (100.0, "factual", None, "r")
    assert flow.cost_usd == 0.75  # no request total yet: sum of step costs
    assert flow.gate_failed and not flow.completed and flow.model == "m1"

    # A trace without baton.step: every span is a hop named after itself.
    plain = stitch([_row("01" * 8, None, 0, 5, name="a"), _row("02" * 8, "01" * 8, 6, 8, name="b")])
    assert [(h.step, h.queued_ms) for h in plain.hops] == [("a", None), ("b", 1.0)]

    with pytest.raises(ValueError):
        stitch([])
    with pytest.raises(ValueError):
        stitch([_row("01" * 8, None, 0, 1), _row("02" * 8, None, 0, 1, trace_id="b" * 32)])


# ---------------------------------------------------------------- stats


def test_nearest_rank() -> None:
    values = [15, 20, 35, 40, 50]
    assert [nearest_rank(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert nearest_rank(list(range(1, 21)), 95) == 19  # exact: ceil(0.95 * 20) = 19, no float drift
    assert nearest_rank([], 50) is None
    with pytest.raises(ValueError):
        nearest_rank([1], 0)


def known_flows() -> list[Flow]:
    flows = []
    for i in range(1, 21):
        outcome = "error" if i >= 19 else "degraded" if i >= 16 else "answered"
        gates: list[GateResult] = []
        if i <= 10:
            gates.append(GateResult("faithfulness", "fail" if i <= 2 else "pass"))
        if i <= 4:
            gates.append(GateResult("pii", "fail" if i == 1 else "fixed"))
        flows.append(
            Flow(
                trace_id=f"{i:032x}",
                request_id=f"r{i}",
                route="factual" if i <= 10 else "creative" if i <= 16 else None,
                outcome=outcome,
                latency_ms=float(i),
                hops=(
                    Hop(f"{i:016x}", "router", "route", 0.0, float(i), 2.0 * i if i % 2 == 0 else None),
                ),
                cost_usd=i / 1000 if outcome != "error" else 0.5,
                fallback=i % 4 == 0,
                gates=tuple(gates),
            )
        )
    # Hand them over shuffled: order must not matter.
    return flows[::3] + flows[1::3] + flows[2::3]


def test_flow_stats_exact() -> None:
    s = flow_stats(known_flows())
    assert s.count == 20
    assert (s.latency_ms.p50, s.latency_ms.p95, s.latency_ms.p99) == (10.0, 19.0, 20.0)
    assert {k: (v.count, v.share) for k, v in s.routes.items()} == {
        "factual": (10, 0.5), "creative": (6, 0.3), "(none)": (4, 0.2)
    }
    assert list(s.routes) == ["factual", "creative", "(none)"]  # most common first
    assert (s.fallbacks, s.fallback_rate) == (5, 0.25)
    assert (s.gate_spans, s.gate_failures, s.gate_failure_rate) == (14, 3, 3 / 14)
    assert {k: (g.spans, g.failures, g.failure_rate) for k, g in s.gates.items()} == {
        "faithfulness": (10, 2, 0.2), "pii": (4, 1, 0.25)
    }
    # Cost over the 18 completed flows (answered or degraded): 0.001 .. 0.018; errors' 0.5 excluded.
    assert s.completed == 18
    assert (s.cost_usd.n, s.cost_usd.p50, s.cost_usd.p95, s.cost_usd.p99) == (18, 0.009, 0.018, 0.018)
    assert s.cost_mean_usd == pytest.approx(0.0095)
    step = s.steps["route"]
    assert step.count == 20
    assert (step.duration_ms.p50, step.duration_ms.p95, step.duration_ms.p99) == (10.0, 19.0, 20.0)
    # Queued known on the 10 even flows: 4, 8, ..., 40.
    assert (step.queued_ms.n, step.queued_ms.p50, step.queued_ms.p95, step.queued_ms.p99) == (10, 20.0, 40.0, 40.0)
    assert s.outcomes == {"answered": 15, "degraded": 3, "error": 2}
    json.dumps(s.to_dict())  # the API serves it as-is

    empty = flow_stats([])
    assert (empty.count, empty.fallback_rate, empty.gate_failure_rate, empty.latency_ms.p50) == (0, None, None, None)


# ---------------------------------------------------------------- render


def test_renderers(mesh: Mesh) -> None:
    flow = stitch(mesh.store.spans(mesh.trace_ids["req-1"]))
    console = Console(record=True, width=160, file=io.StringIO(), color_system=None)
    console.print(waterfall(flow))
    console.print(stats_table(flow_stats(known_flows())))
    text = console.export_text()
    for needle in ("router", "retriever", "guard.output", "route=factual", "verdict=fixed (faithfulness)",
                   "model=gpt-4o-mini-2024", "routing mix", "faithfulness", "25.0%"):
        assert needle in text, needle
    orphaned = stitch(mesh.store.spans(mesh.trace_ids["req-2"]))
    console.print(waterfall(orphaned))
    assert "orphan" in console.export_text()


def test_decode_rejects_bad_ids_in_protobuf() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest()
    sp = req.resource_spans.add().scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.name = b"\x01" * 16, b"\x02" * 3, "x"
    with pytest.raises(OTLPDecodeError, match="span_id"):
        decode(req.SerializeToString(), "application/x-protobuf")
    sp.span_id = b"\x02" * 8
    (row,) = decode(req.SerializeToString(), "application/protobuf")
    assert row.service == "unknown_service" and row.parent_span_id is None


def test_stats_count_ab_arms_shadow_calls_and_cache_hits():
    from services.collector.flows import flow_stats, stitch
    from services.collector.otlp import SpanRow
    from shared import attributes as A

    def flow(n: int, variant: str | None, shadow: bool, cached: bool):
        trace = f"{n:032x}"
        route = SpanRow(trace, f"{n:015x}1", None, "route", "router", 0, 1_000_000,
                        attributes={A.REQUEST_ID: f"r{n}", A.STEP: "route", A.ROUTE: "factual", **({A.VARIANT: variant} if variant else {}),
                                    **({A.OUTCOME: "answered", A.CACHED: True} if cached else {})})
        spans = [route]
        if shadow:
            spans.append(SpanRow(trace, f"{n:015x}2", route.span_id, "shadow chat big", "generator", 10, 20, attributes={A.SHADOW: True}))
        return stitch(spans)

    stats = flow_stats([flow(1, "small", True, False), flow(2, "small", False, False), flow(3, "local", False, True), flow(4, None, False, False)])
    assert stats.variants == {"factual/local": 1, "factual/small": 2}
    assert stats.shadowed == 1 and stats.cache_hits == 1


# ---------------------------------------------------------------- forwarder retries


async def _http_answering(sock: socket.socket, status: int, received: list[bytes]) -> asyncio.AbstractServer:
    """A minimal OTLP/HTTP receiver on an already bound socket: records each body, answers `status`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        received.append(await reader.readexactly(length))
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, sock=sock)


async def test_forwarder_retries_until_the_receiver_comes_up() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening yet: connection refused, as while Jaeger boots
    forwarder = Forwarder(f"http://127.0.0.1:{sock.getsockname()[1]}", backoff_s=0.05)
    await forwarder.start()
    received: list[bytes] = []
    try:
        forwarder.submit(b"spans", {"content-type": "application/x-protobuf"})
        await eventually(lambda: forwarder.retried >= 1, 2)
        assert forwarder.forwarded == 0
        server = await _http_answering(sock, 200, received)
        await eventually(lambda: forwarder.forwarded, 4)
        assert received == [b"spans"] and (forwarder.forwarded, forwarder.failed, forwarder.dropped) == (1, 0, 0)
        server.close()
    finally:
        await forwarder.stop()
        sock.close()


async def test_forwarder_does_not_retry_a_body_the_receiver_refuses() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    received: list[bytes] = []
    server = await _http_answering(sock, 400, received)
    forwarder = Forwarder(f"http://127.0.0.1:{sock.getsockname()[1]}", backoff_s=0.05)
    await forwarder.start()
    try:
        forwarder.submit(b"bad", {"content-type": "application/x-protobuf"})
        await eventually(lambda: forwarder.failed, 4)
        assert (forwarder.failed, forwarder.retried, len(received)) == (1, 0, 1)
    finally:
        await forwarder.stop()
        server.close()
        sock.close()
