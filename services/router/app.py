"""router: validates each Request, picks its route, writes the slip, passes the baton."""

import logging
import re
import uuid

from pydantic import ValidationError

from services.router.routing import Router, UnknownRoute
from shared import subjects
from shared.mesh import Mesh, validation_details
from shared.schema import Error, ErrorCode, Request

mesh = Mesh("router")
router = Router(mesh.config)
app = mesh.app
log = logging.getLogger("baton.router")

REQUEST_ID = re.compile(r"^[A-Za-z0-9_\-=]{1,128}$")


@mesh.subscriber()
async def route(body: bytes) -> None:
    headers = mesh.current_message().headers or {}
    request_id = headers.get(subjects.H_REQUEST_ID) or uuid.uuid4().hex
    reply_to = headers.get(subjects.H_REPLY_TO)
    if not REQUEST_ID.match(request_id):
        await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.INVALID_REQUEST, message="the Baton-Request-Id header must be 1-128 letters, digits, '-', '_' or '='"))
        return
    if len(body) > mesh.settings.max_request_bytes:
        message = f"the request is {len(body)} bytes; the limit is {mesh.settings.max_request_bytes}"
        await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.PAYLOAD_TOO_LARGE, message=message))
        return
    try:
        request = Request.model_validate_json(body)
    except ValidationError as exc:
        details = validation_details(exc)
        message = "invalid request: " + "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.INVALID_REQUEST, message=message, details=details))
        return
    try:
        decision = router.decide(request)
    except UnknownRoute as exc:
        await mesh.reply_error(request_id, reply_to, Error(code=ErrorCode.UNKNOWN_ROUTE, message=str(exc)))
        return
    log.info("request %s -> route %s (%s, confidence %.2f)", request_id, decision.route, decision.reason, decision.confidence)
    await mesh.forward(router.envelope(request_id, request, decision, reply_to))


if __name__ == "__main__":
    from shared.run import run

    run("router")
