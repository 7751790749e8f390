"""A lean HTTP/1.1 transport for httpx: asyncio streams for the sockets, h11 for the framing.

httpx's default transport (httpcore over anyio) polls every idle connection of its pool
on every request to see whether it expired, and wraps every socket operation in anyio:
with 64 model calls in flight that cost more CPU per call than the HTTP itself. This
transport keeps, per origin, a stack of idle connections and takes the top one: no scan.
A connection the server closed while it sat idle is noticed for free
(the event loop already saw its EOF) or, if the close races the request, when the
request fails before a byte of the answer; that request is then sent once more on a
fresh connection.

It speaks no proxy protocol and only HTTP/1.1 (and HTTP/1.0 answers).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import h11
import httpx

DEFAULT_PORTS = {"http": 80, "https": 443}
READ_SIZE = 64 * 1024

Origin = tuple[str, str, int]


class _Disconnected(Exception):
    """The server dropped the connection before a byte of the answer arrived.

    On a connection taken from the pool this means it died while idle, so the request
    most likely never reached the server's application and may be sent again; `error`
    is what the caller sees when it may not.
    """

    def __init__(self, error: httpx.TransportError):
        super().__init__(str(error))
        self.error = error


class _Connection:
    """One socket and the h11 state machine of the exchanges on it."""

    __slots__ = ("reader", "writer", "h11", "idle_since", "heard_back")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.heard_back = False  # any byte of the current answer received

    def looks_alive(self) -> bool:
        """No EOF, reset or close seen while idle: the event loop kept reading, so this costs no syscall."""
        return not (self.writer.is_closing() or self.reader.at_eof() or self.reader.exception())

    def close(self) -> None:
        # Synchronous on purpose: it must also work while a cancellation unwinds.
        self.writer.close()

    def encode(self, message: list[h11.Event]) -> bytes:
        try:
            return b"".join(self.h11.send(event) or b"" for event in message)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc

    async def send(self, data: bytes, timeout: float | None) -> None:
        self.writer.write(data)
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout(f"could not send the request within {timeout}s") from None
        except OSError as exc:
            raise _Disconnected(httpx.WriteError(f"the connection broke while sending: {exc!r}")) from exc

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """The next h11 event of the answer, reading from the socket (each wait bounded by `timeout`) when needed."""
        try:
            while (event := self.h11.next_event()) is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    raise httpx.ReadTimeout(f"no data from the server within {timeout}s") from None
                except OSError as exc:
                    error = httpx.ReadError(f"the connection broke while reading: {exc!r}")
                    if self.heard_back:
                        raise error from exc
                    raise _Disconnected(error) from exc
                if not data and not self.heard_back:
                    raise _Disconnected(httpx.RemoteProtocolError("the server closed the connection without answering"))
                self.heard_back = True
                self.h11.receive_data(data)  # b"" tells h11 about the EOF
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        return event


class _ResponseStream(httpx.AsyncByteStream):
    """A response body as it arrives; hands its connection back to the pool once fully read."""

    def __init__(self, transport: KeepAliveTransport, origin: Origin, connection: _Connection, read_timeout: float | None):
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._read_timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        try:
            while True:
                event = await connection.next_event(self._read_timeout)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    return
        except BaseException:  # errors, cancellation, and a consumer that stopped early
            self._discard()
            raise

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool (or is closed) either way."""
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        parts = []
        try:
            while True:
                event = await connection.next_event(self._read_timeout)
                if isinstance(event, h11.Data):
                    parts.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    break
        finally:
            await self.aclose()
        return b"".join(parts)

    async def aclose(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        state = connection.h11
        if self._complete and state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            self._transport._release(self._origin, connection)
        else:
            connection.close()

    def _discard(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive: per origin a LIFO stack of idle connections, at most
    `max_idle_per_host` of them, none idle for longer than `keepalive_expiry` seconds."""

    def __init__(self, max_idle_per_host: int = 64, keepalive_expiry: float = 30.0):
        self.max_idle_per_host = max_idle_per_host
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._ssl_context: ssl.SSLContext | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        message = _encode_request(request, await request.aread())
        head, stream = await self.open(_origin_of(request.url), message, timeouts)
        return httpx.Response(
            head.status_code,
            headers=head.headers.raw_items(),
            stream=stream,
            extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        )

    async def open(self, origin: Origin, message: list[h11.Event], timeouts: Mapping[str, float | None]) -> tuple[h11.Response, _ResponseStream]:
        """Send one request; its answer's head, and its body to read (and then close)."""
        connection = self._take_idle(origin)
        if connection is not None:
            try:
                return await self._exchange(origin, connection, message, timeouts)
            except _Disconnected:
                pass  # it died while idle: the request never got through, so one more try on a fresh connection
        connection = await self._connect(origin, timeouts.get("connect"))
        try:
            return await self._exchange(origin, connection, message, timeouts)
        except _Disconnected as exc:
            raise exc.error from None

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for connection in stack:
                connection.close()

    async def _exchange(self, origin: Origin, connection: _Connection, message: list[h11.Event], timeouts: Mapping[str, float | None]) -> tuple[h11.Response, _ResponseStream]:
        read_timeout = timeouts.get("read")
        try:
            connection.heard_back = False
            await connection.send(connection.encode(message), timeouts.get("write"))
            while True:
                event = await connection.next_event(read_timeout)
                if isinstance(event, h11.Response):
                    break
                # else an informational 1xx answer: the real one follows
        except BaseException:
            connection.close()
            raise
        return event, _ResponseStream(self, origin, connection, read_timeout)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        tls: dict[str, Any] = {"ssl": self._tls(), "server_hostname": host} if scheme == "https" else {}
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, **tls)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"could not connect to {host}:{port} within {timeout}s") from None
        except OSError as exc:  # refused, unreachable, unknown host, TLS handshake (ssl.SSLError)
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return _Connection(reader, writer)

    def _tls(self) -> ssl.SSLContext:
        # Loading the CA store takes milliseconds: once per transport, and only if https is used.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _take_idle(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        now = time.monotonic()
        while stack:
            connection = stack.pop()
            if now - connection.idle_since < self.keepalive_expiry and connection.looks_alive():
                return connection
            connection.close()
        return None

    def _release(self, origin: Origin, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        stack = self._idle.setdefault(origin, deque())
        connection.idle_since = now = time.monotonic()
        stack.append(connection)
        # The oldest idle connections sit at the bottom, where taking from the top never
        # reaches under steady load: expire and cap them here.
        while stack and (len(stack) > self.max_idle_per_host or now - stack[0].idle_since >= self.keepalive_expiry):
            stack.popleft().close()


def _origin_of(url: httpx.URL) -> Origin:
    scheme = url.scheme
    if scheme not in DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"KeepAliveTransport speaks http and https, not {scheme!r}: {url}")
    if not url.host:
        raise httpx.UnsupportedProtocol(f"the URL names no host: {url}")
    return scheme, url.host, url.port or DEFAULT_PORTS[scheme]


def _encode_request(request: httpx.Request, body: bytes) -> list[h11.Event]:
    headers = request.headers.raw
    if body and "content-length" not in request.headers and "transfer-encoding" not in request.headers:
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
    message: list[h11.Event] = [h11.Request(method=request.method, target=request.url.raw_path, headers=headers)]
    if body:
        message.append(h11.Data(data=body))
    message.append(h11.EndOfMessage())
    return message
