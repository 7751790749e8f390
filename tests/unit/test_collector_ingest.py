"""The collector's fast ingest path: OTLP bytes -> store records without a dict per span.

`decode_records` reads attributes from the span's wire bytes and caches each distinct
attribute's JSON; it must store exactly what the plain path (`decode` -> `record_of`)
would, for every kind of attribute value and for wire shapes the SDK rarely sends.
"""

from __future__ import annotations

import base64
import json
import math
import sqlite3
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from services.collector import otlp
from services.collector.otlp import OTLPDecodeError, SpanRecord, decode, decode_records, record_of
from services.collector.store import SpanStore
from shared.otlp_wire import _varint
from shared import attributes as A

PB = "application/x-protobuf"


def _kv(key: str, **value: object) -> KeyValue:
    kv = KeyValue(key=key)
    if value:
        kv.value.CopyFrom(AnyValue(**value))  # type: ignore[arg-type]
    return kv


def _export() -> ExportTraceServiceRequest:
    """Two services, spans with every attribute kind and some odd-but-valid wire shapes."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(_kv("service.name", string_value="router"))
    spans = rs.scope_spans.add().spans
    first = spans.add(trace_id=b"\x0a" * 16, span_id=b"\x01" * 8, name="route", kind=5,
                      start_time_unix_nano=10, end_time_unix_nano=20)
    first.status.code, first.status.message = 2, "boom"
    nested = AnyValue()
    nested.array_value.values.add(string_value="a")
    nested.array_value.values.add().kvlist_value.values.append(_kv("k", int_value=-1))
    first.attributes.extend([
        _kv(A.REQUEST_ID, string_value="req-1"),
        _kv("s", string_value=""),
        _kv("unicode ключ", string_value="värde " + "x" * 300),  # multi-byte length varints
        _kv("b", bool_value=False),
        _kv("i", int_value=-(1 << 62)),
        _kv("f", double_value=0.1),
        _kv("inf", double_value=math.inf),
        _kv("raw", bytes_value=b"\x00\xff"),
        _kv("unset"),
        _kv("dup", string_value="first"),
        _kv("dup", int_value=2),  # a repeated key: the last one wins, as in a dict
    ])
    first.attributes.add(key="nested").value.CopyFrom(nested)
    # An unknown field numbered past 15 (a two-byte tag), as a newer SDK might send.
    raw_first = first.SerializeToString() + b"\x80\x06\x01"
    first.Clear()
    first.ParseFromString(raw_first)
    spans.add(trace_id=b"\x0a" * 16, span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8, name="child",
              start_time_unix_nano=11, end_time_unix_nano=12).attributes.append(_kv(A.REQUEST_ID, int_value=7))
    other = req.resource_spans.add().scope_spans.add().spans  # no service.name
    other.add(trace_id=b"\x0b" * 16, span_id=b"\x03" * 8, parent_span_id=b"\x00" * 8, name="bare")
    return req


def _comparable(record: SpanRecord) -> tuple[object, ...]:
    return (*record[:10], json.loads(record.attributes_json), record.request_id)


def test_records_equal_the_plain_decode_for_every_attribute_kind() -> None:
    body = _export().SerializeToString()
    plain = [_comparable(record_of(row)) for row in decode(body, PB)]
    assert [_comparable(r) for r in decode_records(body, PB)] == plain
    # Again, now from the cache of attribute JSON: the same records.
    assert [_comparable(r) for r in decode_records(body, PB)] == plain
    first, child, bare = plain
    assert first[10]["dup"] == 2 and first[10]["raw"] == "00ff" and first[10]["unset"] is None
    assert first[10]["nested"] == ["a", {"k": -1}] and first[10]["inf"] == math.inf
    assert (first[11], child[11], bare[11]) == ("req-1", "7", None)
    assert (bare[2], bare[4]) == (None, "unknown_service")


def test_attribute_json_is_byte_for_byte_what_json_dumps_writes() -> None:
    span = Span(trace_id=b"\x0a" * 16, span_id=b"\x04" * 8)
    span.attributes.extend([
        _kv("ascii", string_value="plain"), _kv("ünï", string_value="ключ \"q\" \\ \n"), _kv("t", bool_value=True),
        _kv("zero", int_value=0), _kv("big", int_value=(1 << 63) - 1), _kv("neg", double_value=-2.5e-300),
        _kv("nan", double_value=math.nan), _kv("e", string_value=""),
    ])
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.append(span)
    body = req.SerializeToString()
    (row,), (record,) = decode(body, PB), decode_records(body, PB)
    assert record.attributes_json == record_of(row).attributes_json


def test_records_from_otlp_json_equal_protobuf() -> None:
    from google.protobuf.json_format import MessageToJson

    req = _export()
    for span in (s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans):
        span.DiscardUnknownFields()
    doc = json.loads(MessageToJson(req))
    for rs in doc["resourceSpans"]:  # OTLP JSON spells ids in hex
        for span in rs["scopeSpans"][0]["spans"]:
            for key in ("traceId", "spanId", "parentSpanId"):
                if key in span:
                    span[key] = base64.b64decode(span[key]).hex()
    from_json = decode_records(json.dumps(doc).encode(), "application/json")
    assert [_comparable(r) for r in from_json] == [_comparable(r) for r in decode_records(req.SerializeToString(), PB)]


def test_records_reject_bad_ids_like_decode() -> None:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 3, name="x")
    with pytest.raises(OTLPDecodeError, match="span_id"):
        decode_records(req.SerializeToString(), PB)


def test_attribute_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp, "_MEMBERS_MAX", 5)
    monkeypatch.setattr(otlp, "_members", {})
    for n in range(20):
        span = Span(trace_id=b"\x0a" * 16, span_id=b"\x01" * 8)
        span.attributes.append(_kv(A.REQUEST_ID, string_value=f"r{n}"))
        assert otlp._attributes_json(span) == (json.dumps({A.REQUEST_ID: f"r{n}"}, separators=(",", ":")), f"r{n}")
        assert len(otlp._members) <= 5


def test_store_made_by_an_older_collector_still_works(tmp_path: Path) -> None:
    # The schema before spans became a rowid table: existing files must keep working.
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE spans (trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT,
            name TEXT NOT NULL, service TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
            status_code INTEGER NOT NULL, kind INTEGER NOT NULL, status_message TEXT NOT NULL,
            request_id TEXT, attributes TEXT NOT NULL, PRIMARY KEY (trace_id, span_id)) WITHOUT ROWID;
    """)
    conn.close()
    store = SpanStore(path)
    body = _export().SerializeToString()
    assert store.insert_records(decode_records(body, PB)) == 3
    assert store.insert_records(decode_records(body, PB)) == 0  # retries stay idempotent
    assert store.spans("0a" * 16) == [r for r in decode(body, PB) if r.trace_id == "0a" * 16]
    assert store.trace_id_for_request("req-1") == "0a" * 16
    store.close()


def test_new_store_dedupes_on_ids_and_reads_back_exactly(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "new.sqlite3")
    body = _export().SerializeToString()
    assert store.insert_records(decode_records(body, PB)) == 3
    assert store.insert_records(decode_records(body, PB)) == 0
    rows = decode(body, PB)
    assert store.spans_of_traces(["0a" * 16, "0b" * 16]) == {
        t: [r for r in rows if r.trace_id == t] for t in ("0a" * 16, "0b" * 16)
    }
    # Both spans carry request ids ("req-1" and 7); each maps to the trace, started at its span.
    assert {(r.request_id, r.started_ns) for r in store.requests(10)} == {("req-1", 10), ("7", 11)}
    store.close()


@pytest.mark.parametrize("known_max", [16384, 1])
def test_a_requests_start_is_its_earliest_span_whatever_the_order_of_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known_max: int) -> None:
    import itertools

    from services.collector import store as store_module

    monkeypatch.setattr(store_module, "_KNOWN_STARTS_MAX", known_max)  # 1: the skip cache forgets at once
    starts = {"route": 30, "guard.input": 10, "generate": 50, "guard.output": 20}
    for n, order in enumerate(itertools.permutations(starts)):
        path = tmp_path / f"{n}.sqlite3"
        store = SpanStore(path)
        for i, name in enumerate(order):
            if i == 2:  # a restarted collector: the file remembers, the process does not
                store.close()
                store = SpanStore(path)
            req = ExportTraceServiceRequest()
            span = req.resource_spans.add().scope_spans.add().spans.add(
                trace_id=bytes([1 + i]) * 16, span_id=bytes([1 + i]) * 8, name=name,
                start_time_unix_nano=starts[name], end_time_unix_nano=starts[name] + 1)
            span.attributes.append(_kv(A.REQUEST_ID, string_value="req-1"))
            store.insert_records(decode_records(req.SerializeToString(), PB))
            seen = [starts[o] for o in order[: i + 1]]
            assert [(r.request_id, r.trace_id, r.started_ns) for r in store.requests(5)] == [("req-1", "01" * 16, min(seen))], order
        store.close()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (numbers below 16: a one-byte tag)."""
    return bytes([(number << 3) | 2]) + _varint(len(payload)) + payload


def test_records_read_from_the_wire_equal_protobufs_reading_of_odd_shapes() -> None:
    """Valid protobuf an SDK would not write: what protobuf parses is what is stored."""
    service = _field(1, _kv("service.name", string_value="guardrail").SerializeToString())
    other = _field(1, _kv("host.name", string_value="h").SerializeToString())
    span = Span(trace_id=b"\x0c" * 16, span_id=b"\x05" * 8, name="first name", kind=2, start_time_unix_nano=5, end_time_unix_nano=6)
    span.status.message = "kept"
    span.attributes.append(_kv(A.REQUEST_ID, string_value="r-odd"))
    raw = span.SerializeToString()
    raw += _field(15, b"\x18\x02")  # a second Status: merged (code from it, message from the first)
    raw += _field(5, b"last name")  # a repeated scalar: the last wins
    raw += b"\x30" + b"\xff" * 9 + b"\x01"  # kind -1 as a ten-byte varint (int32 enum)
    raw += b"\x08\x07"  # field 1 (trace_id) as a varint: an unknown field, not the id
    raw += b"\x9d\x01" + b"\x00" * 4  # field 19, fixed32: unknown
    # The resource after the spans, in two parts that merge.
    body = _field(1, _field(2, _field(2, raw)) + _field(1, other) + _field(1, service))
    (row,) = decode(body, PB)
    (record,) = decode_records(body, PB)
    assert _comparable(record) == _comparable(record_of(row))
    assert (record.name, record.service, record.kind, record.status_code, record.status_message) == ("last name", "guardrail", -1, 2, "kept")
    assert record.trace_id == "0c" * 16 and record.request_id == "r-odd"


def test_a_group_field_is_read_through_protobuf_instead() -> None:
    span = Span(trace_id=b"\x0c" * 16, span_id=b"\x05" * 8, name="grouped")
    raw = span.SerializeToString() + b"\xa3\x01" + b"\xa4\x01"  # an empty group, field 20: unknown
    body = _field(1, _field(2, _field(2, raw)))
    (record,) = decode_records(body, PB)
    assert record.name == "grouped" and _comparable(record) == _comparable(record_of(decode(body, PB)[0]))


def test_the_wal_stays_bounded_under_sustained_ingest_and_every_span_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints run in the background; under back-to-back exports the WAL still starts over."""
    import os
    import time

    from services.collector import store as store_module

    monkeypatch.setattr(store_module, "_WAL_CHECKPOINT_PAGES", 40)
    monkeypatch.setattr(store_module, "_CHECKPOINT_SPANS", 64)
    path = tmp_path / "spans.sqlite3"
    store = SpanStore(path)
    largest_wal = 0
    for batch in range(60):
        req = ExportTraceServiceRequest()
        spans = req.resource_spans.add().scope_spans.add().spans
        for i in range(32):
            span = spans.add(trace_id=bytes([batch + 1, i + 1]) * 8, span_id=bytes([i + 1]) * 8, name="hop",
                             start_time_unix_nano=1 + i, end_time_unix_nano=2 + i)
            span.attributes.append(_kv(A.REQUEST_ID, string_value=f"r{batch}-{i}"))
            span.attributes.append(_kv("padding", string_value="x" * 400))
        store.insert_records(decode_records(req.SerializeToString(), PB))
        largest_wal = max(largest_wal, os.path.getsize(f"{path}-wal"))
        # Back to back, but the checkpointer gets its turns: wait (bounded) until it has taken
        # a wake-up, so a busy machine that starves its thread does not fail the bound below.
        deadline = time.monotonic() + 2.0
        while store._checkpointer._wake.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)
    assert store.span_count() == 60 * 32
    # Unbounded, this WAL would hold every page written (several MB); bounded, a few times the interval.
    assert largest_wal < 6 * 40 * 4096, largest_wal
    store.close()
    reopened = SpanStore(path)
    assert reopened.span_count() == 60 * 32 and reopened.trace_id_for_request("r59-31") == bytes([60, 32]).hex() * 8
    reopened.close()
