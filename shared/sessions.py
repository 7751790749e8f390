"""Conversation sessions in a JetStream KV bucket: the history that flows with a request.

A session is a list of turns under its id. The bucket's TTL expires idle sessions; a
size cap (turns and characters) drops the oldest turns first. Writes are
compare-and-set on the key's revision, so two replicas finishing turns of the same
session at once do not lose one.
"""

from __future__ import annotations

import asyncio
import json
import random

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.schema import ChatMessage

WRITE_ATTEMPTS = 20


def capped(turns: list[ChatMessage], max_turns: int, max_chars: int) -> list[ChatMessage]:
    """The newest turns that fit both caps; the oldest go first."""
    kept: list[ChatMessage] = []
    size = 0
    for turn in reversed(turns):
        if len(kept) >= max_turns or size + len(turn.content) > max_chars:
            break
        kept.append(turn)
        size += len(turn.content)
    return list(reversed(kept))


class SessionStore:
    def __init__(self, kv: KeyValue, max_turns: int = 20, max_chars: int = 16_000):
        self.kv = kv
        self.max_turns = max_turns
        self.max_chars = max_chars

    async def history(self, session_id: str) -> list[ChatMessage]:
        turns, _ = await self._read(session_id)
        return turns

    async def append(self, session_id: str, *turns: ChatMessage) -> list[ChatMessage]:
        for _ in range(WRITE_ATTEMPTS):
            history, revision = await self._read(session_id)
            updated = capped(history + list(turns), self.max_turns, self.max_chars)
            body = json.dumps({"turns": [t.model_dump() for t in updated]}).encode()
            try:
                if revision is None:
                    await self.kv.create(session_id, body)
                else:
                    await self.kv.update(session_id, body, last=revision)
                return updated
            except KeyWrongLastSequenceError:
                # Another replica wrote in between: read again, after a jittered pause
                # so the writers of one session do not collide in lockstep.
                await asyncio.sleep(random.uniform(0, 0.005))
        raise RuntimeError(f"session {session_id}: too much contention to record the turn")

    async def _read(self, session_id: str) -> tuple[list[ChatMessage], int | None]:
        try:
            entry = await self.kv.get(session_id)
        except (KeyNotFoundError, NotFoundError):
            return [], None
        if not entry.value:
            return [], entry.revision
        return [ChatMessage.model_validate(t) for t in json.loads(entry.value)["turns"]], entry.revision
