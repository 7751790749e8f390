"""The lean span exporter against a real HTTP server on loopback, and how it is chosen."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import telemetry
from shared.span_export import ExportTarget, LeanSpanExporter, standard_exporter_reason


@dataclass
class Receiver:
    """What an OTLP endpoint saw; `statuses` are answered in turn, then 200."""

    port: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    connections: set[int] = field(default_factory=set)
    statuses: list[int] = field(default_factory=list)
    close_each: bool = False  # drop the kept-alive connection after each answer, as an idle server does


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    seen = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            seen.connections.add(id(self.connection))
            status = seen.statuses.pop(0) if seen.statuses else 200
            self.send_response(status)
            if status in (429, 503):
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            if seen.close_each:
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    seen.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen
    server.shutdown()
    server.server_close()


def finished_spans(count: int = 3) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "guardrail"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("baton")
    for i in range(count):
        with tracer.start_as_current_span("guard.input", attributes={"baton.request_id": f"r{i}", "baton.gate.score": 0.1 * i}):
            pass
    return list(exporter.get_finished_spans())


def lean(receiver: Receiver, **settings: str) -> LeanSpanExporter:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", **settings}
    return LeanSpanExporter(ExportTarget.from_environment(environ))


def test_batches_reach_the_endpoint_as_the_sdk_encodes_them_over_one_connection(receiver: Receiver) -> None:
    exporter = lean(receiver, OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20t0k,x-tenant=shop")
    batches = [finished_spans(), finished_spans(1)]
    assert all(exporter.export(batch) is SpanExportResult.SUCCESS for batch in batches)
    assert [body for _, _, body in receiver.requests] == [sdk_encode_spans(batch).SerializeToString() for batch in batches]
    path, headers, _ = receiver.requests[0]
    assert path == "/v1/traces" and headers["content-type"] == "application/x-protobuf"
    assert headers["authorization"] == "Bearer t0k" and headers["x-tenant"] == "shop"
    assert len(receiver.connections) == 1  # kept alive
    exporter.shutdown()
    assert exporter.export(batches[0]) is SpanExportResult.FAILURE


def test_traces_variables_win_over_the_general_ones_and_gzip_is_honoured(receiver: Receiver) -> None:
    exporter = lean(receiver, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{receiver.port}/custom/traces",
                    OTEL_EXPORTER_OTLP_COMPRESSION="deflate", OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="gzip",
                    OTEL_EXPORTER_OTLP_HEADERS="x-a=general", OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-a=traces", OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="3")
    spans = finished_spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    path, headers, body = receiver.requests[0]
    assert path == "/custom/traces" and headers["content-encoding"] == "gzip" and headers["x-a"] == "traces"
    assert gzip.decompress(body) == sdk_encode_spans(spans).SerializeToString()
    assert exporter.target.timeout_s == 3.0


def test_a_closed_keep_alive_connection_is_reopened_and_nothing_is_lost(receiver: Receiver) -> None:
    receiver.close_each = True
    exporter = lean(receiver)
    for _ in range(3):
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
    assert len(receiver.requests) == 3


def test_a_busy_endpoint_is_retried_and_a_refusal_is_not(receiver: Receiver) -> None:
    receiver.statuses = [503, 429]
    exporter = lean(receiver)
    assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
    assert len(receiver.requests) == 3
    receiver.statuses = [400]
    assert exporter.export(finished_spans(1)) is SpanExportResult.FAILURE
    assert len(receiver.requests) == 4


def test_an_endpoint_that_is_down_fails_the_batch_within_the_timeout() -> None:
    from shared.natsd import free_port

    exporter = LeanSpanExporter(ExportTarget(f"http://127.0.0.1:{free_port()}/v1/traces", timeout_s=0.5))
    assert exporter.export(finished_spans(1)) is SpanExportResult.FAILURE


@pytest.mark.parametrize("setting, reason", [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, None),
    ({"BATON_TRACE_EXPORTER": "otlp"}, "BATON_TRACE_EXPORTER=otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "OTLP protocol grpc"),
    ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem"}, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
    ({"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": "/etc/key.pem"}, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otlp.example:4318/v1/traces"}, "a https endpoint"),
])
def test_settings_only_the_sdk_exporter_implements_select_it(monkeypatch: pytest.MonkeyPatch, setting: dict[str, str], reason: str | None) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", **setting}
    assert standard_exporter_reason(environ) == reason
    for name in list(__import__("os").environ):
        if name.startswith("OTEL_") or name == "BATON_TRACE_EXPORTER":
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    chosen = telemetry.span_exporter()
    try:
        assert isinstance(chosen, LeanSpanExporter if reason is None else OTLPSpanExporter)
    finally:
        chosen.shutdown()
