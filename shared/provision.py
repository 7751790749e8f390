"""Create (or update) the stream, the per-service consumers and the KV buckets.

Idempotent: `baton up`, every service and the tests call it; the last caller wins
on settings that changed.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from shared import subjects
from shared.settings import Settings

MAX_MESSAGE_BYTES = 1024 * 1024  # the server's default max_payload


def stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.STREAM,
        subjects=[subjects.REQUESTS, f"{subjects.STEP_PREFIX}.*"],
        # Work queue: a hop is deleted once acknowledged; what is left is each service's backlog.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msg_size=MAX_MESSAGE_BYTES,
        duplicate_window=120.0,
        num_replicas=replicas,
    )


def consumer_config(service: str, settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.durable(service),
        filter_subject=subjects.consumer_subject(service),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=4096,
        max_waiting=512,
    )


async def provision(js: JetStreamContext, settings: Settings, replicas: int | None = None) -> None:
    replicas = replicas or settings.stream_replicas
    config = stream_config(replicas)
    try:
        await js.add_stream(config)
    except BadRequestError:
        # It exists: a service starting up must not rescale what an operator provisioned,
        # so only the subjects (the contract) are brought up to date.
        existing = (await js.stream_info(subjects.STREAM)).config
        if sorted(existing.subjects or []) != sorted(config.subjects):
            existing.subjects = config.subjects
            await js.update_stream(existing)
    for service in services(settings):
        await ensure_consumer(js, service, settings)
    for bucket, ttl in buckets(settings):
        await ensure_bucket(js, bucket, ttl, replicas)


def buckets(settings: Settings) -> list[tuple[str, float]]:
    """Every KV bucket and its TTL in seconds (0: keep until overwritten)."""
    return [
        (subjects.RESULTS_BUCKET, settings.results_ttl_s),
        (subjects.SESSIONS_BUCKET, settings.session_ttl_s),
        (subjects.CONFIG_BUCKET, 0),
        (subjects.BREAKERS_BUCKET, 0),
        (subjects.DEAD_LETTERS_BUCKET, settings.dead_letter_ttl_s),
        (subjects.CACHE_BUCKET, settings.cache_ttl_s),
        (subjects.BUDGETS_BUCKET, 3 * 24 * 3600),
        (subjects.SHADOW_BUCKET, settings.results_ttl_s),
    ]


def services(settings: Settings) -> list[str]:
    """The built-in services and those of the config's own steps (each has its durable consumer)."""
    from shared.config import load_config

    custom = load_config(settings.config).custom_steps.values()
    return list(dict.fromkeys([*subjects.SERVICES, *custom]))


async def ensure_consumer(js: JetStreamContext, service: str, settings: Settings) -> None:
    config = consumer_config(service, settings)
    try:
        await js.add_consumer(subjects.STREAM, config)
    except BadRequestError:
        # Exists with other settings: replace it (work-queue messages stay in the stream).
        await js.delete_consumer(subjects.STREAM, config.durable_name)
        await js.add_consumer(subjects.STREAM, config)


async def ensure_bucket(js: JetStreamContext, bucket: str, ttl_s: float, replicas: int = 1) -> None:
    try:
        await js.key_value(bucket)
    except NotFoundError:
        # Direct get lets NATS permissions scope reads by key (a client reads only its own results).
        await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl_s, replicas=replicas, history=1, direct=True))
