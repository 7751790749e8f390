"""Decode OTLP/HTTP trace exports into flat span rows.

Two encodings per the OTLP/HTTP spec: binary protobuf (`application/x-protobuf`) and
OTLP JSON (`application/json`). OTLP JSON is *almost* the proto3 JSON mapping that
`google.protobuf.json_format` implements, with one trap: trace and span ids are hex
strings, whereas proto3 JSON encodes `bytes` as base64. A 32-char hex trace id is also
valid base64, so feeding it straight to json_format silently yields wrong ids instead
of an error; we rewrite the id fields to base64 before parsing.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from shared.attributes import REQUEST_ID

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# `application/protobuf` is the registered name; some SDKs send it, so accept both.
_PROTOBUF_TYPES = {PROTOBUF, "application/protobuf"}

UNKNOWN_SERVICE = "unknown_service"  # what the OTel SDKs report when service.name is unset

# Fields holding ids in OTLP JSON, in both spellings json_format accepts.
_SPAN_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
_ID_LENGTHS = {"trace": 16, "span": 8}


class OTLPDecodeError(ValueError):
    """The body is not a valid ExportTraceServiceRequest in the declared encoding."""


class UnsupportedContentType(OTLPDecodeError):
    """Neither protobuf nor JSON."""


@dataclass(frozen=True)
class SpanRow:
    """One span, flattened. Ids are lowercase hex; times are Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    status_code: int = 0  # OTLP StatusCode: 0 unset, 1 ok, 2 error
    kind: int = 0  # OTLP SpanKind: 0 unspecified, 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "status_code": self.status_code,
            "kind": self.kind,
            "status_message": self.status_message,
            "attributes": dict(self.attributes),
        }


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_protobuf(content_type: str | None) -> bool:
    return media_type(content_type) in _PROTOBUF_TYPES


def is_json(content_type: str | None) -> bool:
    return media_type(content_type) == JSON


def parse_request(body: bytes, content_type: str | None) -> ExportTraceServiceRequest:
    """Parse a (decompressed) body; raise OTLPDecodeError on anything malformed."""
    request = ExportTraceServiceRequest()
    if is_protobuf(content_type):
        try:
            request.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as exc:  # upb raises DecodeError; be generous
            raise OTLPDecodeError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from exc
        return request
    if is_json(content_type):
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise OTLPDecodeError(f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise OTLPDecodeError("OTLP JSON body must be an object")
        _hex_ids_to_base64(doc)
        try:
            # The OTLP spec says receivers MUST ignore unknown fields (forward compatibility).
            json_format.ParseDict(doc, request, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, AttributeError) as exc:
            raise OTLPDecodeError(f"body is not an OTLP JSON ExportTraceServiceRequest: {exc}") from exc
        return request
    raise UnsupportedContentType(
        f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}"
    )


def decode(body: bytes, content_type: str | None) -> list[SpanRow]:
    """Body (already decompressed) -> span rows."""
    return rows_from_request(parse_request(body, content_type))


def rows_from_request(request: ExportTraceServiceRequest) -> list[SpanRow]:
    return [
        SpanRow(*_fields(span, service), attributes={kv.key: any_value(kv.value) for kv in span.attributes})
        for service, span in _spans(request)
    ]


class SpanRecord(NamedTuple):
    """One span as the store writes it: SpanRow's fields, the attributes as JSON text
    (what the store keeps) and the request id pulled out of them (what it indexes)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    status_code: int
    kind: int
    status_message: str
    attributes_json: str
    request_id: str | None


def decode_records(body: bytes, content_type: str | None) -> list[SpanRecord]:
    """Body (already decompressed) -> records for the store: the ingest path.

    Same spans as `decode`, but the attributes go straight to JSON text (see
    `_attributes_json`) instead of through a dict per span, which was most of the
    collector's CPU per span.
    """
    request = parse_request(body, content_type)  # validates protobuf bodies (upb): the scan below trusts them
    if is_protobuf(content_type):
        try:
            return _records_from_wire(body)
        except _GroupField:  # a wire shape OTLP never uses: read through the API instead
            pass
    return [
        SpanRecord(*_fields(span, service), *_attributes_json(span))
        for service, span in _spans(request)
    ]


def record_of(row: SpanRow) -> SpanRecord:
    """A decoded span as the store writes it (the slow path's equivalent of decode_records)."""
    return SpanRecord(
        row.trace_id,
        row.span_id,
        row.parent_span_id,
        row.name,
        row.service,
        row.start_ns,
        row.end_ns,
        row.status_code,
        row.kind,
        row.status_message,
        json.dumps(row.attributes, separators=(",", ":")),
        _request_id(row.attributes),
    )


def _spans(request: ExportTraceServiceRequest) -> Iterator[tuple[str, Span]]:
    """(service.name of its resource, span) for every span of an export."""
    for resource_spans in request.resource_spans:
        service = UNKNOWN_SERVICE
        for kv in resource_spans.resource.attributes:
            if kv.key == "service.name" and kv.value.string_value:
                service = kv.value.string_value
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield service, span


def _fields(span: Span, service: str) -> tuple[str, str, str | None, str, str, int, int, int, int, str]:
    """A span's fields in SpanRow order up to, not including, the attributes."""
    status = span.status
    return (
        _hex_id(span.trace_id, "trace", "trace_id"),
        _hex_id(span.span_id, "span", "span_id"),
        # Empty or all-zero parent means "root" in OTLP.
        _hex_id(parent, "span", "parent_span_id") if (parent := span.parent_span_id).strip(b"\x00") else None,
        span.name,
        service,
        _time(span.start_time_unix_nano, "start_time_unix_nano"),
        _time(span.end_time_unix_nano, "end_time_unix_nano"),
        int(status.code),
        int(span.kind),
        status.message,
    )


class _GroupField(Exception):
    """A protobuf group (wire types 3, 4): valid, never sent by OTLP, not scanned here."""


def _records_from_wire(body: bytes) -> list[SpanRecord]:
    """The records of a (upb-validated) ExportTraceServiceRequest, read from its bytes.

    The protobuf API costs a Python object per resource, scope, span, status and
    field read, and the attribute scan needed each span serialized again; this reads
    every span's fields in one pass over the body. Only the fields the records hold
    are read; any other is skipped as protobuf skips an unknown one (a field whose wire
    type is not its declared one included). Repeated occurrences of a field behave as
    in protobuf: the last scalar wins, a message merges (a Resource's attributes
    add up, a Status keeps the fields each occurrence sets).
    """
    records: list[SpanRecord] = []
    for tag, start, end in _message_fields(body, 0, len(body)):
        if tag == 0x0A:  # ExportTraceServiceRequest.resource_spans
            _resource_spans(body, start, end, records)
    return records


def _resource_spans(data: bytes, pos: int, end: int, records: list[SpanRecord]) -> None:
    service = UNKNOWN_SERVICE
    spans: list[tuple[int, int]] = []
    for tag, start, stop in _message_fields(data, pos, end):
        if tag == 0x0A:  # ResourceSpans.resource
            for inner_tag, kv_start, kv_stop in _message_fields(data, start, stop):
                if inner_tag == 0x0A:  # Resource.attributes
                    kv = KeyValue.FromString(data[kv_start:kv_stop])
                    if kv.key == "service.name" and kv.value.string_value:
                        service = kv.value.string_value
        elif tag == 0x12:  # ResourceSpans.scope_spans
            spans += [(a, b) for inner_tag, a, b in _message_fields(data, start, stop) if inner_tag == 0x12]  # ScopeSpans.spans
    for start, stop in spans:
        records.append(_span_record(data, start, stop, service))


def _message_fields(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each length-delimited field of a message; others skipped."""
    fields = []
    while pos < end:
        tag = data[pos]
        if tag >= 0x80:
            tag, pos = _varint(data, pos)
        else:
            pos += 1
        wire_type = tag & 7
        if wire_type == 2:
            length = data[pos]
            if length >= 0x80:
                length, pos = _varint(data, pos)
            else:
                pos += 1
            fields.append((tag, pos, pos + length))
            pos += length
        else:
            pos = _skip(data, pos, wire_type)
    return fields


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """Past a field's value that is not length-delimited."""
    if wire_type == 0:
        while data[pos] >= 0x80:
            pos += 1
        return pos + 1
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise _GroupField


def _span_record(data: bytes, pos: int, end: int, service: str) -> SpanRecord:
    """One Span's record, from its bytes (see `_records_from_wire`)."""
    trace_id = span_id = parent = b""
    name = status_message = ""
    kind = status_code = start_ns = end_ns = 0
    members: list[str] = []
    request_id: str | None = None
    cached = _members.get
    while pos < end:
        tag = data[pos]
        if tag >= 0x80:  # field 16 (flags) and beyond
            tag, pos = _varint(data, pos)
        else:
            pos += 1
        if tag & 7 == 2:
            length = data[pos]
            if length >= 0x80:
                length, pos = _varint(data, pos)
            else:
                pos += 1
            stop = pos + length
            if tag == _ATTRIBUTE_TAG:
                record = data[pos:stop]
                member = cached(record) or _member(record)
                members.append(member[2])
                if member[0] == REQUEST_ID:
                    request_id = None if member[1] is None else str(member[1])
            elif tag == 0x0A:
                trace_id = data[pos:stop]
            elif tag == 0x12:
                span_id = data[pos:stop]
            elif tag == 0x22:
                parent = data[pos:stop]
            elif tag == 0x2A:
                name = data[pos:stop].decode()
            elif tag == 0x7A:  # status: merged over occurrences, as protobuf does
                status_message, status_code = _status(data, pos, stop, status_message, status_code)
            pos = stop
        elif tag == 0x39:  # start_time_unix_nano
            (start_ns,) = _FIXED64.unpack_from(data, pos)
            pos += 8
        elif tag == 0x41:  # end_time_unix_nano
            (end_ns,) = _FIXED64.unpack_from(data, pos)
            pos += 8
        elif tag == 0x30:  # kind
            value, pos = _varint(data, pos)
            kind = _int32(value)
        else:
            pos = _skip(data, pos, tag & 7)
    if len(trace_id) != 16 or trace_id == _NO_TRACE:
        _hex_id(trace_id, "trace", "trace_id")  # raises, naming the id
    if len(span_id) != 8 or span_id == _NO_SPAN:
        _hex_id(span_id, "span", "span_id")
    if start_ns >> 63 or end_ns >> 63:
        _time(start_ns, "start_time_unix_nano"), _time(end_ns, "end_time_unix_nano")
    return SpanRecord(
        trace_id.hex(),
        span_id.hex(),
        _hex_id(parent, "span", "parent_span_id") if parent.strip(b"\x00") else None,
        name,
        service,
        start_ns,
        end_ns,
        status_code,
        kind,
        status_message,
        "{" + ",".join(members) + "}",
        request_id,
    )


_NO_TRACE, _NO_SPAN = bytes(16), bytes(8)


def _status(data: bytes, pos: int, end: int, message: str, code: int) -> tuple[str, int]:
    """Status.message (field 2) and Status.code (field 3) over what an earlier occurrence set."""
    while pos < end:
        tag = data[pos]
        if tag >= 0x80:
            tag, pos = _varint(data, pos)
        else:
            pos += 1
        if tag == 0x12:
            length, pos = _varint(data, pos)
            message = data[pos : pos + length].decode()
            pos += length
        elif tag == 0x18:
            value, pos = _varint(data, pos)
            code = _int32(value)
        elif tag & 7 == 2:
            length, pos = _varint(data, pos)
            pos += length
        else:
            pos = _skip(data, pos, tag & 7)
    return message, code


def _int32(value: int) -> int:
    """An enum (int32) field from its varint, as protobuf reads it: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# Span.attributes is field 9, length-delimited: tag (9 << 3) | 2.
_ATTRIBUTE_TAG = 0x4A
# Serialized KeyValue -> (key, value, its `"key":value` JSON member). Most attributes
# repeat from span to span (service, route, step, outcome...), and a request's id
# recurs on each of its spans, so most lookups hit. Cleared when full: bounded memory.
_members: dict[bytes, tuple[str, Any, str]] = {}
_MEMBERS_MAX = 8192
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_json_string = json.encoder.encode_basestring_ascii  # what json.dumps does with a str


def _attributes_json(span: Span) -> tuple[str, str | None]:
    """(attributes as a JSON object, the request id attribute as text or None).

    Reading attributes through the protobuf API costs a Python object per KeyValue and
    per AnyValue; instead scan the span's wire bytes (upb already validated them) for
    the attribute records and turn each distinct one into JSON once. The result equals
    json.dumps of the dict `rows_from_request` builds, including a repeated key (the
    JSON object then repeats it and json.loads keeps the last, as the dict did).
    """
    data = span.SerializeToString()
    members: list[str] = []
    request_id: str | None = None
    pos, end = 0, len(data)
    while pos < end:
        tag = data[pos]
        if tag >= 0x80:  # a multi-byte tag: field number 16 (Span.flags) or higher
            tag, pos = _varint(data, pos)
        else:
            pos += 1
        wire_type = tag & 7
        if wire_type == 2:
            length = data[pos]
            if length >= 0x80:
                length, pos = _varint(data, pos)
            else:
                pos += 1
            if tag == _ATTRIBUTE_TAG:
                record = data[pos : pos + length]
                member = _members.get(record)
                if member is None:
                    member = _member(record)
                key, value, text = member
                members.append(text)
                if key == REQUEST_ID:
                    request_id = None if value is None else str(value)
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:  # groups (wire types 3, 4) are not in OTLP; read through the API instead
            attributes = {kv.key: any_value(kv.value) for kv in span.attributes}
            return json.dumps(attributes, separators=(",", ":")), _request_id(attributes)
    return "{" + ",".join(members) + "}", request_id


def _member(record: bytes) -> tuple[str, Any, str]:
    member = _scalar_member(record)
    if member is None:
        kv = KeyValue.FromString(record)
        value = any_value(kv.value)
        member = (kv.key, value, _json_string(kv.key) + ":" + json.dumps(value, separators=(",", ":")))
    if len(_members) >= _MEMBERS_MAX:
        _members.clear()
    _members[record] = member
    return member


def _scalar_member(record: bytes) -> tuple[str, Any, str] | None:
    """A short string, bool, int or double attribute in its usual encoding, read by hand.

    Values that differ on every span (a request's id, queue times) miss the cache;
    this keeps a miss about as cheap as the protobuf API was. Only the exact shape
    key (field 1), then value (field 2) holding one field, each length below 128,
    is read here; anything else returns None and goes through KeyValue.FromString.
    """
    end = len(record)
    if end < 4 or record[0] != 0x0A:
        return None
    key_end = 2 + record[1]
    if record[1] >= 0x80 or key_end + 3 > end or record[key_end] != 0x12 or record[key_end + 1] != end - key_end - 2:
        return None
    key = record[2:key_end].decode()  # upb checked the UTF-8 when it parsed the export
    tag, payload = record[key_end + 2], key_end + 3
    if payload >= end:
        return None
    value: Any
    if tag == 0x0A:  # string_value
        if record[payload] != end - payload - 1:
            return None
        value = record[payload + 1 :].decode()
        text = _json_string(value)
    elif tag == 0x21:  # double_value
        if payload + 8 != end:
            return None
        (value,) = _DOUBLE.unpack_from(record, payload)
        text = json.dumps(value)
    elif tag in (0x10, 0x18):  # bool_value, int_value (varints)
        number, after = _varint(record, payload)
        if after != end:
            return None
        if tag == 0x10:
            value = number != 0
            text = "true" if value else "false"
        else:
            value = number - (1 << 64) if number >= 1 << 63 else number
            text = str(value)
    else:
        return None
    return key, value, _json_string(key) + ":" + text


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """Protobuf base-128 varint at `pos` -> (value, position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _request_id(attributes: dict[str, Any]) -> str | None:
    value = attributes.get(REQUEST_ID)
    return None if value is None else str(value)


def any_value(value: AnyValue) -> Any:
    """AnyValue -> plain Python (JSON-safe: bytes become hex, like ids)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)  # string_value, bool_value, int_value, double_value


def response_body(content_type: str | None) -> tuple[bytes, str]:
    """The empty ExportTraceServiceResponse in the request's encoding (OTLP/HTTP success)."""
    if is_json(content_type):
        return b"{}", JSON
    return ExportTraceServiceResponse().SerializeToString(), PROTOBUF


def _hex_id(raw: bytes, kind: str, what: str) -> str:
    if len(raw) != _ID_LENGTHS[kind] or not raw.strip(b"\x00"):
        raise OTLPDecodeError(f"invalid {what}: {raw.hex() or '(empty)'}")
    return raw.hex()


def _time(ns: int, what: str) -> int:
    # fixed64 on the wire, but SQLite integers are signed 64-bit; year 2262 is far enough.
    if ns >= 1 << 63:
        raise OTLPDecodeError(f"{what} out of range: {ns}")
    return ns


def _hex_ids_to_base64(doc: dict[str, Any]) -> None:
    """Rewrite OTLP JSON hex ids in spans and span links to proto3-JSON base64, in place."""
    for resource_spans in _list(doc, "resourceSpans", "resource_spans"):
        for scope_spans in _list(resource_spans, "scopeSpans", "scope_spans"):
            for span in _list(scope_spans, "spans"):
                _convert_ids(span)
                for link in _list(span, "links"):
                    _convert_ids(link)


def _convert_ids(obj: Any) -> None:
    if not isinstance(obj, dict):
        return  # json_format reports the type error with a better message
    for key in _SPAN_ID_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
            except ValueError as exc:
                raise OTLPDecodeError(f"{key} is not hex: {value!r}") from exc


def _list(obj: Any, *keys: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return value
    return []


__all__ = [
    "JSON",
    "PROTOBUF",
    "OTLPDecodeError",
    "SpanRecord",
    "SpanRow",
    "UnsupportedContentType",
    "any_value",
    "decode",
    "decode_records",
    "is_json",
    "is_protobuf",
    "media_type",
    "parse_request",
    "record_of",
    "response_body",
    "rows_from_request",
]
