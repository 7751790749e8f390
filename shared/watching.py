"""Follow keys of a KV bucket: every replica keeps a local copy, fed by one watch.

The live config, the circuit breakers and the semantic cache's index all work this way:
reads are local (no round trip per request) and every write by any replica arrives here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress

from nats.js.kv import KeyValue


class Follower:
    """A background task that hands each entry written under `keys` to `on_entry`
    (the initial values first; deletes arrive as entries without a value)."""

    def __init__(self, name: str):
        self.name = name
        self._task: asyncio.Task | None = None

    async def start(self, kv: KeyValue, keys: str, on_entry: Callable[[KeyValue.Entry], None], **options: bool) -> None:
        watcher = await kv.watch(keys, **options)

        async def follow() -> None:
            async for entry in watcher:
                if entry is not None:  # None marks the end of the initial values
                    on_entry(entry)

        self._task = asyncio.create_task(follow(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
