"""The reply cache: the same question, or a paraphrase of it, on the same route, config
and models.

Keys hash the normalized question with everything that could change the answer (route,
config version, the models the route will use, the response schema). A hit is served
by the router, costs nothing and says so on the Reply. Follow-ups in a session are
never cached: their answer depends on the history.

The semantic layer finds paraphrases. For each scope (everything in the key but the
question) the routers keep an index of the last questions asked, with their embeddings
(shared/embedder.py) and exact keys: one entry per question in the same bucket, and a
decoded copy in each router replica, fed by a watch. A new question whose
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
import functools
import hashlib
import json
import logging
import re
import time
from typing import NamedTuple

import numpy as np
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shared.schema import Envelope, Reply
from shared.watching import Follower

log = logging.getLogger("baton.cache")


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
SEMANTIC_INDEX_SIZE = 200  # questions each router compares with, per scope (the newest)
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
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=64)
def _vector(text: str) -> np.ndarray:
    """A miss embeds its question twice (lookup, then remember): the second is this cache's.
    Read-only: callers copy (astype) before changing it."""
    from shared.embedder import shared_embedder

    vector = shared_embedder().embed(normalize(text))
    vector.flags.writeable = False
    return vector


SEMANTIC_PREFIX = "semantic."  # then <scope>.<exact key>: one small entry per question


class _Scope:
    """The newest questions of one scope, their embeddings as the rows of one matrix (a ring)."""

    def __init__(self, size: int, dim: int):
        self.matrix = np.zeros((size, dim), dtype=np.float32)
        self.keys: list[str | None] = [None] * size
        self.questions: list[str] = [""] * size
        self.rows: dict[str, int] = {}  # exact key -> row
        self.next = 0

    def add(self, key: str, question: str, vector: np.ndarray) -> None:
        row = self.rows.get(key)
        if row is None:
            row = self.next
            self.next = (self.next + 1) % len(self.keys)
            evicted = self.keys[row]
            if evicted is not None:
                del self.rows[evicted]
        self.matrix[row], self.keys[row], self.questions[row] = vector, key, question
        self.rows[key] = row

    def nearest(self, vector: np.ndarray, count: int) -> list[tuple[float, str, str]]:
        """(cosine, exact key, question) of the `count` most similar questions."""
        if not self.rows:
            return []
        scores = self.matrix @ vector
        order = np.argsort(-scores)[:count]
        return [(float(scores[i]), key, self.questions[i]) for i in map(int, order) if (key := self.keys[i]) is not None]


class SemanticIndex:
    """The questions every router replica has indexed, per scope, decoded once.

    Each question is one small KV entry (`semantic.<scope>.<exact key>`); a watch on those
    keys keeps this copy current, so a lookup reads nothing from NATS but the one hit's
    reply, and remembering a question is one put. (It was one index per scope in one key:
    read twice and rewritten whole on every request, about 2.6 ms of the router's CPU and
    270 kB on the bus per cache miss with 200 questions.)"""

    def __init__(self, size: int = SEMANTIC_INDEX_SIZE):
        self.size = size
        self._scopes: dict[str, _Scope] = {}
        self._follower = Follower("semantic-index")

    async def attach(self, kv: KeyValue) -> None:
        await self._follower.start(kv, SEMANTIC_PREFIX + ">", self._entry, ignore_deletes=True)

    async def detach(self) -> None:
        await self._follower.stop()

    def _entry(self, entry: KeyValue.Entry) -> None:
        if not entry.value:
            return
        try:
            _, scope, key = entry.key.split(".", 2)
            stored = json.loads(entry.value)
            vector = np.frombuffer(base64.b64decode(stored["v"]), dtype=np.float16).astype(np.float32)
            self.add(scope, key, stored["q"], vector)
        except (ValueError, KeyError, TypeError):
            log.warning("semantic cache: skipped an unreadable index entry %r", entry.key[:120])

    def add(self, scope: str, key: str, question: str, vector: np.ndarray) -> None:
        found = self._scopes.get(scope)
        if found is None:
            found = self._scopes[scope] = _Scope(self.size, vector.shape[0])
        if vector.shape[0] == found.matrix.shape[1]:  # an entry of another embedder cannot be compared
            found.add(key, question, vector)

    def nearest(self, scope: str, vector: np.ndarray, count: int = 3) -> list[tuple[float, str, str]]:
        found = self._scopes.get(scope)
        return found.nearest(vector, count) if found is not None else []


async def semantic_lookup(kv: KeyValue, index: SemanticIndex, env: Envelope, now: float | None = None) -> tuple[Hit, str] | None:
    """The stored reply of the most similar earlier question in this scope, and that
    question; None when none is similar enough or its reply is gone."""
    question = env.context.question
    for cosine, key, earlier in index.nearest(scope_key(env), _vector(question)):
        if similar(question, earlier, cosine):
            hit = await lookup(kv, key, now)
            if hit is not None:
                return hit, earlier
    return None


async def remember(kv: KeyValue, index: SemanticIndex, env: Envelope, key: str) -> None:
    """Index this question under its exact key, so paraphrases can find its reply later
    (here at once; on the other router replicas through their watch)."""
    question = env.context.question
    from shared.pii import find_pii

    if find_pii(question):
        return  # the router runs before the input gate redacts: personal data is never indexed
    scope = scope_key(env)
    vector = _vector(question).astype(np.float16)
    index.add(scope, key, question, vector.astype(np.float32))
    body = json.dumps({"q": question, "v": base64.b64encode(vector.tobytes()).decode()}).encode()
    await kv.put(f"{SEMANTIC_PREFIX}{scope}.{key}", body)
