"""Choosing a route and writing its slip. Plain Python: no NATS here.

Order of precedence: an explicit route hint, then metadata rules, then keyword and
pattern rules (the route with most hits wins, ties go to the earlier route), then
the configured default route.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from shared.config import MeshConfig, RouteSpec
from shared.schema import Envelope, Event, Request


PATTERN_WEIGHT = 2


class UnknownRoute(LookupError):
    pass


@dataclass(frozen=True)
class RouteDecision:
    route: str
    reason: str
    confidence: float


class Router:
    def __init__(self, config: MeshConfig):
        self.config = config
        self._keyword_res = {
            name: [re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE) for word in spec.match.keywords]
            for name, spec in config.routes.items()
        }
        self._pattern_res = {
            name: [re.compile(pattern, re.IGNORECASE) for pattern in spec.match.patterns]
            for name, spec in config.routes.items()
        }

    def decide(self, request: Request) -> RouteDecision:
        if request.route is not None:
            if request.route not in self.config.routes:
                raise UnknownRoute(f"unknown route {request.route!r}; configured routes: {', '.join(sorted(self.config.routes))}")
            return RouteDecision(request.route, "route hint", 1.0)
        for name, spec in self.config.routes.items():
            rule = spec.match.metadata
            if rule and all(request.metadata.get(key) == value for key, value in rule.items()):
                shown = ", ".join(f"{key}={value}" for key, value in rule.items())
                return RouteDecision(name, f"metadata {shown}", 1.0)
        best, points, matched = None, 0, []
        for name in self.config.routes:
            words = [r.pattern for r in self._keyword_res[name] if r.search(request.text)]
            patterns = [r.pattern for r in self._pattern_res[name] if r.search(request.text)]
            # A pattern is written for its route; a keyword may be shared: patterns weigh more.
            score = len(words) + PATTERN_WEIGHT * len(patterns)
            if score > points:
                best, points, matched = name, score, patterns + words
        if best is not None:
            shown = ", ".join(_readable(p) for p in matched[:3])
            return RouteDecision(best, f"matched {shown}", min(1.0, 0.5 + 0.25 * points))
        return RouteDecision(self.config.default_route, "no rule matched: default route", 0.3)

    def envelope(self, request_id: str, request: Request, decision: RouteDecision, reply_to: str | None, now: float | None = None) -> Envelope:
        """The envelope that starts the request's journey, with its slip and deadline."""
        now = now if now is not None else time.time()
        spec: RouteSpec = self.config.route(decision.route)
        budget_ms = spec.latency_budget_ms
        if request.max_latency_ms is not None:
            budget_ms = min(budget_ms, request.max_latency_ms)
        env = Envelope(
            request_id=request_id,
            reply_to=reply_to,
            request=request,
            route=decision.route,
            slip=[step.model_copy(deep=True) for step in spec.steps],
            deadline=now + budget_ms / 1000,
            config_version=self.config.digest,
            created_at=now,
        )
        env.context.question = request.text
        env.context.history = [m for m in (request.messages or [])[:-1]]
        env.events.append(_route_event(decision))
        return env


def _route_event(decision: RouteDecision) -> Event:
    return Event(kind="route", step="route", data={"route": decision.route, "reason": decision.reason, "confidence": decision.confidence})


def _readable(pattern: str) -> str:
    # Keyword regexes are r"\bword\b": show just the word.
    return re.sub(r"\\b|\\", "", pattern) if pattern.startswith(r"\b") else pattern
