"""The mesh's front door: what a published Request must be before anything routes it.

Plain data in (the client id from the subject, the headers, the body), a typed verdict
out: an `Arrival` to route, or a `Refusal` that says what is wrong and where, if
anywhere, the client may be told. No NATS here: the router's handler feeds it a
message, a unit test feeds it bytes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from shared import subjects
from shared.hops import validation_details
from shared.schema import Error, ErrorCode, Request, unknown_request_fields


BAD_REQUEST_ID = "the Baton-Request-Id header must be 1-128 letters, digits, '-', '_' or '='"


@dataclass(frozen=True)
class Addressed:
    """Who asked, under which request id, and where the one Reply goes."""

    client: str
    request_id: str
    reply_to: str | None  # exactly this client's inbox for this request, or None (the client reads the KV)
    named: bool  # the client named the request id (else the mesh made one up)


@dataclass(frozen=True)
class Arrival(Addressed):
    """A Request the router may route."""

    request: Request


@dataclass(frozen=True)
class Refusal:
    """A request that will not be routed, and the sentence that says why.

    `answerable` is False when no inbox or key could be named for the client at all (its
    id in the subject is not an id): the message can only be kept as a dead letter."""

    client: str
    request_id: str
    reply_to: str | None  # where the error may be sent: never an address that is not this client's own
    error: Error
    answerable: bool = True


def address(client: str, headers: Mapping[str, str]) -> Addressed | Refusal:
    """Check who the request is from and where its Reply may go, before reading the body."""
    named_id = headers.get(subjects.H_REQUEST_ID)
    request_id = named_id or uuid.uuid4().hex
    reply_to = headers.get(subjects.H_REPLY_TO)
    if not subjects.valid_client_id(client):
        problem = f"the client id {client[:80]!r} in the subject is not 1-64 letters, digits, '-' or '_'"
        return Refusal(client, request_id, None, Error(code=ErrorCode.INVALID_REQUEST, message=problem), answerable=False)
    if reply_to is None:
        return Addressed(client, request_id, None, named=named_id is not None)
    if named_id is None:
        problem = f"a request with a reply address needs a {subjects.H_REQUEST_ID} header (the address names it)"
    elif not subjects.valid_request_id(request_id):
        problem = BAD_REQUEST_ID
    elif reply_to != subjects.reply_address(client, request_id):
        problem = f"the reply address must be exactly {subjects.reply_address(client, request_id)} (or absent)"
    else:
        return Addressed(client, request_id, reply_to, named=True)
    # Answering would write to a subject that is not this client's inbox for this request
    # (another client's, or not a subject at all): the refusal is only kept under the id.
    return Refusal(client, request_id, None, Error(code=ErrorCode.INVALID_REQUEST, message=problem))


def admit(addressed: Addressed, body: bytes, max_bytes: int) -> Arrival | Refusal:
    """The addressed request with its parsed body, or the Refusal naming what is wrong with it."""
    parsed = parse_request(addressed.request_id, body, max_bytes)
    if isinstance(parsed, Error):
        return Refusal(addressed.client, addressed.request_id, addressed.reply_to, parsed)
    return Arrival(addressed.client, addressed.request_id, addressed.reply_to, addressed.named, parsed)


def parse_request(request_id: str, body: bytes, max_bytes: int) -> Request | Error:
    """The parsed Request, or the structured Error that names what is wrong with it."""
    if not subjects.valid_request_id(request_id):
        return Error(code=ErrorCode.INVALID_REQUEST, message=BAD_REQUEST_ID)
    if len(body) > max_bytes:
        return Error(code=ErrorCode.PAYLOAD_TOO_LARGE, message=f"the request is {len(body)} bytes; the limit is {max_bytes}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Error(code=ErrorCode.INVALID_REQUEST, message=f"the request body is not UTF-8 JSON (bad byte at position {exc.start})")
    try:
        request = Request.model_validate_json(body)
    except ValidationError as exc:
        details = validation_details(exc)
        message = "invalid request: " + "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        return Error(code=ErrorCode.INVALID_REQUEST, message=message, details=details)
    unknown = unknown_request_fields(json.loads(body))
    if unknown:
        details = [{"field": name, "problem": "unknown field"} for name in unknown]
        message = (
            f"invalid request: unknown field {', '.join(map(repr, unknown))}; "
            f"this mesh's Request (schema v{request.schema_version}) has {', '.join(Request.model_fields)}"
        )
        return Error(code=ErrorCode.INVALID_REQUEST, message=message, details=details)
    return request
