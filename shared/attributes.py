"""Every span attribute Baton sets, declared once.

Standard OpenTelemetry semantic conventions where they exist (messaging, GenAI);
Baton's own under `baton.*` where they don't. Prompt and document text go on spans
only when content tracing is on (BATON_TRACE_CONTENT=1).
"""

# Messaging (OpenTelemetry semantic conventions).
MESSAGING_SYSTEM = "messaging.system"  # "nats"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION = "messaging.operation.type"  # "publish" | "process"

# GenAI (OpenTelemetry semantic conventions).
GEN_AI_OPERATION = "gen_ai.operation.name"  # "chat"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# Baton: the request and its hop.
REQUEST_ID = "baton.request_id"
ROUTE = "baton.route"
ROUTE_REASON = "baton.route.reason"
ROUTE_CONFIDENCE = "baton.route.confidence"
ROUTE_COMPLEXITY = "baton.route.complexity"
CONFIG_VERSION = "baton.config_version"
STEP = "baton.step"  # e.g. "retrieve", "guard.output"
STEP_INDEX = "baton.step.index"
QUEUED_MS = "baton.step.queued_ms"  # time between the previous publish and this hop's start
STEP_OUTCOME = "baton.step.outcome"  # "ok" | "failed"

# Baton: decisions inside a step.
RETRIEVAL_COUNT = "baton.retrieval.count"
RETRIEVAL_TOP_SCORE = "baton.retrieval.top_score"
GATE_NAME = "baton.gate.name"
GATE_VERDICT = "baton.gate.verdict"  # "pass" | "fixed" | "fail"
GATE_SCORE = "baton.gate.score"
GATE_REASON = "baton.gate.reason"
FALLBACK_REASON = "baton.fallback.reason"  # the error code that sent the request to fallback
FALLBACK_ACTION = "baton.fallback.action"  # "retry_model" | "degrade" | "refuse"
COST_USD = "baton.cost_usd"  # cost of this step
SHADOW = "baton.shadow"  # a shadow model's call: recorded, never returned
VARIANT = "baton.variant"  # the A/B arm that served the request
USAGE_ESTIMATED = "baton.usage.estimated"

# Baton: the end of a request (set on the span of the hop that replied).
OUTCOME = "baton.outcome"  # "answered" | "degraded" | "error"
ERROR_CODE = "baton.error.code"
REQUEST_COST_USD = "baton.request.cost_usd"
REQUEST_LATENCY_MS = "baton.request.latency_ms"
CACHED = "baton.cached"  # answered from the reply cache

# Content, only with content tracing on.
CONTENT_PROMPT = "baton.content.prompt"
CONTENT_ANSWER = "baton.content.answer"
