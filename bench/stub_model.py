"""A fast OpenAI-compatible stub model for the benchmarks: raw asyncio, HTTP/1.1 keep-alive.

    python -m bench.stub_model --port 8123 [--latency-ms 0]     # prints "ready <base_url>"

It answers POST /v1/chat/completions with a fixed, well-formed chat completion (with
usage) after `latency_ms`, so the model is never the bottleneck: no framework, no JSON
parsing of the request, a pre-built response. Control endpoints (same port):

    POST /_bench/latency   body: milliseconds as text ("200")
    GET  /_bench/stats     {"chat_requests": n, "last_body_bytes": n}
    GET  /_bench/last      the body of the last chat request, as received

`/_bench/last` lets the harness send the peer (LiteLLM) exactly the payload Baton's
generator sent. Loopback only; every connection closes when the process ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

ANSWER = (
    "Replace the chain once a wear checker shows 0.5 percent elongation, and check it every "
    "1,000 km; a worn chain quickly wears the cassette and chainrings too [1]."
)


def completion_body(model: str = "stub-model") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940},
        }
    ).encode()


def _response(status: str, body: bytes, content_type: bytes = b"application/json", keep_alive: bool = True) -> bytes:
    head = b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: " + str(len(body)).encode()
    head += b"\r\nConnection: keep-alive\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n"
    return head + body


class State:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.chat_requests = 0
        self.last_body = b""
        self.ok = _response("200 OK", completion_body())
        self.ok_close = _response("200 OK", completion_body(), keep_alive=False)


MODELS = json.dumps({"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0, "owned_by": "bench"}]}).encode()


class HTTPProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1: Content-Length or chunked bodies, keep-alive, pipelining-safe order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending = 0  # delayed responses not yet written: keep answers in request order
        self.queue: list[tuple[bytes, bool]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            parsed = self._parse()
            if parsed is None:
                return
            method, path, headers, body = parsed
            self._dispatch(method, path, headers, body)

    def _parse(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, path, version = (head[0].split(" ") + ["", "", ""])[:3]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            pos = start
            while True:
                line_end = self.buffer.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(self.buffer[pos:line_end]).split(b";")[0] or b"0", 16)
                if size == 0:  # the last chunk; clients here send no trailers
                    if len(self.buffer) < line_end + 4:
                        return None
                    consumed = line_end + 4
                    break
                if len(self.buffer) < line_end + 2 + size + 2:
                    return None
                body += self.buffer[line_end + 2 : line_end + 2 + size]
                pos = line_end + 2 + size + 2
            del self.buffer[:consumed]
            body = bytes(body)
        else:
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < start + length:
                return None
            body = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length]
        headers["_version"] = version
        return method, path, headers, body

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        keep_alive = headers.get("connection", "").lower() != "close" and headers.get("_version") != "HTTP/1.0"
        path = path.split("?", 1)[0].rstrip("/")
        state = self.state
        if method == "POST" and path.endswith("/chat/completions"):
            state.chat_requests += 1
            state.last_body = body
            payload = state.ok if keep_alive else state.ok_close
            if state.latency_s > 0:
                self.pending += 1
                asyncio.get_running_loop().call_later(state.latency_s, self._delayed, payload, keep_alive)
                return
            self._write(payload, keep_alive)
        elif method == "GET" and path.endswith("/models"):
            self._write(_response("200 OK", MODELS, keep_alive=keep_alive), keep_alive)
        elif method == "POST" and path == "/_bench/latency":
            state.latency_s = max(0.0, float(body.decode() or 0) / 1000)
            self._write(_response("200 OK", json.dumps({"latency_ms": state.latency_s * 1000}).encode(), keep_alive=keep_alive), keep_alive)
        elif method == "GET" and path == "/_bench/stats":
            stats = {"chat_requests": state.chat_requests, "last_body_bytes": len(state.last_body), "latency_ms": state.latency_s * 1000}
            self._write(_response("200 OK", json.dumps(stats).encode(), keep_alive=keep_alive), keep_alive)
        elif method == "GET" and path == "/_bench/last":
            self._write(_response("200 OK", state.last_body, keep_alive=keep_alive), keep_alive)
        elif method == "GET" and path in ("", "/health", "/healthz"):
            self._write(_response("200 OK", b'{"status":"ok"}', keep_alive=keep_alive), keep_alive)
        else:
            self._write(_response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}', keep_alive=keep_alive), keep_alive)

    def _delayed(self, payload: bytes, keep_alive: bool) -> None:
        self.pending -= 1
        self._send(payload, keep_alive)
        if self.pending == 0:
            for queued, alive in self.queue:
                self._send(queued, alive)
            self.queue.clear()

    def _write(self, payload: bytes, keep_alive: bool) -> None:
        if self.pending:  # a delayed answer is ahead of this one on the connection
            self.queue.append((payload, keep_alive))
        else:
            self._send(payload, keep_alive)

    def _send(self, payload: bytes, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(payload)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int, latency_ms: float) -> None:
    state = State(latency_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HTTPProtocol(state), host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready http://{host}:{bound}/v1", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.latency_ms))


if __name__ == "__main__":
    main()
