"""Turn a finished (or failed) envelope into the one Reply a client receives."""

from __future__ import annotations

import re
import time

from shared.schema import Citation, Envelope, Error, Reply, Usage


def answer_reply(env: Envelope, trace_id: str | None = None) -> Reply:
    answer, citations = renumber_citations(env.context.answer, _citations(env))
    if env.context.disclaimer:
        answer = f"{env.context.disclaimer}\n\n{answer}"
    return Reply(
        request_id=env.request_id,
        ok=True,
        answer=answer,
        citations=citations,
        degraded=env.context.degraded,
        finish_reason=env.context.finish_reason,
        **_accounting(env, trace_id),
    )


def error_reply(request_id: str, error: Error, env: Envelope | None = None, trace_id: str | None = None) -> Reply:
    extra = _accounting(env, trace_id) if env is not None else {"trace_id": trace_id}
    return Reply(request_id=request_id, ok=False, error=error, **extra)


def _citations(env: Envelope) -> list[Citation]:
    passages = env.context.passages
    cited = env.context.citations
    return [
        Citation(index=index, source=passages[index - 1].source, title=passages[index - 1].title)
        for index in cited
        if 0 < index <= len(passages)
    ]


_MARKER = re.compile(r"\[(\d+)\]")


def renumber_citations(answer: str, citations: list[Citation]) -> tuple[str, list[Citation]]:
    """Number the cited sources 1, 2, ... in the order the answer first cites them.

    Models cite passages by their place in the retrieved list, so an answer built from
    the second and fifth passages would read [2] and [5] with no [1]; the reader gets
    [1] and [2], in the text and the list alike. Markers that cite no passage are left alone.
    """
    by_passage = {c.index: c for c in citations}
    order = [int(n) for n in _MARKER.findall(answer) if int(n) in by_passage]
    order = list(dict.fromkeys(order + [c.index for c in citations]))
    new = {old: position for position, old in enumerate(order, start=1)}
    text = _MARKER.sub(lambda m: f"[{new[int(m.group(1))]}]" if int(m.group(1)) in new else m.group(0), answer)
    return text, [by_passage[old].model_copy(update={"index": new[old]}) for old in order]


def cited_first(text: str, cited: list[int], passages: list) -> tuple[str, list[int], list]:
    """Reorder the passages so the ones the answer cites come first, in the order it cites
    them, and renumber the answer's markers to match: what a model wrote as [2] and [5]
    reads [1] and [2], and the passages still line up with the numbers (later gates check
    groundedness against them)."""
    order = [int(n) for n in _MARKER.findall(text) if 0 < int(n) <= len(passages)]
    order = list(dict.fromkeys(order + [n for n in cited if 0 < n <= len(passages)]))
    if order == list(range(1, len(order) + 1)):
        return text, cited, passages
    new = {old: position for position, old in enumerate(order, start=1)}
    rest = [p for number, p in enumerate(passages, start=1) if number not in new]
    text = _MARKER.sub(lambda m: f"[{new[int(m.group(1))]}]" if int(m.group(1)) in new else m.group(0), text)
    return text, [new[n] for n in cited if n in new], [passages[old - 1] for old in order] + rest


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
        "variant": env.context.variant,
    }
