"""Passing the baton: the one helper every service uses.

A service registers a step function with `step_handler`. For each message the helper
parses the envelope, checks the deadline, runs the step inside its budget while
telling JetStream the work is in progress, then either publishes the next hop
(durably, de-duplicated by `Nats-Msg-Id`) or, after the last step, stores the Reply
and sends it to the client's inbox. The input is acknowledged only after that
publish succeeded: a crash in between means redelivery, and the next hop's message
id makes the repeat harmless. A step that fails goes to the fallback service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext, suppress
from contextvars import ContextVar
from typing import Any

import nats
from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.errors import BadSubjectError
from nats.js.api import PubAck
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span
from pydantic import ValidationError

from shared import attributes as A
from shared import envelopes, metrics, subjects, telemetry
from shared.budgets import TenantLedger
from shared.cache import CACHE_KEY, store as cache_store
from shared.config import MeshConfig, load_config
from shared.consumer import PullConsumer
from shared.live_config import ConfigStore
from shared.provision import provision
from shared.replies import answer_reply, error_reply
from shared.run import settle_memory
from shared.schema import ChatMessage, Envelope, Error, ErrorCode, Event, Reply, StepRecord
from shared.sessions import SessionStore
from shared.settings import Settings, broker_security, nats_credentials, server_list, settings as load_settings

log = logging.getLogger("baton.mesh")
_MESSAGE: ContextVar[Msg] = ContextVar("baton_message")
PARKED_FULL_DELAY_S = 2.0  # a message that found no room to wait in comes back after this


class Terminate(Exception):
    """A message that cannot succeed however often it is delivered: end it now.

    The consumer terminates it (no redelivery), keeps it as a dead letter and counts it;
    whoever raises this has already answered the client, when the client can be answered."""

    def __init__(self, reason: str, message: str, request_id: str | None = None, client: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id
        self.client = client


class Later(Exception):
    """Not now: hand the message back to JetStream, to be delivered again after `delay_s`."""

    def __init__(self, delay_s: float):
        super().__init__(f"later, in {delay_s:.2f}s")
        self.delay_s = delay_s


class StepFailed(Exception):
    """A failure the fallback service should act on (not a crash of the service)."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False, details: list[dict] | None = None):
        super().__init__(message)
        self.error = Error(code=code, message=message, retryable=retryable, details=details or [])


StepFn = Callable[[Envelope, StepRecord], Awaitable[None]]


async def decode_raw(msg: NatsMessage) -> bytes:
    # The services validate bodies themselves, so a malformed message gets a
    # structured error reply instead of a framework exception. Async on purpose:
    # FastStream runs a plain function in a worker thread, for every message.
    return msg.body


class Mesh:
    """One service's connection to the mesh: publish hops, replies and failures."""

    def __init__(self, service: str, config: Settings | None = None):
        self.service = service
        self.settings = config or load_settings()
        self.configs = ConfigStore(load_config(self.settings.config))
        self.broker = NatsBroker(
            server_list(self.settings.nats_url),
            inbox_prefix=f"_INBOX.{service}",  # a service's users may subscribe only under their own inbox
            ping_interval=5,  # notice a dead server in seconds, not minutes
            max_reconnect_attempts=-1,
            log_level=logging.DEBUG,  # per-message "Received/Processed" lines only when debugging
            logger=logging.getLogger(f"baton.{service}"),
            security=broker_security(self.settings),
            middlewares=metrics.broker_middlewares(service),
        )
        self.app = FastStream(self.broker, logger=logging.getLogger(f"baton.{service}"))
        self.app.on_startup(self._provision)
        self.app.after_startup(self._follow_config)
        self.tracer = telemetry.setup_tracing(service)
        self.app.after_shutdown(telemetry.shutdown_tracing)
        metrics.serve(service)
        self._sessions: SessionStore | None = None
        key = self.settings.envelope_key
        self._envelope_key = key.get_secret_value().encode() if key else None
        self._handler: Callable[[bytes], Awaitable[None]] | None = None
        self._consumer: PullConsumer | None = None
        self.app.after_startup(self._start_consumer)  # after the config is followed: requests need it
        self.app.after_startup(settle_memory)
        self.app.on_shutdown(self._stop_consumer)  # before the connection drains: in-flight hops still publish
        self.app.on_shutdown(self.configs.detach)

    async def _provision(self) -> None:
        if not self.settings.provision:
            return  # deployed with least privilege: an admin provisioned the stream
        nc = await nats.connect(server_list(self.settings.nats_url), **nats_credentials(self.settings))
        try:
            await provision(nc.jetstream(), self.settings)
        finally:
            await nc.close()

    async def _follow_config(self) -> None:
        await self.configs.attach(await self.broker.key_value(subjects.CONFIG_BUCKET, declare=False))

    @property
    def config(self) -> MeshConfig:
        """The active config: for decisions about new requests."""
        return self.configs.current

    async def config_for(self, env: Envelope) -> MeshConfig:
        """The config a request started with: every hop of it runs on one version."""
        return await self.configs.get(env.config_version)

    def subscriber(self) -> Callable:
        """Register the handler of this service's durable consumer, with redelivery that backs off."""

        def register(handler: Callable[[bytes], Awaitable[None]]) -> Callable[[bytes], Awaitable[None]]:
            # One durable consumer per service: a second handler would take every other message.
            if self._handler is not None:
                raise RuntimeError(f"{self.service} already has a handler: {self._handler.__name__}")
            self._handler = handler
            return handler

        return register

    @property
    def nc(self) -> nats.NATS:
        return self.broker.config.connection_state.connection

    @property
    def js(self) -> JetStreamContext:
        return self.broker.config.connection_state.stream

    async def _start_consumer(self) -> None:
        if self._handler is None:
            return
        durable = subjects.durable(self.service)
        try:
            await self.js.consumer_info(subjects.STREAM, durable)
        except NotFoundError:
            raise RuntimeError(
                f"{self.service}: the durable consumer {durable} does not exist on stream {subjects.STREAM}; "
                "start once with BATON_PROVISION=1 or provision it as an admin (deploy/README.md)"
            ) from None
        self._consumer = PullConsumer(
            self.nc,
            subjects.STREAM,
            durable,
            self._acked(self._handler),
            max_workers=self.settings.max_workers,
            progress_every_s=max(0.2, self.settings.ack_wait_s / 3),
        )
        await self._consumer.start()

    async def _stop_consumer(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    def _acked(self, handler: Callable[[bytes], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        """Ack after the handler returned (its next hop is durably published by then).

        An exception here is the infrastructure failing (a publish during a NATS leader
        election, say), not the request: hand the message back for redelivery after a
        growing pause, so a short outage does not burn through max_deliver in a second."""
        acked = metrics.HOP_MESSAGES.labels(self.service, "acked")
        redelivered = metrics.HOP_MESSAGES.labels(self.service, "redelivered")
        terminated = metrics.HOP_MESSAGES.labels(self.service, "terminated")
        postponed = metrics.HOP_MESSAGES.labels(self.service, "postponed")
        in_flight = metrics.HOPS_IN_FLIGHT.labels(self.service)

        async def handle(message: Msg) -> None:
            _MESSAGE.set(message)  # each message runs in its own task: its own context
            in_flight.inc()
            try:
                await handler(message.data)
            except Later as later:
                postponed.inc()
                with suppress(Exception):
                    await message.nak(delay=later.delay_s)
                return
            except (Terminate, BadSubjectError) as exc:
                # Redelivery would fail the same way, again and again: a poison message.
                stop = exc if isinstance(exc, Terminate) else Terminate("bad_subject", str(exc) or "a subject that is not a literal")
                log.warning("%s: terminated a message (%s): %s", self.service, stop.reason, stop)
                terminated.inc()
                metrics.POISON_MESSAGES.labels(self.service, stop.reason).inc()
                with suppress(Exception):
                    await message.term()
                await self._dead_letter(message, stop)
                return
            except Exception as exc:
                delivered = message.metadata.num_delivered or 1
                delay = min(self.settings.ack_wait_s, 0.25 * 2 ** (delivered - 1))
                log.warning("%s: delivery %d failed (%s: %s); redelivering in %.2fs", self.service, delivered, type(exc).__name__, exc, delay)
                redelivered.inc()
                with suppress(Exception):
                    await message.nak(delay=delay)
                return
            finally:
                in_flight.dec()
            acked.inc()
            with suppress(Exception):  # a lost ack is a redelivery, which the next hop's message id absorbs
                await message.ack()

        return handle

    async def _dead_letter(self, message: Msg, stop: Terminate) -> None:
        """Keep a terminated message for inspection (`baton_dead_letters`)."""
        headers = dict(message.headers or {})
        request_id = stop.request_id or headers.get(subjects.H_REQUEST_ID) or ""
        client = stop.client or (subjects.client_of(message.subject) if self.service == "router" else None)
        seq = message.metadata.sequence.stream if message.reply else 0
        # A key the poisoner cannot aim at someone else's record: the sequence is the stream's.
        key = f"poison.{self.service}.{seq}"
        record = {
            "request_id": request_id[:200],
            "client": client,
            "consumer": self.service,
            "reason": stop.reason,
            "error": str(stop),
            "deliveries": message.metadata.num_delivered if message.reply else 1,
            "stream_seq": seq,
            "subject": message.subject,
            "headers": {k: v[:500] for k, v in headers.items()},
            "body": message.data[:4096].decode(errors="replace"),
            "at": time.time(),
        }
        try:
            bucket = await self.broker.key_value(subjects.DEAD_LETTERS_BUCKET, declare=False)
            await bucket.put(key, json.dumps(record).encode())
        except Exception as exc:  # the metric and the log line still tell
            log.warning("%s: could not keep dead letter %s: %s", self.service, key, exc)

    @asynccontextmanager
    async def parked(self) -> AsyncIterator[None]:
        """While this handler waits for its turn (not for work), the message does not take
        one of this replica's workers: the consumer pulls on, past it. Too many waiting
        already: the message goes back to JetStream for a while instead."""
        message = self.current_message()
        if self._consumer is None or not self._consumer.park(message):
            raise Later(PARKED_FULL_DELAY_S)
        try:
            yield
        finally:
            self._consumer.unpark(message)

    def current_message(self) -> Msg:
        """The JetStream message this task is handling."""
        return _MESSAGE.get()

    # -- publishing ------------------------------------------------------------

    async def forward(self, env: Envelope) -> PubAck:
        """Publish the envelope to the service of the step at its cursor."""
        env.sent_at = time.time()
        subject = subjects.step(env.current.service)
        return await self._publish_durable(env, subject, subjects.hop_msg_id(env.client, env.request_id, env.attempt, env.cursor))

    def seal(self, env: Envelope) -> None:
        """The router's mark on a new envelope: the services believe only what it covers."""
        envelopes.seal(env, self._envelope_key)

    async def fail(self, env: Envelope, error: Error) -> None:
        """Hand the envelope to the fallback service."""
        env.error = error
        env.sent_at = time.time()
        await self._publish_durable(env, subjects.FALLBACK, subjects.hop_msg_id(env.client, env.request_id, env.attempt, "fallback"))

    async def _publish_durable(self, env: Envelope, subject: str, msg_id: str) -> PubAck:
        # nats-py directly, not broker.publish: the framework's publish pipeline cost
        # more CPU per hop than the publish itself.
        return await self.js.publish(
            subject,
            env.model_dump_json().encode(),
            stream=subjects.STREAM,
            headers=telemetry.inject({subjects.H_MSG_ID: msg_id, subjects.H_REQUEST_ID: env.request_id}),
        )

    async def finish(self, env: Envelope) -> Reply:
        span = trace.get_current_span()
        trace_id = telemetry.trace_id_of(span)
        if env.error is None and env.remaining_s() < 0:
            # The client stops waiting at its deadline: an answer after it is not an answer.
            env.error = Error(code=ErrorCode.DEADLINE_EXCEEDED, message=f"the answer was ready {-env.remaining_s() * 1000:.0f} ms after the request's deadline", step=env.steps[-1].step if env.steps else None)
        reply = answer_reply(env, trace_id) if env.error is None else error_reply(env.request_id, env.error, env, trace_id)
        telemetry.record_reply(span, reply)
        metrics.observe_reply(reply)
        if reply.ok and env.request.session_id:
            await self.remember_turn(env, reply)
        await self.account(env, reply)
        await self.deliver(reply, env.reply_to, env.client)
        return reply

    async def account(self, env: Envelope, reply: Reply) -> None:
        """After an answer: fill the cache, add the cost to the tenant's day."""
        try:
            config = await self.config_for(env)
            key = env.context.outputs.get(CACHE_KEY)
            if key and reply.ok and not reply.degraded:
                bucket = await self.broker.key_value(subjects.CACHE_BUCKET, declare=False)
                await cache_store(bucket, key, reply, config.routes[env.route].cache.ttl_s, env.context.question)
            tenant = env.request.metadata.get("tenant")
            if tenant in config.tenants and reply.cost_usd > 0:
                ledger = TenantLedger(await self.broker.key_value(subjects.BUDGETS_BUCKET, declare=False))
                await ledger.add(tenant, reply.cost_usd)
        except Exception:  # bookkeeping must not cost the user the answer
            log.exception("request %s: cache or budget bookkeeping failed", env.request_id)

    async def sessions(self) -> SessionStore:
        if self._sessions is None:
            kv = await self.broker.key_value(subjects.SESSIONS_BUCKET, declare=False)
            spec = self.config.sessions
            self._sessions = SessionStore(kv, spec.max_turns, spec.max_chars)
        return self._sessions

    async def remember_turn(self, env: Envelope, reply: Reply) -> None:
        """Append the turn to the session; the question as the gates left it (redacted)."""
        try:
            store = await self.sessions()
            await store.append(env.request.session_id, ChatMessage(role="user", content=env.context.question), ChatMessage(role="assistant", content=reply.answer or ""))
        except Exception:  # a lost turn must not cost the user the answer
            log.exception("request %s: could not record the session turn", env.request_id)

    async def deliver(self, reply: Reply, reply_to: str | None, client: str | None = None, *, store: bool = True) -> None:
        """Store the Reply under `<client>.<request id>`, then send it to the client's inbox.

        The store is a create: only the first finisher wins. A later finisher finds the
        stored Reply: on a first delivery (a repeated request id, or a second finisher)
        it sends the stored one, so the client sees the same answer again and never a
        different one; on a redelivered last hop it sends nothing, since the first
        delivery sent it already. A reply address that is not exactly the client's inbox
        for this request is never written to (the router refuses such requests).
        """
        body = reply.model_dump_json().encode()
        client = client or subjects.client_of_inbox(reply_to) or subjects.ANONYMOUS
        if reply_to is not None and reply_to != subjects.reply_address(client, reply.request_id):
            log.warning("%s: not sending request %r's reply to %r: not the client's inbox", self.service, reply.request_id[:130], reply_to[:200])
            reply_to = None
        if store and subjects.valid_request_id(reply.request_id) and subjects.valid_client_id(client):  # a hostile id is answered, not stored
            key = subjects.result_key(client, reply.request_id)
            results = await self.broker.key_value(subjects.RESULTS_BUCKET, declare=False)
            try:
                await results.create(key, body)
            except KeyWrongLastSequenceError:
                message = _MESSAGE.get(None)
                if message is not None and message.reply and message.metadata.num_delivered > 1:
                    return  # a redelivered last hop: its first delivery sent the Reply
                with suppress(NotFoundError):
                    body = (await results.get(key)).value or body
        if reply_to:
            await self.nc.publish(reply_to, body, headers=telemetry.inject({subjects.H_REQUEST_ID: reply.request_id}))

    async def resend_stored(self, client: str, request_id: str, reply_to: str | None) -> bool:
        """Send the Reply stored for this request again (a repeated request id); False if none is stored yet."""
        results = await self.broker.key_value(subjects.RESULTS_BUCKET, declare=False)
        try:
            body = (await results.get(subjects.result_key(client, request_id))).value
        except NotFoundError:
            return False
        if body and reply_to:
            await self.nc.publish(reply_to, body, headers=telemetry.inject({subjects.H_REQUEST_ID: request_id}))
        return bool(body)

    async def reply_error(self, request_id: str, reply_to: str | None, error: Error, client: str | None = None, *, store: bool = True) -> None:
        span = trace.get_current_span()
        reply = error_reply(request_id, error, trace_id=telemetry.trace_id_of(span))
        telemetry.record_reply(span, reply)
        metrics.observe_reply(reply)
        await self.deliver(reply, reply_to, client, store=store)

    # -- tracing -----------------------------------------------------------------

    def hop(self, name: str, env: Envelope | None = None, **attributes: object):
        """The span of this hop, parented on the publisher's span from the headers.

        Messaging attributes name the JetStream record (`messaging.message.id` is its
        Nats-Msg-Id) and the durable consumer; the OpenInference kind follows the step."""
        if isinstance(self.tracer, NoOpTracer):
            return nullcontext(INVALID_SPAN)  # tracing off: not even the attributes are built
        message = self.current_message()
        headers = message.headers or {}
        base = {**self._hop_attributes(), A.MESSAGING_DESTINATION: message.subject, A.MESSAGING_BODY_SIZE: len(message.data), A.OI_KIND: telemetry.step_kind(name), A.STEP: name}
        message_id = headers.get(subjects.H_MSG_ID)
        if message_id:
            base[A.MESSAGING_MESSAGE_ID] = message_id
        if env is not None:
            base.update(telemetry.envelope_attributes(env))
        return telemetry.hop_span(self.tracer, name, headers, message.subject, {**base, **attributes} if attributes else base)

    def _hop_attributes(self) -> dict[str, object]:
        """What every hop span of this service shares, built once per server connection."""
        url = self.nc.connected_url if self.nc is not None else None
        cached = getattr(self, "_hop_static", None)
        if cached is None or cached[0] is not url:
            static = telemetry.messaging_attributes("process", "", None, 0, getattr(url, "hostname", None))
            del static[A.MESSAGING_DESTINATION], static[A.MESSAGING_BODY_SIZE]
            static[A.MESSAGING_CONSUMER_GROUP] = subjects.durable(self.service)
            cached = self._hop_static = (url, static)
        return cached[1]

    def observe(self, span: Span, env: Envelope, events: list[Event]) -> None:
        """Decisions taken in this hop: onto its span and into the metrics."""
        telemetry.record_events(span, events, env)
        metrics.observe_events(env.route, events)

    # -- the hop ---------------------------------------------------------------

    def step_handler(self, step: StepFn) -> Callable[[bytes], Awaitable[None]]:
        """Register `step` as this service's handler for steps at the envelope's cursor."""

        async def handle(body: bytes) -> None:
            env = await self.parse_envelope(body)
            record = StepRecord(step=env.current.name, service=self.service, started_at=time.time(), duration_ms=0.0)
            record.queued_ms = round(max(0.0, record.started_at - env.sent_at) * 1000, 3)
            with self.hop(env.current.name, env, **{A.QUEUED_MS: record.queued_ms}) as span:
                events_before = len(env.events)
                try:
                    await self.run_within_budget(env, step, record)
                except StepFailed as failure:
                    self._close(record, "failed", span)
                    env.steps.append(record)
                    failure.error.step = env.current.name
                    telemetry.mark_failed(span, failure.error)
                    self.observe(span, env, env.events[events_before:])
                    await self.fail(env, failure.error)
                    return
                self._close(record, "ok", span)
                env.steps.append(record)
                self.observe(span, env, env.events[events_before:])
                env.cursor += 1
                if env.done:
                    await self.finish(env)
                else:
                    await self.forward(env)

        handle.__name__ = f"{self.service}_step"
        self.subscriber()(handle)
        return handle

    async def parse_envelope(self, body: bytes, *, at_step: bool = True) -> Envelope:
        """The envelope, checked (shared/envelopes.py); else the client is told, if it can
        be, and the message is terminated: no delivery of it could ever succeed."""
        try:
            env = Envelope.model_validate_json(body)
        except ValidationError as exc:
            headers = self.current_message().headers or {}
            request_id = headers.get(subjects.H_REQUEST_ID) or "unknown"
            reply_to = headers.get(subjects.H_REPLY_TO)
            error = Error(code=ErrorCode.INVALID_REQUEST, message=f"malformed envelope at {self.service}: {_summary(exc)}")
            # Nothing in it can be believed: answered (deliver checks the address is an inbox), never stored.
            await self.reply_error(request_id, reply_to, error, store=False)
            raise Terminate("malformed", error.message, request_id) from None
        refusal = envelopes.check(env, self.service, self.config.limits, self._envelope_key)
        if refusal is not None:
            error = Error(code=ErrorCode.INVALID_REQUEST, message=f"refused at {self.service}: {refusal.message}")
            if refusal.answerable:
                await self.reply_error(env.request_id, env.reply_to, error, env.client, store=False)
            raise Terminate(refusal.reason, error.message, env.request_id, env.client)
        return env

    async def run_within_budget(self, env: Envelope, step: StepFn, record: StepRecord) -> None:
        """Run the step with at most the step's budget and never past the deadline."""
        self._maybe_crash(env)
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

    def _maybe_crash(self, env: Envelope) -> None:
        service, _, marker = self.settings.chaos_crash_on.partition(":")
        if marker and service == self.service and marker in env.context.question:
            log.error("chaos: crashing on request %s as BATON_CHAOS_CRASH_ON asks", env.request_id)
            os._exit(70)

    def _close(self, record: StepRecord, outcome: str, span: Span) -> None:
        record.duration_ms = round((time.time() - record.started_at) * 1000, 3)
        record.outcome = outcome  # type: ignore[assignment]
        span.set_attribute(A.STEP_OUTCOME, outcome)
        metrics.STEP_SECONDS.labels(self.service, record.step, outcome).observe(record.duration_ms / 1000)
        metrics.QUEUED_SECONDS.labels(self.service).observe(record.queued_ms / 1000)


def _summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{d['field']}: {d['problem']}" for d in validation_details(exc)[:5])
    return str(exc)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Each problem of a validation error as {field, problem}, for a structured Error."""
    return [
        {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"].removeprefix("Value error, ")}
        for e in exc.errors()[:10]
    ]
