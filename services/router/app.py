"""router: validates each Request, picks its route, writes the slip, passes the baton."""

import json
import logging
import re
import uuid

from pydantic import ValidationError

from services.router.routing import Router, UnknownRoute
from shared import attributes as A
from shared import metrics, subjects, telemetry
from shared.mesh import Mesh, validation_details
from shared import cache
from shared.cache import cache_key
from shared.embedder import shared_embedder
from shared.schema import Error, ErrorCode, Event, Request, unknown_request_fields

mesh = Mesh("router")
app = mesh.app
routers: dict[str, Router] = {}  # one per config version: each compiles its rules once
log = logging.getLogger("baton.router")

REQUEST_ID = re.compile(subjects.REQUEST_ID_PATTERN)


@mesh.subscriber()
async def route(body: bytes) -> None:
    message = mesh.current_message()
    headers = message.headers or {}
    request_id = headers.get(subjects.H_REQUEST_ID) or uuid.uuid4().hex
    reply_to = headers.get(subjects.H_REPLY_TO)
    client = subjects.client_of(message.subject)
    if reply_to and not reply_to.startswith(subjects.inbox_prefix(client) + "."):
        # Answering would hand one client's reply to another: refuse, and keep the
        # refusal under the request id for the real client to find.
        log.warning("request %s from client %s names a foreign reply address; refused", request_id, client)
        error = Error(code=ErrorCode.INVALID_REQUEST, message=f"the reply address must start with {subjects.inbox_prefix(client)}.")
        await mesh.reply_error(request_id, None, error, client=client)
        return
    with mesh.hop("route", **{A.REQUEST_ID: request_id}) as span:
        error = check_request(request_id, body)
        if isinstance(error, Error):
            await mesh.reply_error(request_id, reply_to, error, client=client)
            return
        request = error
        router = router_for(mesh.config)
        try:
            decision = router.decide(request)
        except UnknownRoute as exc:
            await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.UNKNOWN_ROUTE, message=str(exc)), client=client)
            return
        log.info("request %s -> route %s (%s, confidence %.2f)", request_id, decision.route, decision.reason, decision.confidence)
        env = router.envelope(request_id, request, decision, reply_to)
        if request.session_id:
            env.context.history = await (await mesh.sessions()).history(request.session_id) + env.context.history
        # No prompt text here, even with content tracing on: routing runs before the
        # input gate redacts, so the first text on any span is the gate's output.
        span.set_attributes({**telemetry.envelope_attributes(env), A.CONFIG_VERSION: env.config_version})
        key = cache_key(env) if (await mesh.config_for(env)).routes[env.route].cache.enabled else None
        if key is not None:
            bucket = await mesh.broker.key_value(subjects.CACHE_BUCKET, declare=False)
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
                return
            env.context.outputs[cache.CACHE_KEY] = key
            await cache.remember(bucket, env, key)
        mesh.observe(span, env, env.events)
        await mesh.forward(env)


@app.on_startup  # before the subscriber starts pulling: no request waits for this
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
    if not REQUEST_ID.match(request_id):
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
