"""guardrail: the quality gates between steps (input, retrieval, output)."""

from services.guardrail.gates import input_gate, output_gate, retrieval_gate
from shared.mesh import Mesh, StepFailed
from shared.replies import ANSWER
from shared.schema import Envelope, ErrorCode, Event, StepRecord

mesh = Mesh("guardrail")
app = mesh.app

FAILURE_CODES = {
    "guard.input": ErrorCode.INPUT_REJECTED,
    "guard.retrieval": ErrorCode.NO_CONTEXT,
    "guard.output": ErrorCode.OUTPUT_REJECTED,
}


@mesh.step_handler
async def guard(env: Envelope, record: StepRecord) -> None:
    name, params = env.current.name, env.current.params
    spec = (await mesh.config_for(env)).guard
    if name == "guard.input":
        result = input_gate(env.context.question, spec, threshold=float(params.get("threshold", 0.5)))
        if result.verdict == "fixed":
            env.context.question = result.text  # no model downstream sees the redacted values
    elif name == "guard.retrieval":
        result = retrieval_gate(env.context.question, env.context.passages, min_score=float(params.get("min_score", 0.0)), min_passages=int(params.get("min_passages", 1)))
    else:
        result = output_gate(env.context.outputs.get(ANSWER, ""), spec)
        if result.verdict == "fixed":
            env.context.outputs[ANSWER] = result.text
    env.events.append(Event(kind="gate", step=name, data=result.to_event_data()))
    if result.verdict == "fail":
        raise StepFailed(FAILURE_CODES[name], f"{name} refused: {result.reason}", details=[{"gate": name, "score": result.score}])




if __name__ == "__main__":
    from shared.run import run

    run("guardrail")
