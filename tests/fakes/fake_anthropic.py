"""A fake Anthropic Messages API server: real HTTP on loopback, stdlib only.

    with FakeAnthropic() as fake:                   # port 0, background thread
        fake.script([{"mode": "overloaded"}, {"mode": "ok"}])
        ... point a client at fake.base_url ...     # http://127.0.0.1:PORT (the API root)
        fake.calls                                  # what the server received

    python -m tests.fakes.fake_anthropic --port 8098   # standalone; prints "ready <base_url>"

Endpoints: POST /v1/messages (JSON, or SSE events with `stream: true`), GET /v1/models,
and for tests in another process: POST /_control/script (a JSON list of behaviours),
POST /_control/default, GET /_control/calls, POST /_control/reset.

Requests are checked like the real API checks them: the `anthropic-version` header is
required, and the body needs `model`, a positive integer `max_tokens` and a non-empty
`messages` list of user/assistant turns (a "system" role there is a 400: system text goes
in the top-level `system` field). The key is never checked or stored: a call records only
whether `x-api-key` was present (`api_key`) and the `anthropic_version` it named.

A behaviour is {"mode", "latency_s", "retry_after", "text"}, as in fake_openai; scripted
behaviours are consumed one per messages request, then the default applies:
  ok                the answer (scripted `text`, or "Fake answer to: <last user message, 60 chars>")
  error500          HTTP 500 api_error
  overloaded        HTTP 529 overloaded_error (Anthropic's "try again later"; Retry-After if `retry_after`)
  rate_limit        HTTP 429 rate_limit_error with Retry-After: `retry_after` seconds (default 1)
  hang              no answer for 60 s, or until the server closes
  malformed         200 with a body that is not JSON (stream: an event whose data is not JSON)
  cut_stream        the answer stops halfway: truncated JSON, or a stream without message_stop
  no_usage          a normal answer without `usage` (stream: no usage in message_start/message_delta)
  auth              HTTP 401 authentication_error
  bad_request       HTTP 400 invalid_request_error (`text`, if set, is the error message)
  mid_stream_error  stream: 200, some text, then an `error` event (overloaded_error);
                    without streaming, the same as overloaded
Responses are HTTP/1.0, so a stream's end is the connection's end, as with a cut proxy.
"""

from __future__ import annotations

import json
import sys
from http.server import ThreadingHTTPServer
from typing import Any

from tests.fakes import fake_openai
from tests.fakes.fake_openai import BEHAVIOUR_KEYS, HANG_S, _format_seconds, _pieces, answer_text

MODES = (*fake_openai.MODES, "overloaded", "mid_stream_error")
FAKE_MODEL = "fake-claude"
ANTHROPIC_VERSION = "2023-06-01"

# mode -> status, Anthropic error type, default message
_FAILURES: dict[str, tuple[int, str, str]] = {
    "error500": (500, "api_error", "Internal server error"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "mid_stream_error": (529, "overloaded_error", "Overloaded"),  # when not streaming
    "rate_limit": (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    "auth": (401, "authentication_error", "invalid x-api-key"),
    "bad_request": (400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


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


class FakeState(fake_openai.FakeState):
    """fake_openai's shared state, validating behaviours against this server's modes."""

    def script(self, behaviours: list[dict[str, Any]]) -> None:
        checked = [check_behaviour(behaviour) for behaviour in behaviours]
        with self.lock:
            self.queue.clear()
            self.queue.extend(checked)

    def set_default(self, behaviour: dict[str, Any]) -> None:
        checked = check_behaviour(behaviour)
        with self.lock:
            self.default = checked


def _problem(body: Any) -> str | None:
    """What the real API would reject in this body, as its error message; None if acceptable."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required (a positive integer)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{index}: Input should be a valid dictionary"
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not (isinstance(content, str) and content) and not (isinstance(content, list) and content):
            return f"messages.{index}: all messages must have non-empty content"
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        return "system: Input should be a valid string"
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1):
        return "temperature: Input should be less than or equal to 1"
    return None


def _usage(body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
    chars = len(json.dumps(body.get("system") or "")) + sum(len(json.dumps(m.get("content", ""))) for m in body["messages"])
    return {"input_tokens": max(1, chars // 4), "output_tokens": len(pieces)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must never keep the process alive
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: FakeState):
        super().__init__(address, _Handler)
        self.state = state


class _Handler(fake_openai._Handler):
    """fake_openai's handler plumbing (body reading, sending, control routes), Anthropic's routes."""

    server: _Server  # type: ignore[assignment]

    def _error(self, status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        headers = {"request-id": f"req_fake_{len(self.state.calls)}", **(headers or {})}
        self._json(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)

    def _record(self, body: Any) -> dict[str, Any]:
        call = super()._record(body)  # headers without the secret ones, and `authorization` presence
        names = {name.lower() for name in self.headers.keys()}
        call["api_key"] = "x-api-key" in names
        call["anthropic_version"] = self.headers.get("anthropic-version")
        return call

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/_control/calls":
            self._json(200, self.state.snapshot())
        elif self.path.rstrip("/") == "/v1/models":
            self.state.record(self._record(None))
            model = {"type": "model", "id": FAKE_MODEL, "display_name": "Fake Claude", "created_at": "2025-01-01T00:00:00Z"}
            self._json(200, {"data": [model], "has_more": False, "first_id": FAKE_MODEL, "last_id": FAKE_MODEL})
        else:
            self._error(404, f"no route GET {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        body, problem = self._read_json()
        if self.path.startswith("/_control/"):
            self._control(self.path.removeprefix("/_control/"), body, problem)
        elif self.path.rstrip("/") == "/v1/messages":
            self._messages(body, problem)
        else:
            self._error(404, f"no route POST {self.path}", "not_found_error")

    def _messages(self, body: Any, problem: str | None) -> None:
        call = self._record(body)
        behaviour = self.state.next_behaviour()
        call["mode"] = behaviour["mode"]
        self.state.record(call)
        if not self._sleep(float(behaviour.get("latency_s", 0.0))):
            return
        if not self.headers.get("anthropic-version"):
            self._error(400, "anthropic-version: header is required", "invalid_request_error")
            return
        problem = problem or _problem(body)
        if problem:
            self._error(400, problem, "invalid_request_error")
            return
        mode = behaviour["mode"]
        if mode == "hang":
            self._sleep(HANG_S)
            return  # close without a word: the client must have timed out by now
        streamed = body.get("stream") is True
        failure = _FAILURES.get(mode)
        if failure is not None and not (mode == "mid_stream_error" and streamed):
            status, kind, default_message = failure
            headers = None
            if mode == "rate_limit" or (status == 529 and "retry_after" in behaviour):
                headers = {"retry-after": _format_seconds(behaviour.get("retry_after", 1))}
            self._error(status, str(behaviour.get("text") or default_message), kind, headers=headers)
            return
        text = behaviour.get("text") or answer_text(body["messages"])
        if streamed:
            self._stream(body, text, mode)
        else:
            self._complete(body, text, mode)

    # -- answers ----------------------------------------------------------------------------

    def _message_id(self) -> str:
        return f"msg_fake_{len(self.state.calls)}"

    def _complete(self, body: dict[str, Any], text: str, mode: str) -> None:
        pieces, finish = _pieces(text, body.get("max_tokens"))
        payload: dict[str, Any] = {
            "id": self._message_id(),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": _STOP_REASONS[finish],
            "stop_sequence": None,
        }
        if mode != "no_usage":
            payload["usage"] = _usage(body, pieces)
        raw = json.dumps(payload).encode()
        if mode == "malformed":
            raw = b"<html>502 Bad Gateway</html> this is not JSON"
        elif mode == "cut_stream":
            raw = raw[: len(raw) // 2]  # a body that stops mid-object
        self._send(200, raw, headers={"request-id": f"req_fake_{len(self.state.calls)}"})

    def _stream(self, body: dict[str, Any], text: str, mode: str) -> None:
        pieces, finish = _pieces(text, body.get("max_tokens"))
        usage = _usage(body, pieces)
        message: dict[str, Any] = {
            "id": self._message_id(),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if mode != "no_usage":
            message["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
        events: list[tuple[str, Any]] = [
            ("message_start", {"type": "message_start", "message": message}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in pieces
        ]
        if mode == "cut_stream":
            events = events[: max(4, len(events) // 2)]  # some text, then the line goes dead
        elif mode == "malformed":
            events = events[:4] + [("content_block_delta", "{this is not json")]
        elif mode == "mid_stream_error":
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            events = events[:4] + [("error", error)]
        else:
            message_delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": _STOP_REASONS[finish], "stop_sequence": None}}
            if mode != "no_usage":
                message_delta["usage"] = {"output_tokens": usage["output_tokens"]}
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", message_delta),
                ("message_stop", {"type": "message_stop"}),
            ]
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("request-id", f"req_fake_{len(self.state.calls)}")
            self.end_headers()  # no Content-Length: HTTP/1.0 ends the body by closing
            for name, data in events:
                data = data if isinstance(data, str) else json.dumps(data)
                self.wfile.write(f"event: {name}\ndata: {data}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class FakeAnthropic(fake_openai.FakeOpenAI):
    """The fake server in a background thread; starts at construction, stops on `close()`."""

    server_class = _Server
    state_class = FakeState

    @property
    def base_url(self) -> str:
        """The API root, as with https://api.anthropic.com: clients append /v1/messages."""
        return self.url


def main(argv: list[str] | None = None) -> int:
    return fake_openai.main(argv, FakeAnthropic, "A fake Anthropic Messages API server for tests.")


if __name__ == "__main__":
    sys.exit(main())
