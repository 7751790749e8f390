"""Forward accepted OTLP export bodies, unchanged, to another OTLP/HTTP receiver (e.g. Jaeger).

Ingestion must never wait on the downstream: `submit` only appends to a bounded
in-memory queue; one background task drains it through a single shared
httpx.AsyncClient. When the queue is full the *oldest* body is dropped (and counted),
because fresh telemetry is worth more than stale telemetry during an outage.

A post that fails in a way that can pass (connection refused while Jaeger boots, a
timeout, 408/429/5xx) is retried with exponential backoff, up to `retries` times; the
body waits at the head of the queue meanwhile, so retries never exceed the queue bound
(a full queue still drops its oldest body, which may be the one being retried). A body
refused for good (other 4xx) or out of retries is counted as failed and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, replace

import httpx

log = logging.getLogger("baton.collector.forward")


@dataclass(frozen=True)
class Outgoing:
    body: bytes  # exactly as received (still compressed if it came compressed)
    headers: dict[str, str]  # content-type and, if any, content-encoding
    attempts: int = 0  # failed posts so far


RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Forwarder:
    def __init__(self, base_url: str, *, max_queue: int = 1000, timeout_s: float = 10.0, retries: int = 5, backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retried = 0
        self.endpoint = base_url.rstrip("/") + "/v1/traces"
        self.max_queue = max_queue
        self._timeout_s = timeout_s
        self._queue: deque[Outgoing] = deque()
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.forwarded = 0
        self.dropped = 0
        self.failed = 0

    def submit(self, body: bytes, headers: dict[str, str]) -> None:
        """Queue one export body; never blocks, drops the oldest when full."""
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(Outgoing(body, headers))
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "queued": self.queued,
            "max_queue": self.max_queue,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "failed": self.failed,
            "retried": self.retried,
        }

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout_s)
        self._task = asyncio.create_task(self._run(), name="baton-collector-forward")

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        """Give queued bodies a short chance to go out, then stop."""
        if self._task is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout_s
            while (self._queue or self._busy) and loop.time() < deadline and not self._task.done():
                await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        assert self._client is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue.popleft()
            self._busy = True
            try:
                retry = await self._post(item)
            finally:
                self._busy = False
            if retry:
                await self._back_off(item)

    async def _post(self, item: Outgoing) -> bool:
        """Post one body; True when it failed in a way worth another try."""
        assert self._client is not None
        try:
            resp = await self._client.post(self.endpoint, content=item.body, headers=item.headers)
        except httpx.HTTPError as exc:
            return self._failed(item, f"{type(exc).__name__}: {exc}", retryable=True)
        except Exception:  # the loop must survive anything, or forwarding silently stops
            log.exception("forward to %s failed", self.endpoint)
            return self._failed(item, "unexpected error", retryable=False)
        if resp.status_code >= 300:
            return self._failed(item, f"HTTP {resp.status_code}", retryable=resp.status_code in RETRYABLE_STATUS)
        self.forwarded += 1
        return False

    def _failed(self, item: Outgoing, why: str, *, retryable: bool) -> bool:
        if retryable and item.attempts < self.retries:
            return True
        self.failed += 1
        log.warning("forward to %s failed (%s) after %d attempt(s); body dropped", self.endpoint, why, item.attempts + 1)
        return False

    async def _back_off(self, item: Outgoing) -> None:
        """Wait, then put the body back at the head of the queue, unless the queue filled meanwhile."""
        await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2**item.attempts))
        if len(self._queue) >= self.max_queue:
            self.dropped += 1  # the oldest body: the queue's bound wins over the retry
            return
        self.retried += 1
        self._queue.appendleft(replace(item, attempts=item.attempts + 1))
