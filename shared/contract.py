"""The wire contract as one FastStream app, for the AsyncAPI document (`make docs`).

Never run: it declares every subject of the mesh with the pydantic model that travels
on it, so `faststream docs gen shared.contract:app` writes the document anyone can
build a client from, in any language. The services themselves decode bodies by hand
(so malformed input gets a structured error); this module is their typed mirror, and
a test checks it names every subject in `shared/subjects.py`.
"""

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from shared import subjects
from shared.schema import Envelope, Reply, Request

broker = NatsBroker()
app = FastStream(
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

REQUEST_SUBJECT = subjects.request("{client_id}")
REPLY_SUBJECT = "_INBOX.{client_id}.reply.{request_id}"
CHUNK_SUBJECT = subjects.chunk_address(REPLY_SUBJECT)


@broker.subscriber(REQUEST_SUBJECT, title="request", description="A client's Request; the router validates it, picks a route and writes the slip.")
async def request(body: Request) -> None: ...


def _step(service: str, what: str) -> None:
    async def step(body: Envelope) -> None: ...

    step.__name__ = f"{service}_step"
    broker.subscriber(subjects.step(service), title=f"step.{service}", description=what)(step)


_step("retriever", "Run the retrieve step at the envelope's cursor; passages join the context.")
_step("generator", "Run the generate step: the chosen model answers; usage and cost are recorded.")
_step("guardrail", "Run a gate (guard.input, guard.retrieval, guard.output): pass, fixed or fail.")
_step("fallback", "A failed step's envelope (error set): retry another model, degrade, or refuse.")

broker.publisher(REPLY_SUBJECT, schema=Reply, title="reply", description="The one Reply to a request: an answer or a structured error.")
broker.publisher(CHUNK_SUBJECT, schema=str, title="chunk", description="Partial answer text of a streamed request (Request.stream = true), before the Reply.")
