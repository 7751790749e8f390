"""Circuit breakers per model, shared by every replica through a JetStream KV bucket.

closed --(failures >= threshold)--> open --(cool-down passed)--> half_open (one probe)
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open again.

An open breaker makes the generator skip the model at once instead of waiting for
its timeout. Each replica keeps a local copy of every breaker, fed by a watch on the
bucket, so checking a breaker costs no round trip; changes are compare-and-set, so
two replicas cannot both take the half-open probe.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.watching import Follower

log = logging.getLogger("baton.breakers")

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Breaker:
    state: State = "closed"
    failures: int = 0  # consecutive failures while closed
    opened_at: float = 0.0
    probe_started: float = 0.0

    def allows(self, now: float, cooldown_s: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            return now - self.opened_at >= cooldown_s  # time for a probe
        return now - self.probe_started >= cooldown_s  # a probe that never reported is abandoned

    def after_success(self) -> Breaker:
        return Breaker()

    def after_failure(self, now: float, threshold: int) -> Breaker:
        if self.state == "half_open":
            return Breaker(state="open", failures=self.failures + 1, opened_at=now)
        failures = self.failures + 1
        if failures >= threshold:
            return Breaker(state="open", failures=failures, opened_at=now)
        return replace(self, failures=failures)

    def probing(self, now: float) -> Breaker:
        return replace(self, state="half_open", probe_started=now)


class Breakers:
    """The breakers of every model, as this replica last saw them."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 30.0):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._seen: dict[str, tuple[Breaker, int | None]] = {}  # model -> (breaker, KV revision)
        self._kv: KeyValue | None = None
        self._follower = Follower("breakers")

    async def attach(self, kv: KeyValue) -> None:
        self._kv = kv
        await self._follower.start(kv, ">", self._entry)

    async def detach(self) -> None:
        await self._follower.stop()

    def _entry(self, entry: KeyValue.Entry) -> None:
        if entry.value:
            self._seen[entry.key] = (Breaker(**json.loads(entry.value)), entry.revision)
        else:
            self._seen.pop(entry.key, None)

    def state(self, model: str) -> Breaker:
        return self._seen.get(model, (Breaker(), None))[0]

    def snapshot(self) -> dict[str, Breaker]:
        return {model: breaker for model, (breaker, _) in self._seen.items()}

    async def acquire(self, model: str, now: float | None = None) -> bool:
        """May this call go to `model`? Taking the half-open probe is a race only one replica wins."""
        now = time.time() if now is None else now
        breaker = self.state(model)
        if not breaker.allows(now, self.cooldown_s):
            return False
        if breaker.state == "closed":
            return True
        return await self._write(model, lambda current: current.probing(now) if current.allows(now, self.cooldown_s) and current.state != "closed" else None)

    async def record(self, model: str, ok: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if ok and self.state(model) == Breaker():
            return  # the common case: healthy and still healthy, nothing to write
        await self._write(model, lambda current: current.after_success() if ok else current.after_failure(now, self.threshold))

    async def _write(self, model: str, change) -> bool:
        """Compare-and-set `change(current)`; False when change declines (returns None)."""
        for _ in range(10):
            current, revision = await self._read(model)
            updated = change(current)
            if updated is None:
                return False
            if updated == current:
                return True
            if self._kv is None:
                self._seen[model] = (updated, None)
                return True
            body = json.dumps(asdict(updated)).encode()
            try:
                if revision is None:
                    revision = await self._kv.create(model, body)
                else:
                    revision = await self._kv.update(model, body, last=revision)
            except KeyWrongLastSequenceError:
                continue
            self._seen[model] = (updated, revision)
            if updated.state != current.state:
                log.warning("breaker %s: %s -> %s", model, current.state, updated.state)
            return True
        return False

    async def _read(self, model: str) -> tuple[Breaker, int | None]:
        if self._kv is None:
            return self._seen.get(model, (Breaker(), None))
        try:
            entry = await self._kv.get(model)
        except NotFoundError:
            return Breaker(), None
        return (Breaker(**json.loads(entry.value)) if entry.value else Breaker()), entry.revision
