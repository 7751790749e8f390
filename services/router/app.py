"""router: validates each Request, picks its route, writes the slip, passes the baton."""

import os

# The router's matrices are small (a few hundred examples): OpenBLAS threads only spin against
# the other services on a small machine. Training at start took 8 s of CPU with them, 2.5 s
# without, on 840 examples. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from nats.aio.msg import Msg  # noqa: E402

from services.router.routing import Router, UnknownRoute  # noqa: E402
from shared import attributes as A  # noqa: E402
from shared import cache, fairness, intake, metrics, subjects, telemetry  # noqa: E402
from shared.cache import cache_key  # noqa: E402
from shared.embedder import shared_embedder  # noqa: E402
from shared.fairness import ClientSlots  # noqa: E402
from shared.mesh import Channel, Mesh, Terminate  # noqa: E402
from shared.schema import Envelope, Error, ErrorCode, Event, Request  # noqa: E402

mesh = Mesh("router")
routers: dict[str, Router] = {}  # one per config version: each compiles its rules once
log = logging.getLogger("baton.router")

slots = ClientSlots()  # each client's requests in flight, from routing to the Reply
semantic = cache.SemanticIndex()  # the questions every replica indexed, for paraphrase hits
ROUTING_HOLD_S = 60.0  # a request being routed holds its slot at most this long (until it has a deadline)


@mesh.consume(Channel(subjects.request("{client_id}"), Request, "request", "A client's Request; the router validates it, picks a route and writes the slip."))
async def route(message: Msg) -> None:
    """The entry hop: address the message, wait for the client's turn, then route it."""
    addressed = intake.address(subjects.client_of(message.subject), message.headers or {})
    if isinstance(addressed, intake.Refusal) and not addressed.answerable:
        # No inbox could be named for it, no key stored under it: nobody to answer.
        raise Terminate("client_id", addressed.error.message, addressed.request_id, addressed.client)
    client, request_id = addressed.client, addressed.request_id
    limit = mesh.config.max_in_flight(client)
    if not slots.has_room(client, request_id, limit):
        metrics.CLIENT_WAITS.inc()
        async with mesh.parked():
            await slots.wait_for_room(client, request_id, limit)
    slots.hold(client, request_id, time.time() + ROUTING_HOLD_S)
    in_mesh = False
    try:
        in_mesh = await handle(message, addressed)
    finally:
        if not in_mesh:
            slots.release(client, request_id)


async def handle(message: Msg, addressed: intake.Addressed | intake.Refusal) -> bool:
    """Route one request; True when it went on into the mesh (its Reply is still to come)."""
    if isinstance(addressed, intake.Refusal):
        log.warning("request %r from client %s: %s", addressed.request_id[:130], addressed.client, addressed.error.message)
        await refuse(addressed)
        return False
    with mesh.hop("route", None, **{A.REQUEST_ID: addressed.request_id}) as span:
        arrival = intake.admit(addressed, message.data, mesh.settings.max_request_bytes)
        if isinstance(arrival, intake.Refusal):
            await refuse(arrival)
            return False
        client, request_id, reply_to, request = arrival.client, arrival.request_id, arrival.reply_to, arrival.request
        router, published = router_for(mesh.config), published_at(message)
        try:
            env = plan(arrival, router, published, read=read_later)
        except ReadLater as wanted:
            # The encoder's reading (15-30 ms of CPU, a few percent of requests) in a worker
            # thread, so one ambiguous request does not stall every other client's meanwhile;
            # then the same decision again, with the reading in hand.
            assert router.risk_model is not None
            probability = await asyncio.to_thread(router.risk_model.probability, wanted.text)
            env = plan(arrival, router, published, read=lambda _: probability)
        if isinstance(env, Error):
            await mesh.reply_error(request_id, reply_to, env, client=client)
            return False
        mesh.seal(env)
        if request.session_id:
            env.context.history = await (await mesh.sessions()).history(request.session_id) + env.context.history
        # No prompt text here, even with content tracing on: routing runs before the
        # input gate redacts, so the first text on any span is the gate's output.
        span.set_attributes(telemetry.envelope_attributes(env) | {A.CONFIG_VERSION: env.config_version})
        key = cache_key(env) if (await mesh.config_for(env)).routes[env.route].cache.enabled else None
        if key is not None:
            bucket = await mesh.kv(subjects.CACHE_BUCKET)
            hit, event = await cache.lookup(bucket, key), dict[str, object](hit=True)
            if hit is None and (found := await cache.semantic_lookup(bucket, semantic, env)) is not None:
                hit, event = found[0], {"hit": True, "semantic": True, "paraphrase_of": found[1]}
            if hit is not None and request.session_id and hit.question is None:
                hit = None  # no gated question to record as the session's turn: answer afresh
            metrics.CACHE_HITS.labels(env.route, "hit" if hit else "miss").inc()
            if hit is not None:
                env.events.append(Event(kind="cache", step="route", data=event))
                mesh.observe(span, env, env.events)
                reply = cache.served_from_cache(hit.reply, env, telemetry.trace_id_of(span))
                telemetry.record_reply(span, reply)
                if request.session_id and hit.question is not None:  # a hit is a turn too: the follow-up needs it
                    env.context.question = hit.question
                    await mesh.remember_turn(env, reply)
                await mesh.deliver(reply, reply_to, client)
                return False
            env.context.cache_key = key
            await cache.remember(bucket, semantic, env, key)
        mesh.observe(span, env, env.events)
        ack = await mesh.forward(env)
        if ack.duplicate and message.metadata.num_delivered == 1:
            # This client used this request id before: answer with what it got then. If
            # nothing is stored yet, the first one is still on its way to the same inbox.
            # (A redelivery of this very message forwarded it before: its Reply comes once.)
            log.info("request %s from client %s repeats a request id", request_id, client)
            if await mesh.resend_stored(client, request_id, reply_to):
                return False
        slots.hold(client, request_id, env.deadline)
        return True


class ReadLater(Exception):
    """The decision needs the encoder's reading of `text`: not on the event loop."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def read_later(text: str) -> float:
    raise ReadLater(text)


def plan(arrival: intake.Arrival, router: Router, published: float, now: float | None = None, read: Callable[[str], float] | None = None) -> Envelope | Error:
    """The route step itself: the decision and the envelope that carries it, or why there is none.

    The deadline counts from when the client published: time queued before routing is not free.
    `read`: the encoder's reading, when the decision needs one (Router.decide)."""
    try:
        decision = router.decide(arrival.request, read)
    except UnknownRoute as exc:
        return Error(code=ErrorCode.UNKNOWN_ROUTE, message=str(exc))
    log.debug("request %s -> route %s (%s, confidence %.2f)", arrival.request_id, decision.route, decision.reason, decision.confidence)
    env = router.envelope(arrival.request_id, arrival.request, decision, arrival.reply_to, now=published)
    env.client = arrival.client
    now = time.time() if now is None else now
    if env.deadline <= now:
        waited_ms, budget_ms = (now - env.created_at) * 1000, (env.deadline - env.created_at) * 1000
        return Error(code=ErrorCode.DEADLINE_EXCEEDED, message=f"the request waited {waited_ms:.0f} ms to be routed, past its {budget_ms:.0f} ms budget", step="route")
    return env


async def refuse(refusal: intake.Refusal) -> None:
    await mesh.reply_error(refusal.request_id, refusal.reply_to, refusal.error, client=refusal.client)


def published_at(message) -> float:
    """When the client's request was stored in the stream (its PubAck), in epoch seconds."""
    try:
        return message.metadata.timestamp.timestamp()
    except Exception:  # not a JetStream message (a test calling the handler directly)
        return time.time()


@mesh.after_start
async def follow_replies() -> None:
    """Each request a service finished ends one of its client's requests in flight."""

    async def seen(msg: Msg) -> None:
        slots.release_all(fairness.decode(msg.data))

    await mesh.subscribe(subjects.FINISHED, seen)


@mesh.before_consuming
async def follow_semantic_index() -> None:
    await semantic.attach(await mesh.kv(subjects.CACHE_BUCKET))


@mesh.on_stop
async def stop_following() -> None:
    await semantic.detach()


@mesh.before_consuming  # no request waits for this
async def warm_up() -> None:
    router_for(mesh.config)  # train the classifier now, not on the first request (and load the risk encoder)
    shared_embedder()  # and load the semantic cache's embedder
    release_freed_heap()


def release_freed_heap() -> None:
    """Give the heap that training and loading the encoder freed back to the system (glibc keeps
    it otherwise: measured 5 MB after training and 17 MB after the encoder's blocks)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


def router_for(config) -> Router:
    if config.digest not in routers:
        routers.clear()  # only the active version routes new requests
        routers[config.digest] = Router(config)
    return routers[config.digest]


if __name__ == "__main__":
    from shared.run import run

    run("router")
