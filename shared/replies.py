"""Turn a finished (or failed) envelope into the one Reply a client receives."""

from __future__ import annotations

import time

from shared.schema import Citation, Envelope, Error, Reply, Usage

# Keys of Envelope.context.outputs that every step agrees on.
ANSWER = "answer"  # the text the client will receive (guards may rewrite it)
CITATIONS = "citations"  # 1-based indexes into context.passages
DEGRADED = "degraded"
DISCLAIMER = "disclaimer"  # a note the client must see before the answer


def answer_reply(env: Envelope, trace_id: str | None = None) -> Reply:
    outputs = env.context.outputs
    answer = outputs.get(ANSWER, "")
    if outputs.get(DISCLAIMER):
        answer = f"{outputs[DISCLAIMER]}\n\n{answer}"
    return Reply(
        request_id=env.request_id,
        ok=True,
        answer=answer,
        citations=_citations(env),
        degraded=bool(outputs.get(DEGRADED, False)),
        **_accounting(env, trace_id),
    )


def error_reply(request_id: str, error: Error, env: Envelope | None = None, trace_id: str | None = None) -> Reply:
    extra = _accounting(env, trace_id) if env is not None else {"trace_id": trace_id}
    return Reply(request_id=request_id, ok=False, error=error, **extra)


def _citations(env: Envelope) -> list[Citation]:
    passages = env.context.passages
    cited = env.context.outputs.get(CITATIONS, [])
    return [
        Citation(index=index, source=passages[index - 1].source, title=passages[index - 1].title)
        for index in cited
        if 0 < index <= len(passages)
    ]


def _accounting(env: Envelope, trace_id: str | None) -> dict:
    usage = Usage()
    for record in env.steps:
        if record.usage:
            usage.input_tokens += record.usage.input_tokens
            usage.output_tokens += record.usage.output_tokens
            usage.estimated = usage.estimated or record.usage.estimated
    models = list(dict.fromkeys(record.model for record in env.steps if record.model))
    return {
        "route": env.route,
        "models": models,
        "usage": usage,
        "cost_usd": env.cost_usd,
        "steps": env.steps,
        "latency_ms": round((time.time() - env.created_at) * 1000, 2),
        "fallbacks": [event.data.get("action", "") for event in env.events if event.kind == "fallback"],
        "events": env.events,
        "config_version": env.config_version,
        "trace_id": trace_id,
        "session_id": env.request.session_id,
        "variant": env.context.outputs.get("variant"),
    }
