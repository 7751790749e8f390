"""A lean JetStream pull consumer: a standing pull per replica, a task per message.

Why not FastStream's subscriber: under load its consume pipeline (dependency injection,
an anyio task per message, middlewares) and one pull request per message
(`PullSub(batch_size=1)`, the only setting that did not hold a message back after an
idle spell) cost about half of each service's CPU and of nats-server's: switching
halved the router's CPU per request (1.67 -> 0.82 ms) and nats-server's (2.22 -> 1.19
ms), `python -m bench.hotpath`, 2026-12-01. This is the JetStream "consume" protocol
the official Go and Java clients use:

- one inbox per replica; pull requests ask for up to `max_workers` messages, expire
  after `expires_s`, and ask the server for idle heartbeats;
- a message is handed to its own task as soon as it arrives (no waiting for a batch to
  fill); when enough of the credit is used up, one more pull tops it up;
- the server's status messages return unused credit (408 request expired, 409) or prove
  the pull is alive (100 heartbeat); a new consumer leader's advisory, or silence for a
  few heartbeats, means the pulls were lost (a leader change, a server restart): the
  credit is dropped and pulled again.

Several replicas share one durable consumer: each asks only for as many messages as it
has free workers, so JetStream spreads the work by who is free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from shared.subjects import leader_elected

Handler = Callable[[Msg], Awaitable[None]]
log = logging.getLogger("baton.consumer")

PENDING_MESSAGES = "Nats-Pending-Messages"
AFRESH_WINDOW_S = 1.0  # one re-pull for one leader change, however many ways it is announced


class PullConsumer:
    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        handler: Handler,
        *,
        max_workers: int = 64,
        expires_s: float = 15.0,
        heartbeat_s: float = 0.5,
        progress_every_s: float = 10.0,
        max_parked: int = 1024,
    ):
        self.nc = nc
        self.durable = durable
        self.handler = handler
        self.max_workers = max(1, max_workers)
        self.refill_at = max(1, self.max_workers // 4)  # top up once a quarter of the workers is free
        self.expires_s = expires_s
        self.heartbeat_s = heartbeat_s
        self.progress_every_s = progress_every_s
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.leader_subject = leader_elected(durable, stream)
        self.inbox = nc.new_inbox()  # under the connection's inbox prefix, where this service may listen
        self.credit = 0  # messages asked for and neither delivered nor returned
        self.tasks: set[asyncio.Task] = set()
        # Messages in hand, keyed by identity (a nats-py Msg is an unhashable dataclass):
        # id(message) -> (message, when JetStream last heard of it).
        self.working: dict[int, tuple[Msg, float]] = {}
        # Messages in hand that wait for their turn rather than work on it (the router's
        # per-client limit): they do not count against the workers, so the pulls go on
        # past them to other clients' messages. Still in `working`: kept alive as well.
        self.parked: set[int] = set()
        self.max_parked = max_parked
        self.last_heard = time.monotonic()
        self.stopping = False
        self._sub: Subscription | None = None
        self._leader_sub: Subscription | None = None
        self._watchdog: asyncio.Task | None = None
        self._retry_after = 0.0
        self._pulled_afresh_at = -AFRESH_WINDOW_S

    @property
    def busy(self) -> int:
        """Messages being worked on now (in hand and not parked)."""
        return len(self.working) - len(self.parked)

    def park(self, msg: Msg) -> bool:
        """The handler waits for its turn: pull more meanwhile. False when too many wait already."""
        if len(self.parked) >= self.max_parked or id(msg) not in self.working:
            return False
        self.parked.add(id(msg))
        task = asyncio.create_task(self._top_up())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def unpark(self, msg: Msg) -> None:
        self.parked.discard(id(msg))

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_message)
        # In a cluster a killed consumer leader takes this replica's pulls with it; its
        # successor announces itself, and pulling again then beats waiting for silence.
        self._leader_sub = await self.nc.subscribe(self.leader_subject, cb=self._on_new_leader)
        await self._top_up()
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull-watchdog-{self.durable}")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop pulling, let the messages in hand finish (they are acked), then go."""
        self.stopping = True
        if self._watchdog:
            self._watchdog.cancel()
        if self._leader_sub is not None:
            with suppress(Exception):
                await self._leader_sub.unsubscribe()
        if self._sub is not None:
            # No interest on the inbox any more: the server drops this replica's pulls.
            # Drain, not unsubscribe: a message already on its way still reaches
            # _on_message, which hands it straight back, instead of being dropped on
            # the floor to wait out ack_wait before another replica may have it.
            with suppress(Exception):
                await self._sub.drain()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace_s)

    # -- credit ------------------------------------------------------------------

    async def _top_up(self) -> None:
        if self.stopping or not self.nc.is_connected or time.monotonic() < self._retry_after:
            # While reconnecting, nats-py would queue the pull and send it later, together
            # with every other one asked for meanwhile: more messages than workers.
            return
        want = self.max_workers - self.busy - self.credit
        if want >= self.refill_at or (want > 0 and self.credit == 0):
            self.credit += want
            request = {"batch": want, "expires": int(self.expires_s * 1e9), "idle_heartbeat": int(self.heartbeat_s * 1e9)}
            try:
                await self.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self.inbox)
            except Exception as exc:  # disconnected: the watchdog pulls again
                self.credit -= want
                log.warning("%s: pull request failed (%s); retrying", self.durable, exc)

    async def _on_message(self, msg: Msg) -> None:
        self.last_heard = now = time.monotonic()
        status = msg.headers.get(Header.STATUS) if msg.headers else None
        if status is None:
            self.credit = max(0, self.credit - 1)
            if self.stopping:
                await msg.nak()  # straight back to the queue, for another replica
                return
            self.working[id(msg)] = (msg, now)
            task = asyncio.create_task(self._run(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        if status == "100":
            return  # the pulls are alive, nothing to deliver
        pending = msg.headers.get(PENDING_MESSAGES)
        description = msg.headers.get(Header.DESCRIPTION, "")
        if pending is not None and status in ("408", "409"):
            self.credit = max(0, self.credit - int(pending))  # that pull is over: its unused credit comes back
        elif status == "409" and "leadership change" in description.lower():
            await self._pull_afresh("the consumer's leadership changed")
            return
        else:
            # The pull was refused or lost (no JetStream, consumer deleted, too many
            # waiting pulls): start over, after a pause so a broken setup does not spin.
            log.warning("%s: pull ended with status %s %s; pulling again in 1 s", self.durable, status, msg.headers.get(Header.DESCRIPTION, ""))
            self.credit = 0
            self._retry_after = time.monotonic() + 1.0
        await self._top_up()

    async def _on_new_leader(self, msg: Msg) -> None:
        await self._pull_afresh("a new consumer leader was elected")

    async def _pull_afresh(self, why: str) -> None:
        """The pulls are gone with the old leader: forget their credit and pull again.

        The new leader's advisory and its `409 Leadership Change` arrive together, in
        either order: the second must not pull once more, or this replica would be
        handed more messages than it has workers."""
        now = time.monotonic()
        if now - self._pulled_afresh_at < AFRESH_WINDOW_S:
            return
        self._pulled_afresh_at = now
        log.info("%s: %s; pulling again", self.durable, why)
        self.credit = 0
        self._retry_after = 0.0
        self.last_heard = now
        await self._top_up()

    async def _run(self, msg: Msg) -> None:
        try:
            await self.handler(msg)
        except Exception:  # the handler decides ack or nak; this is the last line
            log.exception("%s: handler failed", self.durable)
        finally:
            self.parked.discard(id(msg))
            del self.working[id(msg)]
            await self._top_up()

    async def _watch(self) -> None:
        """Keep long work alive, and notice pulls that died silently."""
        while True:
            await asyncio.sleep(min(self.heartbeat_s, self.progress_every_s))
            try:
                await self._keep_alive()
                await self._revive_pulls()
            except Exception:  # this loop is what keeps the pulls alive: it must not die
                log.exception("%s: pull watchdog", self.durable)

    async def _keep_alive(self) -> None:
        # A long model call: without this JetStream would redeliver the message to
        # another replica after ack_wait, while this one is still working on it.
        now = time.monotonic()
        for key, (msg, since) in list(self.working.items()):
            if now - since >= self.progress_every_s:
                self.working[key] = (msg, now)
                with suppress(Exception):  # disconnected, or already acked: nothing to keep alive
                    await msg.in_progress()

    async def _revive_pulls(self) -> None:
        # A server restart or a leader change drops pull requests without a word: a
        # killed consumer leader cannot say so, and its successor never saw them. The
        # sooner this notices, the shorter a failover stalls the hop (chaos: p99).
        silent = time.monotonic() - self.last_heard
        if self.credit > 0 and silent > 3 * self.heartbeat_s:
            log.info("%s: no heartbeat for %.1f s; pulling again", self.durable, silent)
            self.credit = 0
            self.last_heard = time.monotonic()
        await self._top_up()
