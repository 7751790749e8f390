"""What a service checks before it runs a hop: is this an envelope the router wrote?

A hop arrives on `baton.v1.step.<service>`. With the generated NATS users only services
may publish there, but a service must not believe an envelope just because it parsed:
the slip could name steps no service serves, point at another service, run for ever,
or carry a reply address that is not the client's own inbox (the Reply would then be
stored and sent under someone else's name). The router seals what identifies the
request (client, request id, reply address, creation time, deadline) with a key only
the mesh's processes hold, so a forged envelope is refused even on a NATS without
users. Plain Python: no NATS here.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

from shared import subjects
from shared.config import GATES, STEP_SERVICES, LimitsSpec
from shared.schema import Envelope

CLOCK_SKEW_S = 60.0  # how far in the future a creation time may be (clocks of two hosts)


@dataclass(frozen=True)
class Refusal:
    """Why an envelope is not run; `answerable` when its reply address is the client's own."""

    reason: str  # a metric label: a small fixed set
    message: str
    answerable: bool


def step_service(name: str, custom: Mapping[str, str] | None = None) -> str | None:
    """The service that runs a step of this name, as the config's slips name them; None if none does.

    `custom`: the config's own steps ({name: service}, its `steps:` section)."""
    if custom and name in custom:
        return custom[name]
    kind = name.split(".", 1)[0]
    service = STEP_SERVICES.get(kind)
    if service is None or (kind == "guard" and name not in GATES):
        return None
    return service


def _sealed_fields(env: Envelope) -> bytes:
    return f"{env.client}|{env.request_id}|{env.reply_to}|{env.created_at!r}|{env.deadline!r}".encode()


def _signature(env: Envelope, key: bytes) -> str:
    return hmac.digest(key, _sealed_fields(env), "sha256").hex()  # one call into OpenSSL, no HMAC object


def seal(env: Envelope, key: bytes | None) -> None:
    """Sign who the request belongs to and how long it may run (the router does this once)."""
    env.seal = _signature(env, key) if key else None


def sealed_by(env: Envelope, key: bytes) -> bool:
    expected = _signature(env, key)
    return env.seal is not None and hmac.compare_digest(expected, env.seal)


def reply_address_ok(env: Envelope) -> bool:
    """No reply address, or exactly the recorded client's inbox for this request."""
    if not (subjects.valid_client_id(env.client) and subjects.valid_request_id(env.request_id)):
        return False
    return env.reply_to is None or env.reply_to == subjects.reply_address(env.client, env.request_id)


def check(env: Envelope, service: str, limits: LimitsSpec, key: bytes | None, now: float | None = None, custom: Mapping[str, str] | None = None) -> Refusal | None:
    """None when `service` may run this envelope's hop; else why not.

    The fallback takes envelopes at any cursor (a failure can happen anywhere, or after
    the last step); every other service only the step at the cursor, and only its own.
    """
    now = time.time() if now is None else now
    answerable = reply_address_ok(env)
    if not answerable:
        return Refusal("reply_address", f"the reply address {env.reply_to!r} is not {subjects.reply_address(env.client or '<client>', env.request_id)}", False)
    if key is not None and not sealed_by(env, key):
        # Not written by the router: nothing in it can be believed, the reply address neither.
        return Refusal("unsealed", "the envelope was not sealed by the router", False)
    if not env.slip or len(env.slip) > limits.max_slip_steps:
        return Refusal("slip", f"the slip has {len(env.slip)} steps; 1 to {limits.max_slip_steps} are allowed", answerable)
    for index, step in enumerate(env.slip):
        if step_service(step.name, custom) != step.service:
            return Refusal("step", f"slip step {index} {step.name!r} is not a step the {step.service!r} service runs", answerable)
    if env.deadline - env.created_at > limits.max_deadline_s or env.created_at > now + CLOCK_SKEW_S:
        return Refusal("deadline", f"the deadline is {env.deadline - env.created_at:.0f} s after the request; at most {limits.max_deadline_s:.0f} s is allowed", answerable)
    if service == "fallback":
        if env.cursor > len(env.slip):
            return Refusal("cursor", f"cursor {env.cursor} is past the end of a {len(env.slip)}-step slip", answerable)
        return None
    if env.done:
        return Refusal("cursor", f"cursor {env.cursor} is past the end of a {len(env.slip)}-step slip", answerable)
    if env.current.service != service:
        return Refusal("wrong_service", f"step {env.current.name!r} is the {env.current.service}'s, not the {service}'s", answerable)
    return None
