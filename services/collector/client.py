"""Read flows and stats from a running collector over its JSON API (for the CLI)."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx

from .flows import GateStats, Percentiles, RouteShare, Stats, StepStats, Flow, stitch
from .otlp import SpanRow

_SPAN_FIELDS = {f.name for f in dataclasses.fields(SpanRow)}


class CollectorUnavailable(RuntimeError):
    pass


def fetch_flow(base_url: str, request_id: str, timeout_s: float = 5.0) -> Flow | None:
    """The stitched flow of a request, or None when the collector has no span of it yet."""
    with _client(base_url, timeout_s) as http:
        summary = http.get(f"/api/flows/{request_id}")
        if summary.status_code == 404:
            return None
        summary.raise_for_status()
        spans = http.get(f"/api/traces/{summary.json()['trace_id']}")
        spans.raise_for_status()
    return stitch([SpanRow(**{k: v for k, v in row.items() if k in _SPAN_FIELDS}) for row in spans.json()["spans"]])


def fetch_stats(base_url: str, limit: int = 1000, timeout_s: float = 10.0) -> Stats:
    with _client(base_url, timeout_s) as http:
        response = http.get("/api/stats", params={"limit": limit})
        response.raise_for_status()
    return stats_from_dict(response.json())


def stats_from_dict(data: dict[str, Any]) -> Stats:
    pct = lambda d: Percentiles(**d)  # noqa: E731
    return Stats(
        **{
            **data,
            "latency_ms": pct(data["latency_ms"]),
            "cost_usd": pct(data["cost_usd"]),
            "steps": {k: StepStats(v["count"], pct(v["duration_ms"]), pct(v["queued_ms"])) for k, v in data["steps"].items()},
            "routes": {k: RouteShare(**v) for k, v in data["routes"].items()},
            "gates": {k: GateStats(**v) for k, v in data["gates"].items()},
            "variants": data.get("variants", {}),
        }
    )


class _client(httpx.Client):
    def __init__(self, base_url: str, timeout_s: float):
        super().__init__(base_url=base_url, timeout=timeout_s)

    def send(self, *args: Any, **kwargs: Any) -> httpx.Response:
        try:
            return super().send(*args, **kwargs)
        except httpx.TransportError as exc:
            raise CollectorUnavailable(f"the collector at {self.base_url} does not answer ({exc}); is `baton up` running?") from exc
