"""An async client for Anthropic's Messages API (`POST {base_url}/v1/messages`), plain or
streamed, with the same surface as `OpenAICompatible`: `generate()` returns a `Generation`,
`stream()` yields text deltas and then one `Generation`, and every failure leaves as a
`ProviderError` whose `kind` a fallback policy can switch on and whose message never
contains the API key.

The differences from chat completions that this module absorbs:
  * the key goes in `x-api-key`, and every request names the API version;
  * system instructions are a separate `system` field, not a message;
  * `messages` holds only user and assistant turns, alternating (same-role turns are merged);
  * the answer is a list of content blocks, usage is `input_tokens`/`output_tokens`;
  * a stream is typed events (`message_start`, `content_block_delta`, `message_delta`,
    `message_stop`, `error`, `ping`) and must end with `message_stop`;
  * HTTP 529 means "overloaded": a server-side, retryable condition.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.generator.model_http import Answer, ModelClient, json_body
from services.generator.providers import Generation, HTTPProvider, ProviderError, citations_in, estimate_tokens, parse_retry_after, resolve_spec
from shared.config import ModelSpec
from shared.schema import ChatMessage, Usage

DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
PROVIDER = "anthropic"

# Anthropic's stop reasons in the vocabulary the rest of the mesh (and OpenAI) uses;
# anything not listed passes through unchanged.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# The `error.type` of an in-stream error event (no HTTP status there) -> ProviderError kind.
_ERROR_TYPE_KINDS = {
    "overloaded_error": "server_error",
    "api_error": "server_error",
    "rate_limit_error": "rate_limited",
    "authentication_error": "auth",
    "permission_error": "auth",
    "invalid_request_error": "bad_request",
    "not_found_error": "bad_request",
    "request_too_large": "bad_request",
}

_ERROR_DETAIL_CHARS = 300  # how much of a provider's error body a message may quote
_MAX_TEMPERATURE = 1.0  # Anthropic accepts 0..1 (OpenAI 0..2); clamp so a shared setting cannot 400


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of text parts / text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type", "text") == "text"
        )
    return ""


def _as_dict(message: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    return dict(message)


def split_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """Chat messages -> (system text, Anthropic turns).

    System messages, wherever they are, are joined into the system text (blank line between);
    user and assistant turns keep their order, with consecutive same-role turns merged and
    empty turns dropped (the API rejects empty text content).
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for raw in messages:
        message = _as_dict(raw)
        role = message.get("role")
        text = _text_of(message.get("content")).strip()
        if role == "system":
            if text:
                system.append(text)
            continue
        if role not in ("user", "assistant"):
            raise ProviderError("bad_request", f"{PROVIDER}: a message has the role {role!r}; expected system, user or assistant")
        if not text:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{text}"
        else:
            turns.append({"role": role, "content": text})
    return "\n\n".join(system), turns


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _input_tokens(raw: Mapping[str, Any]) -> int | None:
    """Input tokens including prompt-cache reads and writes (they are all billed input)."""
    base = _int(raw.get("input_tokens"))
    if base is None:
        return None
    cached = (_int(raw.get("cache_creation_input_tokens")) or 0) + (_int(raw.get("cache_read_input_tokens")) or 0)
    return base + cached


def _usage(input_tokens: int | None, output_tokens: int | None, system: str, turns: Sequence[Mapping[str, str]], text: str) -> Usage:
    """Usage as reported, with any missing half estimated (and then marked estimated)."""
    if input_tokens is not None and output_tokens is not None:
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    if input_tokens is None:
        input_tokens = estimate_tokens(system) + sum(estimate_tokens(turn["content"]) for turn in turns)
    if output_tokens is None:
        output_tokens = estimate_tokens(text)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, estimated=True)


def _finish_reason(stop_reason: Any) -> str:
    if not stop_reason:
        return "stop"
    return STOP_REASONS.get(str(stop_reason), str(stop_reason))


def _error_parts(body: Any) -> tuple[str | None, str]:
    """(error type, message) from Anthropic's `{"type": "error", "error": {"type", "message"}}`."""
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            kind = error.get("type")
            message = error.get("message") or error.get("detail") or ""
            return (str(kind) if kind else None), str(message)
        if isinstance(error, str):
            return None, error
    return None, json.dumps(body) if body is not None else ""


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) for each event of a server-sent event stream."""
    event, data = "", list[str]()
    async for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield event, "\n".join(data)
            event, data = "", list[str]()
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


@dataclass
class _StreamState:
    model: str
    parts: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_reason: str | None = None
    response_id: str | None = None
    started: bool = False  # saw message_start
    done: bool = False  # saw message_stop


class AnthropicMessages(HTTPProvider):
    """An async client for Anthropic's `POST {base_url}/v1/messages`, plain or streamed.

    `base_url` is the API root (`https://api.anthropic.com`); a base URL that already ends
    in `/v1` is accepted too, so `.../v1/v1/messages` never happens.
    """

    provider = PROVIDER

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout_s: float = 30,
        client: ModelClient | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._own(api_key, client)

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        env: Mapping[str, str],
        *,
        name: str = "",
        client: ModelClient | None = None,
    ) -> AnthropicMessages:
        """A client for a catalog entry; `name` is the catalog key, used when the spec names no model."""
        model, base_url, api_key = resolve_spec(spec, env, name, DEFAULT_ANTHROPIC_BASE_URL)
        return cls(base_url, api_key, model, timeout_s=spec.timeout_s, client=client)

    # -- requests -------------------------------------------------------------------------

    @property
    def _url(self) -> str:
        if self.base_url.endswith("/v1"):
            return f"{self.base_url}/messages"
        return f"{self.base_url}/v1/messages"

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _payload(self, system: str, turns: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool, top_p: float | None = None) -> dict[str, Any]:
        if not turns:
            raise self._error("bad_request", "there is no user or assistant message to send")
        payload: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens}
        if system:
            payload["system"] = system
        payload["messages"] = turns
        payload["temperature"] = min(max(float(temperature), 0.0), _MAX_TEMPERATURE)
        if top_p is not None:
            payload["top_p"] = top_p
        payload["stream"] = stream
        return payload

    def _error(self, kind: str, message: str, **extra: Any) -> ProviderError:
        return ProviderError(kind, self._scrub(f"{PROVIDER}/{self.model}: {message}"), **extra)

    def _status_error(self, response: Answer | httpx.Response) -> ProviderError:
        status = response.status_code
        if status == 429:
            kind = "rate_limited"
        elif status in (401, 403):
            kind = "auth"
        elif status >= 500:  # includes 529 overloaded
            kind = "server_error"
        else:
            kind = "bad_request"
        try:
            error_type, detail = _error_parts(response.json())
        except ValueError:
            error_type, detail = None, response.text.strip()
        detail = detail[:_ERROR_DETAIL_CHARS]
        if error_type:
            detail = f"{error_type}: {detail}" if detail else error_type
        message = f"HTTP {status} from {self._url}" + (f": {detail}" if detail else "")
        if request_id := response.headers.get("request-id"):
            message += f" (request-id {request_id})"
        retry_after = None
        if kind in ("rate_limited", "server_error"):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        return self._error(kind, message, status=status, retry_after=retry_after)

    def _transport_error(self, exc: httpx.HTTPError | httpx.InvalidURL, timeout: float) -> ProviderError:
        if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
            # A configuration mistake: retrying the same URL cannot help.
            return self._error("bad_request", f"the base URL {self.base_url!r} is not usable: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return self._error("timeout", f"no answer from {self._url} within {timeout:g}s ({type(exc).__name__})")
        return self._error("connection", f"cannot reach {self._url}: {type(exc).__name__}: {exc}")

    async def generate(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float | None = None,
        timeout_s: float | None = None,
    ) -> Generation:
        """One message; `timeout_s` bounds the whole call, not just each network wait."""
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        system, turns = split_messages(messages)
        payload = self._payload(system, turns, max_tokens, temperature, stream=False, top_p=top_p)
        try:
            # httpx timeouts bound each phase; asyncio.timeout bounds a server that trickles bytes.
            async with asyncio.timeout(timeout):
                response = await self._client.post(self._url, self._request_headers(False), json_body(payload), timeout)
        except TimeoutError:
            raise self._error("timeout", f"no complete answer from {self._url} within {timeout:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc, timeout) from None
        if response.status_code >= 400:
            raise self._status_error(response)
        return self._parse_message(response, system, turns)

    def _parse_message(self, response: Answer, system: str, turns: Sequence[Mapping[str, str]]) -> Generation:
        try:
            body = response.json()
        except ValueError:
            raise self._error("malformed", f"the answer is not valid JSON: {response.text[:80]!r}") from None
        if not isinstance(body, Mapping):
            raise self._error("malformed", "the answer is not a JSON object")
        if body.get("type") == "error":  # an error inside a 200 (some proxies do this)
            raise self._in_band_error(body)
        content = body.get("content")
        if not isinstance(content, list):
            raise self._error("malformed", "the answer has no content blocks")
        texts = []
        for block in content:
            if not isinstance(block, Mapping):
                raise self._error("malformed", "a content block is not a JSON object")
            if block.get("type") == "text":
                if not isinstance(block.get("text"), str):
                    raise self._error("malformed", "a text block has no text")
                texts.append(block["text"])
        text = "".join(texts)
        raw_usage = body.get("usage") if isinstance(body.get("usage"), Mapping) else {}
        usage = _usage(_input_tokens(raw_usage), _int(raw_usage.get("output_tokens")), system, turns, text)
        return Generation(
            text=text,
            model=str(body.get("model") or self.model),
            provider=PROVIDER,
            usage=usage,
            citations=citations_in(text),
            finish_reason=_finish_reason(body.get("stop_reason")),
            response_id=str(body["id"]) if body.get("id") else None,
        )

    def _in_band_error(self, body: Any) -> ProviderError:
        error_type, detail = _error_parts(body)
        kind = _ERROR_TYPE_KINDS.get(error_type or "", "server_error")
        label = f"{error_type}: {detail}" if error_type else detail
        return self._error(kind, f"error inside the answer: {label[:_ERROR_DETAIL_CHARS]}")

    async def stream(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[str | Generation]:
        """Text deltas as they arrive, then one `Generation` with the full text and usage.

        `timeout_s` bounds each wait for bytes (connect, first byte, between events), not the
        whole stream: a long answer that keeps flowing is not a timeout.
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        system, turns = split_messages(messages)
        payload = self._payload(system, turns, max_tokens, temperature, stream=True, top_p=top_p)
        state = _StreamState(model=self.model)
        started = False
        try:
            async with self._client.stream(self._url, self._request_headers(True), json_body(payload), timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response)
                started = True
                async for _event, data in _sse_events(response.aiter_lines()):
                    delta = self._apply_event(state, data)
                    if delta:
                        yield delta
                    if state.done:
                        break
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if started and not isinstance(exc, httpx.TimeoutException):
                raise self._error("malformed", f"stream cut: the connection dropped ({type(exc).__name__})") from None
            raise self._transport_error(exc, timeout) from None
        if not state.done:
            raise self._error("malformed", "stream cut: it ended before message_stop")
        text = "".join(state.parts)
        yield Generation(
            text=text,
            model=state.model,
            provider=PROVIDER,
            usage=_usage(state.input_tokens, state.output_tokens, system, turns, text),
            citations=citations_in(text),
            finish_reason=_finish_reason(state.stop_reason),
            response_id=state.response_id,
        )

    def _apply_event(self, state: _StreamState, data: str) -> str:
        """Fold one SSE event into the stream state; returns its text delta ("" if none)."""
        try:
            event = json.loads(data)
        except ValueError:
            raise self._error("malformed", f"a stream event is not valid JSON: {data[:80]!r}") from None
        if not isinstance(event, Mapping):
            raise self._error("malformed", "a stream event is not a JSON object")
        kind = event.get("type")
        if kind == "error":  # e.g. overloaded_error after the 200 was already sent
            raise self._in_band_error(event)
        if kind == "message_start":
            state.started = True
            message = event.get("message") if isinstance(event.get("message"), Mapping) else {}
            if message.get("model"):
                state.model = str(message["model"])
            if message.get("id"):
                state.response_id = str(message["id"])
            usage = message.get("usage") if isinstance(message.get("usage"), Mapping) else {}
            state.input_tokens = _input_tokens(usage)
            state.output_tokens = _int(usage.get("output_tokens"))
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, Mapping) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if not isinstance(text, str):
                    raise self._error("malformed", "a text_delta has no text")
                if text:
                    state.parts.append(text)
                    return text
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, Mapping) and delta.get("stop_reason"):
                state.stop_reason = str(delta["stop_reason"])
            usage = event.get("usage") if isinstance(event.get("usage"), Mapping) else {}
            if (output := _int(usage.get("output_tokens"))) is not None:
                state.output_tokens = output  # cumulative, so the last one wins
            if (input_tokens := _input_tokens(usage)) is not None:
                state.input_tokens = input_tokens
        elif kind == "message_stop":
            if not state.started:
                raise self._error("malformed", "the stream ended without a message_start")
            state.done = True
        # ping, content_block_start/stop and unknown event types carry nothing we need.
        return ""
