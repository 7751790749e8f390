"""Stitch a trace's spans into a Baton flow, and aggregate flows into stats.

Pure functions over `SpanRow`s: no I/O, so the CLI, the HTTP API and tests share them.

Vocabulary:
- hop: a span carrying `baton.step` (one per service a request passes through).
  Spans without it (GenAI calls, gate checks, publishes) belong to their nearest hop
  ancestor, and their decisions are shown on that hop. A trace with no `baton.step`
  at all (not Baton-instrumented) degrades to "every span is a hop, step = span name".
- flow: one request = one trace, its hops in start order plus what was decided.

Percentiles use the nearest-rank method: sort the n values ascending and take the one
at 1-based rank ceil(p/100 * n). It always returns an observed value (no interpolation),
so a p99 latency is a latency some request actually had; with few samples, high
percentiles equal the maximum.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any

from shared import attributes as A

from .otlp import SpanRow

COMPLETED_OUTCOMES = frozenset({"answered", "degraded"})
NO_ROUTE = "(none)"  # routing-mix bucket for flows the router never tagged
STATUS_ERROR = 2  # OTLP StatusCode.STATUS_CODE_ERROR
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Decision:
    """Something a hop decided. kind: route | verdict | fallback | model."""

    kind: str
    value: str
    detail: str | None = None  # route reason, gate name, fallback reason

    def label(self) -> str:
        text = f"{self.kind}={self.value}"
        return f"{text} ({self.detail})" if self.detail and self.kind != "route" else text


@dataclass(frozen=True)
class GateResult:
    name: str
    verdict: str
    span_id: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"


@dataclass(frozen=True)
class Hop:
    span_id: str
    service: str
    step: str
    start_offset_ms: float  # from the flow's first span start
    duration_ms: float
    queued_ms: float | None  # baton.step.queued_ms, else gap after the parent span ended; None if unknown
    name: str = ""
    parent_span_id: str | None = None
    status_code: int = 0
    decisions: tuple[Decision, ...] = ()

    @property
    def error(self) -> bool:
        return self.status_code == STATUS_ERROR


@dataclass(frozen=True)
class Flow:
    trace_id: str
    request_id: str | None = None
    route: str | None = None
    outcome: str | None = None  # answered | degraded | error; None while no hop has replied
    started_ns: int = 0
    latency_ms: float = 0.0  # earliest span start -> latest span end
    hops: tuple[Hop, ...] = ()
    decisions: tuple[Decision, ...] = ()  # every decision in the trace, in span start order
    cost_usd: float | None = None
    fallback: bool = False
    gates: tuple[GateResult, ...] = ()
    error_code: str | None = None
    model: str | None = None  # the last model that answered
    input_tokens: int | None = None
    output_tokens: int | None = None
    orphans: tuple[str, ...] = ()  # span ids whose parent span is not in the trace
    span_count: int = 0
    variant: str | None = None  # the A/B arm that served the request
    shadowed: bool = False  # a shadow model also answered (recorded, never returned)
    cached: bool = False  # answered from the reply cache

    @property
    def completed(self) -> bool:
        return self.outcome in COMPLETED_OUTCOMES

    @property
    def gate_failed(self) -> bool:
        return any(g.failed for g in self.gates)

    @property
    def started(self) -> datetime:
        return datetime.fromtimestamp(self.started_ns / 1e9, tz=timezone.utc)

    def summary(self) -> dict[str, Any]:
        """The flow-list row: everything but the hops."""
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "route": self.route,
            "outcome": self.outcome,
            "started": self.started.isoformat(),
            "started_ns": self.started_ns,
            "latency_ms": self.latency_ms,
            "cost_usd": self.cost_usd,
            "fallback": self.fallback,
            "gate_failed": self.gate_failed,
            "error_code": self.error_code,
            "model": self.model,
            "hop_count": len(self.hops),
            "span_count": self.span_count,
            "orphans": list(self.orphans),
            "variant": self.variant,
            "shadowed": self.shadowed,
            "cached": self.cached,
        }

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        out["input_tokens"] = self.input_tokens
        out["output_tokens"] = self.output_tokens
        out["gates"] = [asdict(g) for g in self.gates]
        out["decisions"] = [asdict(d) | {"label": d.label()} for d in self.decisions]
        out["hops"] = [
            asdict(h) | {"decisions": [d.label() for d in h.decisions]} for h in self.hops
        ]
        return out


def stitch(spans: Sequence[SpanRow]) -> Flow:
    """One trace's spans (any order) -> Flow. Raises ValueError if empty or mixed traces."""
    if not spans:
        raise ValueError("no spans to stitch")
    trace_id = spans[0].trace_id
    if any(s.trace_id != trace_id for s in spans):
        raise ValueError("spans belong to more than one trace")

    ordered = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    by_id = {s.span_id: s for s in ordered}
    started = ordered[0].start_ns
    ended = max(s.end_ns for s in ordered)
    orphans = tuple(
        s.span_id for s in ordered if s.parent_span_id and s.parent_span_id not in by_id
    )

    hop_spans = [s for s in ordered if A.STEP in s.attributes]
    steps_tagged = bool(hop_spans)
    if not steps_tagged:
        hop_spans = ordered
    hop_ids = {s.span_id for s in hop_spans}

    # Every span's decisions go to its nearest hop ancestor-or-self.
    hop_decisions: dict[str, list[Decision]] = defaultdict(list)
    all_decisions: list[Decision] = []
    for s in ordered:
        found = _decisions(s)
        if not found:
            continue
        all_decisions.extend(found)
        owner = _nearest(s, by_id, hop_ids)
        if owner is not None:
            hop_decisions[owner].extend(found)

    depth = {s.span_id: _depth(s, by_id) for s in hop_spans}
    hops = tuple(
        Hop(
            span_id=s.span_id,
            service=s.service,
            step=str(s.attributes[A.STEP]) if steps_tagged else s.name,
            start_offset_ms=(s.start_ns - started) / _NS_PER_MS,
            duration_ms=s.duration_ns / _NS_PER_MS,
            queued_ms=_queued_ms(s, by_id),
            name=s.name,
            parent_span_id=s.parent_span_id,
            status_code=s.status_code,
            decisions=tuple(hop_decisions.get(s.span_id, ())),
        )
        # A parent that starts in the same nanosecond as its child still comes first.
        for s in sorted(hop_spans, key=lambda s: (s.start_ns, depth[s.span_id], s.span_id))
    )

    # The reply is the last span to set baton.outcome (a fallback may reply after an error).
    replies = [s for s in ordered if A.OUTCOME in s.attributes]
    reply = max(replies, key=lambda s: s.end_ns) if replies else None
    cost = _num(reply.attributes.get(A.REQUEST_COST_USD)) if reply else None
    if cost is None:
        # No request total (yet): the sum of per-step costs is the best estimate.
        step_costs = [c for s in ordered if (c := _num(s.attributes.get(A.COST_USD))) is not None]
        cost = sum(step_costs) if step_costs else None

    models = [d.value for d in all_decisions if d.kind == "model"]
    return Flow(
        trace_id=trace_id,
        request_id=_first_str(ordered, A.REQUEST_ID),
        route=_first_str(ordered, A.ROUTE),
        outcome=_str_or_none(reply.attributes.get(A.OUTCOME)) if reply else None,
        started_ns=started,
        latency_ms=(ended - started) / _NS_PER_MS,
        hops=hops,
        decisions=tuple(all_decisions),
        cost_usd=cost,
        fallback=any(
            s.attributes.get(A.STEP) == "fallback" or A.FALLBACK_ACTION in s.attributes
            for s in ordered
        ),
        gates=tuple(
            GateResult(
                name=str(s.attributes.get(A.GATE_NAME, "(unnamed)")),
                verdict=str(s.attributes.get(A.GATE_VERDICT, "")),
                span_id=s.span_id,
            )
            for s in ordered
            if A.GATE_NAME in s.attributes or A.GATE_VERDICT in s.attributes
        ),
        error_code=_str_or_none(reply.attributes.get(A.ERROR_CODE)) if reply else None,
        model=models[-1] if models else None,
        input_tokens=_sum_int(ordered, A.GEN_AI_INPUT_TOKENS),
        output_tokens=_sum_int(ordered, A.GEN_AI_OUTPUT_TOKENS),
        orphans=orphans,
        span_count=len(ordered),
        variant=_first_str(ordered, A.VARIANT),
        shadowed=any(s.attributes.get(A.SHADOW) for s in ordered),
        cached=any(s.attributes.get(A.CACHED) for s in ordered),
    )


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class Percentiles:
    n: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class StepStats:
    count: int
    duration_ms: Percentiles
    queued_ms: Percentiles  # over hops whose queued time is known


@dataclass(frozen=True)
class RouteShare:
    count: int
    share: float  # of all flows


@dataclass(frozen=True)
class GateStats:
    spans: int
    failures: int
    failure_rate: float


@dataclass(frozen=True)
class Stats:
    count: int = 0
    latency_ms: Percentiles = field(default_factory=Percentiles)
    steps: dict[str, StepStats] = field(default_factory=dict)
    routes: dict[str, RouteShare] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0
    fallback_rate: float | None = None  # flows where a fallback ran / flows
    gate_spans: int = 0
    gate_failures: int = 0
    gate_failure_rate: float | None = None  # failed gate spans / gate spans
    gates: dict[str, GateStats] = field(default_factory=dict)
    completed: int = 0  # outcome answered or degraded
    cost_usd: Percentiles = field(default_factory=Percentiles)  # per completed request with a cost
    cost_mean_usd: float | None = None
    variants: dict[str, int] = field(default_factory=dict)  # "route/variant" -> requests served
    shadowed: int = 0  # requests a shadow model also answered
    cache_hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nearest_rank(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (0 < p <= 100) of values; None if empty."""
    if not values:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(values)
    # Exact rational arithmetic: ceil(0.95 * 20) must be 19, not 20 from float error.
    rank = math.ceil(Fraction(str(p)) * len(ordered) / 100)
    return ordered[max(rank, 1) - 1]


def percentiles(values: Iterable[float]) -> Percentiles:
    vals = sorted(values)
    return Percentiles(
        n=len(vals),
        p50=nearest_rank(vals, 50),
        p95=nearest_rank(vals, 95),
        p99=nearest_rank(vals, 99),
    )


def flow_stats(flows: Sequence[Flow]) -> Stats:
    count = len(flows)
    if not count:
        return Stats()

    durations: dict[str, list[float]] = defaultdict(list)
    queued: dict[str, list[float]] = defaultdict(list)
    for f in flows:
        for h in f.hops:
            durations[h.step].append(h.duration_ms)
            if h.queued_ms is not None:
                queued[h.step].append(h.queued_ms)
    steps = {
        step: StepStats(
            count=len(durations[step]),
            duration_ms=percentiles(durations[step]),
            queued_ms=percentiles(queued.get(step, ())),
        )
        for step in sorted(durations)
    }

    route_counts = Counter(f.route or NO_ROUTE for f in flows)
    routes = {
        route: RouteShare(count=n, share=n / count)
        for route, n in sorted(route_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    }

    gate_total: Counter[str] = Counter()
    gate_failed: Counter[str] = Counter()
    for f in flows:
        for g in f.gates:
            gate_total[g.name] += 1
            gate_failed[g.name] += g.failed
    n_gates = sum(gate_total.values())
    n_failed = sum(gate_failed.values())

    fallbacks = sum(f.fallback for f in flows)
    completed = [f for f in flows if f.completed]
    costs = [f.cost_usd for f in completed if f.cost_usd is not None]
    return Stats(
        count=count,
        latency_ms=percentiles(f.latency_ms for f in flows),
        steps=steps,
        routes=routes,
        outcomes=dict(sorted(Counter(f.outcome or "(pending)" for f in flows).items())),
        fallbacks=fallbacks,
        fallback_rate=fallbacks / count,
        gate_spans=n_gates,
        gate_failures=n_failed,
        gate_failure_rate=n_failed / n_gates if n_gates else None,
        gates={
            name: GateStats(
                spans=gate_total[name],
                failures=gate_failed[name],
                failure_rate=gate_failed[name] / gate_total[name],
            )
            for name in sorted(gate_total)
        },
        completed=len(completed),
        cost_usd=percentiles(costs),
        cost_mean_usd=sum(costs) / len(costs) if costs else None,
        variants=dict(sorted(Counter(f"{f.route}/{f.variant}" for f in flows if f.variant).items())),
        shadowed=sum(f.shadowed for f in flows),
        cache_hits=sum(f.cached for f in flows),
    )


# ---------------------------------------------------------------- helpers


def _decisions(s: SpanRow) -> list[Decision]:
    attrs = s.attributes
    out: list[Decision] = []
    if A.ROUTE in attrs:
        out.append(Decision("route", str(attrs[A.ROUTE]), _str_or_none(attrs.get(A.ROUTE_REASON))))
    if A.GATE_VERDICT in attrs:
        out.append(Decision("verdict", str(attrs[A.GATE_VERDICT]), _str_or_none(attrs.get(A.GATE_NAME))))
    if A.FALLBACK_ACTION in attrs:
        out.append(
            Decision("fallback", str(attrs[A.FALLBACK_ACTION]), _str_or_none(attrs.get(A.FALLBACK_REASON)))
        )
    model = attrs.get(A.GEN_AI_RESPONSE_MODEL) or attrs.get(A.GEN_AI_REQUEST_MODEL)
    if model:
        out.append(Decision("model", str(model)))
    return out


def _ancestors(s: SpanRow, by_id: dict[str, SpanRow]) -> Iterable[SpanRow]:
    """Parent, grandparent, ... within the trace; stops on a cycle (bad data must not hang us)."""
    seen = {s.span_id}
    parent = by_id.get(s.parent_span_id or "")
    while parent is not None and parent.span_id not in seen:
        yield parent
        seen.add(parent.span_id)
        parent = by_id.get(parent.parent_span_id or "")


def _nearest(s: SpanRow, by_id: dict[str, SpanRow], hop_ids: set[str]) -> str | None:
    if s.span_id in hop_ids:
        return s.span_id
    return next((a.span_id for a in _ancestors(s, by_id) if a.span_id in hop_ids), None)


def _depth(s: SpanRow, by_id: dict[str, SpanRow]) -> int:
    return sum(1 for _ in _ancestors(s, by_id))


def _queued_ms(s: SpanRow, by_id: dict[str, SpanRow]) -> float | None:
    reported = _num(s.attributes.get(A.QUEUED_MS))
    if reported is not None:
        return reported
    parent = by_id.get(s.parent_span_id or "")
    if parent is None:
        return None  # a root or orphan: nothing in the trace to measure from
    # A parent still running when the child starts (a synchronous call) means no queueing.
    return max(0, s.start_ns - parent.end_ns) / _NS_PER_MS


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # a NaN cost would poison every percentile


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _first_str(spans: Sequence[SpanRow], key: str) -> str | None:
    return next((str(s.attributes[key]) for s in spans if s.attributes.get(key) is not None), None)


def _sum_int(spans: Sequence[SpanRow], key: str) -> int | None:
    values = [v for s in spans if isinstance(v := s.attributes.get(key), int) and not isinstance(v, bool)]
    return sum(values) if values else None
