"""Baton failures as HTTP statuses and OpenAI-style error bodies.

Pure: no I/O and no web framework, so the whole mapping is unit-tested. Every error
the gateway returns is a `GatewayError`; `body()` is OpenAI's shape,

    {"error": {"message": ..., "type": ..., "param": ..., "code": ..., "baton_code": ...}}

(`baton_code`, when set, is the mesh's own ErrorCode; clients that only know OpenAI
ignore it). `headers()` sets `x-should-retry`, which the official SDKs obey instead of
their default of retrying every 408/409/429/5xx: only failures where nothing was done
(or the mesh marked the failure retryable) are worth a second attempt.
"""

from __future__ import annotations

from typing import Any

from nats.errors import Error as NatsError

from baton.client import NotAccepted, ReplyTimeout, RequestTooLarge
from shared.schema import Error, ErrorCode, Reply

INVALID = "invalid_request_error"
SERVER = "api_error"

# ErrorCode -> (HTTP status, OpenAI error type, OpenAI error code)
STATUS: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, INVALID, "invalid_request"),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, INVALID, "payload_too_large"),
    ErrorCode.UNKNOWN_ROUTE: (404, INVALID, "model_not_found"),
    ErrorCode.INPUT_REJECTED: (400, INVALID, "content_filter"),
    ErrorCode.OUTPUT_REJECTED: (400, INVALID, "content_filter"),
    ErrorCode.NO_CONTEXT: (422, INVALID, "no_context"),
    ErrorCode.MODEL_NOT_ALLOWED: (403, "permission_error", "model_not_allowed"),
    ErrorCode.BUDGET_EXCEEDED: (429, "insufficient_quota", "insufficient_quota"),
    ErrorCode.DEADLINE_EXCEEDED: (504, SERVER, "deadline_exceeded"),
    ErrorCode.MODEL_ERROR: (502, SERVER, "model_error"),
    ErrorCode.REDELIVERY_EXHAUSTED: (502, SERVER, "redelivery_exhausted"),
    ErrorCode.UNAVAILABLE: (503, SERVER, "unavailable"),
    ErrorCode.INTERNAL: (500, SERVER, "internal_error"),
}
# Statuses at which a retry can help, when the failure itself says so.
RETRYABLE_STATUSES = frozenset({502, 503})


class GatewayError(Exception):
    """One HTTP error response: status, OpenAI error body, retry advice."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        code: str | None = None,
        param: str | None = None,
        baton_code: str | None = None,
        retry: bool = False,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.baton_code = baton_code
        self.retry = retry
        self.request_id = request_id
        self.extra_headers = dict(headers or {})

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.baton_code is not None:
            error["baton_code"] = self.baton_code
        return error

    def body(self) -> dict[str, Any]:
        return {"error": self.error()}

    def headers(self) -> dict[str, str]:
        headers = {**self.extra_headers, "x-should-retry": "true" if self.retry else "false"}
        if self.request_id:
            headers["x-baton-request-id"] = self.request_id
        return headers

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def from_error(error: Error | None, request_id: str | None = None) -> GatewayError:
    """The HTTP face of a mesh Error (a Reply with ok=False)."""
    if error is None:
        return GatewayError(500, "the mesh answered without an answer or an error", type=SERVER, code="internal_error", request_id=request_id)
    status, type_, code = STATUS.get(error.code, (500, SERVER, "internal_error"))
    return GatewayError(
        status,
        error.message,
        type=type_,
        code=code,
        baton_code=error.code.value,
        retry=status in RETRYABLE_STATUSES and error.retryable,
        request_id=request_id,
    )


def from_reply(reply: Reply) -> GatewayError:
    return from_error(reply.error, reply.request_id)


def from_exception(exc: BaseException) -> GatewayError:
    """The HTTP face of an exception raised while talking to the mesh."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RequestTooLarge):
        return GatewayError(413, f"{exc}", code="payload_too_large", baton_code=ErrorCode.PAYLOAD_TOO_LARGE.value)
    if isinstance(exc, NotAccepted):
        # Nothing was queued, so a retry is safe.
        return GatewayError(503, f"the Baton mesh is not reachable: the request was not accepted ({exc})", type=SERVER, code="mesh_unavailable", retry=True)
    if isinstance(exc, ReplyTimeout):
        # The request may still finish; a retry would run it twice.
        waited = str(exc).split(";", 1)[0]  # drop the client's CLI hint: HTTP callers cannot use it
        return GatewayError(504, f"the mesh did not answer in time: {waited}", type=SERVER, code="timeout", request_id=exc.request_id)
    if isinstance(exc, NatsError):
        return GatewayError(503, f"the Baton mesh is not reachable: NATS connection problem ({type(exc).__name__})", type=SERVER, code="mesh_unavailable", retry=True)
    return GatewayError(500, "internal gateway error; the gateway log has the details", type=SERVER, code="internal_error")


# -- errors the gateway finds itself ------------------------------------------


def bad_request(param: str | None, message: str) -> GatewayError:
    """A malformed HTTP body: 400 naming the field."""
    return GatewayError(400, message, code="invalid_request", param=param, baton_code=ErrorCode.INVALID_REQUEST.value)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than the gateway's limit of {limit} bytes", code="payload_too_large", baton_code=ErrorCode.PAYLOAD_TOO_LARGE.value)


def model_not_found(model: str, available: list[str]) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist. Baton serves: {', '.join(available)}",
        code="model_not_found",
        param="model",
        baton_code=ErrorCode.UNKNOWN_ROUTE.value,
    )


def unauthorized(missing: bool) -> GatewayError:
    # Never echo the key: not even a prefix of it.
    if missing:
        message = "You didn't provide an API key. Send it in the Authorization header as 'Bearer <key>'."
    else:
        message = "Incorrect API key provided."
    return GatewayError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def http_error(status: int, detail: str | None = None, headers: dict[str, str] | None = None) -> GatewayError:
    """Starlette's own 404/405/... with an OpenAI-style body (and its headers, e.g. Allow)."""
    type_ = SERVER if status >= 500 else INVALID
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return GatewayError(status, detail or "error", type=type_, code=code, headers=headers)
