"""Choosing the model for a generate step and calling it. Plain Python: no NATS here.

A step names its models in order of preference (`models: [gpt-small, local-extractive]`).
A model whose API key is not set is unavailable and skipped, so the offline default
still answers; a model outside the route's allow-list is never called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.local_model import LocalExtractive, split_sentences
from services.generator.providers import Generation, OpenAICompatible, ProviderError, build_messages, estimate_tokens
from shared.breakers import Breakers
from shared.budgets import estimate_cost
from shared.config import MeshConfig, ModelSpec
from shared.retry import retrying
from shared.schema import ChatMessage, Passage, Request

if TYPE_CHECKING:  # imported when an anthropic model is first used
    from services.generator.anthropic import AnthropicMessages

TASK_PROMPTS = {
    "chat": "You are Spoke & Chain's friendly bike-shop assistant. Reply briefly.",
    "summarize": "Summarize the user's text in two or three sentences. Use only what the text says.",
    "rewrite": "Rewrite the user's text to be clear and concise, keeping its meaning.",
    "classify": "Classify the user's text with exactly one of the given labels. Answer 'Label: <label>'.",
}


class NoModelAvailable(Exception):
    def __init__(self, message: str, reason: str = "unavailable"):
        super().__init__(message)
        self.reason = reason  # "not_allowed" | "budget" | "unavailable"


def _dominant_reason(skipped: list[dict[str, str]]) -> str:
    """Why nothing could run, when every skip had the same kind of reason."""
    kinds = {"budget" if "budget" in s["why"] else "not_allowed" if "not allowed" in s["why"] else "unavailable" for s in skipped}
    return kinds.pop() if len(kinds) == 1 else "unavailable"


@dataclass
class Choice:
    name: str
    spec: ModelSpec
    skipped: list[dict[str, str]] = field(default_factory=list)  # models passed over, and why


@dataclass
class ModelCall:
    question: str
    passages: list[Passage]
    history: list[ChatMessage]
    task: str = "answer"
    max_sentences: int = 3
    labels: list[str] | None = None
    # The client's sampling settings (the gateway's max_tokens, temperature, top_p), forwarded
    # to provider models; the model's own max_output_tokens stays the ceiling.
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None

    def sampling(self, spec: ModelSpec) -> dict[str, Any]:
        limit = spec.max_output_tokens if self.max_tokens is None else min(self.max_tokens, spec.max_output_tokens)
        return {"max_tokens": limit, "temperature": 0.2 if self.temperature is None else self.temperature, "top_p": self.top_p}


class ModelPool:
    def __init__(self, config: MeshConfig, environ: Mapping[str, str] | None = None, breakers: Breakers | None = None):
        self.config = config
        self.environ = environ if environ is not None else os.environ
        self.breakers = breakers or Breakers(config.breakers.threshold, config.breakers.cooldown_s)
        self.local = LocalExtractive()
        self._clients: dict[str, OpenAICompatible | AnthropicMessages] = {}

    def unavailable_reason(self, name: str) -> str | None:
        spec = self.config.models[name]
        if spec.provider == "local":
            return None
        if spec.api_key_env and not self.environ.get(spec.api_key_env):
            return f"{spec.api_key_env} is not set"
        return None

    async def choose(self, route: str, preferred: list[str], *, budget_usd: float | None = None, input_tokens: int = 0, tenant_models: list[str] | None = None) -> Choice:
        """The first model of `preferred` that is allowed, configured, affordable and not cut off by its breaker."""
        allowed = self.config.routes[route].models
        skipped = []
        for name in preferred:
            spec = self.config.models.get(name)
            if spec is None:
                skipped.append({"model": name, "why": "not in the models catalog"})
            elif allowed and name not in allowed:
                skipped.append({"model": name, "why": f"not allowed on route {route}"})
            elif tenant_models and name not in tenant_models:
                skipped.append({"model": name, "why": "not allowed for the tenant"})
            elif budget_usd is not None and (estimate := estimate_cost(spec, input_tokens)) > budget_usd:
                skipped.append({"model": name, "why": f"over budget (up to ${estimate:.6f}, ${budget_usd:.6f} left)"})
            elif reason := self.unavailable_reason(name):
                skipped.append({"model": name, "why": reason})
            elif spec.provider != "local" and not await self.breakers.acquire(name):
                skipped.append({"model": name, "why": "circuit breaker open"})
            else:
                return Choice(name, spec, skipped)
        shown = "; ".join(f"{s['model']}: {s['why']}" for s in skipped) or "the step names no models"
        raise NoModelAvailable(f"no model available for route {route} ({shown})", reason=_dominant_reason(skipped))

    async def generate(self, choice: Choice, call: ModelCall, timeout_s: float, on_retry: Callable[[int, Exception, float], None] | None = None) -> Generation:
        """One answer from `choice`, retried on errors that can succeed, within `timeout_s`."""
        if choice.spec.provider == "local":
            generation = self.local.generate(
                call.question, call.passages, task=call.task, history=call.history, max_sentences=call.max_sentences, labels=call.labels
            )
            return cut_to_tokens(generation, call.max_tokens)
        client = self._client(choice)
        messages = build_messages(call.question, call.passages if call.task == "answer" else [], call.history, TASK_PROMPTS.get(call.task))

        async def attempt(remaining_s: float) -> Generation:
            return await client.generate(messages, **call.sampling(choice.spec), timeout_s=min(remaining_s, choice.spec.timeout_s))

        try:
            generation = await retrying(
                attempt,
                deadline=time.time() + timeout_s,
                retries=choice.spec.retries,
                retryable=lambda exc: isinstance(exc, ProviderError) and exc.retryable,
                retry_after=lambda exc: exc.retry_after if isinstance(exc, ProviderError) else None,
                on_retry=on_retry,
            )
        except ProviderError as exc:
            await self.breakers.record(choice.name, ok=not exc.retryable)  # a bad request says nothing about health
            raise
        await self.breakers.record(choice.name, ok=True)
        generation.model = choice.name
        return generation

    async def stream(self, choice: Choice, call: ModelCall, timeout_s: float, on_delta: Callable[[str], Awaitable[None]]) -> Generation:
        """Generate, handing each piece of text to `on_delta` as it arrives."""
        if choice.spec.provider == "local":
            generation = await self.generate(choice, call, timeout_s)
            for sentence in split_sentences(generation.text):  # instant: one piece per sentence
                await on_delta(sentence + " ")
            return generation
        client = self._client(choice)
        messages = build_messages(call.question, call.passages if call.task == "answer" else [], call.history, TASK_PROMPTS.get(call.task))
        final = None
        async for piece in client.stream(messages, **call.sampling(choice.spec), timeout_s=timeout_s):
            if isinstance(piece, str):
                await on_delta(piece)
            else:
                final = piece
        assert final is not None, "a provider stream ends with its Generation"
        final.model = choice.name
        return final

    def cost_usd(self, spec: ModelSpec, generation: Generation) -> float:
        usage = generation.usage
        return round(usage.input_tokens * spec.price_in_per_mtok / 1e6 + usage.output_tokens * spec.price_out_per_mtok / 1e6, 10)

    def _client(self, choice: Choice) -> OpenAICompatible | AnthropicMessages:
        client = self._clients.get(choice.name)
        if client is None:
            if choice.spec.provider == "anthropic":
                from services.generator.anthropic import AnthropicMessages

                client = AnthropicMessages.from_spec(choice.spec, self.environ, name=choice.name)
            else:
                client = OpenAICompatible.from_spec(choice.spec, self.environ, name=choice.name)
            self._clients[choice.name] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def cut_to_tokens(generation: Generation, max_tokens: int | None) -> Generation:
    """The local model writes whole sentences; a client's max_tokens still bounds them
    (at a word boundary, about 4 characters a token), as a provider would."""
    if max_tokens is None or estimate_tokens(generation.text) <= max_tokens:
        return generation
    cut = generation.text[: max_tokens * 4].rsplit(" ", 1)[0] if max_tokens * 4 < len(generation.text) else generation.text
    generation.text = cut
    generation.finish_reason = "length"
    generation.usage = generation.usage.model_copy(update={"output_tokens": min(generation.usage.output_tokens, max_tokens)})
    return generation


def model_call(question: str, passages: list[Passage], history: list[ChatMessage], params: Mapping[str, Any], request: Request | None = None) -> ModelCall:
    sampling: dict[str, Any] = {"max_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p} if request else {}
    return ModelCall(
        **sampling,
        question=question,
        passages=passages,
        history=history,
        task=params.get("task", "answer"),
        max_sentences=int(params.get("max_sentences", 3)),
        labels=params.get("labels"),
    )


__all__ = ["ModelPool", "ModelCall", "Choice", "NoModelAvailable", "ProviderError", "model_call"]
