"""A service's place in the mesh: the three parts every service is built from, together.

- shared/runtime.py  HopRuntime: connection, consumer, the one publish, ack/nak/term, spans, metrics;
- shared/hops.py     Hops: one hop of a request (check, run the step within its budget, pass the baton);
- shared/bookkeeping.py RequestBook: the Reply, sessions, cache and budgets, once per request.

Building a Mesh starts nothing: no connection, no tracing, no metrics server until
`run()` (or `start()`), so a service's app.py imports without side effects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from nats.aio.msg import Msg
from nats.js.api import PubAck, RawStreamMsg
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, Tracer

from shared import subjects
from shared.bookkeeping import RequestBook
from shared.config import MeshConfig
from shared.hops import Hops, StepFailed, StepFn, validation_details
from shared.runtime import (
    Channel,
    HopRuntime,
    Later,
    MessageHandler,
    Terminate,
    current_message,
)
from shared.schema import Envelope, Error, Event, Reply
from shared.sessions import SessionStore
from shared.settings import Settings

__all__ = ["Channel", "Later", "Mesh", "StepFailed", "StepFn", "Terminate", "validation_details"]


class Mesh:
    """One service: its runtime, its hops and its requests' bookkeeping."""

    def __init__(self, service: str, config: Settings | None = None):
        self.runtime = HopRuntime(service, config)
        self.requests = RequestBook(self.runtime)
        self.hops = Hops(self.runtime, self.requests)
        self.service = service
        self.settings = self.runtime.settings
        self.configs = self.runtime.configs

    # -- lifecycle (the runtime's) -------------------------------------------------------

    async def run(self) -> None:
        await self.runtime.run()

    async def start(self) -> None:
        await self.runtime.start()

    async def stop(self) -> None:
        await self.runtime.stop()

    def before_consuming(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        return self.runtime.before_consuming(hook)

    def after_start(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        return self.runtime.after_start(hook)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        return self.runtime.on_stop(hook)

    # -- registration -----------------------------------------------------------------

    def step_handler(self, step: StepFn) -> StepFn:
        """Register `step` as this service's step: it runs on each envelope at its cursor.

        The step's docstring describes its channel in the AsyncAPI document."""
        what = (step.__doc__ or f"Run {step.__name__} at the envelope's cursor.").strip().split("\n\n")[0]
        channel = Channel(subjects.step(self.service), Envelope, f"step.{self.service}", " ".join(what.split()))
        self.runtime.consume(self.hops.handler(step), channel)
        return step

    def consume(self, channel: Channel) -> Callable[[MessageHandler], MessageHandler]:
        """Register a handler of raw consumer messages (the router, the fallback)."""

        def register(handler: MessageHandler) -> MessageHandler:
            return self.runtime.consume(handler, channel)

        return register

    # -- config, transport ------------------------------------------------------------

    @property
    def config(self) -> MeshConfig:
        """The active config: for decisions about new requests."""
        return self.runtime.config

    async def config_for(self, env: Envelope) -> MeshConfig:
        """The config a request started with: every hop of it runs on one version."""
        return await self.configs.get(env.config_version)

    @property
    def tracer(self) -> Tracer:
        return self.runtime.tracer

    async def kv(self, bucket: str) -> KeyValue:
        return await self.runtime.kv(bucket)

    async def publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None, *, durable: bool = False) -> PubAck | None:
        return await self.runtime.publish(subject, body, headers, durable=durable)

    async def subscribe(self, subject: str, handler: MessageHandler, *, queue: str = "") -> None:
        await self.runtime.subscribe(subject, handler, queue=queue)

    async def stored_message(self, seq: int) -> RawStreamMsg:
        return await self.runtime.stored_message(seq)

    async def delete_stored_message(self, seq: int) -> None:
        await self.runtime.delete_stored_message(seq)

    def parked(self) -> AbstractAsyncContextManager[None]:
        return self.runtime.parked()

    def current_message(self) -> Msg:
        return current_message()

    def hop(self, name: str, env: Envelope | None = None, **attributes: object):
        return self.runtime.hop(name, env, **attributes)

    def observe(self, span: Span, env: Envelope, events: list[Event]) -> None:
        self.runtime.observe(span, env, events)

    # -- a request's hops ---------------------------------------------------------------

    async def parse_envelope(self, body: bytes) -> Envelope:
        return await self.hops.parse_envelope(body)

    def seal(self, env: Envelope) -> None:
        self.hops.seal(env)

    async def forward(self, env: Envelope) -> PubAck:
        return await self.hops.forward(env)

    async def fail(self, env: Envelope, error: Error) -> None:
        await self.hops.fail(env, error)

    # -- a request's bookkeeping ----------------------------------------------------------

    async def finish(self, env: Envelope) -> Reply:
        return await self.requests.finish(env)

    async def sessions(self) -> SessionStore:
        return await self.requests.sessions()

    async def remember_turn(self, env: Envelope, reply: Reply) -> None:
        await self.requests.remember_turn(env, reply)

    async def deliver(self, reply: Reply, reply_to: str | None, client: str | None = None, *, store: bool = True) -> None:
        await self.requests.deliver(reply, reply_to, client, store=store)

    async def resend_stored(self, client: str, request_id: str, reply_to: str | None) -> bool:
        return await self.requests.resend_stored(client, request_id, reply_to)

    async def reply_error(self, request_id: str, reply_to: str | None, error: Error, client: str | None = None, *, store: bool = True) -> None:
        await self.requests.reply_error(request_id, reply_to, error, client, store=store)


