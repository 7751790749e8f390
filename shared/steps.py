"""Your own step in one file: a decorated plain function, typed in and out, no transport.

    from pydantic import BaseModel
    from shared.steps import StepInput, StepOutput, step

    class Params(BaseModel):
        tone: str = "plain"

    @step("rewrite", params=Params)
    def rewrite(data: StepInput, params: Params) -> StepOutput:
        return StepOutput(answer=data.answer.upper() if params.tone == "loud" else data.answer)

Start it with `baton serve my_module.py` (as many replicas as you like), declare it in the
config (`steps: {rewrite: {service: rewrite}}`) and name it in a route's `steps`. The
runtime gives it what a built-in step has: its durable consumer, the envelope checks,
the step's budget and the request's deadline, the hop span, metrics, and the fallback
when it fails (raise `StepFailed`, or any exception: `internal`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.hops import StepFailed, StepFn
from shared.schema import ChatMessage, Envelope, ErrorCode, Event, Passage, StepRecord


class StepInput(BaseModel):
    """What a step sees of the request: the question as the gates left it, and what earlier steps found."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    route: str
    question: str
    history: list[ChatMessage] = Field(default_factory=list)
    passages: list[Passage] = Field(default_factory=list)
    answer: str = ""  # an earlier step's answer, if any
    time_left_s: float  # until the step's budget or the request's deadline, whichever is first


class StepOutput(BaseModel):
    """What a step changes; None leaves it as it was."""

    answer: str | None = None
    passages: list[Passage] | None = None
    citations: list[int] | None = None
    note: dict[str, Any] = Field(default_factory=dict)  # onto the hop's span and the Reply's events


UserStep = Callable[..., StepOutput | Awaitable[StepOutput]]


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: UserStep
    params: type[BaseModel] | None
    description: str


REGISTRY: dict[str, StepSpec] = {}


def step(name: str, *, params: type[BaseModel] | None = None) -> Callable[[UserStep], UserStep]:
    """Register `fn` as the step `name`; `params` types the parameters the config gives it."""

    def register(fn: UserStep) -> UserStep:
        description = " ".join((fn.__doc__ or f"The custom step {name}.").strip().split("\n\n")[0].split())
        REGISTRY[name] = StepSpec(name, fn, params, description)
        return fn

    return register


def steps_of(module_name: str) -> list[StepSpec]:
    return [spec for spec in REGISTRY.values() if spec.fn.__module__ == module_name]


def runner(spec: StepSpec) -> StepFn:
    """The step as the hop runner calls it: the envelope in, the typed output applied to it.

    A plain (not async) function runs in a worker thread, so a slow one (a model call
    through a library without asyncio) does not stall the other messages of this replica."""
    takes_params = len(inspect.signature(spec.fn).parameters) > 1

    async def run(env: Envelope, record: StepRecord) -> None:
        args: list[Any] = [step_input(env, record)]
        if takes_params:
            args.append(parameters(spec, env.current.params))
        if inspect.iscoroutinefunction(spec.fn):
            output = await spec.fn(*args)
        else:
            output = await asyncio.to_thread(spec.fn, *args)
        apply(env, spec.name, output)

    run.__doc__ = spec.description
    run.__name__ = spec.name
    return run


def step_input(env: Envelope, record: StepRecord) -> StepInput:
    left = env.remaining_s()
    if env.current.budget_ms:
        left = min(left, env.current.budget_ms / 1000 - (time.time() - record.started_at))
    return StepInput(
        request_id=env.request_id, route=env.route, question=env.context.question, history=env.context.history,
        passages=env.context.passages, answer=env.context.answer, time_left_s=max(0.0, left),
    )


def parameters(spec: StepSpec, raw: dict[str, Any]) -> Any:
    if spec.params is None:
        return dict(raw)
    try:
        return spec.params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise StepFailed(ErrorCode.INTERNAL, f"{spec.name}: bad parameters in the config: {problems}") from None


def config_problems(spec: StepSpec, routes: dict[str, Any]) -> list[str]:
    """Each route entry of this step whose parameters its `params` model refuses, as a sentence.

    Checked before anything starts (`baton up --step`), so a typo in the config is not
    found by the first request that reaches the step. (The step checks them again on
    every message: a live config can change under it.)"""
    if spec.params is None:
        return []
    problems = []
    for route, route_spec in routes.items():
        for entry in route_spec.steps:
            if entry.name != spec.name:
                continue
            try:
                spec.params.model_validate(entry.params)
            except ValidationError as exc:
                found = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
                problems.append(f"route {route!r}, step {spec.name!r}: {found}")
    return problems


def apply(env: Envelope, name: str, output: StepOutput) -> None:
    if not isinstance(output, StepOutput):
        raise StepFailed(ErrorCode.INTERNAL, f"{name} returned {type(output).__name__}, not a StepOutput")
    if output.answer is not None:
        env.context.answer = output.answer
    if output.passages is not None:
        env.context.passages = output.passages
    if output.citations is not None:
        env.context.citations = output.citations
    env.events.append(Event(kind="note", step=name, data=output.note))
