"""What a service refuses to run (shared/envelopes.py), and the per-client limit (shared/fairness.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import envelopes, subjects
from shared.config import LimitsSpec
from shared import fairness
from shared.fairness import ClientSlots, FinishedNotes
from shared.schema import Envelope, Request, Step

KEY = b"k" * 32
LIMITS = LimitsSpec()
SLIP = [
    Step(service="guardrail", name="guard.input"),
    Step(service="retriever", name="retrieve"),
    Step(service="generator", name="generate"),
    Step(service="guardrail", name="guard.output"),
]


def envelope(cursor: int = 0, **changes) -> Envelope:
    now = time.time()
    fields = {
        "request_id": "q-1",
        "client": "acme",
        "reply_to": subjects.reply_address("acme", "q-1"),
        "request": Request(prompt="hi"),
        "route": "factual",
        "slip": [step.model_copy() for step in SLIP],
        "cursor": cursor,
        "created_at": now,
        "deadline": now + 20,
    }
    env = Envelope(**{**fields, **changes})
    envelopes.seal(env, KEY)
    return env


def test_the_routers_envelope_is_run_by_the_service_at_its_cursor():
    assert envelopes.check(envelope(0), "guardrail", LIMITS, KEY) is None
    assert envelopes.check(envelope(1), "retriever", LIMITS, KEY) is None
    assert envelopes.check(envelope(4), "fallback", LIMITS, KEY) is None  # a failure after the last step


@pytest.mark.parametrize(
    ("changes", "service", "reason"),
    [
        ({"cursor": 1}, "guardrail", "wrong_service"),  # the retriever's step sent to the guardrail
        ({"cursor": 4}, "guardrail", "cursor"),
        ({"slip": [Step(service="guardrail", name="guard.nope")]}, "guardrail", "step"),
        ({"slip": [Step(service="retriever", name="retrieve;rm -rf")]}, "retriever", "step"),
        ({"slip": [Step(service="generator", name="retrieve")]}, "generator", "step"),
        ({"slip": [Step(service="guardrail", name="guard.input")] * 17}, "guardrail", "slip"),
        ({"slip": []}, "fallback", "slip"),
    ],
)
def test_a_slip_no_config_could_write_is_refused_with_the_client_told(changes, service, reason):
    refusal = envelopes.check(envelope(**changes), service, LIMITS, KEY)
    assert refusal is not None and refusal.reason == reason and refusal.answerable


def test_a_deadline_beyond_the_limit_is_refused():
    now = time.time()
    refusal = envelopes.check(envelope(created_at=now, deadline=now + 3600), "guardrail", LIMITS, KEY)
    assert refusal is not None and refusal.reason == "deadline"


@pytest.mark.parametrize(
    "reply_to",
    [
        "baton.v1.request.victim",  # writes under another client's keys
        "_INBOX.victim.reply.q-1",  # another client's inbox
        "_INBOX.acme.reply.q-2",  # another request's
        "_INBOX.acme.reply.q-1 x",
        "_INBOX.acme..q-1",
        "_INBOX.acme.reply.*",
        "_INBOX.acme.reply.>",
    ],
)
def test_a_reply_address_that_is_not_exactly_the_clients_inbox_is_refused_and_never_answered(reply_to):
    refusal = envelopes.check(envelope(reply_to=reply_to), "guardrail", LIMITS, KEY)
    assert refusal is not None and refusal.reason == "reply_address" and not refusal.answerable


def test_an_envelope_the_router_did_not_seal_is_refused_and_not_answered():
    forged = envelope()
    forged.seal = None
    assert envelopes.check(forged, "guardrail", LIMITS, KEY).reason == "unsealed"
    moved = envelope()
    moved.deadline += 3600 * 24  # a longer deadline than the router gave
    refusal = envelopes.check(moved, "guardrail", LimitsSpec(max_deadline_s=10**9), KEY)
    assert refusal.reason == "unsealed" and not refusal.answerable
    assert envelopes.check(forged, "guardrail", LIMITS, None) is None  # no key configured: not checked


def test_a_seal_survives_the_wire():
    env = envelope()
    assert envelopes.check(Envelope.model_validate_json(env.model_dump_json()), "guardrail", LIMITS, KEY) is None


# -- the per-client limit ------------------------------------------------------------------


async def test_a_client_at_its_limit_waits_for_its_own_request_while_others_go_past():
    slots = ClientSlots()
    deadline = time.time() + 30
    for i in range(2):
        slots.hold("flood", f"f{i}", deadline)
    assert not slots.has_room("flood", "f2", limit=2)
    assert slots.has_room("flood", "f0", limit=2)  # a request already held never waits behind itself
    assert slots.has_room("victim", "v0", limit=2)
    waiting = asyncio.create_task(slots.wait_for_room("flood", "f2", limit=2))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    slots.release("flood", "f0")
    await asyncio.wait_for(waiting, 1)


async def test_a_request_nobody_answers_frees_its_slot_at_its_deadline():
    slots = ClientSlots()
    slots.hold("c", "r1", time.time() + 0.2)
    started = time.monotonic()
    await asyncio.wait_for(slots.wait_for_room("c", "r2", limit=1), 2)
    assert 0.1 < time.monotonic() - started < 1.5
    assert slots.in_flight("c") == 1 and slots.has_room("c", "r2", limit=1)  # r1 is gone; r2 holds the slot it was handed


async def test_a_freed_slot_goes_to_the_clients_oldest_waiter_and_wakes_no_other():
    slots = ClientSlots()
    deadline = time.time() + 30
    slots.hold("flood", "f0", deadline)
    waiting = [asyncio.create_task(slots.wait_for_room("flood", f"w{i}", limit=1)) for i in range(3)]
    await asyncio.sleep(0.02)
    assert not slots.has_room("flood", "late", limit=1)  # a newcomer queues behind the waiters
    slots.release("flood", "f0")
    await asyncio.sleep(0.02)
    assert [t.done() for t in waiting] == [True, False, False]
    assert slots.in_flight("flood") == 1 and slots.has_room("flood", "w0", limit=1)  # handed over, already held
    slots.release("flood", "w0")
    await asyncio.sleep(0.02)
    assert [t.done() for t in waiting] == [True, True, False]
    waiting[2].cancel()
    slots.release("flood", "w1")
    await asyncio.sleep(0.02)
    assert slots.in_flight("flood") == 0 and slots.has_room("flood", "late", limit=1)  # a cancelled waiter takes nothing


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_the_slot_on():
    slots = ClientSlots()
    slots.hold("c", "r0", time.time() + 30)
    first = asyncio.create_task(slots.wait_for_room("c", "r1", limit=1))
    second = asyncio.create_task(slots.wait_for_room("c", "r2", limit=1))
    await asyncio.sleep(0.02)
    slots.release("c", "r0")  # r1 is handed the slot, but is cancelled before it runs
    first.cancel()
    await asyncio.sleep(0.02)
    assert first.cancelled() and second.done()
    assert slots.in_flight("c") == 1 and slots.has_room("c", "r2", limit=1)


# -- what the finishing services tell the router -------------------------------------------


async def test_finished_requests_reach_the_router_as_one_small_message_per_window():
    sent: list[bytes] = []

    async def send(body: bytes) -> None:
        sent.append(body)

    notes = FinishedNotes(send, window_s=0.02)
    notes.note("acme", "q-1")
    notes.note("globex", "q-2")
    assert sent == []  # not yet: more may finish within the window
    await asyncio.sleep(0.06)
    assert [fairness.decode(body) for body in sent] == [[("acme", "q-1"), ("globex", "q-2")]]
    notes.note("acme", "q-3")
    await notes.flush()  # on stop: nothing pending is lost
    assert fairness.decode(sent[-1]) == [("acme", "q-3")]
    slots = ClientSlots()
    slots.hold("acme", "q-1", time.time() + 30)
    slots.release_all(fairness.decode(sent[0]))
    assert slots.in_flight("acme") == 0


@pytest.mark.parametrize("body", [b"", b"{", b'{"acme": "q-1"}', b'[["acme"]]', b'[["acme", 3]]', b"[1, 2]"])
def test_a_malformed_finished_note_names_no_request(body):
    assert fairness.decode(body) == []


# -- credentials of the local mesh ---------------------------------------------------------


def test_settings_and_the_cli_find_the_local_meshs_user_only_for_that_mesh(tmp_path, monkeypatch):
    from shared.natsd import write_credentials
    from shared.settings import Settings

    for name in ("NATS_URL", "NATS_USER", "NATS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert Settings(state_dir=tmp_path).nats_user is None
    write_credentials(tmp_path, "nats://127.0.0.1:4999", {"cli": "secret-1", "admin": "secret-2"})
    assert (tmp_path / "credentials.json").stat().st_mode & 0o777 == 0o600
    found = Settings(state_dir=tmp_path)
    assert found.nats_user == "cli" and found.nats_password.get_secret_value() == "secret-1"
    monkeypatch.setenv("NATS_URL", "nats://elsewhere:4222")
    assert Settings(state_dir=tmp_path).nats_user is None  # another server: not its password
    monkeypatch.setenv("NATS_USER", "me")
    assert Settings(state_dir=tmp_path).nats_user == "me"
