"""OTLP/protobuf trace export bodies, written by hand: the bytes the SDK's encoder makes.

`encode_spans(spans)` returns what
`opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans(spans).SerializeToString()`
returns, byte for byte (tests/unit/test_otlp_wire.py compares them), without building a
protobuf object per span, attribute and value: that was about 70 us of a service's CPU
per span, more than making the span. Only the few messages of an ExportTraceServiceRequest
are written (opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto), fields in
field-number order as upb writes them, with the SDK encoder's choices kept: a status and
a scope are always present, a link carries no trace state, flags say whether the parent
was remote, an attribute of an unsupported type is logged and left out.

Most attributes repeat from span to span (the messaging ones, the step, the route), so
each distinct string/int/bool attribute is encoded once and its bytes reused.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_UINT64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# SpanFlags: the SDK always says whether it knows the parent is remote, and whether it is.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200

# An attribute's field by (tag, key, type, value): bounded, cleared when full.
_cache: dict[tuple[bytes, str, type, Any], bytes] = {}
_CACHE_MAX = 4096
# A float attribute's field up to its value, by (tag, key): bounded the same way.
_float_prefixes: dict[tuple[bytes, str], bytes] = {}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]
# Span.kind (field 6): the SDK's enum starts at INTERNAL = 0, OTLP's at UNSPECIFIED = 0.
_KINDS = {kind: b"\x30" + _SMALL[kind.value + 1] for kind in SpanKind}


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """AnyValue's payload, in the SDK encoder's order of type checks."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"Value out of range: {value}")  # as protobuf says it
        return b"\x18" + _varint(value & _UINT64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    value_field = _field(b"\x12", _any_value(value))
    return _field(b"\x0a", key.encode()) + value_field if key else value_field


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
    """Each attribute as `tag + length + KeyValue`; a string, int or bool one from the
    cache when it was seen before (floats vary per span, and 0.0 == -0.0: only their
    prefix is kept)."""
    parts: list[bytes] = []
    if not attributes:
        return parts
    cache = _cache
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int or kind is bool:
            encoded = cache.get((tag, key, kind, value))
            if encoded is None:
                encoded = _remember(tag, key, kind, value)
        elif kind is float:  # the key's bytes once, then 8 bytes per value
            prefix = _float_prefixes.get((tag, key))
            if prefix is None:
                prefix = _float_prefix(tag, key)
            encoded = prefix + _DOUBLE(value)
        else:
            encoded = _attribute(tag, key, value)
        if encoded:
            parts.append(encoded)
    return parts


def _remember(tag: bytes, key: str, kind: type, value: Any) -> bytes:
    encoded = _attribute(tag, key, value)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[(tag, key, kind, value)] = encoded
    return encoded


def _float_prefix(tag: bytes, key: str) -> bytes:
    """Everything of a float attribute's field before the double: its length does not
    depend on the value (KeyValue: key, then AnyValue{double_value: fixed64})."""
    key_field = _field(b"\x0a", key.encode()) if key else b""
    prefix = tag + _varint(len(key_field) + 11) + key_field + b"\x12\x09\x21"
    if len(_float_prefixes) >= _CACHE_MAX:
        _float_prefixes.clear()
    _float_prefixes[(tag, key)] = prefix
    return prefix


def _attribute(tag: bytes, key: str, value: Any) -> bytes:
    """One attribute field; empty when protobuf could not hold it (the SDK encoder's
    behaviour: logged, and only that attribute left out)."""
    try:
        return _field(tag, _key_value(key, value))
    except Exception as error:
        log.exception("Failed to encode key %s: %s", key, error)
        return b""


def _span_attributes(span: ReadableSpan) -> Mapping[str, Any] | None:
    """The span's attributes: the SDK's own dict when it is there (a tenth of the
    encoding's time goes to reading them through the read-only view otherwise)."""
    stored = getattr(span, "_attributes", None)
    if type(stored) is dict:  # a LeanSpan's (shared/lean_tracer.py)
        return stored
    inner = getattr(stored, "_dict", None)
    return inner if type(inner) is dict else span.attributes


def _uint_field(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""


def _flags(parent: Any) -> bytes:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    return b"\x85\x01" + _FIXED32(flags)  # field 16, fixed32


def _span(span: ReadableSpan) -> bytes:
    """One Span message's payload (opentelemetry.proto.trace.v1.Span)."""
    context = span.get_span_context()
    assert context is not None  # a finished SDK span has one
    parent = span.parent
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    trace_state = context.trace_state
    if trace_state is not None:
        text = ",".join([f"{key}={value}" for key, value in trace_state.items()])
        if text:
            parts.append(_field(b"\x1a", text.encode()))
    if parent:
        parts.append(b"\x22\x08")
        parts.append(parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_field(b"\x2a", span.name.encode()))
    parts.append(_KINDS[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts += _attributes(b"\x4a", _span_attributes(span))
    parts.append(_uint_field(b"\x50", span.dropped_attributes))
    for event in span.events:
        parts.append(_field(b"\x5a", _event(event)))
    parts.append(_uint_field(b"\x60", span.dropped_events))
    for link in span.links:
        parts.append(_field(b"\x6a", _link(link)))
    parts.append(_uint_field(b"\x70", span.dropped_links))
    status = span.status
    if status is not None:
        parts.append(_field(b"\x7a", _status(status.status_code.value, status.description)))
    parts.append(_flags(parent))
    return b"".join(parts)


def _status(code: int, description: str | None) -> bytes:
    return (_field(b"\x12", description.encode()) if description else b"") + (b"\x18" + _varint(code) if code else b"")


def _event(event: Any) -> bytes:
    parts = [b"\x09" + _FIXED64(event.timestamp)] if event.timestamp else []
    if event.name:
        parts.append(_field(b"\x12", event.name.encode()))
    parts += _attributes(b"\x1a", event.attributes)
    parts.append(_uint_field(b"\x20", event.dropped_attributes))
    return b"".join(parts)


def _link(link: Any) -> bytes:
    context = link.context
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    parts += _attributes(b"\x22", link.attributes)
    parts.append(_uint_field(b"\x28", link.dropped_attributes))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if context.is_remote else 0)
    parts.append(b"\x35" + _FIXED32(flags))
    return b"".join(parts)


def _resource(resource: Any) -> bytes:
    return b"".join(_attributes(b"\x0a", resource.attributes))


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    parts = []
    if scope.name:
        parts.append(_field(b"\x0a", scope.name.encode()))
    if scope.version:
        parts.append(_field(b"\x12", scope.version.encode()))
    parts += _attributes(b"\x1a", scope.attributes)
    return b"".join(parts)


_Scoped = tuple[Any, list[bytes]]  # (instrumentation scope or None, its encoded spans)


def _group(spans: Sequence[ReadableSpan]) -> list[tuple[Any, list[_Scoped]]]:
    """Encoded spans grouped by resource, then by scope, in order of first appearance.

    Grouped by identity first (one provider has one resource: a Resource's hash is a
    JSON dump of its attributes), then equal resources and scopes merged, as the SDK's
    dictionary of them does."""
    by_identity: dict[int, tuple[Any, dict[int, _Scoped]]] = {}
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        entry = by_identity.get(id(resource))
        if entry is None:
            entry = by_identity[id(resource)] = (resource, {})
        scoped = entry[1].get(id(scope))
        if scoped is None:
            scoped = entry[1][id(scope)] = (scope, [])
        scoped[1].append(_span(span))
    merged: list[tuple[Any, list[_Scoped]]] = []
    for resource, by_scope in by_identity.values():
        into = next((m for m in merged if m[0] == resource), None)
        if into is None:
            into = (resource, [])
            merged.append(into)
        for scope, encoded in by_scope.values():
            same = next((s for s in into[1] if s[0] is scope or (scope is not None and s[0] is not None and s[0] == scope)), None)
            if same is None:
                into[1].append((scope, encoded))
            else:
                same[1].extend(encoded)
    return merged


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """A serialized ExportTraceServiceRequest holding `spans`."""
    out = []
    for resource, scopes in _group(spans):
        resource_parts = [_field(b"\x0a", _resource(resource))]
        for scope, encoded in scopes:
            scope_parts = [_field(b"\x0a", _scope(scope))]
            for span in encoded:
                scope_parts.append(b"\x12")
                scope_parts.append(_varint(len(span)))
                scope_parts.append(span)
            if scope is not None and scope.schema_url:
                scope_parts.append(_field(b"\x1a", scope.schema_url.encode()))
            resource_parts.append(_field(b"\x12", b"".join(scope_parts)))
        if resource.schema_url:
            resource_parts.append(_field(b"\x1a", resource.schema_url.encode()))
        out.append(_field(b"\x0a", b"".join(resource_parts)))
    return b"".join(out)
