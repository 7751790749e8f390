"""generator: calls the chosen model (local or remote) and records usage and cost."""

import time

from opentelemetry import trace

from services.generator.models import TASK_PROMPTS, ModelPool, NoModelAvailable, ProviderError, model_call
from shared import metrics, subjects, telemetry
from services.generator.providers import build_messages, estimate_tokens
from services.generator.shadow import ShadowRunner
from shared.pii import redact, redaction_kinds
from shared.breakers import Breakers
from shared.budgets import TenantLedger, request_budget_left
from shared.experiments import stable_fraction
from shared.bookkeeping import REPLY_ADDRESS
from shared.mesh import Channel, Mesh, StepFailed
from shared.local_model import split_sentences
from shared.replies import cited_first
from shared.schema import Envelope, ErrorCode, Event, StepRecord

mesh = Mesh("generator")
mesh.runtime.sends(Channel(subjects.chunk_address(REPLY_ADDRESS), str, "chunk", "Partial answer text of a streamed request (Request.stream = true), before the Reply."))
pools: dict[str, ModelPool] = {}  # one per config version: clients follow the model catalog
breakers = Breakers(mesh.config.breakers.threshold, mesh.config.breakers.cooldown_s)
shadows = ShadowRunner(mesh)


@mesh.before_consuming
async def share_breakers() -> None:
    await breakers.attach(await mesh.kv(subjects.BREAKERS_BUCKET))


async def pool_for(env: Envelope) -> ModelPool:
    config = await mesh.config_for(env)
    if config.digest not in pools:
        pools[config.digest] = ModelPool(config, breakers=breakers)
    return pools[config.digest]


@mesh.on_stop
async def close_pools() -> None:
    await breakers.detach()
    for pool in pools.values():
        await pool.aclose()


@mesh.step_handler
async def generate(env: Envelope, record: StepRecord) -> None:
    """Run the generate step: the chosen model answers; usage and cost are recorded."""
    params = env.current.params
    pool = await pool_for(env)
    config = pool.config
    preferred = params.get("models") or config.routes[env.route].models or ["local-extractive"]
    tenant = config.tenants.get(env.request.metadata.get("tenant", ""))
    try:
        choice = await pool.choose(
            env.route,
            preferred,
            budget_usd=await budget_left(env, config),
            input_tokens=prompt_tokens(env),
            tenant_models=tenant.models if tenant else None,
        )
    except NoModelAvailable as exc:
        code = {"not_allowed": ErrorCode.MODEL_NOT_ALLOWED, "budget": ErrorCode.BUDGET_EXCEEDED}.get(exc.reason, ErrorCode.MODEL_ERROR)
        raise StepFailed(code, str(exc)) from exc
    if choice.skipped:
        env.events.append(Event(kind="model", step=env.current.name, data={"model": choice.name, "skipped": choice.skipped}))
    record.model = choice.name  # recorded even if the call fails: the fallback skips it
    call = model_call(env.context.question, env.context.passages, env.context.history, params, env.request)
    # The generate hop's span is the model call's span (OpenInference LLM, GenAI attributes):
    # one span less per request than a child span would cost, and nothing else runs in it.
    span = trace.get_current_span()
    span.set_attributes(llm_attributes(choice, env, call))
    try:
        timeout_s = step_time_left(env, record)
        live = streams_live(env, pool)
        if live and choice.spec.provider != "local":
            generation = await pool.stream(choice, call, timeout_s, on_delta=chunk_sender(env))
        else:
            generation = await pool.generate(choice, call, timeout_s, on_retry=retry_noter(env, choice.name, span))
            # Sources numbered from [1] before any text leaves (a remote stream is already out).
            generation.text, generation.citations, env.context.passages = cited_first(generation.text, generation.citations, env.context.passages)
            if live:
                await send_sentences(generation.text, chunk_sender(env))
    except ProviderError as exc:
        env.events.append(Event(kind="model", step=env.current.name, data={"model": choice.name, "error": exc.kind}))
        telemetry.mark_model_failed(span, exc.kind, str(exc))
        raise StepFailed(ErrorCode.MODEL_ERROR, f"{choice.name}: {exc}", retryable=exc.retryable) from exc
    record.usage = generation.usage
    record.cost_usd = pool.cost_usd(choice.spec, generation)
    telemetry.record_generation(span, generation, record.cost_usd, traced_answer(generation.text, config))
    metrics.MODEL_TOKENS.labels(choice.name, "input").inc(generation.usage.input_tokens)
    metrics.MODEL_TOKENS.labels(choice.name, "output").inc(generation.usage.output_tokens)
    env.context.answer = generation.text
    env.context.citations = generation.citations
    env.context.finish_reason = generation.finish_reason
    env.events.append(Event(kind="model", step=env.current.name, data={"model": choice.name, "provider": choice.spec.provider, "tier": choice.spec.tier, "cost_usd": record.cost_usd}))
    shadow = config.routes[env.route].shadow
    if shadow is not None and shadow.model != choice.name and stable_fraction(f"shadow:{env.request_id}") < shadow.share:
        env.events.append(Event(kind="model", step=env.current.name, data={"shadow": shadow.model}))
        shadows.start(env, shadow.model, call, pool, primary=choice.name)


def llm_attributes(choice, env: Envelope, call) -> dict:
    """The model span's request side; the prompt messages only with content tracing on."""
    messages = None
    if telemetry.content_tracing():
        messages = build_messages(call.question, call.passages if call.task == "answer" else [], call.history, TASK_PROMPTS.get(call.task))
    return telemetry.llm_request_attributes(
        provider=choice.spec.provider,
        model=choice.spec.model or choice.name,
        max_tokens=choice.spec.max_output_tokens,
        session_id=env.request.session_id,
        messages=messages,
    )


def traced_answer(text: str, config) -> str | None:
    """The answer for the span, with content tracing on: redacted as the output gate would."""
    if not telemetry.content_tracing():
        return None
    return redact(text, redaction_kinds(config.guard.redact))[0]


async def budget_left(env: Envelope, config) -> float | None:
    """The tighter of what the request and its tenant's day may still spend."""
    left = request_budget_left(env, config)
    tenant_name = env.request.metadata.get("tenant", "")
    tenant = config.tenants.get(tenant_name)
    if tenant is not None and tenant.daily_budget_usd is not None:
        ledger = TenantLedger(await mesh.kv(subjects.BUDGETS_BUCKET))
        tenant_left = max(0.0, tenant.daily_budget_usd - await ledger.spent_today(tenant_name))
        left = tenant_left if left is None else min(left, tenant_left)
    return left


def prompt_tokens(env: Envelope) -> int:
    text = env.context.question + "".join(p.text for p in env.context.passages) + "".join(t.content for t in env.context.history)
    return estimate_tokens(text)


def step_time_left(env: Envelope, record: StepRecord) -> float:
    """What is left of the step's budget, never past the request's deadline."""
    left = env.remaining_s()
    if env.current.budget_ms:
        left = min(left, env.current.budget_ms / 1000 - (time.time() - record.started_at))
    return max(0.05, left)


def retry_noter(env: Envelope, model: str, span=None):
    def note(attempt: int, exc: Exception, wait_s: float) -> None:
        error = getattr(exc, "kind", type(exc).__name__)
        env.events.append(Event(kind="model", step=env.current.name, data={"model": model, "retry": attempt, "error": error, "wait_s": round(wait_s, 3)}))
        metrics.MODEL_RETRIES.labels(model).inc()
        if span is not None:  # one span event per attempt that failed and is tried again
            telemetry.record_retry(span, attempt, error, wait_s)

    return note


def streams_live(env: Envelope, pool: ModelPool) -> bool:
    return env.request.stream and env.reply_to is not None and pool.config.routes[env.route].stream == "live"


async def send_sentences(text: str, send) -> None:
    """The local model answers at once: stream it a sentence at a time."""
    for sentence in split_sentences(text):
        await send(sentence + " ")


def chunk_sender(env: Envelope):
    """Partial text goes straight to the client's inbox (core NATS: not stored, not retried)."""
    address = subjects.chunk_address(env.reply_to)

    async def send(text: str) -> None:
        await mesh.publish(address, text.encode())

    return send


if __name__ == "__main__":
    from shared.run import run

    run("generator")
