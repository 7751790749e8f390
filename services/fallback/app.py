"""fallback: every failure comes here and leaves as a retry, a degraded answer or a clear error."""

import logging

from services.fallback.policy import decide, retry_slip
from services.generator.local import LocalExtractive
from services.guardrail.gates import output_gate
from shared.mesh import Mesh
from shared.replies import ANSWER, CITATIONS, DEGRADED
from shared.schema import Envelope, Error, ErrorCode, Event

mesh = Mesh("fallback")
app = mesh.app
local = LocalExtractive()
log = logging.getLogger("baton.fallback")


@mesh.subscriber()
async def recover(body: bytes) -> None:
    env = await mesh.parse_envelope(body, at_step=False)
    if env is None:
        return
    if env.error is None:
        env.error = Error(code=ErrorCode.INTERNAL, message="sent to fallback without an error")
    with mesh.hop("fallback", env) as span:
        config = await mesh.config_for(env)
        decision = decide(env, config)
        log.info("request %s: %s -> %s (%s)", env.request_id, env.error.code.value, decision.action, decision.reason)
        event = Event(kind="fallback", step=env.error.step, data={"reason": env.error.code.value, "action": decision.action, "why": decision.reason, "model": decision.model})
        env.events.append(event)
        mesh.observe(span, env, [event])
        if decision.action == "retry_model":
            retry_slip(env, decision.model)
            await mesh.forward(env)
            return
        if decision.action == "degrade":
            degrade(env, config)
        await mesh.finish(env)


def degrade(env: Envelope, config) -> None:
    """Answer from the passages already retrieved, with the same output redaction."""
    generation = local.generate(env.context.question, env.context.passages)
    checked = output_gate(generation.text, config.guard)
    env.context.outputs[ANSWER] = checked.text if checked.text is not None else generation.text
    env.context.outputs[CITATIONS] = generation.citations
    env.context.outputs[DEGRADED] = True
    env.error = None


if __name__ == "__main__":
    from shared.run import run

    run("fallback")
