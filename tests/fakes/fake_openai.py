"""A fake OpenAI chat-completions server: real HTTP on loopback, stdlib only.

    with FakeOpenAI() as fake:                      # port 0, background thread
        fake.script([{"mode": "rate_limit", "retry_after": 2}, {"mode": "ok"}])
        ... point a client at fake.base_url ...     # http://127.0.0.1:PORT/v1
        fake.calls                                  # what the server received

    python -m tests.fakes.fake_openai --port 8099   # standalone; prints "ready <base_url>"

Endpoints: POST /v1/chat/completions (JSON or SSE with `stream: true`), GET /v1/models,
and for tests in another process: POST /_control/script (a JSON list of behaviours),
POST /_control/default, GET /_control/calls, POST /_control/reset.

A behaviour is {"mode", "latency_s", "retry_after", "text"}; scripted behaviours are
consumed one per chat request, and the default behaviour applies when none is left:
  ok          the answer (scripted `text`, or "Fake answer to: <last user message, 60 chars>")
  error500    HTTP 500 with an OpenAI-style error body
  rate_limit  HTTP 429 with Retry-After: `retry_after` seconds (default 1)
  hang        no answer for 60 s, or until the server closes
  malformed   200 with a body that is not JSON (stream: chunks that are not JSON)
  cut_stream  the answer stops halfway: truncated JSON, or a stream without finish/[DONE]
  no_usage    a normal answer without the `usage` field / usage chunk
  auth        HTTP 401 invalid_api_key
  bad_request HTTP 400 (`text`, if set, is the error message)
Responses are HTTP/1.0, so a stream's end is the connection's end, as with a cut proxy.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "error500", "rate_limit", "hang", "malformed", "cut_stream", "no_usage", "auth", "bad_request")
BEHAVIOUR_KEYS = ("mode", "latency_s", "retry_after", "text")
HANG_S = 60.0
FAKE_MODEL = "fake-model"
_SECRET_HEADERS = ("authorization", "api-key", "x-api-key")


def check_behaviour(behaviour: Any) -> dict[str, Any]:
    """A validated copy of one behaviour; a typo should fail the test that made it, loudly."""
    if not isinstance(behaviour, dict):
        raise ValueError(f"a behaviour is a JSON object, got {behaviour!r}")
    unknown = set(behaviour) - set(BEHAVIOUR_KEYS)
    if unknown:
        raise ValueError(f"unknown behaviour keys {sorted(unknown)}; known: {list(BEHAVIOUR_KEYS)}")
    mode = behaviour.get("mode", "ok")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
    return {"mode": mode, **{key: value for key, value in behaviour.items() if key != "mode"}}


def answer_text(messages: Any) -> str:
    """ "Fake answer to: " + the last user message, whitespace collapsed, first 60 characters."""
    last = ""
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            last = content if isinstance(content, str) else ""
    return f"Fake answer to: {' '.join(last.split())[:60]}"


class FakeState:
    """Everything the handlers share; guarded by one lock because handlers run in threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # wakes "hang" and latency sleeps at shutdown
        self.queue: deque[dict[str, Any]] = deque()
        self.default: dict[str, Any] = {"mode": "ok"}
        self.calls: list[dict[str, Any]] = []

    def next_behaviour(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.queue.popleft() if self.queue else self.default)

    def script(self, behaviours: list[dict[str, Any]]) -> None:
        checked = [check_behaviour(behaviour) for behaviour in behaviours]
        with self.lock:
            self.queue = deque(checked)

    def set_default(self, behaviour: dict[str, Any]) -> None:
        checked = check_behaviour(behaviour)
        with self.lock:
            self.default = checked

    def record(self, call: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(call)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.calls))  # a deep copy callers may mutate

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.default = {"mode": "ok"}
            self.calls.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must never keep the process alive
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: FakeState):
        super().__init__(address, _Handler)
        self.state = state


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    error_content_type = "application/json"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # tests read `calls`, not access logs

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def state(self) -> FakeState:
        return self.server.state

    def _read_json(self) -> tuple[Any, str | None]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None, None
        try:
            return json.loads(raw), None
        except ValueError as exc:
            return None, f"the request body is not valid JSON: {exc}"

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to tell it

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _error(self, status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; False means stop now without answering."""
        return not self.state.stopping.wait(max(0.0, seconds))

    def _record(self, body: Any) -> dict[str, Any]:
        headers = {name.lower(): value for name, value in self.headers.items() if name.lower() not in _SECRET_HEADERS}
        call = {
            "method": self.command,
            "path": self.path,
            "body": body,
            "headers": headers,
            "authorization": "authorization" in {name.lower() for name in self.headers.keys()},
            "at": time.time(),
        }
        return call

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/_control/calls":
            self._json(200, self.state.snapshot())
        elif self.path.rstrip("/") == "/v1/models":
            self.state.record(self._record(None))
            self._json(200, {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "baton-tests"}]})
        else:
            self._error(404, f"no route GET {self.path}", "invalid_request_error")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        body, problem = self._read_json()
        if self.path.startswith("/_control/"):
            self._control(self.path.removeprefix("/_control/"), body, problem)
        elif self.path.rstrip("/") == "/v1/chat/completions":
            self._chat(body, problem)
        else:
            self._error(404, f"no route POST {self.path}", "invalid_request_error")

    def _control(self, action: str, body: Any, problem: str | None) -> None:
        try:
            if problem:
                raise ValueError(problem)
            if action == "script":
                if not isinstance(body, list):
                    raise ValueError("POST /_control/script takes a JSON list of behaviours")
                self.state.script(body)
                self._json(200, {"queued": len(body)})
            elif action == "default":
                self.state.set_default(body)
                self._json(200, {"default": self.state.default})
            elif action == "reset":
                self.state.reset()
                self._json(200, {"reset": True})
            else:
                self._error(404, f"unknown control action {action!r}", "invalid_request_error")
        except ValueError as exc:
            self._error(400, str(exc), "invalid_request_error")

    def _chat(self, body: Any, problem: str | None) -> None:
        call = self._record(body)
        behaviour = self.state.next_behaviour()
        call["mode"] = behaviour["mode"]
        self.state.record(call)
        if not self._sleep(float(behaviour.get("latency_s", 0.0))):
            return
        if problem or not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._error(400, problem or "'messages' is required and must be a list", "invalid_request_error")
            return
        mode = behaviour["mode"]
        if mode == "hang":
            self._sleep(HANG_S)
            return  # close without a word: the client must have timed out by now
        failure = _FAILURES.get(mode)
        if failure is not None:
            status, kind, code, default_message = failure
            headers = {"Retry-After": _format_seconds(behaviour.get("retry_after", 1))} if mode == "rate_limit" else None
            self._error(status, str(behaviour.get("text") or default_message), kind, code, headers)
            return
        text = behaviour.get("text") or answer_text(body["messages"])
        if body.get("stream"):
            self._stream(body, text, mode)
        else:
            self._complete(body, text, mode)

    # -- answers ----------------------------------------------------------------------------

    def _complete(self, body: dict[str, Any], text: str, mode: str) -> None:
        pieces, finish_reason = _pieces(text, body.get("max_tokens"))
        answer = "".join(pieces)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{len(self.state.calls)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or FAKE_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish_reason}],
        }
        if mode != "no_usage":
            payload["usage"] = _usage(body["messages"], pieces)
        raw = json.dumps(payload).encode()
        if mode == "malformed":
            raw = b"<html>502 Bad Gateway</html> this is not JSON"
        elif mode == "cut_stream":
            raw = raw[: len(raw) // 2]  # a body that stops mid-object
        self._send(200, raw)

    def _stream(self, body: dict[str, Any], text: str, mode: str) -> None:
        pieces, finish_reason = _pieces(text, body.get("max_tokens"))
        base = {"id": f"chatcmpl-fake-{len(self.state.calls)}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.get("model") or FAKE_MODEL}

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events: list[Any] = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": piece}, None) for piece in pieces]
        if mode == "cut_stream":
            events = events[: max(2, len(events) // 2)]  # some text, then the line goes dead
        elif mode == "malformed":
            events = events[:2] + ["{this is not json"]
        else:
            events.append(chunk({}, finish_reason))
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            if include_usage and mode != "no_usage":
                events.append({**base, "choices": [], "usage": _usage(body["messages"], pieces)})
            events.append("[DONE]")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()  # no Content-Length: HTTP/1.0 ends the body by closing
            for event in events:
                data = event if isinstance(event, str) else json.dumps(event)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


# status, error type, error code, default message
_FAILURES: dict[str, tuple[int, str, str | None, str]] = {
    "error500": (500, "server_error", None, "The server had an error while processing your request."),
    "rate_limit": (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    "auth": (401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    "bad_request": (400, "invalid_request_error", None, "Invalid request: this model's maximum context length was exceeded."),
}


def _format_seconds(value: Any) -> str:
    seconds = float(value)
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:g}"


def _pieces(text: str, max_tokens: Any) -> tuple[list[str], str]:
    """The answer as stream deltas (a word with its trailing space each = one 'token')."""
    pieces = re.findall(r"\S+\s*", text) or ([text] if text else [])
    if isinstance(max_tokens, int) and 0 < max_tokens < len(pieces):
        return pieces[:max_tokens], "length"
    return pieces, "stop"


def _usage(messages: list[Any], pieces: list[str]) -> dict[str, int]:
    prompt_chars = sum(len(json.dumps(message.get("content", ""))) for message in messages if isinstance(message, dict))
    prompt = max(1, prompt_chars // 4)
    return {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}


class FakeOpenAI:
    """The fake server in a background thread; starts at construction, stops on `close()`.

    Other fake providers subclass it with their own `server_class`, `state_class` and `base_url`.
    """

    server_class: type[ThreadingHTTPServer] = _Server
    state_class: type[FakeState] = FakeState

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.state = self.state_class()
        self._server = self.server_class((host, port), self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__, daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The chat and model requests so far (not control requests), oldest first."""
        return self.state.snapshot()

    def script(self, behaviours: list[dict[str, Any]]) -> None:
        """Replace the queue of behaviours; each chat request consumes the first one left."""
        self.state.script(behaviours)

    def set_default(self, behaviour: dict[str, Any]) -> None:
        self.state.set_default(behaviour)

    def reset(self) -> None:
        self.state.reset()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.stopping.set()  # release hung handlers first, so nothing waits 60 s
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: list[str] | None = None, fake_class: type[FakeOpenAI] = FakeOpenAI, description: str = "A fake OpenAI chat-completions server for tests.") -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    # Handlers only set the event: the main thread does the shutdown outside signal context.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with fake_class(args.host, args.port) as fake:
        print(f"ready {fake.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
