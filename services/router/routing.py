"""Choosing a route and writing its slip. Plain Python: no NATS here.

Order of precedence, first match wins:
1. an explicit route hint (an unknown one is an error);
2. metadata rules (risk level, tenant tier: the Stripe pattern);
3. pattern rules, then word rules (`match.words`), which are written for their route;
4. the classifier trained from the routes' example utterances (and `hints`), when
   confident enough;
5. the configured default route.
Then a complex request on a route that names `escalate_to` moves to that route (the
frontier tier with more context). The decision, its reason and confidence travel
with the request.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services.router.classifier import PAYLOAD_MARKER, RouteClassifier, asks_for_text_task, complexity, focus_text
from services.router.risk import RISK_ROUTE, RiskAssessment, assess_request_risk, escalate_for_risk, with_models
from services.router.risk_model import EncoderRiskModel, load_risk_model
from shared.config import MeshConfig, RouteSpec
from shared.experiments import stable_fraction
from shared.schema import Envelope, Event, Request


class UnknownRoute(LookupError):
    pass


@dataclass(frozen=True)
class RouteDecision:
    route: str
    reason: str
    confidence: float
    complexity: float = 0.0
    risk: float = 0.0
    risk_reasons: tuple[str, ...] = ()


class Router:
    def __init__(self, config: MeshConfig, risk_model: EncoderRiskModel | None | Literal["default"] = "default"):
        self.config = config
        self._word_res = {
            name: [re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE) for word in spec.match.words]
            for name, spec in config.routes.items()
        }
        self._pattern_res = {
            name: [re.compile(pattern, re.IGNORECASE) for pattern in spec.match.patterns]
            for name, spec in config.routes.items()
        }
        has_examples = any(spec.examples for spec in config.routes.values())
        self.classifier = RouteClassifier.from_config(config) if config.routing.classifier != "off" and has_examples else None
        reads_risk = self.classifier is not None and RISK_ROUTE in self.classifier.routes
        self.risk_model = (load_risk_model() if risk_model == "default" else risk_model) if reads_risk else None

    def decide(self, request: Request, read: Callable[[str], float] | None = None) -> RouteDecision:
        """The route for `request`. `read(text)` gives the encoder's high-risk probability when
        the gate opens (default: the risk model, here and now; the router process passes a
        reader that defers it to a worker thread, see services/router/app.py)."""
        predicted: list[list[tuple[str, float]]] = []

        def predict() -> list[tuple[str, float]]:
            """The classifier's probabilities, computed at most once per request (routing and risk both read them)."""
            if not predicted and self.classifier is not None:
                predicted.append(self.classifier.predict(request.text))
            return predicted[0] if predicted else []

        decision = self._escalate(request, self._choose(request, predict))
        if decision.reason == "route hint" or decision.route == RISK_ROUTE or RISK_ROUTE not in self.config.routes:
            return escalate_for_risk(decision, request.text, self.config.routes)
        return escalate_for_risk(decision, request.text, self.config.routes, self._risk(request.text, predict, read))

    def _risk(self, text: str, predict: Callable[[], list[tuple[str, float]]], read: Callable[[str], float] | None = None) -> RiskAssessment:
        """The cues, then (when they do not suffice and the classifier gives high risk some weight) the encoder's reading."""
        cues = assess_request_risk(text)
        if cues.high or self.classifier is None:
            return cues
        model = self.risk_model
        if model is None:
            return cues
        probability = dict(predict()).get(RISK_ROUTE, 0.0)
        # A story told after a colon ("long story short: <what happened>") is marked as material
        # and the classifier never sees it; material under a real text task ("rewrite this: ...")
        # stays with the cues, at half weight (assess_request_risk).
        instruction = focus_text(text)
        unseen = PAYLOAD_MARKER in instruction and not asks_for_text_task(instruction)
        return with_models(cues, probability, lambda: (read or model.probability)(text), model.threshold, unseen_material=unseen)

    def _choose(self, request: Request, predict: Callable[[], list[tuple[str, float]]]) -> RouteDecision:
        if request.route is not None:
            if request.route not in self.config.routes:
                raise UnknownRoute(f"unknown route {request.route!r}; configured routes: {', '.join(sorted(self.config.routes))}")
            return RouteDecision(request.route, "route hint", 1.0)
        for name, spec in self.config.routes.items():
            rule = spec.match.metadata
            if rule and all(request.metadata.get(key) == value for key, value in rule.items()):
                shown = ", ".join(f"{key}={value}" for key, value in rule.items())
                return RouteDecision(name, f"metadata {shown}", 1.0)
        text = request.text
        # Rules read the instruction, not pasted material: the question marks or words of a
        # quoted review say nothing about what the user wants done with it.
        instruction = focus_text(text)
        by_pattern = self._best_rule(self._pattern_res, instruction)
        if by_pattern is not None:
            name, matched = by_pattern
            return RouteDecision(name, f"pattern {_readable(matched[0])}", 1.0)
        by_words = self._best_rule(self._word_res, instruction)
        if by_words is not None:
            name, matched = by_words
            return RouteDecision(name, "words " + ", ".join(_readable(p) for p in matched[:3]), 1.0)
        if self.classifier is not None:
            route, probability = predict()[0]
            if probability >= self.config.routing.min_confidence:
                return RouteDecision(route, f"classifier {probability:.2f}", round(probability, 4))
            fallback_reason = f"classifier unsure ({route} {probability:.2f} < {self.config.routing.min_confidence})"
        else:
            fallback_reason = "no rule matched"
        return RouteDecision(self.config.default_route, f"{fallback_reason}: default route", 0.3)

    def _escalate(self, request: Request, decision: RouteDecision) -> RouteDecision:
        if decision.reason == "route hint":
            return decision
        score = complexity(request.text)
        target = self.config.routes[decision.route].escalate_to
        if target and score.score >= self.config.routing.complexity_threshold:
            why = ", ".join(score.reasons[:3])
            return RouteDecision(target, f"{decision.reason}; escalated from {decision.route}: complexity {score.score:.2f} ({why})", decision.confidence, score.score)
        return RouteDecision(decision.route, decision.reason, decision.confidence, score.score)

    @staticmethod
    def _best_rule(rules: dict[str, list[re.Pattern]], text: str) -> tuple[str, list[str]] | None:
        """The route with most matching rules; ties go to the route listed first."""
        best = None
        for name, compiled in rules.items():
            matched = [r.pattern for r in compiled if r.search(text)]
            if matched and (best is None or len(matched) > len(best[1])):
                best = (name, matched)
        return best

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
            # Its own params dict per step (an A/B variant sets "models" below), the rest shared
            # with the config: nothing else writes to a slip before it is sent (a deep copy: 24 us).
            slip=[step.model_copy(update={"params": dict(step.params)}) for step in spec.steps],
            deadline=now + budget_ms / 1000,
            config_version=self.config.digest,
            created_at=now,
        )
        env.context.question = request.text
        env.context.history = [m for m in (request.messages or [])[:-1]]
        event = _route_event(decision)
        variant = self.pick_variant(decision.route, experiment_unit(request, request_id))
        if variant is not None:
            for step in env.slip:
                if step.service == "generator":
                    step.params["models"] = list(variant.models)
            env.context.variant = variant.name
            event.data["variant"] = variant.name
        env.events.append(event)
        return env

    def pick_variant(self, route: str, unit: str):
        """A/B arm by a stable hash: one session or user always lands in the same arm."""
        variants = self.config.routes[route].variants
        if not variants:
            return None
        point = stable_fraction(f"{route}:{unit}") * sum(v.weight for v in variants)
        for variant in variants:
            point -= variant.weight
            if point < 0:
                return variant
        return variants[-1]




def experiment_unit(request: Request, request_id: str) -> str:
    return request.session_id or request.metadata.get("user") or request_id


def _route_event(decision: RouteDecision) -> Event:
    data = {"route": decision.route, "reason": decision.reason, "confidence": decision.confidence, "complexity": decision.complexity,
            "risk": decision.risk, "risk_reasons": list(decision.risk_reasons)}
    return Event(kind="route", step="route", data=data)


def _readable(pattern: str) -> str:
    # Word-rule regexes are r"\bword\b": show just the word.
    return re.sub(r"\\b|\\", "", pattern) if pattern.startswith(r"\b") else pattern
