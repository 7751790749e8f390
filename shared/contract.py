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

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from shared import subjects
from shared.runtime import Channel

SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")


def channels() -> list[Channel]:
    """Every service's registrations, each subject once."""
    found: dict[tuple[str, bool], Channel] = {}
    for service in SERVICES:
        mesh = importlib.import_module(f"services.{service}.app").mesh
        for channel in mesh.runtime.channels:
            found.setdefault((channel.address, channel.sends), channel)
    return list(found.values())


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


app = document_app(channels())
