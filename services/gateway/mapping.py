"""OpenAI Chat Completions <-> Baton Request/Reply. Pure: unit-tested without a mesh.

Request side: `parse_chat_request` validates an HTTP body and builds the Baton Request,
raising a 400 GatewayError that names the bad field. Reply side: the `chat.completion`
object, the streamed `chat.completion.chunk` objects, the `baton` extra and headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from services.gateway import errors
from shared.schema import ChatMessage, Reply, Request

MODEL_PREFIX = "baton/"
AUTO = "baton/auto"
ROLES: dict[str, Literal["system", "user", "assistant"]] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SESSION_ID = re.compile(r"^[A-Za-z0-9_\-=]{1,128}$")
MAX_USER_CHARS = 256
# Every body field the gateway acts on (or refuses with a reason below); any other is a
# 400 naming it, never silently ignored. The last three are Baton's extensions.
FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "tools", "functions", "user", "metadata", "response_format", "max_latency_ms", "max_cost_usd", "cache",
})


@dataclass(frozen=True)
class ChatCall:
    """One parsed `POST /v1/chat/completions`."""

    model: str
    request: Request
    stream: bool = False
    include_usage: bool = False


# -- models ----------------------------------------------------------------------


def model_ids(routes: Collection[str]) -> list[str]:
    return [AUTO] + [MODEL_PREFIX + route for route in routes]


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "baton"}


def models_list(routes: Collection[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, created) for m in model_ids(routes)]}


def route_of(model: str, routes: Collection[str]) -> str | None:
    """The route hint a model names: None for `baton/auto`; a 404 GatewayError if unknown."""
    if model == AUTO:
        return None
    route = model.removeprefix(MODEL_PREFIX)
    if model.startswith(MODEL_PREFIX) and route in routes:
        return route
    raise errors.model_not_found(model, model_ids(routes))


# -- request ---------------------------------------------------------------------


def session_id_for(user: str | None, tenant: str | None) -> str | None:
    """OpenAI's `user` as a Baton session id.

    Without a tenant, a `user` that is already a valid session id is used as is. With a
    tenant (or a `user` with other characters, e.g. an e-mail address) it is hashed
    together with the tenant, so two tenants using the same user name never share a
    session's history.
    """
    if not user:
        return None
    if tenant is None and SESSION_ID.match(user):
        return user
    digest = hashlib.sha256(f"{tenant or ''}\x00{user}".encode()).hexdigest()[:32]
    return f"u-{digest}"


def parse_chat_request(body: bytes, *, routes: Collection[str], tenant: str | None = None) -> ChatCall:
    """Validate an OpenAI Chat Completions body and build the Baton Request."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise errors.bad_request(None, "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise errors.bad_request(None, f"the request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise errors.bad_request(None, "the request body must be a JSON object")

    unsupported = sorted(set(data) - FIELDS)
    if unsupported:
        raise errors.bad_request(unsupported[0], f"{', '.join(map(repr, unsupported))}: not supported by Baton, so refused rather than ignored; supported: {', '.join(sorted(FIELDS))}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("model", f"'model' is required and must be a string, e.g. {AUTO!r}")
    route = route_of(model, routes)

    messages = _messages(data.get("messages"))
    stream = _optional(data, "stream", bool) or False
    options = _optional(data, "stream_options", dict) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise errors.bad_request("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _optional(data, name, int)
        if value is not None and value < 1:
            raise errors.bad_request(name, f"'{name}' must be at least 1")
        max_tokens = value if max_tokens is None else max_tokens
    sampling = {
        "max_output_tokens": max_tokens,
        "temperature": _number_in(data, "temperature", 0, 2),
        "top_p": _number_in(data, "top_p", 0, 1),
    }
    n = _optional(data, "n", int)
    if n not in (None, 1):
        raise errors.bad_request("n", "Baton returns one choice per request; 'n' must be 1")
    for name in ("tools", "functions"):
        if data.get(name):
            raise errors.bad_request(name, f"'{name}' (tool calling) is not supported by Baton")

    user = _optional(data, "user", str)
    if user is not None and len(user) > MAX_USER_CHARS:
        raise errors.bad_request("user", f"'user' must be at most {MAX_USER_CHARS} characters")
    metadata = _metadata(data.get("metadata"))
    if tenant is not None:
        metadata["tenant"] = tenant  # the key's tenant; a body cannot claim another
    response_schema = _response_schema(data.get("response_format"))
    # Baton extensions (the SDK's extra_body): budgets, and `cache: false` to skip the reply cache.
    max_latency_ms = _optional(data, "max_latency_ms", int)
    max_cost_usd = _number_in(data, "max_cost_usd", 0, math.inf)
    extensions = {} if (cache := _optional(data, "cache", bool)) is None else {"cache": cache}

    given: dict[str, Any] = {name: value for name, value in sampling.items() if value is not None}
    try:
        request = Request(
            messages=messages,
            session_id=session_id_for(user, tenant),
            metadata=metadata,
            route=route,
            response_schema=response_schema,
            max_latency_ms=max_latency_ms,
            max_cost_usd=max_cost_usd,
            stream=stream,
            **given,
            **extensions,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"])) or "messages"
        raise errors.bad_request(field, f"{field}: {first['msg'].removeprefix('Value error, ')}") from None
    return ChatCall(model=model, request=request, stream=stream, include_usage=include_usage)


def _type_name(kind: type) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", dict: "an object", list: "an array"}[kind]


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is None:
        return None
    # bool is an int in Python, not in JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.bad_request(name, f"'{name}' must be {_type_name(kind)}")
    return value


def _number_in(data: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bound = f"between {low} and {high}" if high != math.inf else f"at least {low}"
        raise errors.bad_request(name, f"'{name}' must be a number {bound}")
    return float(value)


def _messages(raw: Any) -> list[ChatMessage]:
    if raw is None:
        raise errors.bad_request("messages", "'messages' is required: a non-empty array of {role, content} objects")
    if not isinstance(raw, list) or not raw:
        raise errors.bad_request("messages", "'messages' must be a non-empty array of {role, content} objects")
    messages = []
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise errors.bad_request(where, f"'{where}' must be an object with 'role' and 'content'")
        role = item.get("role")
        if role not in ROLES:
            raise errors.bad_request(f"{where}.role", f"'{where}.role' must be one of system, developer, user, assistant (got {role!r}); tool messages are not supported")
        if item.get("tool_calls") or item.get("function_call"):
            raise errors.bad_request(f"{where}.tool_calls", f"'{where}': tool calls are not supported by Baton")
        messages.append(ChatMessage(role=ROLES[role], content=_content(item.get("content"), f"{where}.content")))
    return messages


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise errors.bad_request(f"{where}[{index}]", f"'{where}[{index}]': only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise errors.bad_request(where, f"'{where}' must be a string or an array of text parts")


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise errors.bad_request("metadata", "'metadata' must be an object of string values")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise errors.bad_request(f"metadata.{key}", f"'metadata.{key}' must be a string")
    return dict(raw)


def _response_schema(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise errors.bad_request("response_format", "'response_format' must be an object with a 'type'")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise errors.bad_request("response_format.json_schema.schema", "'response_format.json_schema.schema' must be a JSON Schema object")
        return schema
    raise errors.bad_request("response_format.type", "'response_format.type' must be one of text, json_object, json_schema")


# -- reply -----------------------------------------------------------------------


def usage(reply: Reply) -> dict[str, int]:
    prompt, completion = reply.usage.input_tokens, reply.usage.output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def baton_extra(reply: Reply) -> dict[str, Any]:
    """What the mesh knows beyond OpenAI's fields; the official SDK keeps it as an extra."""
    return {
        "request_id": reply.request_id,
        "route": reply.route,
        "models": reply.models,
        "cost_usd": reply.cost_usd,
        "trace_id": reply.trace_id,
        "degraded": reply.degraded,
        "cached": getattr(reply, "cached", False),
        "variant": getattr(reply, "variant", None),
        "fallbacks": reply.fallbacks,
        "citations": [citation.model_dump() for citation in reply.citations],
        "latency_ms": reply.latency_ms,
        "session_id": reply.session_id,
        "usage_estimated": reply.usage.estimated,
        "config_version": reply.config_version,
    }


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def finish_reason(reply: Reply) -> str:
    """OpenAI's finish_reason: "length" when the model was cut at max_tokens, else "stop"."""
    return "length" if reply.finish_reason == "length" else "stop"


def completion(reply: Reply, *, model: str, created: int) -> dict[str, Any]:
    """The `chat.completion` object of a successful Reply."""
    return {
        "id": completion_id(reply.request_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": reply.config_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.answer or "", "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(reply),
            }
        ],
        "usage": usage(reply),
        "baton": baton_extra(reply),
    }


def format_cost(cost_usd: float) -> str:
    text = f"{cost_usd:.10f}".rstrip("0").rstrip(".")
    return text or "0"


def reply_headers(reply: Reply) -> dict[str, str]:
    headers = {"x-baton-request-id": reply.request_id, "x-baton-cost-usd": format_cost(reply.cost_usd)}
    if reply.route:
        headers["x-baton-route"] = reply.route
    if reply.trace_id:
        headers["x-baton-trace-id"] = reply.trace_id
    return headers


def chunk(
    chunk_id: str,
    *,
    created: int,
    model: str,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    include_usage: bool = False,
    usage_value: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; the usage chunk (include_usage) has no choices."""
    body: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
    }
    if include_usage:
        body["usage"] = usage_value  # null on every chunk but the last, as OpenAI does
    if extra:
        body.update(extra)
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")
