"""KeepAliveTransport against real loopback servers that answer, stream, reuse, drop and hang."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import pytest_asyncio

from services.generator.model_http import ModelHTTP, ProxiedHTTP, json_body
from services.generator.providers import OpenAICompatible
from services.generator.transport import KeepAliveTransport

pytestmark = pytest.mark.timeout(5)

OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@dataclass
class Peer:
    """The server's side of one connection, and the requests it received."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed the connection

    async def next_request(self) -> bytes | None:
        """The next request's head, or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.hung_up.set()
            return None
        length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        body = await self.reader.readexactly(int(length[1])) if length else b""
        self.requests.append((head, body))
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_client(self) -> bool:
        """Whether the client closed the connection (within 2 s), for a server that is not reading anyway."""
        return await asyncio.wait_for(self.reader.read(), 2) == b""

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


Answer = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def loopback(answer: Answer) -> AsyncIterator[tuple[str, list[Peer]]]:
    """An HTTP server on 127.0.0.1 that runs `answer` for each connection: (base URL, peers by connection)."""
    peers: list[Peer] = []
    handlers: set[asyncio.Task] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        peer = Peer(reader, writer)
        peers.append(peer)
        try:
            await answer(peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a client that went away, or the server shutting down
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", peers
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def keep_alive(peer: Peer) -> None:
    while await peer.next_request():
        await peer.send(OK_HELLO)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=2) as client:
        yield client


async def test_content_length_body(client: httpx.AsyncClient) -> None:
    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")

    async with loopback(answer) as (url, peers):
        response = await client.post(f"{url}/v1/chat?x=1", json={"question": "why"})
    assert (response.status_code, response.json(), response.reason_phrase, response.http_version) == (201, {"ok": True}, "Created", "HTTP/1.1")
    [(head, body)] = peers[0].requests
    assert head.startswith(b"POST /v1/chat?x=1 HTTP/1.1\r\n") and re.search(rb"(?i)host: 127\.0\.0\.1:\d+\r\n", head)
    assert json.loads(body) == {"question": "why"}


async def test_chunked_body(client: httpx.AsyncClient) -> None:
    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    async with loopback(answer) as (url, _):
        response = await client.get(url)
    assert response.text == "hello world"


async def test_a_streamed_body_arrives_while_the_server_still_sends(client: httpx.AsyncClient) -> None:
    first_line_seen = asyncio.Event()

    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await peer.send(b"9\r\ndata: 1\n\n\r\n")
        await asyncio.wait_for(first_line_seen.wait(), 2)  # the rest only once the client has read the start
        await asyncio.sleep(0.05)
        await peer.send(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")

    lines = []
    async with loopback(answer) as (url, _):
        async with client.stream("GET", url) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                first_line_seen.set()
    assert lines == ["data: 1", "", "data: 2", ""]


async def test_keep_alive_reuses_the_connection(client: httpx.AsyncClient) -> None:
    async with loopback(keep_alive) as (url, peers):
        first = await client.get(url)
        second = await client.post(url, content=b"again")
    assert first.text == second.text == "hello"
    assert len(peers) == 1 and len(peers[0].requests) == 2


async def test_a_connection_closed_while_idle_is_not_used_again(client: httpx.AsyncClient) -> None:
    async def answer_once(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(OK_HELLO)  # keep-alive by HTTP/1.1 default, but then the server closes

    async with loopback(answer_once) as (url, peers):
        await client.get(url)
        await asyncio.sleep(0.05)  # the FIN reaches the client while the connection is idle
        response = await client.get(url)
    assert response.text == "hello" and len(peers) == 2


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_a_reused_connection_dropped_before_answering_is_retried_once_on_a_new_one(client: httpx.AsyncClient, drop: str) -> None:
    async def answer_then_drop_the_next(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(OK_HELLO)
        await peer.next_request()
        peer.reset() if drop == "reset" else peer.writer.close()

    async with loopback(answer_then_drop_the_next) as (url, peers):
        await client.get(url)
        response = await client.get(url)
    assert response.text == "hello"
    assert [len(peer.requests) for peer in peers] == [2, 1]


async def test_a_fresh_connection_dropped_before_answering_is_not_retried(client: httpx.AsyncClient) -> None:
    async def drop(peer: Peer) -> None:
        await peer.next_request()

    async with loopback(drop) as (url, peers):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
    assert len(peers) == 1


@pytest.mark.parametrize(
    "answer_head",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"],
    ids=["connection-close", "http-1.0-body-until-eof"],
)
async def test_connections_the_server_closes_are_not_reused(client: httpx.AsyncClient, answer_head: bytes) -> None:
    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(answer_head + b"hello")

    async with loopback(answer) as (url, peers):
        assert (await client.get(url)).text == "hello"
        assert (await client.get(url)).text == "hello"
    assert len(peers) == 2


async def test_connect_refused_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/")


async def test_a_server_that_never_answers_is_a_read_timeout(client: httpx.AsyncClient) -> None:
    async def hang(peer: Peer) -> None:
        await peer.next_request()
        await asyncio.sleep(10)

    async with loopback(hang) as (url, _):
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(url, timeout=httpx.Timeout(2, read=0.3))
        assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "cut_answer",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"],
    ids=["content-length", "chunked"],
)
async def test_a_body_cut_midway_is_an_error(client: httpx.AsyncClient, cut_answer: bytes) -> None:
    async def cut(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(cut_answer)

    async with loopback(cut) as (url, _):
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(url)
        async with client.stream("GET", url) as response:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                async for _ in response.aiter_bytes():
                    pass


@pytest.mark.parametrize("when", ["before-the-answer", "mid-body"])
async def test_cancellation_closes_the_connection(client: httpx.AsyncClient, when: str) -> None:
    async def stall_the_first_call(peer: Peer) -> None:
        if len(peers) > 1:
            return await keep_alive(peer)
        await peer.next_request()
        if when == "mid-body":
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert await peer.closed_by_client()
        peer.hung_up.set()

    async def call(url: str) -> None:
        async with client.stream("GET", url) as response:
            async for _ in response.aiter_bytes():
                pass

    async with loopback(stall_the_first_call) as (url, peers):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await call(url)
        await asyncio.wait_for(peers[0].hung_up.wait(), 2)
        assert (await client.get(url)).text == "hello"
    assert len(peers) == 2 and len(peers[0].requests) == 1


async def test_idle_connections_expire_and_are_capped() -> None:
    async with loopback(keep_alive) as (url, peers):
        async with httpx.AsyncClient(transport=KeepAliveTransport(max_idle_per_host=1, keepalive_expiry=0.1)) as client:
            await asyncio.gather(client.get(url), client.get(url))  # two connections, one kept
            await asyncio.sleep(0.05)
            assert [peer.hung_up.is_set() for peer in peers].count(True) == 1
            await asyncio.sleep(0.1)
            await client.get(url)  # the kept one has expired
            await asyncio.sleep(0.05)
    assert len(peers) == 3 and all(peer.hung_up.is_set() for peer in peers[:2])


async def test_aclose_closes_idle_connections() -> None:
    async with loopback(keep_alive) as (url, peers):
        transport = KeepAliveTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(url)
        await asyncio.wait_for(peers[0].hung_up.wait(), 2)


async def test_only_http_and_https() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await KeepAliveTransport().handle_async_request(httpx.Request("GET", "ftp://example.com/file"))


@pytest.mark.parametrize("proxy", [None, "http://proxy.invalid:3128"])
async def test_providers_use_it_unless_a_proxy_is_configured(monkeypatch: pytest.MonkeyPatch, proxy: str | None) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    async with OpenAICompatible("http://127.0.0.1:9/v1", None, "m") as provider:
        uses_it = isinstance(provider._client, ModelHTTP) and isinstance(provider._client._transport, KeepAliveTransport)
    assert uses_it is (proxy is None)


# --- ModelHTTP: the providers' client over the same connections -------------------------------


@pytest.fixture(params=[ModelHTTP, ProxiedHTTP])
def model_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[ModelHTTP] | type[ProxiedHTTP]:
    """Both clients a provider may get must behave alike (ProxiedHTTP here without a proxy: httpx direct)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    return request.param


async def test_model_http_sends_what_httpx_sent_and_reuses_the_connection(model_client: type[ModelHTTP]) -> None:
    async def answer(peer: Peer) -> None:
        while await peer.next_request():
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nRetry-After: 3\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")

    payload = {"question": "wie schnell fährt ein Rad?", "n": 1}
    async with loopback(answer) as (url, peers):
        http = model_client()
        try:
            first = await http.post(f"{url}/v1/chat/completions", [(b"Content-Type", b"application/json")], json_body(payload), 2)
            second = await http.post(f"{url}/v1/chat/completions", [(b"Content-Type", b"application/json")], b"{}", 2)
        finally:
            await http.aclose()
    assert (first.status_code, first.json(), first.text, first.headers["retry-after"]) == (200, {"ok": True}, '{"ok":true}', "3")
    assert second.json() == {"ok": True} and len(peers) == 1  # one keep-alive connection
    [(head, body), _] = peers[0].requests
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and re.search(rb"(?i)\r\nhost: 127\.0\.0\.1:\d+\r\n", head)
    assert re.search(rb"(?i)\r\ncontent-type: application/json\r\n", head) and re.search(rb"(?i)\r\nuser-agent: python-httpx/", head)
    # The body byte for byte as httpx's json= wrote it: compact, UTF-8, not ASCII-escaped.
    assert body == json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() and "fährt".encode() in body


async def test_model_http_decodes_an_answer_the_server_compressed_unasked() -> None:
    packed = gzip.compress(b'{"ok":true}')

    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed))

    async with loopback(answer) as (url, _):
        http = ModelHTTP()
        try:
            response = await http.post(url, [], b"{}", 2)
        finally:
            await http.aclose()
    assert response.json() == {"ok": True}


async def test_model_http_streams_and_maps_failures_to_httpx_errors(model_client: type[ModelHTTP]) -> None:
    async def answer(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await peer.next_request()
        await asyncio.sleep(10)  # the second request is never answered

    async with loopback(answer) as (url, peers):
        http = model_client()
        try:
            async with http.stream(url, [], b"{}", 2) as response:
                lines = [line async for line in response.aiter_lines()]
            with pytest.raises(httpx.ReadTimeout):
                await http.post(url, [], b"{}", 0.2)
        finally:
            await http.aclose()
        with pytest.raises(httpx.ConnectError):
            await model_client().post("http://127.0.0.1:9/v1", [], b"{}", 2)
        with pytest.raises(httpx.UnsupportedProtocol):
            await model_client().post("ftp://127.0.0.1/v1", [], b"{}", 2)
    assert lines == ["data: 1", "", "data: 2", ""] and len(peers) == 1  # the streamed answer's connection was reused
