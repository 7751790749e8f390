"""The reply cache: the same question, or a paraphrase of it, on the same route, config
and models.

Keys hash the normalized question with everything that could change the answer (route,
config version, the models the route will use, the response schema). A hit is served
by the router, costs nothing and says so on the Reply. Follow-ups in a session are
never cached: their answer depends on the history.

The semantic layer finds paraphrases. For each scope (everything in the key but the
question) the router keeps a small index in the same bucket: the last questions asked,
with their embeddings (shared/embedder.py) and exact keys. A new question whose
nearest indexed question is `similar` reuses that question's reply, if one was stored.
Similarity alone cannot tell "the warranty on the Metro 8" from "the warranty on the
Tempo SL" (cosine 0.97), so a paraphrase must also name the same numbers and proper
names and must not be a minimal pair (the same sentence with a word or two swapped).
The threshold was measured on tests/data/paraphrases.jsonl (20 paraphrases, 20 near
misses): at 0.80, 12 paraphrases hit and 1 near miss does ("how long does the battery
take to charge" / "... last on a charge"); see tests/unit/test_semantic_cache.py.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import re
import time
from typing import NamedTuple

import numpy as np

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.schema import Envelope, Reply



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


# --- the semantic layer ----------------------------------------------------------------

SEMANTIC_THRESHOLD = 0.80
SEMANTIC_INDEX_SIZE = 200  # questions remembered per scope (about 60 kB in KV)
_WORD = re.compile(r"[A-Za-z0-9][\w'-]*")


def _entities(text: str) -> set[str]:
    """Numbers and capitalized words after the first ("Metro 8", "Ireland", "SRAM")."""
    words = _WORD.findall(text)
    return {w.lower() for i, w in enumerate(words)
            if any(c.isdigit() for c in w) or (i > 0 and w[0].isupper() and not w.startswith("I'") and w != "I")}


def _minimal_pair(a: str, b: str) -> bool:
    """The same sentence with a few words swapped one for one: a near miss, not a paraphrase."""
    wa, wb = [w.lower() for w in _WORD.findall(a)], [w.lower() for w in _WORD.findall(b)]
    ops = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes()
    changed = [op for op in ops if op[0] != "equal"]
    kept = sum(op[2] - op[1] for op in ops if op[0] == "equal")
    return bool(changed) and kept >= 0.6 * max(len(wa), len(wb)) and all(
        op[0] == "replace" and op[2] - op[1] == op[4] - op[3] for op in changed)


def similar(a: str, b: str, cosine: float, threshold: float = SEMANTIC_THRESHOLD) -> bool:
    return cosine >= threshold and _entities(a) == _entities(b) and not _minimal_pair(a, b)


def scope_key(env: Envelope) -> str:
    request = env.request
    models = [step.params.get("models") for step in env.slip if step.service == "generator"]
    material = {"route": env.route, "config": env.config_version, "models": models, "schema": request.response_schema}
    return "semantic." + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]


def _vector(text: str) -> np.ndarray:
    from shared.embedder import shared_embedder

    return shared_embedder().embed(normalize(text))


async def _index(kv: KeyValue, scope: str) -> tuple[list[dict], int | None]:
    try:
        entry = await kv.get(scope)
    except NotFoundError:
        return [], None
    return (json.loads(entry.value) if entry.value else []), entry.revision


async def semantic_lookup(kv: KeyValue, env: Envelope, now: float | None = None) -> tuple[Hit, str] | None:
    """The stored reply of the most similar earlier question in this scope, and that
    question; None when none is similar enough or its reply is gone."""
    entries, _ = await _index(kv, scope_key(env))
    if not entries:
        return None
    question = env.context.question
    vector = _vector(question)
    matrix = np.stack([np.frombuffer(base64.b64decode(e["v"]), dtype=np.float16).astype(np.float32) for e in entries])
    for index in np.argsort(-(matrix @ vector))[:3]:
        entry = entries[int(index)]
        if similar(question, entry["q"], float(matrix[int(index)] @ vector)):
            hit = await lookup(kv, entry["key"], now)
            if hit is not None:
                return hit, entry["q"]
    return None


async def remember(kv: KeyValue, env: Envelope, key: str) -> None:
    """Index this question under its exact key, so paraphrases can find its reply later.
    Best effort: a concurrent writer wins and this question is simply not indexed."""
    question = env.context.question
    from shared.pii import find_pii

    if find_pii(question):
        return  # the router runs before the input gate redacts: personal data is never indexed
    scope = scope_key(env)
    entries, revision = await _index(kv, scope)
    vector = base64.b64encode(_vector(question).astype(np.float16).tobytes()).decode()
    entries = [e for e in entries if e["key"] != key][-(SEMANTIC_INDEX_SIZE - 1):] + [{"key": key, "q": question, "v": vector}]
    body = json.dumps(entries).encode()
    try:
        if revision is None:
            await kv.create(scope, body)
        else:
            await kv.update(scope, body, last=revision)
    except KeyWrongLastSequenceError:
        pass  # a concurrent writer won the race: this question is simply not indexed
