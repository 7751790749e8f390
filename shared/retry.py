"""Bounded retries with exponential backoff and full jitter, within a deadline."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random = random._inst) -> float:
    """Full jitter: a random wait up to base * 2^attempt (AWS architecture blog's variant)."""
    return rng.uniform(0, min(max_s, base_s * 2**attempt))


async def retrying(
    call: Callable[[float], Awaitable[T]],
    *,
    deadline: float,
    retries: int,
    retryable: Callable[[Exception], bool],
    retry_after: Callable[[Exception], float | None] = lambda exc: None,
    base_s: float = 0.2,
    max_s: float = 5.0,
    on_retry: Callable[[int, Exception, float], None] | None = None,
) -> T:
    """Call `call(timeout_s)` until it succeeds, retries run out, or the deadline is near.

    A server's Retry-After wins over our own backoff; a wait that would end past the
    deadline is not taken: the caller's fallback has a better use for that time.
    """
    attempt = 0
    while True:
        remaining = deadline - time.time()
        try:
            return await call(max(0.05, remaining))
        except Exception as exc:
            if attempt >= retries or not retryable(exc):
                raise
            wait = retry_after(exc)
            wait = backoff_s(attempt, base_s, max_s) if wait is None else wait
            if time.time() + wait >= deadline - 0.05:
                raise
            if on_retry is not None:
                on_retry(attempt + 1, exc, wait)
            await asyncio.sleep(wait)
            attempt += 1
