"""The exact-match reply cache: the same question on the same route, config and models.

Keys hash the normalized question with everything that could change the answer (route,
config version, the models the route will use, the response schema). A hit is served
by the router, costs nothing and says so on the Reply. Follow-ups in a session are
never cached: their answer depends on the history.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import NamedTuple

from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shared.schema import Envelope, Reply

CACHE_KEY = "cache_key"  # where the router leaves the key on the envelope's outputs


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def cache_key(env: Envelope) -> str | None:
    """The key for this request, or None when it must not be cached."""
    request = env.request
    if not request.cache or env.context.history or request.stream:
        return None
    models = [step.params.get("models") for step in env.slip if step.service == "generator"]
    material = {
        "q": normalize(env.context.question),
        "route": env.route,
        "config": env.config_version,
        "models": models,
        "schema": request.response_schema,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:48]


class Hit(NamedTuple):
    reply: Reply
    # The question as the input gate left it (redacted) when the answer was cached: what a
    # session records as the turn, since a hit skips the gates. None in older entries.
    question: str | None


async def lookup(kv: KeyValue, key: str, now: float | None = None) -> Hit | None:
    try:
        entry = await kv.get(key)
    except NotFoundError:
        return None
    if not entry.value:
        return None
    stored = json.loads(entry.value)
    if stored["expires_at"] < (now or time.time()):
        return None
    return Hit(Reply.model_validate(stored["reply"]), stored.get("question"))


async def store(kv: KeyValue, key: str, reply: Reply, ttl_s: float, question: str | None = None) -> None:
    body = {"expires_at": time.time() + ttl_s, "reply": reply.model_dump(mode="json"), "question": question}
    await kv.put(key, json.dumps(body).encode())


def served_from_cache(cached: Reply, env: Envelope, trace_id: str | None) -> Reply:
    """The cached answer, as this request's Reply: no model ran, nothing was spent."""
    return cached.model_copy(
        update={
            "request_id": env.request_id,
            "cached": True,
            "cost_usd": 0.0,
            "usage": cached.usage.model_copy(update={"input_tokens": 0, "output_tokens": 0}),
            "steps": [],
            "fallbacks": [],
            "events": env.events,
            "latency_ms": round((time.time() - env.created_at) * 1000, 2),
            "trace_id": trace_id,
            "session_id": env.request.session_id,
        }
    )
