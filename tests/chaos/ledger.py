"""Load with a ledger: every accepted request must get exactly one reply."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from baton.client import BatonClient, BatonError, NotAccepted

QUESTIONS = [
    "How do I fix a puncture?",
    "What tyre pressure should I run on 40 mm gravel tyres?",
    "hi there!",
    "How many days do I have to return a bike?",
    "How often should I lube my chain?",
]


@dataclass
class Ledger:
    sent: int = 0
    accepted: int = 0
    refused: int = 0  # not accepted: an explicit error at publish time
    answered: int = 0
    errors: int = 0  # accepted and ended with an error reply
    lost: int = 0  # accepted, no reply and nothing stored
    duplicates: int = 0  # a second, different reply to one request
    redundant: int = 0  # the same reply delivered again (a redelivered last hop), de-duplicated
    late_ok: int = 0  # ok Replies that arrived after the route's latency budget (the deadline)
    latencies_ms: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    error_codes: Counter = field(default_factory=Counter)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")

    def line(self, name: str) -> str:
        return (
            f"{name}: sent={self.sent} accepted={self.accepted} answered={self.answered} errors={self.errors} "
            f"refused={self.refused} lost={self.lost} duplicates={self.duplicates} redundant={self.redundant} late_ok={self.late_ok} "
            f"p50={self.percentile(50):.1f}ms p99={self.percentile(99):.1f}ms"
            + (f" codes={dict(self.error_codes)}" if self.error_codes else "")
        )


async def run_load(url: str, requests: int, concurrency: int, duration_s: float = 0.0, timeout_s: float = 40.0, budgets_ms: dict[str, int] | None = None, client_id: str | None = None, id_prefix: str | None = None) -> Ledger:
    """`requests` asks from `concurrency` workers, paced to last about `duration_s` (steady load).
    With `budgets_ms` (route -> latency budget), an ok Reply later than its route's budget counts as late."""
    ledger = Ledger()
    bodies: dict[str, set[bytes]] = {}
    async with BatonClient(url, timeout_s=timeout_s, client_id=client_id) as client:

        async def watch(msg) -> None:  # a second view of the inbox: every delivery, not just the first
            bodies.setdefault(msg.subject.rsplit(".", 1)[-1], set()).add(msg.data)
            arrivals[msg.subject] += 1

        arrivals: Counter = Counter()
        await client.nc.subscribe(f"{client.inbox_prefix}.reply.>", cb=watch)
        queue = iter(range(requests))
        start = time.monotonic()
        spacing = duration_s / requests if duration_s else 0.0

        async def worker() -> None:
            for i in queue:
                if spacing:
                    await asyncio.sleep(max(0.0, start + i * spacing - time.monotonic()))
                ledger.sent += 1
                started = time.monotonic()
                try:
                    request_id = f"{id_prefix}{i}" if id_prefix else None
                    reply = await client.ask(QUESTIONS[i % len(QUESTIONS)], cache=False, request_id=request_id)  # every request walks the mesh
                    ledger.answers.append(reply.answer or "")
                except NotAccepted:
                    ledger.refused += 1
                    continue
                except BatonError:
                    ledger.accepted += 1
                    ledger.lost += 1
                    continue
                ledger.accepted += 1
                elapsed_ms = (time.monotonic() - started) * 1000
                ledger.latencies_ms.append(elapsed_ms)
                if reply.ok:
                    ledger.answered += 1
                    if budgets_ms and elapsed_ms > budgets_ms.get(reply.route or "", float("inf")):
                        ledger.late_ok += 1
                else:
                    ledger.errors += 1
                    ledger.error_codes[reply.error.code.value] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(1.0)  # late deliveries of redelivered last hops
    ledger.duplicates = sum(1 for seen in bodies.values() if len(seen) > 1)
    ledger.redundant = sum(arrivals.values()) - len(arrivals)
    return ledger


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
