"""fallback: every failure comes here and leaves as a retry, a degraded answer or a clear error."""

import logging
import time
from contextlib import suppress

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.fallback import dead_letters
from services.fallback.policy import NO_CONTEXT_ANSWER, decide, retry_slip, skip_retrieval_slip
from shared.local_model import LocalExtractive
from shared import subjects
from shared.config import MeshConfig
from shared.mesh import Channel, Mesh
from shared.pii import redact, redaction_kinds
from shared.retry import retrying
from shared.schema import Envelope, Error, ErrorCode, Event

mesh = Mesh("fallback")
local = LocalExtractive()
log = logging.getLogger("baton.fallback")
ADVISORY_PATIENCE_S = 60.0


@mesh.consume(Channel(subjects.FALLBACK, Envelope, "step.fallback", "A failed step's envelope (error set): retry another model, degrade, or refuse."))
async def recover(message: Msg) -> None:
    env = await mesh.parse_envelope(message.data)
    if env.error is None:
        env.error = Error(code=ErrorCode.INTERNAL, message="sent to fallback without an error")
    with mesh.hop("fallback", env) as span:
        config = await mesh.config_for(env)
        decision = decide(env, config)
        log.info("request %s: %s -> %s (%s)", env.request_id, env.error.code.value, decision.action, decision.reason)
        event = Event(kind="fallback", step=env.error.step, data={"reason": env.error.code.value, "action": decision.action, "why": decision.reason, "model": decision.model})
        env.events.append(event)
        mesh.observe(span, env, [event])
        if decision.action == "retry_model" and decision.model is not None:
            retry_slip(env, decision.model)
            await mesh.forward(env)
            return
        if decision.action == "answer_without_context":
            skip_retrieval_slip(env)
            await mesh.forward(env)
            return
        if decision.action == "degrade":
            degrade(env, config)
        await mesh.finish(env)


def degrade(env: Envelope, config: MeshConfig) -> None:
    """Answer from the passages already retrieved, redacted as the output gate redacts."""
    assert env.error is not None
    if env.error.code == ErrorCode.NO_CONTEXT:
        env.context.answer, env.context.citations = NO_CONTEXT_ANSWER, []
    else:
        generation = local.generate(env.context.question, env.context.passages)
        env.context.answer = redact(generation.text, redaction_kinds(config.guard.redact))[0]
        env.context.citations = generation.citations
    env.context.degraded = True
    env.error = None


@mesh.after_start
async def listen_for_exhausted_hops() -> None:
    await mesh.subscribe(subjects.MAX_DELIVERIES_ADVISORY, exhausted, queue="fallback")


async def exhausted(advisory: Msg) -> None:
    """A hop ran out of deliveries: keep it as a dead letter and end the request with an error."""
    consumer, seq, deliveries = dead_letters.read_advisory(advisory.data)
    try:
        # The advisory is not stored: if JetStream is briefly unavailable, keep asking.
        message = await retrying(
            lambda _: mesh.stored_message(seq),
            deadline=time.time() + ADVISORY_PATIENCE_S,
            retries=20,
            retryable=lambda exc: not isinstance(exc, NotFoundError),
        )
    except NotFoundError:
        return  # another fallback replica handled it already
    headers = dict(message.headers or {})
    letter = dead_letters.describe(consumer, seq, deliveries, message.data or b"", headers)
    log.error("request %s: %s ran out of deliveries (%d); dead-lettered", letter.request_id, consumer, deliveries)
    bucket = await mesh.kv(subjects.DEAD_LETTERS_BUCKET)
    await bucket.put(letter.request_id, dead_letters.record(letter, message.data or b"", headers))
    # A request's client is the one its subject names (a reply address could name anyone's inbox).
    client = subjects.client_of(message.subject or "") if consumer == "router" else None
    await mesh.reply_error(letter.request_id, letter.reply_to, letter.error(), client)
    with suppress(NotFoundError):
        await mesh.delete_stored_message(seq)


if __name__ == "__main__":
    from shared.run import run

    run("fallback")
