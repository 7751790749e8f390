"""Every span attribute Baton sets, declared once.

Three vocabularies side by side, so every OTLP backend reads the spans: the
OpenTelemetry semantic conventions (messaging, HTTP, GenAI), OpenInference (what
Phoenix, Arize and other LLM backends read: span kind, input/output, documents,
messages; names taken from the `openinference-semantic-conventions` package), and
Baton's own under `baton.*` where neither has a name. Prompt, answer and document
text go on spans only when content tracing is on (BATON_TRACE_CONTENT=1), and only
text the gates have already redacted.
"""

from openinference.semconv.resource import ResourceAttributes
from openinference.semconv.trace import DocumentAttributes, MessageAttributes, OpenInferenceSpanKindValues, SpanAttributes

# Resource (every process of one mesh shares the project, so Phoenix files them together).
SERVICE_NAME = "service.name"
PROJECT_NAME = ResourceAttributes.PROJECT_NAME  # "openinference.project.name"

# Messaging (OpenTelemetry semantic conventions, v1.27+ names).
MESSAGING_SYSTEM = "messaging.system"  # "nats"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION = "messaging.operation.type"  # "send" | "process" ("publish" is deprecated)
MESSAGING_OPERATION_NAME = "messaging.operation.name"  # "publish" | "process"
MESSAGING_MESSAGE_ID = "messaging.message.id"  # the Nats-Msg-Id: matches the JetStream record
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"  # the durable consumer
MESSAGING_BODY_SIZE = "messaging.message.body.size"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# HTTP server (the gateway).
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
USER_AGENT = "user_agent.original"
CLIENT_ADDRESS = "client.address"

# GenAI (OpenTelemetry semantic conventions).
GEN_AI_OPERATION = "gen_ai.operation.name"  # "chat"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"  # JSON, content tracing only
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"  # JSON, content tracing only
RETRY_EVENT = "gen_ai.retry"  # one span event per failed attempt that is retried
RETRY_ATTEMPT = "baton.retry.attempt"
RETRY_WAIT_S = "baton.retry.wait_s"

# OpenInference (names from the package, never typed by hand).
OI_KIND = SpanAttributes.OPENINFERENCE_SPAN_KIND
CHAIN = OpenInferenceSpanKindValues.CHAIN.value  # the request, the route decision, the fallback
GUARDRAIL = OpenInferenceSpanKindValues.GUARDRAIL.value  # a gate
RETRIEVER = OpenInferenceSpanKindValues.RETRIEVER.value
LLM = OpenInferenceSpanKindValues.LLM.value
EMBEDDING = OpenInferenceSpanKindValues.EMBEDDING.value
INPUT_VALUE = SpanAttributes.INPUT_VALUE
OUTPUT_VALUE = SpanAttributes.OUTPUT_VALUE
SESSION_ID = SpanAttributes.SESSION_ID
METADATA = SpanAttributes.METADATA
LLM_MODEL_NAME = SpanAttributes.LLM_MODEL_NAME
LLM_PROVIDER = SpanAttributes.LLM_PROVIDER
LLM_PROMPT_TOKENS = SpanAttributes.LLM_TOKEN_COUNT_PROMPT
LLM_COMPLETION_TOKENS = SpanAttributes.LLM_TOKEN_COUNT_COMPLETION
LLM_TOTAL_TOKENS = SpanAttributes.LLM_TOKEN_COUNT_TOTAL
LLM_INPUT_MESSAGES = SpanAttributes.LLM_INPUT_MESSAGES  # + ".<i>.message.role|content"
LLM_OUTPUT_MESSAGES = SpanAttributes.LLM_OUTPUT_MESSAGES
MESSAGE_ROLE = MessageAttributes.MESSAGE_ROLE
MESSAGE_CONTENT = MessageAttributes.MESSAGE_CONTENT
RETRIEVAL_DOCUMENTS = SpanAttributes.RETRIEVAL_DOCUMENTS  # + ".<i>.document.id|score|content|metadata"
DOCUMENT_ID = DocumentAttributes.DOCUMENT_ID
DOCUMENT_SCORE = DocumentAttributes.DOCUMENT_SCORE
DOCUMENT_CONTENT = DocumentAttributes.DOCUMENT_CONTENT
DOCUMENT_METADATA = DocumentAttributes.DOCUMENT_METADATA
EMBEDDING_MODEL_NAME = SpanAttributes.EMBEDDING_MODEL_NAME

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

# Content goes on INPUT_VALUE / OUTPUT_VALUE and the message attributes above (the names
# backends read), only with content tracing on and only after the input gate redacted it.
