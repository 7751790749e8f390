"""The fallback policy: retry another model, degrade, or refuse, never loop."""

import time

import pytest

from services.fallback.policy import decide, retry_slip
from shared.config import load_config
from shared.schema import Error, ErrorCode, Passage, Request, StepRecord
from shared.settings import Settings
from services.router.routing import Router


@pytest.fixture(scope="module")
def config():
    return load_config(Settings().config)


def failed(config, code, step="generate", passages=True, tried=("gpt-small",), deadline_in=10.0, route="factual"):
    router = Router(config)
    env = router.envelope("r1", Request(prompt="How do I fix a puncture?", route=route), router.decide(Request(prompt="x", route=route)), None)
    env.deadline = time.time() + deadline_in
    env.cursor = next(i for i, step in enumerate(env.slip) if step.name == "generate")
    env.steps = [StepRecord(step="generate", service="generator", started_at=0, duration_ms=1, model=m, outcome="failed") for m in tried]
    if passages:
        env.context.passages = [Passage(text="Patch the tube after roughening it.", score=3.0, source="handbook/puncture-repair.md")]
    env.error = Error(code=code, message="boom", step=step)
    return env


def test_a_model_failure_retries_the_next_model_in_the_chain(config):
    env = failed(config, ErrorCode.MODEL_ERROR)
    decision = decide(env, config)
    assert decision.action == "retry_model" and decision.model == "local-extractive"
    generate_at = env.cursor
    retry_slip(env, decision.model)
    assert env.cursor == generate_at and env.attempt == 1 and env.error is None
    assert env.current.params["models"] == ["local-extractive"]


def test_when_the_chain_is_exhausted_it_degrades_to_the_passages(config):
    env = failed(config, ErrorCode.MODEL_ERROR, tried=("gpt-small", "local-extractive"))
    assert decide(env, config).action == "degrade"


def test_without_passages_it_refuses_clearly(config):
    env = failed(config, ErrorCode.MODEL_ERROR, tried=("gpt-small", "local-extractive"), passages=False)
    decision = decide(env, config)
    assert decision.action == "refuse" and "no fallback left" in decision.reason


def test_a_rejected_input_is_never_retried_or_degraded(config):
    assert decide(failed(config, ErrorCode.INPUT_REJECTED, step="guard.input"), config).action == "refuse"


def test_no_retry_when_the_deadline_is_too_close(config):
    assert decide(failed(config, ErrorCode.MODEL_ERROR, deadline_in=0.2), config).action == "degrade"


def test_fallback_depth_is_bounded(config):
    env = failed(config, ErrorCode.MODEL_ERROR)
    env.attempt = config.routes["factual"].fallback.max_depth
    assert decide(env, config).action == "degrade"


@pytest.mark.parametrize(("code", "step"), [(ErrorCode.OUTPUT_REJECTED, "guard.output"), (ErrorCode.MODEL_ERROR, "generate"), (ErrorCode.NO_CONTEXT, "guard.retrieval")])
def test_a_json_request_is_refused_never_degraded_to_prose(config, code, step):
    env = failed(config, code, step=step, tried=("gpt-small", "local-extractive"))
    env.request = env.request.model_copy(update={"response_schema": {"type": "object"}})
    decision = decide(env, config)
    assert decision.action == "refuse" and "JSON" in decision.reason
