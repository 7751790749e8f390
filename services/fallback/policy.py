"""What to do with a failed request. Plain Python: no NATS here.

Every failure ends in exactly one of these actions, chosen from the route's policy:
- retry_model: run the generate step again on the next model of the fallback chain
  (also when the output gate refused an answer: regenerate once, elsewhere);
- answer_without_context: retrieval found nothing good enough, and the route prefers
  an answer with a disclaimer to none: the slip continues without passages;
- degrade: answer extractively from the passages already retrieved, marked degraded
  (or, when retrieval found nothing, say plainly that the corpus has no answer);
- refuse: a clear error the client can act on.
A request that asks for JSON (`response_schema`) is never degraded: an extractive answer
is prose, and prose with ok: true would break the caller's parser. It is refused instead.
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
    action: Literal["retry_model", "answer_without_context", "degrade", "refuse"]
    reason: str
    model: str | None = None


def decide(env: Envelope, config: MeshConfig, now: float | None = None) -> Decision:
    error = env.error
    assert error is not None, "fallback needs an envelope with an error"
    policy = config.routes[env.route].fallback if env.route in config.routes else None
    if error.code in REFUSE_ALWAYS or policy is None:
        return Decision("refuse", f"{error.code.value} cannot be recovered")
    failed_step = error.step or ""
    can_retry = env.remaining_s(now) > MIN_RETRY_S and env.attempt < policy.max_depth
    regenerate = failed_step == "guard.output" and error.code == ErrorCode.OUTPUT_REJECTED and env.attempt == 0
    if (failed_step.startswith("generate") and error.code in MODEL_FAILURES) or regenerate:
        model = _next_model(env, policy.models)
        if model and can_retry:
            return Decision("retry_model", f"{failed_step} failed ({error.code.value}); trying {model}", model)
    wants_json = env.request.response_schema is not None
    if error.code == ErrorCode.NO_CONTEXT:
        if policy.no_context == "answer_without" and can_retry:
            return Decision("answer_without_context", "retrieval found nothing relevant; answering without the knowledge base, with a disclaimer")
        if wants_json:
            return Decision("refuse", "retrieval found nothing relevant, and a JSON answer cannot say so")
        return Decision("degrade", "retrieval found nothing relevant; saying so")
    if wants_json:
        return Decision("refuse", f"{failed_step or 'a step'} failed ({error.code.value}); the request asks for JSON, which a degraded extractive answer is not")
    if policy.degrade and env.context.passages:
        return Decision("degrade", f"{failed_step or 'a step'} failed ({error.code.value}); answering from retrieved passages")
    return Decision("refuse", f"{failed_step or 'a step'} failed ({error.code.value}) and the route has no fallback left")


def _next_model(env: Envelope, chain: list[str]) -> str | None:
    tried = {record.model for record in env.steps if record.model}
    tried |= {str(event.data["model"]) for event in env.events if event.kind in ("model", "fallback") and event.data.get("model")}
    return next((model for model in chain if model not in tried), None)


def retry_slip(env: Envelope, model: str) -> None:
    """Point the cursor back at the generate step that failed (or wrote the refused answer), pinned to `model`."""
    assert env.error is not None, "only a failed envelope is retried"
    failed = next(i for i, step in enumerate(env.slip) if step.name == env.error.step)
    index = max(i for i, step in enumerate(env.slip[: failed + 1]) if step.service == "generator")
    env.slip[index].params = {**env.slip[index].params, "models": [model]}
    env.cursor = index
    env.attempt += 1
    env.error = None
    env.sent_at = time.time()


NO_CONTEXT_ANSWER = "The Spoke & Chain knowledge base has nothing relevant to this question, so I cannot answer it from there."
NO_CONTEXT_DISCLAIMER = "Note: the knowledge base has nothing on this; the answer below is not from it."


def skip_retrieval_slip(env: Envelope) -> None:
    """Go on after the failed retrieval gate with no passages, and mark the answer."""
    assert env.error is not None, "only a failed envelope goes on without context"
    failed = next(i for i, step in enumerate(env.slip) if step.name == env.error.step)
    env.context.passages = []
    env.context.disclaimer = NO_CONTEXT_DISCLAIMER
    env.cursor = failed + 1
    env.attempt += 1
    env.error = None
    env.sent_at = time.time()
