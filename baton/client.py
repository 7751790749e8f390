"""The Python client: publish Requests onto the bus and get their Replies.

    async with BatonClient(nats_url) as baton:
        reply = await baton.ask("How often should I replace my chain?")

A request is accepted when JetStream acknowledges it (PubAck). Its Reply arrives on
this client's own inbox; it is also stored in the results bucket, so `result(id)`
fetches it later, even from another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js.errors import NotFoundError

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared import attributes as A
from shared import subjects, telemetry
from shared.schema import Reply, Request
from shared.settings import local_credentials, server_list, settings


log = logging.getLogger("baton.client")
CONNECT_TIMEOUT_S = 5.0
ACCEPT_TIMEOUT_S = 6.0  # how long to keep offering a request while the stream elects a leader
PUBLISH_TIMEOUT_S = 2.0


class BatonError(Exception):
    """Base of every error this client raises."""


class Unreachable(BatonError):
    """No NATS server answered."""


class NotAccepted(BatonError):
    """The mesh did not acknowledge the request: nothing was queued."""


class RequestTooLarge(NotAccepted):
    pass


class ReplyTimeout(BatonError):
    def __init__(self, request_id: str, timeout_s: float):
        super().__init__(f"no reply to request {request_id} within {timeout_s:.1f}s; fetch it later with `baton result {request_id}`")
        self.request_id = request_id


class BatonClient:
    def __init__(self, nats_url: str, *, client_id: str | None = None, timeout_s: float = 30.0, tracer: trace.Tracer | None = None, **connect_options: Any):
        self.nats_url = nats_url
        self.tracer = tracer or trace.get_tracer("baton.client")
        if "user" in connect_options:
            client_id = client_id or connect_options["user"]  # a client user may use only its own subjects
        else:
            # The mesh `baton up` runs on this machine has NATS users: connect as its CLI client.
            user, password = local_credentials(settings().state_dir, nats_url)
            if user:
                connect_options = {**connect_options, "user": user, "password": password}
                client_id = client_id or user
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.timeout_s = timeout_s
        self.inbox_prefix = subjects.inbox_prefix(self.client_id)
        self.subject = subjects.request(self.client_id)
        self._connect_options = connect_options
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self.duplicates = 0  # replies that arrived for a request already answered
        self.nc: nats.NATS | None = None

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> BatonClient:
        options = {"connect_timeout": 2, "error_cb": _quiet, **self._connect_options}
        try:
            self.nc = await asyncio.wait_for(nats.connect(server_list(self.nats_url), inbox_prefix=self.inbox_prefix.encode(), **options), timeout_s)
        except (TimeoutError, OSError, NatsError) as exc:
            raise Unreachable(f"cannot reach NATS at {self.nats_url} ({type(exc).__name__}); start the mesh with `baton up` or set NATS_URL") from exc
        self.js = self.nc.jetstream()
        self._sub = await self.nc.subscribe(f"{self.inbox_prefix}.reply.>", cb=self._on_reply)
        return self

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> BatonClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, request: Request | str, *, request_id: str | None = None, **fields: Any) -> str:
        """Queue a request; returns its id as soon as JetStream has accepted it."""
        request_id, _ = await self._publish(request, request_id, fields)
        return request_id

    async def ask(self, request: Request | str, *, timeout_s: float | None = None, request_id: str | None = None, **fields: Any) -> Reply:
        """Queue a request and wait for its Reply (a request id used before gets the Reply given then)."""
        timeout_s = timeout_s or self.timeout_s
        request_id, future = await self._publish(request, request_id, fields)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            stored = await self.result(request_id)
            if stored is not None:
                return stored
            raise ReplyTimeout(request_id, timeout_s) from None
        finally:
            self._pending.pop(request_id, None)

    async def stream(self, request: Request | str, *, timeout_s: float | None = None, request_id: str | None = None, **fields: Any) -> AsyncIterator[str | Reply]:
        """Yield the answer's text as it is generated, then the final Reply.

        The Reply is what the output gate let through: when a route streams live,
        partial text may differ from the final answer (e.g. redacted), so a UI
        should replace the streamed text with `reply.answer` at the end.
        """
        if isinstance(request, str):
            request = Request(prompt=request, **fields)
        request = request.model_copy(update={"stream": True})
        timeout_s = timeout_s or self.timeout_s
        request_id = request_id or uuid.uuid4().hex
        chunks: asyncio.Queue[str] = asyncio.Queue()

        async def on_chunk(msg: Any) -> None:
            chunks.put_nowait(msg.data.decode())

        sub = await self.nc.subscribe(subjects.chunk_address(self.reply_to(request_id)), cb=on_chunk)
        try:
            _, future = await self._publish(request, request_id, {})
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not future.done():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise ReplyTimeout(request_id, timeout_s)
                getter = asyncio.ensure_future(chunks.get())
                await asyncio.wait({getter, future}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not chunks.empty():
                yield chunks.get_nowait()
            yield future.result()
        finally:
            self._pending.pop(request_id, None)
            await sub.unsubscribe()

    async def send_raw(self, body: bytes, *, request_id: str | None = None, headers: dict[str, str] | None = None) -> asyncio.Future[Reply]:
        """Publish arbitrary bytes as a request (for tests of hostile input)."""
        request_id = request_id or uuid.uuid4().hex
        future = self._expect(request_id)
        await self._js_publish(body, request_id, headers or {})
        return future

    async def result(self, request_id: str) -> Reply | None:
        """The stored Reply of a request, or None while it is not finished.

        A direct get of this client's own key, without binding to the bucket: binding
        needs stream info, which would list every client's keys.
        """
        key = subjects.result_key(self.client_id, request_id)
        try:
            message = await self.js.get_msg(f"KV_{subjects.RESULTS_BUCKET}", subject=f"$KV.{subjects.RESULTS_BUCKET}.{key}", direct=True)
        except NotFoundError:
            return None
        return Reply.model_validate_json(message.data) if message.data else None

    def reply_to(self, request_id: str) -> str:
        return f"{self.inbox_prefix}.reply.{request_id}"

    async def _publish(self, request: Request | str, request_id: str | None, fields: dict[str, Any]) -> tuple[str, asyncio.Future[Reply]]:
        if isinstance(request, str):
            request = Request(prompt=request, **fields)
        request_id = request_id or uuid.uuid4().hex
        future = self._expect(request_id)
        await self._js_publish(request.model_dump_json(exclude_defaults=True).encode(), request_id, {})
        return request_id, future

    def _expect(self, request_id: str) -> asyncio.Future[Reply]:
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return future

    async def _js_publish(self, body: bytes, request_id: str, extra_headers: dict[str, str]) -> None:
        assert self.nc is not None, "call connect() first"
        if len(body) > self.nc.max_payload:
            self._pending.pop(request_id, None)
            raise RequestTooLarge(f"the request is {len(body)} bytes; the server accepts at most {self.nc.max_payload}")
        headers = {
            # A retried publish is de-duplicated by JetStream; the nonce keeps other clients
            # from pre-empting the id. A repeated request id is answered by the router.
            subjects.H_MSG_ID: subjects.request_msg_id(self.client_id, request_id, uuid.uuid4().hex[:16]),
            subjects.H_REQUEST_ID: request_id,
            subjects.H_REPLY_TO: self.reply_to(request_id),
            **extra_headers,
        }
        attributes = {A.MESSAGING_SYSTEM: "nats", A.MESSAGING_DESTINATION: self.subject, A.MESSAGING_OPERATION: "publish", A.REQUEST_ID: request_id}
        # The root of the request's trace: every hop nests under this span.
        with self.tracer.start_as_current_span(f"publish {subjects.REQUEST_PREFIX}", kind=SpanKind.PRODUCER, attributes=attributes):
            telemetry.inject(headers)
            give_up = asyncio.get_running_loop().time() + ACCEPT_TIMEOUT_S
            pause = 0.25
            while True:
                try:
                    ack = await self.js.publish(self.subject, body, headers=headers, timeout=PUBLISH_TIMEOUT_S)
                    if ack.duplicate:
                        await self._answer_from_store(request_id)
                    return
                except MaxPayloadError as exc:
                    self._pending.pop(request_id, None)
                    raise RequestTooLarge(str(exc)) from exc
                except NatsError as exc:
                    # A lost PubAck (leader change, reconnect) is safe to retry: the
                    # message id makes JetStream store the request once.
                    if asyncio.get_running_loop().time() + pause < give_up:
                        await asyncio.sleep(pause)
                        pause = min(2.0, pause * 2)
                        continue
                    self._pending.pop(request_id, None)
                    raise NotAccepted(f"the mesh did not accept the request within {ACCEPT_TIMEOUT_S:.0f}s ({type(exc).__name__}); is `baton up` running and NATS_URL right?") from exc

    async def _answer_from_store(self, request_id: str) -> None:
        """JetStream had this message already (a retried publish whose first PubAck was
        lost): its Reply may have come and gone before this call listened for it."""
        future = self._pending.get(request_id)
        stored = await self.result(request_id)
        if stored is not None and future is not None and not future.done():
            future.set_result(stored)

    async def _on_reply(self, msg: Any) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.get(request_id)
        if future is None or future.done():
            self.duplicates += 1 if future is not None else 0
            return
        with contextlib.suppress(Exception):
            future.set_result(Reply.model_validate_json(msg.data))


async def _quiet(exc: Exception) -> None:
    """Connection trouble surfaces as typed errors from our calls; the details go to the debug log."""
    log.debug("NATS: %s: %s", type(exc).__name__, exc)
