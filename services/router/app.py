"""router: validates each Request, picks its route, writes the slip, passes the baton."""

import json
import logging
import time
import uuid

from nats.aio.msg import Msg
from pydantic import ValidationError

from services.router.routing import Router, UnknownRoute
from shared import attributes as A
from shared import metrics, subjects, telemetry
from shared import fairness
from shared.fairness import ClientSlots
from shared.mesh import Channel, Mesh, Terminate, validation_details
from shared import cache
from shared.cache import cache_key
from shared.embedder import shared_embedder
from shared.schema import Error, ErrorCode, Event, Request, unknown_request_fields

mesh = Mesh("router")
routers: dict[str, Router] = {}  # one per config version: each compiles its rules once
log = logging.getLogger("baton.router")

slots = ClientSlots()  # each client's requests in flight, from routing to the Reply
ROUTING_HOLD_S = 60.0  # a request being routed holds its slot at most this long (until it has a deadline)


@mesh.consume(Channel(subjects.request("{client_id}"), Request, "request", "A client's Request; the router validates it, picks a route and writes the slip."))
async def route(message: Msg) -> None:
    body = message.data
    headers = message.headers or {}
    named_id = headers.get(subjects.H_REQUEST_ID)
    request_id = named_id or uuid.uuid4().hex
    reply_to = headers.get(subjects.H_REPLY_TO)
    client = subjects.client_of(message.subject)
    if not subjects.valid_client_id(client):
        # No inbox could be named for it, no key stored under it: nobody to answer.
        raise Terminate("client_id", f"the client id {client[:80]!r} in the subject is not 1-64 letters, digits, '-' or '_'", request_id, client)
    limit = mesh.config.max_in_flight(client)
    if not slots.has_room(client, request_id, limit):
        metrics.CLIENT_WAITS.inc()
        async with mesh.parked():
            await slots.wait_for_room(client, request_id, limit)
    slots.hold(client, request_id, time.time() + ROUTING_HOLD_S)
    in_mesh = False
    try:
        in_mesh = await handle(message, body, client, request_id, reply_to, named=named_id is not None)
    finally:
        if not in_mesh:
            slots.release(client, request_id)


async def handle(message, body: bytes, client: str, request_id: str, reply_to: str | None, *, named: bool) -> bool:
    """Route one request; True when it went on into the mesh (its Reply is still to come).
    `named`: the client named the request id (else the router made one up)."""
    error = check_address(client, request_id, reply_to) if named or reply_to is None else Error(
        code=ErrorCode.INVALID_REQUEST, message=f"a request with a reply address needs a {subjects.H_REQUEST_ID} header (the address names it)"
    )
    if error is not None:
        # Answering would write to a subject that is not this client's inbox for this
        # request (another client's, or not a subject at all): refuse, and keep the
        # refusal under the request id for the real client to find.
        log.warning("request %r from client %s: %s", request_id[:130], client, error.message)
        await mesh.reply_error(request_id, None, error, client=client)
        return False
    with mesh.hop("route", **{A.REQUEST_ID: request_id}) as span:
        error = check_request(request_id, body)
        if isinstance(error, Error):
            await mesh.reply_error(request_id, reply_to, error, client=client)
            return False
        request = error
        router = router_for(mesh.config)
        try:
            decision = router.decide(request)
        except UnknownRoute as exc:
            await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.UNKNOWN_ROUTE, message=str(exc)), client=client)
            return False
        log.debug("request %s -> route %s (%s, confidence %.2f)", request_id, decision.route, decision.reason, decision.confidence)
        # The deadline counts from when the client published: time queued before routing is not free.
        env = router.envelope(request_id, request, decision, reply_to, now=published_at(message))
        env.client = client
        mesh.seal(env)
        if env.remaining_s() <= 0:
            waited_ms, budget_ms = (time.time() - env.created_at) * 1000, (env.deadline - env.created_at) * 1000
            error = Error(code=ErrorCode.DEADLINE_EXCEEDED, message=f"the request waited {waited_ms:.0f} ms to be routed, past its {budget_ms:.0f} ms budget", step="route")
            await mesh.reply_error(request_id, reply_to, error, client=client)
            return False
        if request.session_id:
            env.context.history = await (await mesh.sessions()).history(request.session_id) + env.context.history
        # No prompt text here, even with content tracing on: routing runs before the
        # input gate redacts, so the first text on any span is the gate's output.
        span.set_attributes({**telemetry.envelope_attributes(env), A.CONFIG_VERSION: env.config_version})
        key = cache_key(env) if (await mesh.config_for(env)).routes[env.route].cache.enabled else None
        if key is not None:
            bucket = await mesh.kv(subjects.CACHE_BUCKET)
            hit, event = await cache.lookup(bucket, key), {"hit": True}
            if hit is None and (found := await cache.semantic_lookup(bucket, env)) is not None:
                hit, event = found[0], {"hit": True, "semantic": True, "paraphrase_of": found[1]}
            if hit is not None and request.session_id and hit.question is None:
                hit = None  # no gated question to record as the session's turn: answer afresh
            metrics.CACHE_HITS.labels(env.route, "hit" if hit else "miss").inc()
            if hit is not None:
                env.events.append(Event(kind="cache", step="route", data=event))
                mesh.observe(span, env, env.events)
                reply = cache.served_from_cache(hit.reply, env, telemetry.trace_id_of(span))
                telemetry.record_reply(span, reply)
                if request.session_id:  # a hit is a turn too: the follow-up needs it
                    env.context.question = hit.question
                    await mesh.remember_turn(env, reply)
                await mesh.deliver(reply, reply_to, client)
                return False
            env.context.outputs[cache.CACHE_KEY] = key
            await cache.remember(bucket, env, key)
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


def check_address(client: str, request_id: str, reply_to: str | None) -> Error | None:
    """Only the exact literal inbox of this client for this request may receive its Reply."""
    if reply_to is None or reply_to == subjects.reply_address(client, request_id):
        return None
    if not subjects.valid_request_id(request_id):
        return Error(code=ErrorCode.INVALID_REQUEST, message="the Baton-Request-Id header must be 1-128 letters, digits, '-', '_' or '='")
    return Error(code=ErrorCode.INVALID_REQUEST, message=f"the reply address must be exactly {subjects.reply_address(client, request_id)} (or absent)")


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


@mesh.before_consuming  # no request waits for this
async def warm_up() -> None:
    router_for(mesh.config)  # train the classifier now, not on the first request
    shared_embedder()  # and load the semantic cache's embedder


def router_for(config) -> Router:
    if config.digest not in routers:
        routers.clear()  # only the active version routes new requests
        routers[config.digest] = Router(config)
    return routers[config.digest]


def check_request(request_id: str, body: bytes) -> Request | Error:
    """The parsed Request, or the structured Error that names what is wrong with it."""
    if not subjects.valid_request_id(request_id):
        return Error(code=ErrorCode.INVALID_REQUEST, message="the Baton-Request-Id header must be 1-128 letters, digits, '-', '_' or '='")
    if len(body) > mesh.settings.max_request_bytes:
        return Error(code=ErrorCode.PAYLOAD_TOO_LARGE, message=f"the request is {len(body)} bytes; the limit is {mesh.settings.max_request_bytes}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Error(code=ErrorCode.INVALID_REQUEST, message=f"the request body is not UTF-8 JSON (bad byte at position {exc.start})")
    try:
        request = Request.model_validate_json(body)
    except ValidationError as exc:
        details = validation_details(exc)
        message = "invalid request: " + "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        return Error(code=ErrorCode.INVALID_REQUEST, message=message, details=details)
    unknown = unknown_request_fields(json.loads(body))
    if unknown:
        details = [{"field": name, "problem": "unknown field"} for name in unknown]
        message = f"invalid request: unknown field {', '.join(map(repr, unknown))}; this mesh's Request (schema v{request.schema_version}) has {', '.join(Request.model_fields)}"
        return Error(code=ErrorCode.INVALID_REQUEST, message=message, details=details)
    return request


if __name__ == "__main__":
    from shared.run import run

    run("router")
