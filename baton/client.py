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
import os
import re
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import attributes as A
from shared import subjects, telemetry
from shared.schema import Reply, Request
from shared.settings import Settings, local_credentials, server_list, settings


log = logging.getLogger("baton.client")
CONNECT_TIMEOUT_S = 5.0
ACCEPT_TIMEOUT_S = 6.0  # how long to keep offering a request while the stream elects a leader
PUBLISH_TIMEOUT_S = 2.0


class BatonError(Exception):
    """Base of every error this client raises."""


class Unreachable(BatonError):
    """No NATS server answered."""


class InvalidRequest(BatonError):
    """The request cannot be sent as given (empty prompt, text that is not valid Unicode, a bad id)."""


class NotAccepted(BatonError):
    """The mesh did not acknowledge the request: nothing was queued."""


class RequestTooLarge(NotAccepted):
    pass


class ReplyTimeout(BatonError):
    def __init__(self, request_id: str, timeout_s: float):
        super().__init__(f"no reply to request {request_id} within {timeout_s:.1f}s; fetch it later with `baton result {request_id}`")
        self.request_id = request_id


class BatonClient:
    def __init__(self, nats_url: str | None = None, *, client_id: str | None = None, timeout_s: float = 30.0, tracer: trace.Tracer | None = None, **connect_options: Any):
        """`nats_url` defaults to NATS_URL, else the mesh `baton up` is running. `client_id`
        defaults to BATON_CLIENT_ID, else a fresh one: only a client with the same id can
        fetch a request's stored Reply later, so pass one (or set it) to use `result()`
        from another process."""
        self.nats_url = nats_url or Settings().nats_url
        self.tracer = tracer or trace.get_tracer("baton.client")
        wanted = client_id or os.environ.get("BATON_CLIENT_ID")
        if "user" in connect_options:
            wanted = wanted or connect_options["user"]  # a client user may use only its own subjects
        else:
            # The mesh `baton up` runs on this machine has NATS users: connect as the user of
            # this client id (by default the CLI's, `cli`; `baton up --client NAME` adds more).
            user, password = local_credentials(settings().state_dir, self.nats_url, user=wanted)
            if user:
                connect_options = {**connect_options, "user": user, "password": password}
                wanted = user
        self.client_id = wanted or uuid.uuid4().hex[:12]
        if not _CLIENT_ID.match(self.client_id):
            raise InvalidRequest(f"client id {self.client_id!r} must be 1-64 letters, digits, '-' or '_'")
        self.timeout_s = timeout_s
        self.inbox_prefix = subjects.inbox_prefix(self.client_id)
        self.subject = subjects.request(self.client_id)
        self._connect_options = connect_options
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self.duplicates = 0  # replies that arrived for a request already answered
        self.nc: nats.NATS | None = None

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> BatonClient:
        options = {"connect_timeout": 2, "error_cb": _quiet, **self._connect_options}
        # One quick attempt, not nats-py's retry loop, unless the caller asked to wait for the
        # server (max_reconnect_attempts=-1, as the gateway does when started before NATS).
        wait_for_server = options.get("max_reconnect_attempts") == -1
        if not wait_for_server and not await _any_listening(server_list(self.nats_url)):
            raise Unreachable(f"cannot reach NATS at {self.nats_url} (nothing listens there); start the mesh with `baton up` or set NATS_URL")
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
        """Queue a request; returns its id as soon as JetStream has accepted it.

        Its trace's root is the publish span, which ends at the PubAck: this client never
        sees the Reply, so no span of its can cover the request (ask or stream do)."""
        request_id, _ = await self._publish(request, request_id, fields)
        return request_id

    async def ask(self, request: Request | str, *, timeout_s: float | None = None, request_id: str | None = None, **fields: Any) -> Reply:
        """Queue a request and wait for its Reply (a request id used before gets the Reply given then).

        The root span of the request's trace covers it from publish to Reply, so a
        backend's root latency is the request's; a refused or degraded Reply is an error."""
        timeout_s = timeout_s or self.timeout_s
        request = _as_request(request, fields)
        with self.tracer.start_as_current_span("baton ask", kind=SpanKind.CLIENT, attributes=_root_attributes(request)) as root:
            request_id, future = await self._publish(request, request_id, {})
            try:
                reply = await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                reply = await self.result(request_id)
                if reply is None:
                    root.set_status(Status(StatusCode.ERROR, f"no reply within {timeout_s:.1f}s"))
                    root.set_attribute(A.ERROR_TYPE, "reply_timeout")
                    raise ReplyTimeout(request_id, timeout_s) from None
            finally:
                self._pending.pop(request_id, None)
            telemetry.record_request_outcome(root, reply)
            return reply

    async def stream(self, request: Request | str, *, timeout_s: float | None = None, request_id: str | None = None, **fields: Any) -> AsyncGenerator[str | Reply, None]:
        """Yield the answer's text as it is generated, then the final Reply.

        The Reply is what the output gate let through: when a route streams live,
        partial text may differ from the final answer (e.g. redacted), so a UI
        should replace the streamed text with `reply.answer` at the end.
        """
        request = _as_request(request, fields).model_copy(update={"stream": True})
        timeout_s = timeout_s or self.timeout_s
        request_id = request_id or uuid.uuid4().hex
        chunks: asyncio.Queue[str] = asyncio.Queue()

        async def on_chunk(msg: Any) -> None:
            chunks.put_nowait(msg.data.decode())

        # The root span covers the whole stream; not made current: a generator's context
        # must not leak into its consumer's between items.
        root = self.tracer.start_span("baton stream", kind=SpanKind.CLIENT, attributes=_root_attributes(request))
        sub = await self.nc.subscribe(subjects.chunk_address(self.reply_to(request_id)), cb=on_chunk)
        try:
            _, future = await self._publish(request, request_id, {}, parent=trace.set_span_in_context(root))
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not future.done():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    root.set_status(Status(StatusCode.ERROR, f"no reply within {timeout_s:.1f}s"))
                    raise ReplyTimeout(request_id, timeout_s)
                getter: asyncio.Future[Any] = asyncio.ensure_future(chunks.get())
                await asyncio.wait({getter, future}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not chunks.empty():
                yield chunks.get_nowait()
            reply = future.result()
            telemetry.record_request_outcome(root, reply)
            root.end()  # before the last item: a caller may stop iterating once it has the Reply
            yield reply
        except Exception as exc:
            root.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if root.is_recording():
                root.end()
            self._pending.pop(request_id, None)
            if not (self.nc.is_closed or self.nc.is_draining):  # a drain already ends every subscription
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
        if not _REQUEST_ID.match(request_id):
            raise InvalidRequest(f"{request_id!r} is not a request id: ids are 1-128 letters, digits, '-', '_' or '='")
        key = subjects.result_key(self.client_id, request_id)
        try:
            message = await self.js.get_msg(f"KV_{subjects.RESULTS_BUCKET}", subject=f"$KV.{subjects.RESULTS_BUCKET}.{key}", direct=True)
        except NotFoundError:
            return None
        return Reply.model_validate_json(message.data) if message.data else None

    def reply_to(self, request_id: str) -> str:
        return f"{self.inbox_prefix}.reply.{request_id}"

    async def _publish(self, request: Request | str, request_id: str | None, fields: dict[str, Any], parent: Context | None = None) -> tuple[str, asyncio.Future[Reply]]:
        request = _as_request(request, fields)
        request_id = request_id or uuid.uuid4().hex
        if not _REQUEST_ID.match(request_id):
            raise InvalidRequest(f"{request_id!r} is not a valid request id: use 1-128 letters, digits, '-', '_' or '='")
        try:
            body = request.model_dump_json(exclude_defaults=True).encode()
        except PydanticSerializationError as exc:  # e.g. a lone surrogate, which no UTF-8 can carry
            raise InvalidRequest(f"the request's text cannot be encoded as UTF-8 ({exc})") from None
        future = self._expect(request_id)
        await self._js_publish(body, request_id, {}, parent)
        return request_id, future

    def _expect(self, request_id: str) -> asyncio.Future[Reply]:
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return future

    async def _js_publish(self, body: bytes, request_id: str, extra_headers: dict[str, str], parent: Context | None = None) -> None:
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
        server = getattr(self.nc.connected_url, "hostname", None)
        attributes = {**telemetry.messaging_attributes("publish", self.subject, request_id, len(body), server), A.OI_KIND: A.CHAIN, A.REQUEST_ID: request_id}
        # Every hop nests under this span (the root for `submit`, under the request's root for ask/stream).
        with self.tracer.start_as_current_span(f"publish {subjects.REQUEST_PREFIX}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes):
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


def _root_attributes(request: Request) -> dict[str, Any]:
    """The request's root span: a CHAIN in OpenInference terms. No prompt text: it is not redacted yet."""
    attributes: dict[str, Any] = {A.OI_KIND: A.CHAIN}
    if request.session_id:
        attributes[A.SESSION_ID] = attributes[A.GEN_AI_CONVERSATION_ID] = request.session_id
    return attributes


_REQUEST_ID = re.compile(subjects.REQUEST_ID_PATTERN)
_CLIENT_ID = re.compile(subjects.CLIENT_ID_PATTERN)


def _as_request(request: Request | str, fields: dict[str, Any]) -> Request:
    """A Request from a prompt and fields, or InvalidRequest naming what is wrong."""
    if isinstance(request, Request):
        return request
    try:
        return Request(prompt=request, **fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise InvalidRequest(f"invalid request: {problems}") from None


async def _any_listening(servers: list[str], timeout_s: float = 1.0) -> bool:
    """Whether any server accepts a TCP connection (websocket URLs are left to nats-py)."""
    from urllib.parse import urlsplit

    for server in servers:
        url = urlsplit(server if "://" in server else f"nats://{server}")
        if url.scheme in ("ws", "wss"):
            return True
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 4222), timeout_s)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True
    return False


async def _quiet(exc: Exception) -> None:
    """Connection trouble surfaces as typed errors from our calls; the details go to the debug log."""
    log.debug("NATS: %s: %s", type(exc).__name__, exc)
