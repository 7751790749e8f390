"""The generator's HTTP client for model APIs: POST a JSON body, read the answer.

httpx's AsyncClient builds, per request, a URL model, a header model, a cookie jar
merge, auth and redirect hooks and a Response with its byte-stream layers; on the
bench route that was more CPU than the exchange itself
(`python -m bench.hotpath --profile generator`). `ModelHTTP` sends the same request
over `KeepAliveTransport`'s connections with its head parts built once per URL, and
hands back the answer as `Answer`: the status, the headers and the body bytes.

Errors stay httpx's exception types (ConnectError, ReadTimeout, RemoteProtocolError,
...), so the providers map them as before. A stream is still an `httpx.Response`
(its line decoder handles every SSE line ending), built straight from the transport.
With a proxy configured, `ProxiedHTTP` does the same through httpx itself, since
KeepAliveTransport speaks no proxy protocol.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import h11
import httpx

from services.generator.transport import KeepAliveTransport, Origin, _origin_of

Header = tuple[bytes, bytes]
_USER_AGENT = (b"User-Agent", f"python-httpx/{httpx.__version__}".encode())


class Answer:
    """A model API's whole answer, read the way the providers read an httpx.Response."""

    __slots__ = ("status_code", "raw_headers", "content", "_headers")

    def __init__(self, status_code: int, raw_headers: Sequence[Header], content: bytes):
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.content = content
        self._headers: httpx.Headers | None = None

    @property
    def headers(self) -> httpx.Headers:
        """Case-insensitive headers; built only when asked (error answers: Retry-After, request-id)."""
        if self._headers is None:
            self._headers = httpx.Headers(list(self.raw_headers))
        return self._headers

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class ModelClient(Protocol):
    async def post(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> Answer: ...

    def stream(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> Any: ...

    async def aclose(self) -> None: ...


class ModelHTTP:
    """POST to model APIs over KeepAliveTransport, without httpx's per-request machinery.

    `headers` are the request's own (content type, accept, key); Host, User-Agent and
    Content-Length are added here. `timeout` bounds each phase (connect, write, each
    read), as `httpx.Timeout(timeout)` did.
    """

    def __init__(self, transport: KeepAliveTransport | None = None):
        self._transport = transport or KeepAliveTransport()
        self._targets: dict[str, tuple[Origin, bytes, Header]] = {}

    async def post(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> Answer:
        origin, message = self._message(url, headers, body)
        head, stream = await self._transport.open(origin, message, _phases(timeout))
        content = await stream.read()
        raw = head.headers.raw_items()
        if any(name.lower() == b"content-encoding" for name, _ in raw):
            content = await _decoded(head, raw, content)  # a server that compressed unasked
        return Answer(head.status_code, raw, content)

    @asynccontextmanager
    async def stream(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> AsyncIterator[httpx.Response]:
        origin, message = self._message(url, headers, body)
        head, stream = await self._transport.open(origin, message, _phases(timeout))
        response = httpx.Response(head.status_code, headers=head.headers.raw_items(), stream=stream)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _message(self, url: str, headers: Sequence[Header], body: bytes) -> tuple[Origin, list[h11.Event]]:
        target = self._targets.get(url)
        if target is None:
            parsed = httpx.URL(url)
            target = self._targets[url] = (_origin_of(parsed), parsed.raw_path, (b"Host", parsed.netloc))
        origin, path, host = target
        wire = [host, *headers, _USER_AGENT, (b"Content-Length", str(len(body)).encode())]
        return origin, [h11.Request(method=b"POST", target=path, headers=wire), h11.Data(data=body), h11.EndOfMessage()]


class ProxiedHTTP:
    """The same surface through httpx's own client, which speaks the proxy protocols."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient()
        self._transport = self._client._transport

    async def post(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> Answer:
        response = await self._client.post(url, content=body, headers=list(headers), timeout=httpx.Timeout(timeout))
        return Answer(response.status_code, response.headers.raw, response.content)

    def stream(self, url: str, headers: Sequence[Header], body: bytes, timeout: float) -> Any:
        return self._client.stream("POST", url, content=body, headers=list(headers), timeout=httpx.Timeout(timeout))

    async def aclose(self) -> None:
        await self._client.aclose()


def new_client() -> ModelClient:
    """ModelHTTP, unless a proxy is configured (then httpx's client, which goes through it)."""
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return ProxiedHTTP()
    return ModelHTTP()


def json_body(payload: Any) -> bytes:
    """The JSON body exactly as httpx's `json=` wrote it (compact, UTF-8, no NaN)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _phases(timeout: float) -> dict[str, float]:
    return {"connect": timeout, "read": timeout, "write": timeout}


async def _decoded(head: h11.Response, raw: list[Header], content: bytes) -> bytes:
    """The body decoded by httpx's decoders (gzip, deflate, br, zstd) as the Content-Encoding says."""
    response = httpx.Response(head.status_code, headers=raw, stream=httpx.ByteStream(content))
    return await response.aread()
