"""Prometheus metrics of every service, declared once.

Served on BATON_METRICS_PORT (host BATON_METRICS_HOST) when set; `baton up` gives
each replica its own port. The seed's measures: latency, routing mix, fallback
rate, gate failures and cost per completed request.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from shared.schema import Event, Reply

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
COST_BUCKETS = (0.0, 0.00001, 0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0)

STEP_SECONDS = Histogram("baton_step_duration_seconds", "Time one step took in its service", ["service", "step", "outcome"], buckets=LATENCY_BUCKETS)
QUEUED_SECONDS = Histogram("baton_step_queued_seconds", "Time a hop waited between publish and start", ["service"], buckets=LATENCY_BUCKETS)
ROUTES = Counter("baton_routes_total", "Routing decisions", ["route"])
GATES = Counter("baton_gate_verdicts_total", "Quality gate verdicts", ["gate", "verdict"])
FALLBACKS = Counter("baton_fallbacks_total", "Fallbacks taken", ["route", "reason", "action"])
REPLIES = Counter("baton_replies_total", "Requests finished", ["route", "outcome"])
REQUEST_SECONDS = Histogram("baton_request_latency_seconds", "End-to-end latency of finished requests", ["route", "outcome"], buckets=LATENCY_BUCKETS)
REQUEST_COST = Histogram("baton_request_cost_usd", "Cost of each completed request", ["route"], buckets=COST_BUCKETS)
MODEL_RETRIES = Counter("baton_model_retries_total", "Retried model calls", ["model"])
SHADOW_CALLS = Counter("baton_shadow_calls_total", "Shadow model calls", ["model", "outcome"])
CACHE_HITS = Counter("baton_cache_total", "Reply cache lookups", ["route", "outcome"])
HOP_MESSAGES = Counter("baton_hop_messages_total", "Hop messages this service took from its consumer, by what became of them", ["service", "outcome"])
POISON_MESSAGES = Counter("baton_poison_messages_total", "Messages terminated at once (no redelivery could succeed) and kept as dead letters", ["service", "reason"])
CLIENT_WAITS = Counter("baton_client_limit_waits_total", "Requests that waited because their client had its limit of requests in flight")
HOPS_IN_FLIGHT = Gauge("baton_hops_in_flight", "Hop messages this service is working on", ["service"])
MODEL_TOKENS = Counter("baton_model_tokens_total", "Tokens per model", ["model", "direction"])


def serve(service: str) -> int | None:
    """Start the /metrics endpoint when BATON_METRICS_PORT is set; returns the port."""
    port = os.environ.get("BATON_METRICS_PORT")
    if not port:
        return None
    start_http_server(int(port), addr=os.environ.get("BATON_METRICS_HOST", "127.0.0.1"), registry=REGISTRY)
    return int(port)


def observe_events(route: str, events: list[Event]) -> None:
    for event in events:
        if event.kind == "route":
            ROUTES.labels(event.data["route"]).inc()
        elif event.kind == "gate":
            GATES.labels(event.data.get("gate", event.step or ""), event.data.get("verdict", "")).inc()
        elif event.kind == "fallback":
            FALLBACKS.labels(route, event.data["reason"], event.data["action"]).inc()


def observe_reply(reply: Reply) -> None:
    route = reply.route or "(none)"
    outcome = "error" if not reply.ok else "degraded" if reply.degraded else "answered"
    REPLIES.labels(route, outcome).inc()
    if reply.latency_ms is not None:
        REQUEST_SECONDS.labels(route, outcome).observe(reply.latency_ms / 1000)
    if reply.ok:
        REQUEST_COST.labels(route).observe(reply.cost_usd)
