"""The wire contract, from the handlers that run: `make docs` writes docs/asyncapi.yaml.

Each service registers its consumer with the subject and the pydantic model it takes
(`Mesh.step_handler`, `Mesh.consume`) and declares what it publishes (`HopRuntime.sends`);
importing a service's app.py starts nothing, so this module imports them all and lays
their registrations out as an AsyncAPI document with FastStream's generator (its only
use in Baton: see docs/design.md). A test checks it names every subject in
shared/subjects.py.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from shared import subjects
from shared.runtime import Channel
from shared.schema import Envelope
from shared.settings import ROOT

SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")
# Your own steps are documented too: `BATON_DOC_STEPS=my_step.py make docs` adds each
# module's @step (comma-separated); the shipped example shows what such a channel is.
EXAMPLE_STEPS = ("examples/agent_step.py",)


def channels(step_modules: tuple[str, ...] = EXAMPLE_STEPS) -> list[Channel]:
    """Every service's registrations and the custom steps' consumers, each subject once."""
    found: dict[tuple[str, bool], Channel] = {}
    for service in SERVICES:
        mesh = importlib.import_module(f"services.{service}.app").mesh
        for channel in mesh.runtime.channels:
            found.setdefault((channel.address, channel.sends), channel)
    for channel in map(custom_channel, step_modules):
        found.setdefault((channel.address, channel.sends), channel)
    return list(found.values())


def custom_channel(target: str) -> Channel:
    """The consumer `baton serve target` runs: the step's envelope in, its config parameters named."""
    from shared.run import step_of

    found = Path(target)
    spec = step_of(target if found.exists() or found.is_absolute() else str(ROOT / target))
    taken = ""
    if spec.params is not None:
        fields = ", ".join(f"{name} ({info.annotation.__name__ if isinstance(info.annotation, type) else info.annotation}, default {info.default!r})" for name, info in spec.params.model_fields.items())
        taken = f" Its parameters, from the route's step entry in the config: {fields}."
    description = f"{spec.description} (custom step `{spec.name}` from {target}, run by `baton serve {target}`).{taken}"
    return Channel(subjects.step(spec.name), Envelope, f"step.{spec.name}", description)


def step_modules_from_env() -> tuple[str, ...]:
    extra = tuple(m.strip() for m in os.environ.get("BATON_DOC_STEPS", "").split(",") if m.strip())
    return (*EXAMPLE_STEPS, *extra)


def document_app(registered: list[Channel]) -> FastStream:
    broker = NatsBroker()
    for channel in registered:
        if channel.sends:
            broker.publisher(channel.address, schema=channel.payload, title=channel.title, description=channel.description)
            continue

        broker.subscriber(channel.address, title=channel.title, description=channel.description)(_taking(channel))
    return FastStream(
        broker,
        specification=AsyncAPI(
            title="Baton mesh",
            version="v1",
            description=(
                "Publish a Request through JetStream to baton.v1.request.<client_id> with headers "
                "Baton-Request-Id, Nats-Msg-Id (unique to the client: <client_id>.<request_id>) and "
                "Baton-Reply-To (exactly _INBOX.<client_id>.reply.<request_id>, or absent); "
                "the PubAck means accepted. The one Reply arrives on that inbox and is kept in the KV bucket "
                f"{subjects.RESULTS_BUCKET} under <client_id>.<request_id>."
            ),
        ),
    )


def _taking(channel: Channel):
    """A function whose one parameter has the channel's model: FastStream reads the schema from it."""

    async def takes(body) -> None: ...

    takes.__annotations__ = {"body": channel.payload, "return": None}
    takes.__name__ = channel.title.replace(".", "_")
    return takes


app = document_app(channels(step_modules_from_env()))
