"""Every NATS name Baton uses, in one place. The version lives in the subject."""

import re

STREAM = "BATON"
PREFIX = "baton.v1"
ALL = f"{PREFIX}.>"

# Clients publish Requests to baton.v1.request.<client id> (JetStream: PubAck = accepted).
# The last token is the client's identity: NATS permissions let each client user publish
# only under its own id, and the router only answers to that client's inbox.
REQUEST_PREFIX = f"{PREFIX}.request"
REQUESTS = f"{REQUEST_PREFIX}.*"


def request(client_id: str) -> str:
    return f"{REQUEST_PREFIX}.{client_id}"


def client_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def inbox_prefix(client_id: str) -> str:
    """Where a client receives its replies (and nothing else)."""
    return f"_INBOX.{client_id}"


def client_of_inbox(reply_to: str | None) -> str | None:
    """The client a reply address belongs to: `_INBOX.<client>.reply.<request id>`."""
    parts = (reply_to or "").split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "_INBOX" else None


def reply_address(client_id: str, request_id: str) -> str:
    """The one reply address a request may name: anything else is refused (invalid_request).

    Exact, so it is always a literal subject (no spaces, wildcards or empty tokens that
    would make the publish fail on every redelivery) and always this client's own."""
    return f"{inbox_prefix(client_id)}.reply.{request_id}"


def request_msg_id(client_id: str, request_id: str, nonce: str) -> str:
    """The Nats-Msg-Id of a request: per client, and with a nonce no other client can guess,
    so nobody can pre-publish (and so silence) another client's request. A retried publish
    reuses the nonce; a repeated request id gets a new one and is answered by the router."""
    return f"{client_id}.{request_id}.{nonce}"


def hop_msg_id(client_id: str | None, request_id: str, attempt: int, where: int | str) -> str:
    """The Nats-Msg-Id of a hop: the client is part of it, so two clients' ids never collide."""
    return f"{client_id or ANONYMOUS}.{request_id}.{attempt}.{where}"


def result_key(client_id: str, request_id: str) -> str:
    """Results are kept per client: a client user may read only keys under its own id."""
    return f"{client_id}.{request_id}"


ANONYMOUS = "_"  # results of requests that named no reply address
STEP_PREFIX = f"{PREFIX}.step"

SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")


def step(service: str) -> str:
    """The subject a service consumes its steps from."""
    return f"{STEP_PREFIX}.{service}"


FALLBACK = step("fallback")

# Requests a service finished (or refused), in batches, for the router's per-client count
# of requests in flight (shared/fairness.py). Core NATS, outside the stream's subjects.
FINISHED = f"{PREFIX}.finished"



def chunk_address(reply_to: str) -> str:
    """Where partial text of a streamed request goes: beside its reply, in the client's inbox."""
    head, sep, request_id = reply_to.rpartition(".reply.")
    return f"{head}.chunk.{request_id}" if sep else f"{reply_to}.chunk"

# Key-value buckets.
RESULTS_BUCKET = "baton_results"  # request id -> Reply
SESSIONS_BUCKET = "baton_sessions"  # session id -> history
BREAKERS_BUCKET = "baton_breakers"  # model -> circuit breaker state, shared by replicas
CONFIG_BUCKET = "baton_config"
CACHE_BUCKET = "baton_cache"  # request fingerprint -> Reply (exact-match cache)
BUDGETS_BUCKET = "baton_budgets"  # tenant.day -> USD spent
SHADOW_BUCKET = "baton_shadow"  # request id -> the shadow model's answer, never returned
DEAD_LETTERS_BUCKET = "baton_dead_letters"  # request id -> the hop that kept crashing, for inspection  # "active" and "v.<digest>" -> config YAML

# Headers that travel with every message.
H_REQUEST_ID = "Baton-Request-Id"
H_REPLY_TO = "Baton-Reply-To"  # the client's inbox; the JetStream reply is the PubAck
H_MSG_ID = "Nats-Msg-Id"  # JetStream de-duplication

# A request id is also a KV key and a subject token, a client id a subject token.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_\-=]{1,128}$"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


def valid_request_id(request_id: str | None) -> bool:
    return bool(request_id) and _REQUEST_ID.fullmatch(request_id) is not None


def valid_client_id(client_id: str | None) -> bool:
    return bool(client_id) and _CLIENT_ID.fullmatch(client_id) is not None

# The server tells us when a message ran out of deliveries.
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.*"


def leader_elected(durable: str, stream: str = STREAM) -> str:
    """Where a cluster announces a new leader for a consumer (its waiting pulls are gone)."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{stream}.{durable}"


def durable(service: str) -> str:
    """One durable pull consumer per service, shared by all its replicas."""
    return service


def consumer_subject(service: str) -> str:
    return REQUESTS if service == "router" else step(service)
