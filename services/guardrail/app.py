"""guardrail: the quality gates between steps (input, retrieval, output)."""

import os

import httpx

from services.guardrail.gates import input_gate, output_gate, retrieval_gate
from services.guardrail import injection_model, judge
from shared import subjects
from shared.breakers import Breakers
from shared.pii import redact, redaction_kinds
from shared.mesh import Mesh, StepFailed
from shared.schema import Envelope, ErrorCode, Event, StepRecord

mesh = Mesh("guardrail")
breakers = Breakers(mesh.config.breakers.threshold, mesh.config.breakers.cooldown_s)  # the judge's, shared in KV
http: httpx.AsyncClient | None = None  # the judge's client, made on start

@mesh.before_consuming  # no request waits for this
async def warm_up() -> None:
    global http
    http = httpx.AsyncClient()
    if mesh.config.guard.injection_model and injection_model.available():
        injection_model.warm()  # load the offline detector now, not on the first request


@mesh.before_consuming
async def share_breakers() -> None:
    await breakers.attach(await mesh.kv(subjects.BREAKERS_BUCKET))


@mesh.on_stop
async def close_judge() -> None:
    await breakers.detach()
    if http is not None:
        await http.aclose()


FAILURE_CODES = {
    "guard.input": ErrorCode.INPUT_REJECTED,
    "guard.retrieval": ErrorCode.NO_CONTEXT,
    "guard.output": ErrorCode.OUTPUT_REJECTED,
}


@mesh.step_handler
async def guard(env: Envelope, record: StepRecord) -> None:
    """Run a gate (guard.input, guard.retrieval, guard.output): pass, fixed or fail."""
    name, params = env.current.name, env.current.params
    spec = (await mesh.config_for(env)).guard
    if name == "guard.input":
        result = input_gate(env.context.question, spec, threshold=optional_float(params, "threshold"))
        if result.verdict == "fixed":
            scrub_request(env, result.text, spec)
        if params.get("judge") and result.verdict != "fail":
            await ask_the_judge(env, params["judge"])
    elif name == "guard.retrieval":
        result = retrieval_gate(
            env.context.question,
            env.context.passages,
            min_score=float(params.get("min_score", 0.0)),
            min_passages=int(params.get("min_passages", 1)),
            min_overlap=float(params.get("min_overlap", 0.0)),
            neutralize=bool(params.get("neutralize", True)),
        )
        if result.verdict == "fixed" and result.passages is not None:
            env.context.passages = result.passages  # instructions hidden in documents never reach a model
    else:
        result = output_gate(
            env.context.answer,
            spec,
            passages=env.context.passages,
            min_grounded=optional_float(params, "min_grounded"),
            response_schema=env.request.response_schema,
        )
        if result.verdict == "fixed":
            env.context.answer = result.text
    env.events.append(Event(kind="gate", step=name, data=result.to_event_data()))
    if result.verdict == "fail":
        raise StepFailed(FAILURE_CODES[name], f"{name} refused: {result.reason}", details=[{"gate": name, "score": result.score}])


async def ask_the_judge(env: Envelope, params: dict) -> None:
    """The route's optional guard model; its verdict (or why it had none) goes on an event."""
    try:
        spec = judge.spec_from(params, (await mesh.config_for(env)).models, dict(os.environ))
    except ValueError as exc:
        raise StepFailed(ErrorCode.INTERNAL, f"guard.input judge misconfigured: {exc}") from exc
    assert http is not None, "made on start"
    result = await judge.judge(env.context.question, spec, http, breakers)
    env.events.append(Event(kind="gate", step="guard.input.judge", data=result.to_event_data()))
    if result.blocks(spec):
        raise StepFailed(ErrorCode.INPUT_REJECTED, f"guard.input refused by the judge: {result.reason}",
                         details=[{"gate": "guard.input.judge", "verdict": result.verdict}])


def optional_float(params: dict, key: str) -> float | None:
    return None if params.get(key) is None else float(params[key])


def scrub_request(env: Envelope, question: str, spec) -> None:
    """No model downstream sees the redacted values, and no hop carries them on."""
    env.context.question = question
    kinds = redaction_kinds(spec.redact)
    env.context.history = [turn.model_copy(update={"content": redact(turn.content, kinds)[0]}) for turn in env.context.history]
    request = env.request
    if request.prompt is not None:
        request.prompt = question
    if request.messages:
        request.messages = [m.model_copy(update={"content": redact(m.content, kinds)[0]}) for m in request.messages]


if __name__ == "__main__":
    from shared.run import run

    run("guardrail")
