"""A lean OpenTelemetry tracer: spans without the SDK's span objects.

The SDK builds, per span, a Span with a lock, a BoundedAttributes (a lock, and every
attribute value cleaned by a generic recursive function), two BoundedLists, a Status,
a generator-based context manager and, at the end, a ReadableSpan copy; about 70 us of a
service's CPU per hop span. Here a span is one small object: ids, parent, name, kind,
times, a plain attribute dict, events and status. `end()` hands it to the same
BatchSpanProcessor (OTEL_BSP_* settings, fork handling, flush and shutdown unchanged),
whose worker gives it to the lean exporter; shared/otlp_wire.py encodes it there, as it
encodes the SDK's ReadableSpans (it reads the same fields).

It is the OpenTelemetry API (`opentelemetry.trace.Tracer` and `Span`): the current span is
set through the OTel context, so `trace.get_current_span()`, `trace.use_span`, nested spans
and the W3C propagator work as with the SDK. What reaches the wire is what the SDK would
send (tests/unit/test_lean_tracer.py decodes both): the same ids and flags, parent,
resource and scope, attribute cleaning (plain str/bool/int/float values are taken as they
are, anything else goes through the SDK's own cleaning), span limits with dropped
counts, re-set attributes moved last, status rules, exception events.

Supported samplers: the default parentbased_always_on and always_on (OTEL_TRACES_SAMPLER);
any other sampler, and the SDK's internal metrics, keep the SDK's tracer
(`sdk_tracer_reason`). Unlike the SDK's span, this one takes no lock: a span is written
by the one task that runs its hop; its attribute dict is read only after `end()`.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import traceback
import weakref
from collections.abc import Mapping, Sequence
from contextlib import ContextDecorator
from time import time_ns
from types import MappingProxyType, TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes, _clean_attribute_value
from opentelemetry.sdk.resources import Resource, _get_process_dependent_resource
from opentelemetry.sdk.trace import Event, SpanLimits, SpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util import types

log = logging.getLogger(__name__)

# The SDK logs its span warnings under these names: keep them where users look.
_sdk_log = logging.getLogger("opentelemetry.sdk.trace")
_attributes_log = logging.getLogger("opentelemetry.attributes")

_SAMPLERS = ("parentbased_always_on", "always_on")
_PLAIN = frozenset({str, bool, int, float})  # attribute values the SDK's cleaning returns unchanged
_STR = frozenset({str})
_UNSET = Status(StatusCode.UNSET)
_random_bits = random.getrandbits


def _new_id(bits: int) -> int:
    """A random id, never the invalid 0 (the SDK's RandomIdGenerator)."""
    value = _random_bits(bits)
    while not value:
        value = _random_bits(bits)
    return value


# Trace flags by (sampled, random trace id): the SDK's RandomIdGenerator says its ids are random.
_FLAGS = {(s, r): TraceFlags((TraceFlags.SAMPLED if s else TraceFlags.DEFAULT) | (TraceFlags.RANDOM_TRACE_ID if r else 0)) for s in (False, True) for r in (False, True)}


def sdk_tracer_reason(environ: Mapping[str, str] = os.environ) -> str | None:
    """What the lean tracer does not do, so that the SDK's tracer must make the spans; None when nothing."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in _SAMPLERS:
        return f"OTEL_TRACES_SAMPLER={sampler}"
    if environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "").strip().lower() == "true":
        return "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"
    return None


class LeanTracerProvider(trace_api.TracerProvider):
    """One resource and one span processor for every tracer it gives.

    The processor sees each span at its end only (`on_end`): the BatchSpanProcessor and
    the SimpleSpanProcessor do nothing at a span's start, so nothing is lost with them."""

    def __init__(self, resource: Resource, processor: SpanProcessor, *, sampler: str | None = None, limits: SpanLimits | None = None) -> None:
        self.resource = resource
        self.processor = processor
        chosen = (sampler or os.environ.get("OTEL_TRACES_SAMPLER", "") or "parentbased_always_on").strip().lower()
        if chosen not in _SAMPLERS:
            raise ValueError(f"the lean tracer samples with {' or '.join(_SAMPLERS)}, not {chosen!r}: use the SDK's tracer for it")
        self.parent_based = chosen == "parentbased_always_on"
        self.limits = limits or SpanLimits()  # reads OTEL_SPAN_*_LIMIT and OTEL_ATTRIBUTE_*_LIMIT as the SDK does
        self._tracers: dict[InstrumentationScope, LeanTracer] = {}
        self._stopped = False
        atexit.register(self.shutdown)  # as the SDK's provider: what is queued is sent at exit
        if hasattr(os, "register_at_fork"):
            after_fork = weakref.WeakMethod(self._after_fork)  # a provider shut down and dropped is not kept alive

            def in_child() -> None:
                method = after_fork()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=in_child)

    def _after_fork(self) -> None:
        """A forked child gets its own service.instance.id, as the SDK's provider does."""
        self.resource = self.resource.merge(_get_process_dependent_resource())
        for tracer in self._tracers.values():
            tracer.resource = self.resource

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None, schema_url: str | None = None, attributes: types.Attributes = None) -> trace_api.Tracer:
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return trace_api.NoOpTracer()  # as the SDK's provider
        if not instrumenting_module_name:
            log.error("get_tracer called with missing module name.")
        scope = InstrumentationScope(instrumenting_module_name or "", instrumenting_library_version or "", schema_url, attributes)
        tracer = self._tracers.get(scope)
        if tracer is None:
            tracer = self._tracers[scope] = LeanTracer(self, scope)
        return tracer

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.processor.shutdown()
        atexit.unregister(self.shutdown)


class LeanTracer(trace_api.Tracer):
    """`opentelemetry.trace.Tracer` making `LeanSpan`s; a span not sampled is a NonRecordingSpan, as in the SDK."""

    def __init__(self, provider: LeanTracerProvider, scope: InstrumentationScope) -> None:
        self.resource = provider.resource
        self.scope = scope
        self.processor = provider.processor
        self.limits = provider.limits
        self.parent_based = provider.parent_based

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is not None and not isinstance(parent, SpanContext):
            raise TypeError("parent_span_context must be a SpanContext or None.")
        if parent is None or not parent.is_valid:
            trace_id = _new_id(128)
            parent, sampled, random_id, trace_state = None, True, True, None
        else:
            trace_id = parent.trace_id
            parent_flags = parent.trace_flags
            sampled = parent_flags.sampled or not self.parent_based
            random_id, trace_state = parent_flags.random_trace_id, parent.trace_state
        span_id = _new_id(64)
        span_context = SpanContext(trace_id, span_id, False, _FLAGS[sampled, random_id], trace_state)
        if not sampled:
            return NonRecordingSpan(span_context)
        return LeanSpan(self, name, span_context, parent, kind, attributes, links, start_time, record_exception, set_status_on_exception)

    def start_as_current_span(  # type: ignore[override]  # the SDK's is a generator-based manager; this one is a class (cheaper)
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        return _CurrentSpan(self, name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception, end_on_exit)


class _CurrentSpan(ContextDecorator):
    """`start_as_current_span`'s manager: start on entry, current while inside, as `trace.use_span`
    on exit (an Exception, not a BaseException, is recorded and sets ERROR), then end. Also a
    decorator, like the SDK's: each call starts a span of its own."""

    __slots__ = ("_tracer", "_arguments", "_end_on_exit", "_span", "_token")

    def __init__(self, tracer: LeanTracer, name: str, context: context_api.Context | None, kind: SpanKind, attributes: types.Attributes, links: Sequence[Link] | None,
                 start_time: int | None, record_exception: bool, set_status_on_exception: bool, end_on_exit: bool) -> None:
        self._tracer = tracer
        self._arguments = (name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception)
        self._end_on_exit = end_on_exit

    def _recreate_cm(self) -> _CurrentSpan:
        return _CurrentSpan(self._tracer, *self._arguments, self._end_on_exit)

    def __enter__(self) -> trace_api.Span:
        span = self._span = self._tracer.start_span(*self._arguments)
        self._token = context_api.attach(context_api.set_value(_SPAN_KEY, span))
        return span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        span = self._span
        context_api.detach(self._token)
        if isinstance(exc, Exception) and span.is_recording():
            _name, _context, _kind, _attributes, _links, _start, record_exception, set_status_on_exception = self._arguments
            if record_exception:
                span.record_exception(exc)
            if set_status_on_exception:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end_on_exit:
            span.end()


class LeanSpan(trace_api.Span):
    """A recording span; also what the exporter reads (the fields of the SDK's ReadableSpan)."""

    __slots__ = ("_tracer", "_name", "_context", "_parent", "kind", "_attributes", "_dropped_attributes", "_events", "_links",
                 "_status", "_start_time", "_end_time", "_record_exception", "_set_status_on_exception")

    def __init__(self, tracer: LeanTracer, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind, attributes: types.Attributes,
                 links: Sequence[Link] | None, start_time: int | None, record_exception: bool, set_status_on_exception: bool) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self.kind = kind
        self._attributes: dict[str, Any] = {}
        self._dropped_attributes = 0
        self._events: BoundedList | None = None  # made on the first event: most spans have none
        self._links: BoundedList | None = self._new_links(links) if links else None
        self._status = _UNSET
        self._end_time: int | None = None
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        if attributes:
            self._put_all(attributes)
        self._start_time = start_time if start_time is not None else time_ns()

    # -- the attributes, as the SDK's BoundedAttributes keeps them ---------------

    def _put_all(self, attributes: Mapping[str, types.AnyValue]) -> None:
        limit = self._tracer.limits.max_span_attributes
        if limit == 0:
            self._dropped_attributes += len(attributes)
            return
        max_length = self._tracer.limits.max_span_attribute_length
        stored = self._attributes
        if (max_length is None and (limit is None or len(stored) + len(attributes) <= limit) and "" not in attributes
                and _PLAIN.issuperset(map(type, attributes.values())) and _STR.issuperset(map(type, attributes))):
            # The usual call, checked and stored in C: plain values under string keys, room for all.
            if stored and not stored.keys().isdisjoint(attributes):
                for key in attributes:
                    stored.pop(key, None)  # a re-set attribute moves last, as in the SDK
            stored.update(attributes)
            return
        for key, value in attributes.items():
            if type(key) is str and key and type(value) in _PLAIN and max_length is None:
                if key in stored:
                    del stored[key]  # a re-set attribute moves last, as in the SDK
                elif limit is not None and len(stored) >= limit:
                    self._drop_oldest()
                stored[key] = value
            else:  # the SDK's cleaning: a key made a str or dropped, a sequence a tuple, a string cut to the limit
                cleaned = _clean_attribute_value({key: value}, max_length)
                self._dropped_attributes += 1 - len(cleaned)
                for clean_key, clean_value in cleaned.items():
                    self._put(clean_key, clean_value, limit)

    def _put(self, key: str, value: types.AnyValue, limit: int | None) -> None:
        stored = self._attributes
        if key in stored:
            del stored[key]
        elif limit is not None and len(stored) >= limit:
            self._drop_oldest()
        stored[key] = value

    def _drop_oldest(self) -> None:
        _attributes_log.warning("Attributes dict is full. Dropping the oldest key-value pair from attributes to make space for the new key-value pair.")
        del self._attributes[next(iter(self._attributes))]
        self._dropped_attributes += 1

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is not None:
            _sdk_log.warning("Setting attribute on ended span.")
            return
        self._put_all(attributes)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            _sdk_log.warning("Setting attribute on ended span.")
            return
        limits = self._tracer.limits
        if limits.max_span_attributes == 0:
            self._dropped_attributes += 1
            return
        if not key or not isinstance(key, str):
            _attributes_log.warning("invalid key `%s`. must be non-empty string. Dropping key from attributes.", key)
            self._dropped_attributes += 1
            return
        if type(value) not in _PLAIN or limits.max_span_attribute_length is not None:
            value = _clean_attribute_value(value, limits.max_span_attribute_length)
        self._put(key, value, limits.max_span_attributes)

    # -- events, links, status --------------------------------------------------

    def _ended(self, operation: str) -> bool:
        if self._end_time is None:
            return False
        _sdk_log.warning("Tried calling %s on an ended span.", operation)
        return True

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        limits = self._tracer.limits
        event = Event(name, BoundedAttributes(limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True), timestamp)
        if self._ended("_add_event"):
            return
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        self._events.append(event)

    def _new_links(self, links: Sequence[Link]) -> BoundedList:
        limits = self._tracer.limits
        valid = []
        for link in links:
            if link and link.context and (link.context.is_valid or link.attributes or link.context.trace_state):
                link._attributes = BoundedAttributes(limits.max_link_attributes, link.attributes, max_value_len=limits.max_attribute_length, immutable=True)
                valid.append(link)
        return BoundedList.from_seq(limits.max_links, valid)

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return
        limits = self._tracer.limits
        link = Link(context, BoundedAttributes(limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True))
        if self._ended("_add_link"):
            return
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        self._links.append(link)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended("set_status"):
            return
        # As the SDK: OK is final, UNSET is ignored.
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _sdk_log.warning("Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description)
            self._status = status
        elif isinstance(status, StatusCode):
            if status is StatusCode.UNSET:
                return
            self._status = Status(status, description)

    def record_exception(self, exception: BaseException, attributes: types.Attributes = None, timestamp: int | None = None, escaped: bool = False) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    # -- lifecycle ----------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _sdk_log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._tracer.processor.on_end(self)  # type: ignore[arg-type]  # read as a ReadableSpan

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """`with tracer.start_span(...) as span:` records an exception as the SDK's span does."""
        if exc is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()

    # -- read by the exporter and by code that inspects a span (ReadableSpan's fields) --

    @property
    def name(self) -> str:
        return self._name

    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def start_time(self) -> int | None:
        return self._start_time

    @property
    def end_time(self) -> int | None:
        return self._end_time

    @property
    def status(self) -> Status:
        return self._status

    @property
    def attributes(self) -> types.Attributes:
        return MappingProxyType(self._attributes)

    @property
    def dropped_attributes(self) -> int:
        return self._dropped_attributes

    @property
    def events(self) -> Sequence[Event]:
        return tuple(self._events) if self._events is not None else ()

    @property
    def dropped_events(self) -> int:
        return self._events.dropped if self._events is not None else 0

    @property
    def links(self) -> Sequence[Link]:
        return tuple(self._links) if self._links is not None else ()

    @property
    def dropped_links(self) -> int:
        return self._links.dropped if self._links is not None else 0

    @property
    def resource(self) -> Resource:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._tracer.scope

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'
