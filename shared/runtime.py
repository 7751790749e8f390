"""The hop runtime: one service's connection to NATS, its consumer, and the one way to publish.

It owns what every service needs and no step cares about: the connection (built on
start, never at import), the durable pull consumer (shared/consumer.py), what becomes
of a message (ack after the handler returned, nak with a growing pause when the
infrastructure failed, term + dead letter for a message no delivery could fix), the hop
span, the hop metrics, and KV handles. Per-request bookkeeping (sessions, cache,
budgets, the Reply) lives in shared/bookkeeping.py; running one step in
shared/hops.py.

FastStream is not used here (docs/design.md says why): its per-message pipeline cost
more CPU than the hop itself, and what was left of it (lifecycle hooks, KV handles) is
a few lines of nats-py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext, suppress
from contextvars import ContextVar
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg
from nats.errors import BadSubjectError
from nats.js import JetStreamContext
from nats.js.api import PubAck, RawStreamMsg
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span, Tracer

from shared import attributes as A
from shared import metrics, subjects, telemetry
from shared.config import MeshConfig, load_config
from shared.consumer import PullConsumer
from shared.jetstream import LeanJetStream
from shared.live_config import ConfigStore
from shared.provision import provision
from shared.run import settle_memory
from shared.settings import Settings, nats_credentials, server_list
from shared.settings import settings as load_settings

log = logging.getLogger("baton.runtime")
_MESSAGE: ContextVar[Msg] = ContextVar("baton_message")
PARKED_FULL_DELAY_S = 2.0  # a message that found no room to wait in comes back after this

Hook = Callable[[], Awaitable[None]]
MessageHandler = Callable[[Msg], Awaitable[None]]


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


def current_message() -> Msg:
    """The JetStream message this task is handling (each message runs in its own task)."""
    return _MESSAGE.get()


def current_message_or_none() -> Msg | None:
    return _MESSAGE.get(None)


@dataclass(frozen=True)
class Channel:
    """A subject this service consumes or publishes, with the model on it: the AsyncAPI
    document (shared/contract.py) is built from these registrations, not written apart."""

    address: str
    payload: type
    title: str
    description: str
    sends: bool = False  # published by the service (a Reply, a chunk), not consumed


class HopRuntime:
    """Connection, consumer, publish, ack policy, spans and metrics of one service."""

    def __init__(self, service: str, config: Settings | None = None):
        self.service = service
        self.settings = config or load_settings()
        self.configs = ConfigStore(load_config(self.settings.config))
        self.tracer: Tracer = NoOpTracer()  # the real one from start(): importing a service sets nothing up
        self.nc: nats.NATS | None = None
        self.js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}
        self._handler: MessageHandler | None = None
        self._consumer: PullConsumer | None = None
        self._before_consuming: list[Hook] = []
        self._after_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._hop_static: tuple[object, dict[str, object]] | None = None
        self.channels: list[Channel] = []

    # -- lifecycle ----------------------------------------------------------------

    def before_consuming(self, hook: Hook) -> Hook:
        """Run on start, after connecting and before the first message is pulled (warm-ups)."""
        self._before_consuming.append(hook)
        return hook

    def after_start(self, hook: Hook) -> Hook:
        self._after_start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Run on stop, after the consumer finished its messages, before the connection drains."""
        self._on_stop.append(hook)
        return hook

    async def start(self) -> None:
        metrics.serve(self.service)
        self.tracer = telemetry.setup_tracing(self.service)
        if self.settings.provision:
            await self._provision()
        self.nc = await nats.connect(
            server_list(self.settings.nats_url),
            inbox_prefix=f"_INBOX.{self.service}".encode(),  # a service's users may subscribe only under their own inbox
            ping_interval=5,  # notice a dead server in seconds, not minutes
            max_reconnect_attempts=-1,
            error_cb=self._connection_error,
            **nats_credentials(self.settings),
        )
        self.js = LeanJetStream(self.nc)  # hops and KV writes: a leaner PubAck wait (shared/jetstream.py)
        await self.configs.attach(await self.kv(subjects.CONFIG_BUCKET))
        for hook in self._before_consuming:
            await hook()
        await self._start_consumer()  # after the config is followed: requests need it
        for hook in self._after_start:
            await hook()
        await settle_memory()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()  # before the connection drains: in-flight hops still publish
        for hook in self._on_stop:
            with suppress(Exception):
                await hook()
        await self.configs.detach()
        if self.nc is not None:
            with suppress(Exception):
                await self.nc.drain()
        telemetry.shutdown_tracing()

    async def run(self) -> None:
        """Start, serve until SIGINT or SIGTERM, stop gracefully."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        log.info("%s: started", self.service)
        try:
            await stopping.wait()
        finally:
            await self.stop()

    async def _connection_error(self, exc: Exception) -> None:
        log.warning("%s: NATS connection: %s: %s", self.service, type(exc).__name__, exc)

    async def _provision(self) -> None:
        nc = await nats.connect(server_list(self.settings.nats_url), **nats_credentials(self.settings))
        try:
            await provision(nc.jetstream(), self.settings)
        finally:
            await nc.close()

    @property
    def config(self) -> MeshConfig:
        """The active config: for decisions about new requests."""
        return self.configs.current

    async def kv(self, bucket: str) -> KeyValue:
        """A KV bucket the admin provisioned (never created here)."""
        handle = self._kv.get(bucket)
        if handle is None:
            assert self.js is not None, "the runtime is not started"
            handle = self._kv[bucket] = await self.js.key_value(bucket)
        return handle

    async def stored_message(self, seq: int) -> RawStreamMsg:
        """A message of the stream by its sequence (an exhausted hop, named by its advisory)."""
        assert self.js is not None, "the runtime is not started"
        return await self.js.get_msg(subjects.STREAM, seq)

    async def delete_stored_message(self, seq: int) -> None:
        assert self.js is not None, "the runtime is not started"
        await self.js.delete_msg(subjects.STREAM, seq)

    # -- the one publish API -------------------------------------------------------

    async def publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None, *, durable: bool = False, traced: bool = True) -> PubAck | None:
        """Publish with the current trace context in the headers.

        durable: into the stream, acknowledged (a hop: its Nats-Msg-Id de-duplicates a repeat);
        else core NATS (a Reply or a chunk to a client's inbox: not stored, not retried).
        traced=False: no trace context (a message about many requests, like the finished notes)."""
        assert self.nc is not None and self.js is not None, "the runtime is not started"
        headers = telemetry.inject(headers or {}) if traced else headers
        if durable:
            return await self.js.publish(subject, body, stream=subjects.STREAM, headers=headers)
        await self.nc.publish(subject, body, headers=headers)
        return None

    async def subscribe(self, subject: str, handler: MessageHandler, *, queue: str = "") -> None:
        """A core NATS subscription (advisories, Reply sightings); a failing handler is logged."""
        assert self.nc is not None, "the runtime is not started"

        async def guarded(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("%s: handler of %s failed", self.service, subject)

        await self.nc.subscribe(subject, queue=queue, cb=guarded)

    # -- the consumer and what becomes of each message -------------------------------

    def consume(self, handler: MessageHandler, channel: Channel) -> MessageHandler:
        """Register the handler of this service's durable consumer, and what it takes."""
        # One durable consumer per service: a second handler would take every other message.
        if self._handler is not None:
            raise RuntimeError(f"{self.service} already has a handler: {self._handler.__name__}")
        self._handler = handler
        self.channels.append(channel)
        return handler

    def sends(self, channel: Channel) -> None:
        """Declare a subject this service publishes to (for the contract)."""
        self.channels.append(Channel(channel.address, channel.payload, channel.title, channel.description, sends=True))

    async def _start_consumer(self) -> None:
        if self._handler is None:
            return
        assert self.nc is not None and self.js is not None
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
            self.settled(self._handler),
            max_workers=self.settings.max_workers,
            progress_every_s=max(0.2, self.settings.ack_wait_s / 3),
        )
        consumer = self._consumer
        # Read when scraped, not counted per message: the messages in hand are the consumer's.
        metrics.HOPS_IN_FLIGHT.labels(self.service).set_function(lambda: len(consumer.working))
        await self._consumer.start()

    def settled(self, handler: MessageHandler) -> MessageHandler:
        """Ack after the handler returned (its next hop is durably published by then).

        An exception here is the infrastructure failing (a publish during a NATS leader
        election, say), not the request: hand the message back for redelivery after a
        growing pause, so a short outage does not burn through max_deliver in a second."""
        acked = metrics.HOP_MESSAGES.labels(self.service, "acked")
        redelivered = metrics.HOP_MESSAGES.labels(self.service, "redelivered")
        terminated = metrics.HOP_MESSAGES.labels(self.service, "terminated")
        postponed = metrics.HOP_MESSAGES.labels(self.service, "postponed")

        async def handle(message: Msg) -> None:
            _MESSAGE.set(message)
            try:
                await handler(message)
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
            acked.inc()
            try:
                await message.ack()
            except Exception:  # a lost ack is a redelivery, which the next hop's message id absorbs
                pass

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
            bucket = await self.kv(subjects.DEAD_LETTERS_BUCKET)
            await bucket.put(key, json.dumps(record).encode())
        except Exception as exc:  # the metric and the log line still tell
            log.warning("%s: could not keep dead letter %s: %s", self.service, key, exc)

    @asynccontextmanager
    async def parked(self) -> AsyncIterator[None]:
        """While this handler waits for its turn (not for work), the message does not take
        one of this replica's workers: the consumer pulls on, past it. Too many waiting
        already: the message goes back to JetStream for a while instead."""
        message = current_message()
        consumer = self._consumer
        if consumer is None or not consumer.park(message):
            raise Later(PARKED_FULL_DELAY_S)
        try:
            yield
        finally:
            consumer.unpark(message)

    # -- spans -----------------------------------------------------------------

    def hop(self, name: str, env=None, **attributes: object):
        """The span of this hop, parented on the publisher's span from the headers.

        Messaging attributes name the JetStream record (`messaging.message.id` is its
        Nats-Msg-Id) and the durable consumer; the OpenInference kind follows the step."""
        if isinstance(self.tracer, NoOpTracer):
            return nullcontext(INVALID_SPAN)  # tracing off: not even the attributes are built
        message = current_message()
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
        cached = self._hop_static
        if cached is None or cached[0] is not url:
            static = telemetry.messaging_attributes("process", "", None, 0, getattr(url, "hostname", None))
            del static[A.MESSAGING_DESTINATION], static[A.MESSAGING_BODY_SIZE]
            static[A.MESSAGING_CONSUMER_GROUP] = subjects.durable(self.service)
            cached = self._hop_static = (url, static)
        return cached[1]

    def observe(self, span: Span, env, events, attributes: dict[str, object] | None = None) -> None:
        """Decisions taken in this hop (and its own `attributes`): onto its span in one call, and into the metrics."""
        telemetry.record_events(span, events, env, attributes)
        metrics.observe_events(env.route, events)
