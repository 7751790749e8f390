"""Cost budgets: per request (route and client limits) and per tenant per day.

A model call whose estimated cost would overspend is not made: the generator takes the
next (cheaper) allowed model, or refuses with `budget_exceeded`. Tenant spend is kept
per UTC day in a KV bucket, added with compare-and-set by the hop that finishes.
"""

from __future__ import annotations

import asyncio
import random
import time

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.config import MeshConfig, ModelSpec
from shared.schema import Envelope

PROMPT_OVERHEAD_TOKENS = 60  # system prompt and message framing


def estimate_cost(spec: ModelSpec, input_tokens: int) -> float:
    """The most a call can cost: its input plus a full-length answer."""
    return (input_tokens + PROMPT_OVERHEAD_TOKENS) * spec.price_in_per_mtok / 1e6 + spec.max_output_tokens * spec.price_out_per_mtok / 1e6


def request_budget_left(env: Envelope, config: MeshConfig) -> float | None:
    """What this request may still spend, or None when nothing limits it."""
    limits = [limit for limit in (config.routes[env.route].cost_budget_usd, env.request.max_cost_usd) if limit is not None]
    return None if not limits else max(0.0, min(limits) - env.cost_usd)


def day_key(tenant: str, now: float | None = None) -> str:
    return f"{tenant}.{time.strftime('%Y%m%d', time.gmtime(now or time.time()))}"


class TenantLedger:
    def __init__(self, kv: KeyValue):
        self.kv = kv

    async def spent_today(self, tenant: str) -> float:
        value, _ = await self._read(day_key(tenant))
        return value

    async def add(self, tenant: str, usd: float) -> float:
        key = day_key(tenant)
        for _ in range(20):
            value, revision = await self._read(key)
            body = repr(round(value + usd, 10)).encode()
            try:
                if revision is None:
                    await self.kv.create(key, body)
                else:
                    await self.kv.update(key, body, last=revision)
                return value + usd
            except KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.005))
        raise RuntimeError(f"tenant {tenant}: too much contention to record spend")

    async def _read(self, key: str) -> tuple[float, int | None]:
        try:
            entry = await self.kv.get(key)
        except NotFoundError:
            return 0.0, None
        return (float(entry.value) if entry.value else 0.0), entry.revision
