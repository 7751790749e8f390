"""A synchronous face for BatonClient, for scripts and notebooks.

    with SyncBatonClient("nats://127.0.0.1:4222") as baton:
        print(baton.ask("How do I fix a puncture?").answer)

The async client runs on its own event loop in a background thread; each call waits for
its result, so the typed errors (NotAccepted, ReplyTimeout, ...) surface unchanged.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

from baton.client import BatonClient
from shared.schema import Reply, Request

_DONE = object()


class SyncBatonClient:
    def __init__(self, nats_url: str | None = None, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="baton-client", daemon=True)
        self._thread.start()
        self._client = BatonClient(nats_url, **options)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def ask(self, request: Request | str, **fields: Any) -> Reply:
        return self._call(self._client.ask(request, **fields))

    def submit(self, request: Request | str, **fields: Any) -> str:
        return self._call(self._client.submit(request, **fields))

    def result(self, request_id: str) -> Reply | None:
        return self._call(self._client.result(request_id))

    def stream(self, request: Request | str, **fields: Any) -> Iterator[str | Reply]:
        """Partial text as it arrives, then the final Reply."""
        items: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for item in self._client.stream(request, **fields):
                    items.put(item)
            except BaseException as exc:  # handed to the caller's thread below
                items.put(exc)
            finally:
                items.put(_DONE)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while (item := items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncBatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
