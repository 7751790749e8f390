"""Baton collector: receives OTLP/HTTP spans, stores them in SQLite, stitches flows, reports.

Run it with `python -m services.collector` (see app.py for endpoints and env vars).
"""

from .flows import Decision, Flow, GateResult, Hop, Stats, flow_stats, nearest_rank, stitch
from .otlp import OTLPDecodeError, SpanRow, decode
from .store import SpanStore

__all__ = [
    "Decision",
    "Flow",
    "GateResult",
    "Hop",
    "OTLPDecodeError",
    "SpanRow",
    "SpanStore",
    "Stats",
    "decode",
    "flow_stats",
    "nearest_rank",
    "stitch",
]
