"""One client's flood waits behind its own limit, not in front of everyone else.

The router counts each client's requests in flight: from the moment it starts routing
one until its Reply is seen on the client's inbox (or its deadline passes, for a
request nobody answers to). A client at its limit waits for one of its own requests to
finish; other clients' requests go past. Plain asyncio: no NATS here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

MAX_WAIT_SLICE_S = 1.0  # re-check at least this often: a held request may reach its deadline


class ClientSlots:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._held: dict[str, dict[str, float]] = {}  # client -> request id -> held until (epoch s)
        self._freed: dict[str, asyncio.Event] = {}

    def in_flight(self, client: str) -> int:
        held = self._held.get(client)
        if not held:
            return 0
        now = self.clock()
        for request_id in [r for r, until in held.items() if until <= now]:
            del held[request_id]  # its deadline passed: nothing will come of it any more
        if not held:
            del self._held[client]
            return 0
        return len(held)

    def has_room(self, client: str, request_id: str, limit: int) -> bool:
        """A request already held (a redelivery, a repeated id) never waits behind itself."""
        return request_id in self._held.get(client, ()) or self.in_flight(client) < limit

    def hold(self, client: str, request_id: str, until: float) -> None:
        self._held.setdefault(client, {})[request_id] = until

    def release(self, client: str, request_id: str) -> None:
        held = self._held.get(client)
        if held is None or held.pop(request_id, None) is None:
            return
        if not held:
            del self._held[client]
        event = self._freed.pop(client, None)
        if event is not None:
            event.set()

    async def wait_for_room(self, client: str, request_id: str, limit: int) -> None:
        while not self.has_room(client, request_id, limit):
            event = self._freed.setdefault(client, asyncio.Event())
            held = self._held.get(client, {})
            soonest = min(held.values(), default=self.clock()) - self.clock()
            try:
                await asyncio.wait_for(event.wait(), max(0.01, min(MAX_WAIT_SLICE_S, soonest)))
            except TimeoutError:
                pass
