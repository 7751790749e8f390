"""The wire contract of Baton, version 1.

Every message on `baton.v1.*` is one of these models serialized as JSON. Inside v1
only optional fields are ever added, so an old service can read a newer message.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


class _Wire(BaseModel):
    # Unknown fields from a newer minor version are kept, not rejected.
    model_config = ConfigDict(extra="ignore")


class ErrorCode(str, Enum):
    """What went wrong, as a value a program can switch on."""

    INVALID_REQUEST = "invalid_request"  # malformed JSON, wrong types, missing prompt
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_ROUTE = "unknown_route"
    INPUT_REJECTED = "input_rejected"  # an input gate refused the request
    OUTPUT_REJECTED = "output_rejected"  # an output gate refused the answer
    NO_CONTEXT = "no_context"  # retrieval found nothing good enough
    MODEL_ERROR = "model_error"  # the provider failed and no fallback could answer
    MODEL_NOT_ALLOWED = "model_not_allowed"
    BUDGET_EXCEEDED = "budget_exceeded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"  # a component could not be reached
    REDELIVERY_EXHAUSTED = "redelivery_exhausted"  # a hop kept crashing
    INTERNAL = "internal"


class Error(_Wire):
    code: ErrorCode
    message: str
    step: str | None = None  # the step that failed, when one did
    details: list[dict[str, Any]] = Field(default_factory=list)
    retryable: bool = False


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class Request(_Wire):
    """What a client publishes on `baton.v1.request`."""

    schema_version: int = SCHEMA_VERSION
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    session_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-=]{1,128}$")
    metadata: dict[str, str] = Field(default_factory=dict)
    route: str | None = Field(default=None, description="route hint; must name a configured route")
    max_latency_ms: int | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, ge=0)
    response_schema: dict[str, Any] | None = None
    stream: bool = False
    cache: bool = True  # False: never answer this request from the reply cache
    # Sampling, forwarded to provider models (the gateway maps OpenAI's max_tokens,
    # temperature and top_p here); the model's own max_output_tokens stays the ceiling.
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _has_text(self) -> Request:
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give either 'prompt' or 'messages', not both: which one is the question would be a guess")
        if not self.text.strip():
            raise ValueError("the request needs a non-empty 'prompt' or a user message in 'messages'")
        return self

    @property
    def text(self) -> str:
        """The user's question: the prompt, or the last user message."""
        if self.prompt is not None:
            return self.prompt
        for message in reversed(self.messages or []):
            if message.role == "user":
                return message.content
        return ""


def unknown_request_fields(data: Any) -> list[str]:
    """The fields of a Request body that this version does not know, as dotted paths.

    The router refuses them rather than ignore them: a client that sets a field expects
    it to act (a newer client on an older mesh learns at once that it cannot). Envelopes
    between services stay lenient (`_Wire`), so services of mixed versions interoperate.
    """
    if not isinstance(data, dict):
        return []
    unknown = [name for name in data if name not in Request.model_fields]
    messages = data.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            if isinstance(message, dict):
                unknown += [f"messages.{index}.{name}" for name in message if name not in ChatMessage.model_fields]
    return unknown


class Step(_Wire):
    """One entry of the routing slip: which service runs what, with which parameters."""

    service: str
    name: str  # e.g. "guard.input", "retrieve", "generate"
    params: dict[str, Any] = Field(default_factory=dict)
    budget_ms: int | None = None


class Passage(_Wire):
    text: str
    score: float
    source: str
    title: str = ""
    corpus: str = ""


class Usage(_Wire):
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False


class StepRecord(_Wire):
    """What one hop did: timing, model, usage and cost. Kept in order on the envelope."""

    step: str
    service: str
    started_at: float
    duration_ms: float
    queued_ms: float = 0.0  # time between the previous hop's publish and this hop's start
    model: str | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    outcome: Literal["ok", "failed", "skipped"] = "ok"


class Event(_Wire):
    """A decision worth keeping: route chosen, gate verdict, fallback taken."""

    kind: Literal["route", "gate", "fallback", "retrieval", "model", "cache", "note"]
    step: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)


class Context(_Wire):
    history: list[ChatMessage] = Field(default_factory=list)
    passages: list[Passage] = Field(default_factory=list)
    outputs: dict[str, Any] = Field(default_factory=dict)  # intermediate output per step name
    question: str = ""  # the question as later steps should see it (possibly redacted)

    # The outputs every step agrees on, typed. They travel in `outputs` (its keys are the
    # wire contract, so services of two versions still read each other's envelopes).

    @property
    def answer(self) -> str:
        """The text the client will receive (gates may rewrite it)."""
        return str(self.outputs.get("answer", ""))

    @answer.setter
    def answer(self, text: str) -> None:
        self.outputs["answer"] = text

    @property
    def citations(self) -> list[int]:
        """1-based indexes into `passages` that the answer cites."""
        return list(self.outputs.get("citations", []))

    @citations.setter
    def citations(self, cited: list[int]) -> None:
        self.outputs["citations"] = list(cited)

    @property
    def degraded(self) -> bool:
        """The answer is the fallback's, from the passages alone."""
        return bool(self.outputs.get("degraded", False))

    @degraded.setter
    def degraded(self, value: bool) -> None:
        self.outputs["degraded"] = value

    @property
    def disclaimer(self) -> str | None:
        """A note the client must read before the answer (the fallback's, when it answered without context)."""
        return self.outputs.get("disclaimer") or None

    @disclaimer.setter
    def disclaimer(self, text: str) -> None:
        self.outputs["disclaimer"] = text

    @property
    def finish_reason(self) -> str | None:
        """Why the model that wrote the answer stopped: "stop", or "length" when cut at max_output_tokens."""
        return self.outputs.get("finish_reason")

    @finish_reason.setter
    def finish_reason(self, reason: str) -> None:
        self.outputs["finish_reason"] = reason

    @property
    def variant(self) -> str | None:
        """The A/B arm of the route's experiment this request is in, if any."""
        return self.outputs.get("variant")

    @variant.setter
    def variant(self, name: str) -> None:
        self.outputs["variant"] = name

    @property
    def cache_key(self) -> str | None:
        """Where the last hop files the answer in the reply cache (the router left it; None: not cached)."""
        return self.outputs.get("cache_key")

    @cache_key.setter
    def cache_key(self, key: str) -> None:
        self.outputs["cache_key"] = key


class Envelope(_Wire):
    """The request in flight: the slip travels with it (Routing Slip pattern)."""

    schema_version: int = SCHEMA_VERSION
    request_id: str
    reply_to: str | None = None
    client: str | None = None  # the client the router took the request from (its subject's last token)
    request: Request
    route: str
    slip: list[Step]
    cursor: int = 0
    deadline: float  # absolute, epoch seconds
    config_version: str = ""
    context: Context = Field(default_factory=Context)
    steps: list[StepRecord] = Field(default_factory=list)
    events: list[Event] = Field(default_factory=list)
    attempt: int = 0  # how many fallbacks this request has taken
    created_at: float = Field(default_factory=time.time)  # when the router accepted it
    sent_at: float = Field(default_factory=time.time)  # when the previous hop published it
    error: Error | None = None
    seal: str | None = None  # the router's signature of who the request belongs to (shared/envelopes.py)

    @property
    def current(self) -> Step:
        return self.slip[self.cursor]

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.slip)

    def remaining_s(self, now: float | None = None) -> float:
        return self.deadline - (now if now is not None else time.time())

    @property
    def cost_usd(self) -> float:
        return round(sum(record.cost_usd for record in self.steps), 10)

    @field_validator("cursor")
    @classmethod
    def _cursor_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("cursor must be >= 0")
        return value


class Citation(_Wire):
    index: int
    source: str
    title: str = ""


class Reply(_Wire):
    """The one answer to one request: either `answer` or `error` is set."""

    schema_version: int = SCHEMA_VERSION
    request_id: str
    ok: bool
    answer: str | None = None
    citations: list[Citation] = Field(default_factory=list)
    route: str | None = None
    models: list[str] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    steps: list[StepRecord] = Field(default_factory=list)
    latency_ms: float | None = None
    degraded: bool = False
    # Why the model stopped: "stop", or "length" when max_output_tokens cut the answer short.
    finish_reason: str | None = None
    cached: bool = False  # answered from the reply cache: no model ran, no cost
    variant: str | None = None  # the A/B arm this request was served by
    fallbacks: list[str] = Field(default_factory=list)
    events: list[Event] = Field(default_factory=list)
    config_version: str | None = None
    trace_id: str | None = None
    session_id: str | None = None
    error: Error | None = None
