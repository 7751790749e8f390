"""Hostile messages onto every subject: each gets a structured error, nothing crashes.

Bodies come from hypothesis (arbitrary bytes, arbitrary JSON, envelopes with wrong
types) plus hand-made worst cases (invalid UTF-8, deep nesting, oversize). The test
talks to the mesh from a client running on its own event loop thread, so hypothesis
can drive it synchronously.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.client import BatonClient
from shared import subjects
from shared.schema import ErrorCode, Request
from tests.conftest import MeshSpec, eventually

pytestmark = pytest.mark.e2e

SUBJECTS = ["request", *[subjects.step(s) for s in ("retriever", "generator", "guardrail", "fallback")]]
EXPECTED = {ErrorCode.INVALID_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
wrong_envelopes = st.fixed_dictionaries(
    {
        "request_id": st.one_of(st.integers(), st.none(), st.text(max_size=5)),
        "request": json_values,
        "route": json_values,
        "slip": st.one_of(st.just([]), st.lists(json_values, max_size=3), st.text(max_size=5)),
        "cursor": st.one_of(st.integers(min_value=-5, max_value=50), st.text(max_size=3)),
        "deadline": st.one_of(st.text(max_size=5), st.none(), st.floats(allow_nan=False)),
    }
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    wrong_envelopes.map(lambda v: json.dumps(v).encode()),
)
WORST_CASES = [
    b"\xff\xfe\xfa not utf-8 at all",
    b"[" * 50_000 + b"]" * 50_000,  # deep nesting
    b'{"prompt": ' * 3000 + b'"x"' + b"}" * 3000,
    json.dumps({"prompt": "x" * 400_000}).encode(),  # over the request limit, under the server's
    b"",
    b"null",
    b'{"prompt": "hi", "metadata": {"tier": 5}}',
    b'{"prompt": "hi", "messages": "not a list"}',
]


MESH = MeshSpec("hostile")


class Driver:
    """A client on its own event loop, callable from synchronous hypothesis tests."""

    def __init__(self, url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.call(BatonClient(url, timeout_s=20).connect())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def send(self, subject: str, body: bytes):
        request_id = f"hostile-{uuid.uuid4().hex[:12]}"
        future = self.client._expect(request_id)
        headers = {subjects.H_REQUEST_ID: request_id, subjects.H_MSG_ID: request_id, subjects.H_REPLY_TO: self.client.reply_to(request_id)}
        target = self.client.subject if subject == "request" else subject
        await self.client.js.publish(target, body, headers=headers)
        return await asyncio.wait_for(future, 5)

    def close(self) -> None:
        self.call(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def driver(mesh):
    d = Driver(mesh.nats_url)
    yield d
    d.close()


@pytest.mark.parametrize("subject", SUBJECTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_generated_garbage_gets_a_structured_error_on_every_subject(driver, subject, body):
    reply = driver.call(driver.send(subject, body))
    if reply.ok:  # hypothesis found a valid request: it must then be a real answer
        assert subject == "request" and reply.answer
        return
    assert reply.error.code in EXPECTED | {ErrorCode.UNKNOWN_ROUTE}
    assert reply.error.message


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("body", WORST_CASES, ids=["not-utf8", "deep-array", "deep-object", "oversize", "empty", "null", "wrong-metadata", "wrong-messages"])
def test_worst_cases_get_a_structured_error_on_every_subject(driver, subject, body):
    reply = driver.call(driver.send(subject, body))
    assert not reply.ok and reply.error.code in EXPECTED
    if subject == "request" and len(body) > 300_000:
        assert reply.error.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_after_the_barrage_every_service_is_alive_and_answers(driver, mesh):
    assert all(r.alive for r in mesh.replicas)
    reply = driver.call(driver.client.ask("How do I fix a puncture?", cache=False))
    assert reply.ok and reply.route == "factual"


# -- one client cannot hurt another ------------------------------------------------------------


async def test_two_clients_using_the_same_request_id_both_get_their_own_answers(mesh):
    async with BatonClient(mesh.nats_url) as first, BatonClient(mesh.nats_url) as second:
        _, answer_one = await first._publish(Request(prompt="How do I fix a puncture?", cache=False), "q-1", {})
        _, answer_two = await second._publish(Request(prompt="How many days do I have to return a bike?", cache=False), "q-1", {})
        one, two = await asyncio.wait_for(asyncio.gather(answer_one, answer_two), 20)
        assert one.ok and two.ok and one.answer != two.answer
        assert "puncture" in one.answer.lower() or "tube" in one.answer.lower()
        assert (await first.result("q-1")).answer == one.answer and (await second.result("q-1")).answer == two.answer


async def test_a_repeated_request_id_is_answered_with_the_reply_already_given_never_silence(mesh):
    async with BatonClient(mesh.nats_url) as client:
        _, first = await client._publish(Request(prompt="How do I fix a puncture?", cache=False), "again-1", {})
        first = await asyncio.wait_for(first, 20)
        _, repeat = await client._publish(Request(prompt="Something else entirely?", cache=False), "again-1", {})
        repeat = await asyncio.wait_for(repeat, 20)
        assert repeat.model_dump() == first.model_dump()
        # At once, while the first is still on its way: the one Reply reaches both.
        _, a = await client._publish(Request(prompt="How often should I lube my chain?", cache=False), "again-2", {})
        client._pending.pop("again-2")
        _, b = await client._publish(Request(prompt="How often should I lube my chain?", cache=False), "again-2", {})
        assert (await asyncio.wait_for(b, 20)).ok


@pytest.mark.parametrize("address", ["_INBOX.{c}.reply.{r} x", "_INBOX.{c}..{r}", "_INBOX.{c}.reply.*", "_INBOX.{c}.reply.>", "_INBOX.{c}.reply.{r}.x", "baton.v1.request.{c}"])
async def test_a_poisoned_reply_address_is_refused_once_and_never_redelivered(mesh, address):
    async with BatonClient(mesh.nats_url) as client:
        before = await client.js.consumer_info(subjects.STREAM, "router")
        request_id = f"poison-{uuid.uuid4().hex[:8]}"
        headers = {subjects.H_REQUEST_ID: request_id, subjects.H_MSG_ID: f"{client.client_id}.{request_id}", subjects.H_REPLY_TO: address.format(c=client.client_id, r=request_id)}
        await client.js.publish(client.subject, b'{"prompt": "How do I fix a puncture?"}', headers=headers)
        refused = await eventually(lambda: client.result(request_id), 10, every=0.1, what="the refusal stored under the client's key")
        assert not refused.ok and refused.error.code == ErrorCode.INVALID_REQUEST
        assert subjects.reply_address(client.client_id, request_id) in refused.error.message
        async def settled():  # the refusal is stored just before the message is acked
            info = await client.js.consumer_info(subjects.STREAM, "router")
            return info if info.num_ack_pending == 0 else None

        after = await eventually(settled, 10, every=0.1, what="the router's message acked")
        assert after.num_redelivered == before.num_redelivered


def _forged(mesh, client: BatonClient, request_id: str, slip: list[dict], cursor: int = 0, reply_to: str | None = None, seal: bool = True) -> bytes:
    """An envelope written by hand: sealed with the mesh's key (as a compromised service
    could), or not sealed at all (as any client could)."""
    from shared import envelopes
    from shared.schema import Envelope

    now = time.time()
    env = Envelope(
        request_id=request_id, client=client.client_id, reply_to=reply_to or client.reply_to(request_id),
        request=Request(prompt="How do I fix a puncture?"), route="factual", slip=slip, cursor=cursor,
        created_at=now, deadline=now + 20,
    )
    env.context.question = env.request.text
    envelopes.seal(env, mesh.envelope_key.encode() if seal else None)
    return env.model_dump_json().encode()


async def _dead_letters(client: BatonClient, service: str) -> list[dict]:
    bucket = await client.js.key_value(subjects.DEAD_LETTERS_BUCKET)
    try:
        keys = await bucket.keys()
    except Exception:  # no keys yet
        return []
    return [json.loads((await bucket.get(k)).value) for k in keys if k.startswith(f"poison.{service}.")]


@pytest.mark.parametrize(
    ("subject_service", "slip", "cursor", "reason"),
    [
        ("guardrail", [{"service": "guardrail", "name": "guard.nope"}], 0, "step"),
        ("retriever", [{"service": "retriever", "name": "retrieve;rm -rf"}], 0, "step"),
        ("guardrail", [{"service": "guardrail", "name": "guard.input"}, {"service": "retriever", "name": "retrieve"}], 1, "wrong_service"),
        ("guardrail", [{"service": "guardrail", "name": "guard.input"}] * 40, 0, "slip"),
    ],
    ids=["unknown-gate", "unknown-step", "wrong-service", "long-slip"],
)
async def test_a_forged_envelope_is_refused_with_an_error_terminated_and_kept_as_a_dead_letter(mesh, subject_service, slip, cursor, reason):
    async with BatonClient(mesh.nats_url) as client:
        request_id = f"forged-{uuid.uuid4().hex[:8]}"
        future = client._expect(request_id)
        body = _forged(mesh, client, request_id, slip, cursor)
        await client.js.publish(subjects.step(subject_service), body, headers={subjects.H_REQUEST_ID: request_id})
        reply = await asyncio.wait_for(future, 10)
        assert not reply.ok and reply.error.code == ErrorCode.INVALID_REQUEST and subject_service in reply.error.message
        letters = await eventually(lambda: _matching(client, subject_service, request_id), 10, every=0.1, what="the dead letter")
        assert letters[0]["reason"] == reason and letters[0]["deliveries"] == 1
        assert await client.result(request_id) is None  # nothing stored under the client's name
        info = await client.js.consumer_info(subjects.STREAM, subjects.durable(subject_service))
        assert info.num_ack_pending == 0


async def _matching(client, service, request_id):
    return [letter for letter in await _dead_letters(client, service) if letter["request_id"] == request_id]


async def test_an_unsealed_envelope_or_one_aimed_at_another_clients_inbox_is_neither_answered_nor_stored(mesh):
    async with BatonClient(mesh.nats_url) as forger, BatonClient(mesh.nats_url) as victim:
        delivered = []

        async def collect(msg):
            delivered.append(msg.subject)

        await victim.nc.subscribe(f"{victim.inbox_prefix}.reply.>", cb=collect)
        await forger.nc.subscribe(f"{forger.inbox_prefix}.reply.>", cb=collect)
        last_step = [{"service": "guardrail", "name": "guard.output"}]
        unsealed = _forged(mesh, victim, "planted-1", last_step, seal=False)  # a whole answer, forged for the victim
        foreign = _forged(mesh, forger, "planted-2", last_step, reply_to=victim.reply_to("planted-2"))
        await forger.js.publish(subjects.step("guardrail"), unsealed, headers={subjects.H_REQUEST_ID: "planted-1"})
        await forger.js.publish(subjects.step("guardrail"), foreign, headers={subjects.H_REQUEST_ID: "planted-2"})
        reasons = await eventually(lambda: _reasons(victim, forger), 10, every=0.1, what="both dead letters")
        assert reasons == {"unsealed", "reply_address"}
        await asyncio.sleep(0.5)
        assert delivered == []
        assert await victim.result("planted-1") is None and await victim.result("planted-2") is None
        # The victim's real request with the planted id still gets the real answer.
        _, real = await victim._publish(Request(prompt="How do I fix a puncture?", cache=False), "planted-1", {})
        assert (await asyncio.wait_for(real, 20)).ok


async def _reasons(victim, forger) -> set[str] | None:
    letters = [letter for letter in await _dead_letters(victim, "guardrail") if letter["request_id"] in ("planted-1", "planted-2")]
    return {letter["reason"] for letter in letters} if len(letters) == 2 else None


async def test_no_ok_reply_after_the_deadline_counted_from_the_clients_publish(mesh):
    async with BatonClient(mesh.nats_url) as client:
        reply = await client.ask("How do I fix a puncture?", max_latency_ms=1, cache=False)
        assert not reply.ok and reply.error.code == ErrorCode.DEADLINE_EXCEEDED


async def test_a_publish_jetstream_already_had_is_answered_from_the_stored_reply(mesh):
    async with BatonClient(mesh.nats_url) as client:
        body = b'{"prompt": "How do I fix a puncture?", "cache": false}'
        same_id = {subjects.H_MSG_ID: f"{client.client_id}.dup-1"}  # as a retried publish carries
        first = await asyncio.wait_for(await client.send_raw(body, request_id="dup-1", headers=same_id), 20)
        again = await asyncio.wait_for(await client.send_raw(body, request_id="dup-1", headers=same_id), 5)
        assert first.ok and again.model_dump() == first.model_dump()
