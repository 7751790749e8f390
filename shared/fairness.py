"""One client's flood waits behind its own limit, not in front of everyone else.

The router counts each client's requests in flight: from the moment it starts routing
one until the service that finished it says so (a `FinishedNotes` batch on
`subjects.FINISHED`), or its deadline passes, for a request nobody finishes. A client at
its limit waits for one of its own requests to finish, first come first served: a
freed slot is handed to the client's oldest waiter, so a release wakes one waiter, not
all of them. Other clients' requests go past. Plain asyncio: no NATS here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("baton.fairness")
MAX_WAIT_SLICE_S = 1.0  # re-check at least this often: a held request may reach its deadline
HANDOVER_HOLD_S = 60.0  # a slot handed to a waiter is held this long, until its request holds it itself


@dataclass
class _Waiter:
    request_id: str
    limit: int
    served: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ClientSlots:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._held: dict[str, dict[str, float]] = {}  # client -> request id -> held until (epoch s)
        self._waiting: dict[str, deque[_Waiter]] = {}  # client -> its waiters, oldest first

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
        """A request already held (a redelivery, a repeated id) never waits behind itself;
        a new one waits while older ones of the same client do."""
        if request_id in self._held.get(client, ()):
            return True
        return not self._waiting.get(client) and self.in_flight(client) < limit

    def hold(self, client: str, request_id: str, until: float) -> None:
        self._held.setdefault(client, {})[request_id] = until

    def release(self, client: str, request_id: str) -> None:
        held = self._held.get(client)
        if held is None or held.pop(request_id, None) is None:
            return
        if not held:
            del self._held[client]
        self._hand_over(client)

    def release_all(self, finished: list[tuple[str, str]]) -> None:
        for client, request_id in finished:
            self.release(client, request_id)

    def _hand_over(self, client: str) -> None:
        """Give the client's free slots to its oldest waiters, holding each for it."""
        queue = self._waiting.get(client)
        while queue:
            waiter = queue[0]
            if waiter.served.done():  # it stopped waiting (cancelled)
                queue.popleft()
                continue
            if self.in_flight(client) >= waiter.limit:
                break
            queue.popleft()
            self.hold(client, waiter.request_id, self.clock() + HANDOVER_HOLD_S)
            waiter.served.set_result(None)
        if not queue:
            self._waiting.pop(client, None)

    async def wait_for_room(self, client: str, request_id: str, limit: int) -> None:
        """Return once this request holds one of the client's slots (or already held one)."""
        if self.has_room(client, request_id, limit):
            return
        waiter = _Waiter(request_id, limit)
        self._waiting.setdefault(client, deque()).append(waiter)
        self._hand_over(client)  # a slot may have freed by its deadline, unannounced
        try:
            while not waiter.served.done():
                held = self._held.get(client, {})
                soonest = min(held.values(), default=self.clock()) - self.clock()
                await asyncio.wait({waiter.served}, timeout=max(0.01, min(MAX_WAIT_SLICE_S, soonest)))
                self._hand_over(client)
        except asyncio.CancelledError:
            if waiter.served.done():
                self.release(client, request_id)  # handed a slot it will never use: pass it on
            else:
                waiter.served.cancel()
                self._hand_over(client)  # off the queue now, so newcomers need not wait behind it
            raise


# -- what the finishing services tell the router ---------------------------------------------

Send = Callable[[bytes], Awaitable[None]]
FINISHED_WINDOW_S = 0.005  # notes that finish this close together travel as one message


class FinishedNotes:
    """The requests this process finished, sent to the router in small batches.

    The router must learn that a request finished to free its client's slot; seeing
    every Reply go by cost it (and nats-server) a 2-4 kB message per request. A note
    is a few dozen bytes, and the notes of one `window_s` travel as one message. A lost
    note (a core NATS publish) only delays the slot until the request's deadline."""

    def __init__(self, send: Send, window_s: float = FINISHED_WINDOW_S, max_batch: int = 256):
        self.send = send
        self.window_s = window_s
        self.max_batch = max_batch
        self._pending: list[tuple[str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task] = set()

    def note(self, client: str, request_id: str) -> None:
        self._pending.append((client, request_id))
        if len(self._pending) >= self.max_batch:
            self._send_pending()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._send_pending)

    def _send_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        try:
            await self.send(encode(batch))
        except Exception as exc:  # the slots still free at the requests' deadlines
            log.warning("could not tell the router of %d finished requests: %s: %s", len(batch), type(exc).__name__, exc)

    async def flush(self) -> None:
        """Send what is pending now (on stop, before the connection drains)."""
        self._send_pending()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=2.0)


def encode(finished: list[tuple[str, str]]) -> bytes:
    return json.dumps(finished, separators=(",", ":")).encode()


def decode(body: bytes) -> list[tuple[str, str]]:
    """The (client, request id) pairs of a note; a malformed note names none."""
    try:
        pairs = json.loads(body)
    except ValueError:
        return []
    if not isinstance(pairs, list):
        return []
    return [(c, r) for pair in pairs if isinstance(pair, list) and len(pair) == 2 for c, r in [pair] if isinstance(c, str) and isinstance(r, str)]
