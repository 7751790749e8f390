"""The entry step without NATS: what a published Request must be, and the route step's verdict."""

from __future__ import annotations

import time

import pytest

from services.router.app import ReadLater, plan, read_later
from services.router.routing import Router
from shared import intake, subjects
from shared.config import load_config
from shared.schema import Envelope, Error, ErrorCode, Request
from shared.settings import Settings

LIMIT = 1_000_000


def headers(request_id: str | None = None, reply_to: str | None = None) -> dict[str, str]:
    named = {subjects.H_REQUEST_ID: request_id} if request_id is not None else {}
    return {**named, **({subjects.H_REPLY_TO: reply_to} if reply_to is not None else {})}


# -- who asked, and where the Reply may go -------------------------------------------------


def test_a_request_to_its_own_inbox_is_addressed_there():
    addressed = intake.address("shop-web", headers("q-1", "_INBOX.shop-web.reply.q-1"))
    assert addressed == intake.Addressed("shop-web", "q-1", "_INBOX.shop-web.reply.q-1", named=True)


def test_a_request_without_an_id_gets_one_and_no_inbox():
    addressed = intake.address("shop-web", {})
    assert isinstance(addressed, intake.Addressed) and not addressed.named and addressed.reply_to is None
    assert subjects.valid_request_id(addressed.request_id)


@pytest.mark.parametrize(
    "given, says",
    [
        (headers("q-1", "_INBOX.other-client.reply.q-1"), "must be exactly _INBOX.shop-web.reply.q-1"),
        (headers("q-1", "_INBOX.shop-web.reply.q-2"), "must be exactly _INBOX.shop-web.reply.q-1"),
        (headers(None, "_INBOX.shop-web.reply.q-1"), "needs a Baton-Request-Id header"),
        (headers("q 1*", "_INBOX.shop-web.reply.q 1*"), "1-128 letters"),
    ],
)
def test_an_address_that_is_not_the_clients_own_is_never_answered(given, says):
    refusal = intake.address("shop-web", given)
    assert isinstance(refusal, intake.Refusal) and refusal.answerable
    assert refusal.reply_to is None, "the error must not go to an address the client does not own"
    assert refusal.error.code == ErrorCode.INVALID_REQUEST and says in refusal.error.message


def test_a_subject_whose_client_is_not_an_id_cannot_be_answered_at_all():
    refusal = intake.address("a*b", headers("q-1"))
    assert isinstance(refusal, intake.Refusal) and not refusal.answerable
    assert "client id" in refusal.error.message


# -- the body ----------------------------------------------------------------------------------


def test_a_good_body_arrives_with_its_address():
    arrival = intake.admit(intake.Addressed("shop-web", "q-1", None, True), b'{"prompt": "How do I fix a puncture?"}', LIMIT)
    assert isinstance(arrival, intake.Arrival) and arrival.request.prompt == "How do I fix a puncture?"
    assert (arrival.client, arrival.request_id) == ("shop-web", "q-1")


@pytest.mark.parametrize(
    "request_id, body, code, says",
    [
        ("bad id!", b'{"prompt": "hi"}', ErrorCode.INVALID_REQUEST, "Baton-Request-Id"),
        ("q-1", b"\xff\xfe", ErrorCode.INVALID_REQUEST, "not UTF-8"),
        ("q-1", b'{"prompt": 3}', ErrorCode.INVALID_REQUEST, "prompt"),
        ("q-1", b"{not json", ErrorCode.INVALID_REQUEST, "invalid request"),
        ("q-1", b'{"prompt": "hi", "tempreature": 1}', ErrorCode.INVALID_REQUEST, "unknown field 'tempreature'"),
        ("q-1", b'{"prompt": "' + b"x" * 2_000_000 + b'"}', ErrorCode.PAYLOAD_TOO_LARGE, "the limit is"),
    ],
)
def test_a_bad_body_is_refused_with_the_sentence_that_says_why(request_id, body, code, says):
    refusal = intake.admit(intake.Addressed("shop-web", request_id, "_INBOX.shop-web.reply.q-1", True), body, LIMIT)
    assert isinstance(refusal, intake.Refusal) and refusal.error.code == code and says in refusal.error.message
    assert refusal.reply_to == "_INBOX.shop-web.reply.q-1", "a checked address is told what was wrong"


# -- the route step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_config(Settings().config))


def arrival(request: Request) -> intake.Arrival:
    return intake.Arrival("shop-web", "q-1", "_INBOX.shop-web.reply.q-1", True, request)


def test_the_route_step_asks_for_the_encoder_only_when_the_decision_needs_it(router):
    # An ordinary question decides on the spot; an incident told without a cue word needs the
    # encoder's reading, which the router process takes in a worker thread and hands back.
    assert isinstance(plan(arrival(Request(prompt="How do I fix a puncture?")), router, time.time(), read=read_later), Envelope)
    incident = Request(prompt="Bit of a situation: the bike you sold me threw me off when the bars turned. I've been off work for a month and I want to know who pays.")
    with pytest.raises(ReadLater) as wanted:
        plan(arrival(incident), router, time.time(), read=read_later)
    assert wanted.value.text == incident.text
    env = plan(arrival(incident), router, time.time(), read=lambda _: 0.9)
    assert isinstance(env, Envelope) and env.route == "high_risk"
    assert plan(arrival(incident), router, time.time(), read=lambda _: 0.1).route != "high_risk"  # type: ignore[union-attr]


def test_the_route_step_writes_the_slip_and_counts_the_deadline_from_publishing(router):
    published = time.time() - 0.5
    env = plan(arrival(Request(prompt="How do I fix a puncture?")), router, published)
    assert isinstance(env, Envelope)
    assert (env.client, env.reply_to, env.route) == ("shop-web", "_INBOX.shop-web.reply.q-1", "factual")
    assert [step.name for step in env.slip] == [step.name for step in router.config.route("factual").steps]
    assert env.deadline == pytest.approx(published + router.config.route("factual").latency_budget_ms / 1000)


def test_a_request_that_queued_past_its_budget_is_refused_not_routed(router):
    request = Request(prompt="How do I fix a puncture?", max_latency_ms=100)
    error = plan(arrival(request), router, published=time.time() - 1.0)
    assert isinstance(error, Error) and error.code == ErrorCode.DEADLINE_EXCEEDED and "past its 100 ms budget" in error.message


def test_an_unknown_route_hint_is_a_clear_error(router):
    error = plan(arrival(Request(prompt="hi", route="no-such-route")), router, time.time())
    assert isinstance(error, Error) and error.code == ErrorCode.UNKNOWN_ROUTE and "no-such-route" in error.message
