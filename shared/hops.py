"""One hop of a request: check the envelope, run the step within its budget, pass the baton.

For each message: parse and check the envelope (shared/envelopes.py), check the
deadline, run the step inside min(its budget, the time left), then publish the next hop
(durably, de-duplicated by `Nats-Msg-Id`), or after the last step finish the request
(shared/bookkeeping.py), or hand a failed step to the fallback service. The runtime
acks the input only after that publish succeeded: a crash in between means redelivery,
and the next hop's message id makes the repeat harmless.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import PubAck
from pydantic import ValidationError

from shared import attributes as A
from shared import envelopes, metrics, subjects, telemetry
from shared.bookkeeping import RequestBook
from shared.runtime import HopRuntime, Terminate, current_message
from shared.schema import Envelope, Error, ErrorCode, StepRecord

log = logging.getLogger("baton.hops")

StepFn = Callable[[Envelope, StepRecord], Awaitable[None]]


class StepFailed(Exception):
    """A failure the fallback service should act on (not a crash of the service)."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False, details: list[dict] | None = None):
        super().__init__(message)
        self.error = Error(code=code, message=message, retryable=retryable, details=details or [])


class Hops:
    """Runs this service's step on each envelope at its cursor."""

    def __init__(self, runtime: HopRuntime, book: RequestBook):
        self.runtime = runtime
        self.book = book
        key = runtime.settings.envelope_key
        self.envelope_key = key.get_secret_value().encode() if key else None
        # The metrics of each hop, looked up once (a label lookup takes a lock and builds a tuple).
        self._step_seconds: dict[tuple[str, str], Any] = {}
        self._queued_seconds = metrics.QUEUED_SECONDS.labels(runtime.service)

    @property
    def service(self) -> str:
        return self.runtime.service

    def seal(self, env: Envelope) -> None:
        """The router's mark on a new envelope: the services believe only what it covers."""
        envelopes.seal(env, self.envelope_key)

    async def forward(self, env: Envelope) -> PubAck:
        """Publish the envelope to the service of the step at its cursor."""
        env.sent_at = time.time()
        msg_id = subjects.hop_msg_id(env.client, env.request_id, env.attempt, env.cursor)
        return await self._publish(env, subjects.step(env.current.service), msg_id)

    async def fail(self, env: Envelope, error: Error) -> None:
        """Hand the envelope to the fallback service."""
        env.error = error
        env.sent_at = time.time()
        await self._publish(env, subjects.FALLBACK, subjects.hop_msg_id(env.client, env.request_id, env.attempt, "fallback"))

    async def _publish(self, env: Envelope, subject: str, msg_id: str) -> PubAck:
        ack = await self.runtime.publish(subject, env.model_dump_json().encode(), {subjects.H_MSG_ID: msg_id, subjects.H_REQUEST_ID: env.request_id}, durable=True)
        assert ack is not None
        return ack

    def handler(self, step: StepFn) -> Callable[[Msg], Awaitable[None]]:
        """The message handler that runs `step` at the envelope's cursor (see the module doc)."""
        step = chaos_wrapped(step, self.service, self.runtime.settings.chaos_crash_on)

        async def handle(message: Msg) -> None:
            env = await self.parse_envelope(message.data)
            record = StepRecord(step=env.current.name, service=self.service, started_at=time.time(), duration_ms=0.0)
            record.queued_ms = round(max(0.0, record.started_at - env.sent_at) * 1000, 3)
            with self.runtime.hop(env.current.name, env, **{A.QUEUED_MS: record.queued_ms}) as span:
                events_before = len(env.events)
                try:
                    await self.run_within_budget(env, step, record)
                except StepFailed as failure:
                    self._close(record, "failed")
                    env.steps.append(record)
                    failure.error.step = env.current.name
                    telemetry.mark_failed(span, failure.error)
                    self.runtime.observe(span, env, env.events[events_before:], {A.STEP_OUTCOME: "failed"})
                    await self.fail(env, failure.error)
                    return
                self._close(record, "ok")
                env.steps.append(record)
                self.runtime.observe(span, env, env.events[events_before:], {A.STEP_OUTCOME: "ok"})
                env.cursor += 1
                if env.done:
                    await self.book.finish(env)
                else:
                    await self.forward(env)

        handle.__name__ = f"{self.service}_step"
        return handle

    async def parse_envelope(self, body: bytes) -> Envelope:
        """The envelope, checked (shared/envelopes.py); else the client is told, if it can
        be, and the message is terminated: no delivery of it could ever succeed."""
        try:
            env = Envelope.model_validate_json(body)
        except ValidationError as exc:
            headers = current_message().headers or {}
            request_id = headers.get(subjects.H_REQUEST_ID) or "unknown"
            reply_to = headers.get(subjects.H_REPLY_TO)
            error = Error(code=ErrorCode.INVALID_REQUEST, message=f"malformed envelope at {self.service}: {summary(exc)}")
            # Nothing in it can be believed: answered (deliver checks the address is an inbox), never stored.
            await self.book.reply_error(request_id, reply_to, error, store=False)
            raise Terminate("malformed", error.message, request_id) from None
        config = self.runtime.config
        refusal = envelopes.check(env, self.service, config.limits, self.envelope_key, custom=config.custom_steps)
        if refusal is not None:
            error = Error(code=ErrorCode.INVALID_REQUEST, message=f"refused at {self.service}: {refusal.message}")
            if refusal.answerable:
                await self.book.reply_error(env.request_id, env.reply_to, error, env.client, store=False)
            raise Terminate(refusal.reason, error.message, env.request_id, env.client)
        return env

    async def run_within_budget(self, env: Envelope, step: StepFn, record: StepRecord) -> None:
        """Run the step with at most the step's budget and never past the deadline."""
        remaining = env.remaining_s()
        if remaining <= 0:
            raise StepFailed(ErrorCode.DEADLINE_EXCEEDED, f"the request's deadline passed before {env.current.name} started")
        budget = env.current.budget_ms / 1000 if env.current.budget_ms else remaining
        limit = min(budget, remaining)
        try:
            async with asyncio.timeout(limit):
                await step(env, record)
        except TimeoutError:
            which = "step budget" if budget < remaining else "request deadline"
            raise StepFailed(ErrorCode.DEADLINE_EXCEEDED, f"{env.current.name} did not finish within its {which} ({limit * 1000:.0f} ms)", retryable=True) from None
        except StepFailed:
            raise
        except Exception as exc:  # a bug in a step must still end in a reply
            log.exception("%s: step %s crashed", self.service, env.current.name)
            raise StepFailed(ErrorCode.INTERNAL, f"{env.current.name} failed: {type(exc).__name__}: {exc}") from exc

    def _close(self, record: StepRecord, outcome: str) -> None:
        record.duration_ms = round((time.time() - record.started_at) * 1000, 3)
        record.outcome = outcome  # type: ignore[assignment]
        step_seconds = self._step_seconds.get((record.step, outcome))
        if step_seconds is None:
            step_seconds = self._step_seconds[record.step, outcome] = metrics.STEP_SECONDS.labels(self.service, record.step, outcome)
        step_seconds.observe(record.duration_ms / 1000)
        self._queued_seconds.observe(record.queued_ms / 1000)


def chaos_wrapped(step: StepFn, service: str, crash_on: str) -> StepFn:
    """BATON_CHAOS_CRASH_ON=<service>:<marker>: this process dies (exit 70) on a request whose
    question holds the marker (the chaos and dead-letter tests). Unset: `step` itself, no check per hop."""
    target, _, marker = crash_on.partition(":")
    if not marker or target != service:
        return step

    async def crashing(env: Envelope, record: StepRecord) -> None:
        if marker in env.context.question:
            log.error("chaos: crashing on request %s as BATON_CHAOS_CRASH_ON asks", env.request_id)
            os._exit(70)
        await step(env, record)

    return crashing


def summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{d['field']}: {d['problem']}" for d in validation_details(exc)[:5])
    return str(exc)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Each problem of a validation error as {field, problem}, for a structured Error."""
    return [
        {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"].removeprefix("Value error, ")}
        for e in exc.errors()[:10]
    ]
