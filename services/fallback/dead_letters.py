"""Hops that ran out of deliveries: a dead-letter record and a terminal error reply.

JetStream publishes an advisory when a message reaches its consumer's max_deliver. The
message is still in the work-queue stream; we read it by sequence, keep it in the
dead-letter bucket for inspection, answer the client, and remove it from the stream.
Plain Python over a JetStream context: no FastStream here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError

from shared import subjects
from shared.schema import Envelope, Error, ErrorCode


@dataclass
class DeadLetter:
    request_id: str
    reply_to: str | None
    consumer: str
    step: str | None
    deliveries: int
    stream_seq: int

    def error(self) -> Error:
        where = f"step {self.step}" if self.step else f"the {self.consumer} service"
        return Error(
            code=ErrorCode.REDELIVERY_EXHAUSTED,
            message=f"{where} failed on this request {self.deliveries} times in a row; it was set aside as a dead letter for inspection",
            step=self.step,
        )


def read_advisory(body: bytes) -> tuple[str, int, int]:
    """(consumer, stream sequence, deliveries) of a max-deliveries advisory."""
    advisory = json.loads(body)
    return advisory["consumer"], int(advisory["stream_seq"]), int(advisory.get("deliveries", 0))


def describe(consumer: str, stream_seq: int, deliveries: int, data: bytes, headers: dict[str, str]) -> DeadLetter:
    request_id = headers.get(subjects.H_REQUEST_ID, f"seq-{stream_seq}")
    reply_to, step = headers.get(subjects.H_REPLY_TO), None
    if consumer != "router":  # a hop carries an envelope: its own reply address and step
        try:
            env = Envelope.model_validate_json(data)
            request_id, reply_to = env.request_id, env.reply_to
            step = env.current.name if not env.done else None
        except ValidationError:
            pass
    return DeadLetter(request_id, reply_to, consumer, step, deliveries, stream_seq)


def record(letter: DeadLetter, data: bytes, headers: dict[str, str]) -> bytes:
    return json.dumps(
        {
            "request_id": letter.request_id,
            "consumer": letter.consumer,
            "step": letter.step,
            "deliveries": letter.deliveries,
            "stream_seq": letter.stream_seq,
            "headers": headers,
            "body": data.decode(errors="replace"),
            "at": time.time(),
        }
    ).encode()
