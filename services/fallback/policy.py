"""What to do with a failed request. Plain Python: no NATS here.

Every failure ends in exactly one of three actions, chosen from the route's policy:
- retry_model: run the generate step again on the next model of the fallback chain;
- degrade: answer extractively from the passages already retrieved, marked degraded;
- refuse: a clear error the client can act on.
A bound on fallback depth keeps a request from looping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from shared.config import MeshConfig
from shared.schema import Envelope, ErrorCode

# Failures that no other model can fix: the request itself was refused.
REFUSE_ALWAYS = {ErrorCode.INPUT_REJECTED, ErrorCode.INVALID_REQUEST, ErrorCode.UNKNOWN_ROUTE, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.MODEL_NOT_ALLOWED, ErrorCode.BUDGET_EXCEEDED}
# Failures of a model call that another model may not have.
MODEL_FAILURES = {ErrorCode.MODEL_ERROR, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE, ErrorCode.OUTPUT_REJECTED}
MIN_RETRY_S = 1.0  # below this much time left, a retry would only blow the deadline


@dataclass(frozen=True)
class Decision:
    action: Literal["retry_model", "degrade", "refuse"]
    reason: str
    model: str | None = None


def decide(env: Envelope, config: MeshConfig, now: float | None = None) -> Decision:
    error = env.error
    assert error is not None, "fallback needs an envelope with an error"
    policy = config.routes[env.route].fallback if env.route in config.routes else None
    if error.code in REFUSE_ALWAYS or policy is None:
        return Decision("refuse", f"{error.code.value} cannot be recovered")
    failed_step = error.step or ""
    if failed_step.startswith("generate") and error.code in MODEL_FAILURES:
        model = _next_model(env, policy.models)
        enough_time = env.remaining_s(now) > MIN_RETRY_S
        if model and enough_time and env.attempt < policy.max_depth:
            return Decision("retry_model", f"{failed_step} failed ({error.code.value}); trying {model}", model)
    if policy.degrade and env.context.passages:
        return Decision("degrade", f"{failed_step or 'a step'} failed ({error.code.value}); answering from retrieved passages")
    return Decision("refuse", f"{failed_step or 'a step'} failed ({error.code.value}) and the route has no fallback left")


def _next_model(env: Envelope, chain: list[str]) -> str | None:
    tried = {record.model for record in env.steps if record.model}
    tried |= {event.data.get("model") for event in env.events if event.kind in ("model", "fallback")}
    return next((model for model in chain if model not in tried), None)


def retry_slip(env: Envelope, model: str) -> None:
    """Point the cursor back at the failed generate step, pinned to `model`."""
    index = next(i for i, step in enumerate(env.slip) if step.name == env.error.step)
    env.slip[index].params = {**env.slip[index].params, "models": [model]}
    env.cursor = index
    env.attempt += 1
    env.error = None
    env.sent_at = time.time()
