"""Model providers for the generator: the result type, the error type, and an
OpenAI-compatible chat-completions client (OpenAI itself, vLLM, Ollama, LiteLLM, the
test fake, ...).

Every failure of a provider leaves this module as a `ProviderError` whose `kind` a
fallback policy can switch on, and whose message never contains the API key.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.generator.model_http import Answer, ModelClient, json_body, new_client
from shared.config import ModelSpec
from shared.generation import Generation, estimate_tokens
from shared.schema import ChatMessage, Passage, Usage

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
# Anthropic serves an OpenAI-compatible chat-completions endpoint under this base.
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
_DEFAULT_BASE_URLS = {"openai": DEFAULT_OPENAI_BASE_URL, "anthropic": DEFAULT_ANTHROPIC_BASE_URL}

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's question using only the numbered "
    "context passages below. Cite every passage you use with its number in square "
    "brackets, like [1] or [2]. If the passages do not contain the answer, say that you "
    "could not find it in the knowledge base. Do not invent facts."
)

_CITATION = re.compile(r"\[(\d{1,3})\]")
_ERROR_DETAIL_CHARS = 300  # how much of a provider's error body a message may quote


class ProviderError(Exception):
    """A provider call that failed, classified so callers can decide to retry or fall back."""

    KINDS = frozenset(
        {"timeout", "rate_limited", "server_error", "bad_request", "auth", "malformed", "connection", "missing_key"}
    )
    RETRYABLE_KINDS = frozenset({"timeout", "rate_limited", "server_error", "connection", "malformed"})

    def __init__(self, kind: str, message: str, *, status: int | None = None, retry_after: float | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown ProviderError kind {kind!r}; expected one of {sorted(self.KINDS)}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in self.RETRYABLE_KINDS

    def __repr__(self) -> str:
        return f"ProviderError(kind={self.kind!r}, status={self.status!r}, message={self.message!r})"


def citations_in(text: str, limit: int | None = None) -> list[int]:
    """The distinct [n] markers in `text`, in order of first appearance (only 1..limit when given)."""
    seen: list[int] = []
    for match in _CITATION.finditer(text):
        number = int(match.group(1))
        if number >= 1 and (limit is None or number <= limit) and number not in seen:
            seen.append(number)
    return seen


def _as_dict(message: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    return dict(message)


def _format_passage(number: int, passage: Passage) -> str:
    label = " — ".join(part for part in (passage.title, passage.source) if part)
    header = f"[{number}] {label}" if label else f"[{number}]"
    return f"{header}\n{passage.text.strip()}"


def build_messages(
    question: str,
    passages: Sequence[Passage],
    history: Iterable[ChatMessage | Mapping[str, Any]] = (),
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for a grounded answer: instructions and numbered passages, the history, the question.

    A custom `system_prompt` replaces the instructions; without passages it stands alone (a
    classify or rewrite task), while the default grounded prompt says that nothing was found.
    """
    system = system_prompt or DEFAULT_SYSTEM_PROMPT
    if passages:
        context = "\n\n".join(_format_passage(number, passage) for number, passage in enumerate(passages, 1))
        system = f"{system}\n\nContext passages:\n\n{context}"
    elif system_prompt is None:
        system = f"{system}\n\nContext passages:\n\n(no passages were found)"
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    turns = [_as_dict(turn) for turn in history]
    # The grounding prompt stays the only system instruction, so history cannot override it.
    turns = [turn for turn in turns if turn.get("role") != "system"]
    # Histories often already end with the current question; asking it twice confuses models.
    if turns and turns[-1].get("role") == "user" and turns[-1].get("content") == question:
        turns.pop()
    messages.extend(turns)
    messages.append({"role": "user", "content": question})
    return messages


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds, given either as a number or as an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def _estimated_usage(messages: Sequence[Mapping[str, Any]], text: str) -> Usage:
    prompt = sum(estimate_tokens(_message_text(message)) for message in messages)
    return Usage(input_tokens=prompt, output_tokens=estimate_tokens(text), estimated=True)


def _parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(input_tokens=prompt, output_tokens=completion)


def _error_detail(response: Answer | httpx.Response) -> str:
    """The provider's own explanation from an error body: {"error": {"message": ...}} and variants."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:_ERROR_DETAIL_CHARS]
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            message = error.get("message") or error.get("detail")
            if message:
                return str(message)[:_ERROR_DETAIL_CHARS]
        elif isinstance(error, str):
            return error[:_ERROR_DETAIL_CHARS]
    return json.dumps(body)[:_ERROR_DETAIL_CHARS]


def _status_kind(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status >= 500:
        return "server_error"
    return "bad_request"


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` payloads of a server-sent event stream, one per event."""
    data: list[str] = []
    async for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def resolve_spec(spec: ModelSpec, env: Mapping[str, str], name: str, default_base_url: str) -> tuple[str, str, str | None]:
    """(model, base URL, API key) of a catalog entry; the key only ever from the environment."""
    model = spec.model or name
    if not model:
        raise ProviderError("bad_request", "the model spec names no model; set 'model' in the models catalog")
    base_url = spec.base_url or (env.get(spec.base_url_env) if spec.base_url_env else None) or default_base_url
    api_key = None
    if spec.api_key_env:
        api_key = env.get(spec.api_key_env) or None
        if api_key is None:
            raise ProviderError("missing_key", f"model {model!r} needs an API key: set the environment variable {spec.api_key_env}")
    return model, base_url, api_key


class HTTPProvider:
    """What every HTTP model client shares: its HTTP client's lifetime, and never leaking the key."""

    _api_key: str | None
    _client: ModelClient
    _owns_client: bool
    base_url: str
    model: str

    def _own(self, api_key: str | None, client: ModelClient | None) -> None:
        self._api_key = api_key or None
        self._owns_client = client is None
        self._client = client or new_client()
        self._wire_headers: dict[bool, list[tuple[bytes, bytes]]] = {}

    def _headers(self, stream: bool) -> dict[str, str]:
        raise NotImplementedError

    def _request_headers(self, stream: bool) -> list[tuple[bytes, bytes]]:
        """`_headers` as bytes, built once per client (they only change with `stream`)."""
        wire = self._wire_headers.get(stream)
        if wire is None:
            wire = self._wire_headers[stream] = [(name.encode(), value.encode()) for name, value in self._headers(stream).items()]
        return wire

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _scrub(self, text: str) -> str:
        """Remove the key from text that came from elsewhere (error bodies, exception strings)."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text


class OpenAICompatible(HTTPProvider):
    """An async client for `POST {base_url}/chat/completions`, plain or streamed."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout_s: float = 30,
        client: ModelClient | None = None,
        *,
        provider: str = "openai",
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.provider = provider
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
    ) -> OpenAICompatible:
        """A client for a catalog entry; `name` is the catalog key, used when the spec names no model."""
        model, base_url, api_key = resolve_spec(spec, env, name, _DEFAULT_BASE_URLS.get(spec.provider, DEFAULT_OPENAI_BASE_URL))
        return cls(base_url, api_key, model, timeout_s=spec.timeout_s, client=client, provider=spec.provider)

    # -- requests -------------------------------------------------------------------------

    @property
    def _url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _payload(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, temperature: float, stream: bool, top_p: float | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if top_p is not None:
            payload["top_p"] = top_p
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _error(self, kind: str, message: str, **extra: Any) -> ProviderError:
        return ProviderError(kind, self._scrub(f"{self.provider}/{self.model}: {message}"), **extra)

    def _status_error(self, response: Answer | httpx.Response) -> ProviderError:
        status = response.status_code
        kind = _status_kind(status)
        detail = _error_detail(response)
        message = f"HTTP {status} from {self._url}" + (f": {detail}" if detail else "")
        retry_after = None
        if kind == "rate_limited":
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            ms = response.headers.get("retry-after-ms")  # OpenAI's finer-grained variant
            if ms is not None:
                retry_after = parse_retry_after(ms)
                retry_after = retry_after / 1000 if retry_after is not None else None
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
        """One chat completion; `timeout_s` bounds the whole call, not just each network wait."""
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        wire = [_as_dict(message) for message in messages]
        payload = self._payload(wire, max_tokens, temperature, stream=False, top_p=top_p)
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
        return self._parse_completion(response, wire)

    def _parse_completion(self, response: Answer, wire: Sequence[Mapping[str, Any]]) -> Generation:
        try:
            body = response.json()
        except ValueError:
            raise self._error("malformed", f"the answer is not valid JSON: {response.text[:80]!r}") from None
        choices = body.get("choices") if isinstance(body, Mapping) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], Mapping):
            raise self._error("malformed", "the answer has no choices")
        message = choices[0].get("message")
        if not isinstance(message, Mapping):
            raise self._error("malformed", "the first choice has no message")
        text = message.get("content")
        if text is None:
            text = message.get("refusal") or ""  # a refusal is still an answer to show
        if not isinstance(text, str):
            raise self._error("malformed", "the message content is not text")
        usage = _parse_usage(body.get("usage")) or _estimated_usage(wire, text)
        return Generation(
            text=text,
            model=str(body.get("model") or self.model),
            provider=self.provider,
            usage=usage,
            citations=citations_in(text),
            finish_reason=str(choices[0].get("finish_reason") or "stop"),
            response_id=str(body["id"]) if body.get("id") else None,
        )

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

        `timeout_s` bounds each wait for bytes (connect, first byte, between chunks), not the
        whole stream: a long answer that keeps flowing is not a timeout.
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        wire = [_as_dict(message) for message in messages]
        payload = self._payload(wire, max_tokens, temperature, stream=True, top_p=top_p)
        state = _StreamState(model=self.model)
        started = False
        try:
            async with self._client.stream(self._url, self._request_headers(True), json_body(payload), timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response)
                started = True
                async for data in _sse_data(response.aiter_lines()):
                    if data.strip() == "[DONE]":
                        state.done = True
                        break
                    delta = self._apply_chunk(state, data)
                    if delta:
                        yield delta
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if started and not isinstance(exc, httpx.TimeoutException):
                raise self._error("malformed", f"stream cut: the connection dropped ({type(exc).__name__})") from None
            raise self._transport_error(exc, timeout) from None
        if not state.done and state.finish_reason is None:
            raise self._error("malformed", "stream cut: it ended before [DONE] or a finish_reason")
        text = "".join(state.parts)
        yield Generation(
            text=text,
            model=state.model,
            provider=self.provider,
            usage=state.usage or _estimated_usage(wire, text),
            citations=citations_in(text),
            finish_reason=state.finish_reason or "stop",
            response_id=state.response_id,
        )

    def _apply_chunk(self, state: _StreamState, data: str) -> str:
        """Fold one SSE chunk into the stream state; returns its text delta ("" if none)."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._error("malformed", f"a stream chunk is not valid JSON: {data[:80]!r}") from None
        if not isinstance(chunk, Mapping):
            raise self._error("malformed", "a stream chunk is not a JSON object")
        if chunk.get("error"):  # some servers report failures in-band after a 200
            error = chunk["error"]
            detail = error.get("message") if isinstance(error, Mapping) else error
            raise self._error("server_error", f"error inside the stream: {str(detail)[:_ERROR_DETAIL_CHARS]}")
        if chunk.get("model"):
            state.model = str(chunk["model"])
        if chunk.get("id"):
            state.response_id = str(chunk["id"])
        usage = _parse_usage(chunk.get("usage"))
        if usage is not None:
            state.usage = usage
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, Mapping) else None
        if isinstance(text, str) and text:
            state.parts.append(text)
            return text
        return ""


@dataclass
class _StreamState:
    model: str
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    done: bool = False
