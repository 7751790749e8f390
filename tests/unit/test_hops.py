"""The hop runner and its ack policy, with fake messages and a recording publish: no NATS.

What becomes of one consumer message: forwarded and acked, failed over to the fallback,
finished (the Reply stored once and sent), refused and terminated, or handed back with a
growing pause when the infrastructure failed."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from shared import subjects
from shared.bookkeeping import RequestBook
from shared.hops import Hops, StepFailed, chaos_wrapped
from shared.runtime import HopRuntime, Later
from shared.schema import Envelope, ErrorCode, Request, Step
from shared.settings import Settings

SLIP = [Step(service="guardrail", name="guard.input"), Step(service="retriever", name="retrieve"), Step(service="guardrail", name="guard.output")]


class FakeMessage:
    """What the runtime reads of a JetStream message, and what it did with it."""

    def __init__(self, body: bytes, *, delivered: int = 1, headers: dict[str, str] | None = None):
        self.data = body
        self.subject = "baton.v1.step.guardrail"
        self.headers = headers or {}
        self.reply = "$JS.ACK.x"
        self.metadata = SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=42))
        self.settled: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def term(self) -> None:
        self.settled.append(("term", None))


class FakeBucket:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def create(self, key: str, value: bytes) -> None:
        if key in self.values:
            raise KeyWrongLastSequenceError()
        self.values[key] = value

    async def put(self, key: str, value: bytes) -> None:
        self.values[key] = value

    async def get(self, key: str):
        if key not in self.values:
            raise NotFoundError()
        return SimpleNamespace(value=self.values[key])


class Recorder:
    """A runtime whose publish and KV are in memory."""

    def __init__(self, service: str = "guardrail", *, fail_publishes: int = 0, crash_on: str = ""):
        self.runtime = HopRuntime(service, Settings(chaos_crash_on=crash_on, envelope_key=None, ack_wait_s=30))
        self.published: list[tuple[str, dict, dict[str, str] | None, bool]] = []
        self.buckets: dict[str, FakeBucket] = {}
        self.fail_publishes = fail_publishes

        async def publish(subject, body, headers=None, *, durable=False, traced=True):
            if self.fail_publishes:
                self.fail_publishes -= 1
                raise ConnectionError("no responders: a leader election")
            self.published.append((subject, json.loads(body), headers, durable))
            return SimpleNamespace(duplicate=False) if durable else None

        async def kv(bucket):
            return self.buckets.setdefault(bucket, FakeBucket())

        self.runtime.publish = publish  # type: ignore[method-assign]
        self.runtime.kv = kv  # type: ignore[method-assign]
        self.book = RequestBook(self.runtime)
        self.hops = Hops(self.runtime, self.book)

    async def deliver(self, step, message: FakeMessage) -> FakeMessage:
        handle = self.runtime.settled(self.hops.handler(step))
        await handle(message)  # type: ignore[arg-type]
        return message


def envelope(cursor: int = 0, *, deadline_s: float = 30, budget_ms: int | None = None) -> Envelope:
    slip = [step.model_copy(update={"budget_ms": budget_ms}) for step in SLIP]
    return Envelope(
        request_id="q-1", client="acme", reply_to=subjects.reply_address("acme", "q-1"), request=Request(prompt="How do I fix a puncture?"),
        route="factual", slip=slip, cursor=cursor, deadline=time.time() + deadline_s, created_at=time.time(), config_version="",
    )


def body(env: Envelope) -> bytes:
    return env.model_dump_json().encode()


async def passes(env, record) -> None:
    env.context.answer = "Patch the tube."


async def test_a_step_that_succeeds_forwards_to_the_next_service_then_acks():
    mesh = Recorder()
    message = await mesh.deliver(passes, FakeMessage(body(envelope())))
    [(subject, sent, headers, durable)] = mesh.published
    assert subject == subjects.step("retriever") and durable
    assert headers[subjects.H_MSG_ID] == "acme.q-1.0.1"  # de-duplicates a repeat of this hop
    assert sent["cursor"] == 1 and sent["steps"][0]["outcome"] == "ok" and sent["context"]["outputs"]["answer"] == "Patch the tube."
    assert message.settled == [("ack", None)]


async def test_the_last_step_stores_the_reply_once_and_sends_it_to_the_clients_inbox():
    mesh = Recorder()
    message = await mesh.deliver(passes, FakeMessage(body(envelope(cursor=2))))
    [(subject, reply, _, durable)] = mesh.published
    assert subject == subjects.reply_address("acme", "q-1") and not durable
    assert reply["ok"] and reply["answer"] == "Patch the tube."
    assert json.loads(mesh.buckets[subjects.RESULTS_BUCKET].values["acme.q-1"])["answer"] == "Patch the tube."
    assert message.settled == [("ack", None)]

    # Redelivered after the Reply went out (its ack was lost): nothing is sent twice.
    again = await mesh.deliver(passes, FakeMessage(body(envelope(cursor=2)), delivered=2))
    assert len(mesh.published) == 1 and again.settled == [("ack", None)]


async def test_the_hop_that_finishes_a_request_tells_the_router_and_no_other_hop_does():
    mesh = Recorder()
    await mesh.deliver(passes, FakeMessage(body(envelope(cursor=0))))  # forwarded: not finished
    await mesh.deliver(passes, FakeMessage(body(envelope(cursor=2))))
    await asyncio.sleep(0.05)  # the notes of a few milliseconds travel together
    finished = [sent for subject, sent, _, durable in mesh.published if subject == subjects.FINISHED]
    assert finished == [[["acme", "q-1"]]]
    # The router answers only requests it never let into the mesh: it frees those slots itself.
    assert RequestBook(HopRuntime("router", Settings(envelope_key=None))).finished is None


async def test_a_failed_step_goes_to_the_fallback_with_its_error():
    async def refuses(env, record) -> None:
        raise StepFailed(ErrorCode.INPUT_REJECTED, "guard.input refused: injection")

    mesh = Recorder()
    message = await mesh.deliver(refuses, FakeMessage(body(envelope())))
    [(subject, sent, headers, _)] = mesh.published
    assert subject == subjects.FALLBACK and headers[subjects.H_MSG_ID] == "acme.q-1.0.fallback"
    assert sent["error"]["code"] == "input_rejected" and sent["error"]["step"] == "guard.input"
    assert sent["steps"][0]["outcome"] == "failed" and sent["cursor"] == 0
    assert message.settled == [("ack", None)]


async def test_a_step_over_its_budget_fails_over_as_a_retryable_deadline():
    async def slow(env, record) -> None:
        await asyncio.sleep(5)

    mesh = Recorder()
    started = time.monotonic()
    await mesh.deliver(slow, FakeMessage(body(envelope(budget_ms=50))))
    assert time.monotonic() - started < 2
    [(subject, sent, _, _)] = mesh.published
    assert subject == subjects.FALLBACK
    assert sent["error"]["code"] == "deadline_exceeded" and sent["error"]["retryable"] and "step budget (50 ms)" in sent["error"]["message"]


async def test_a_request_past_its_deadline_does_not_run_the_step():
    calls = []

    async def step(env, record) -> None:
        calls.append(env.request_id)

    mesh = Recorder()
    await mesh.deliver(step, FakeMessage(body(envelope(deadline_s=-1))))
    assert calls == []
    [(subject, sent, _, _)] = mesh.published
    assert subject == subjects.FALLBACK and sent["error"]["code"] == "deadline_exceeded"


async def test_a_step_that_crashes_still_ends_at_the_fallback():
    async def buggy(env, record) -> None:
        raise KeyError("oops")

    mesh = Recorder()
    await mesh.deliver(buggy, FakeMessage(body(envelope())))
    [(subject, sent, _, _)] = mesh.published
    assert subject == subjects.FALLBACK and sent["error"]["code"] == "internal" and "KeyError" in sent["error"]["message"]


async def test_a_malformed_envelope_is_answered_unstored_terminated_and_kept_as_a_dead_letter():
    mesh = Recorder()
    headers = {subjects.H_REQUEST_ID: "q-9", subjects.H_REPLY_TO: subjects.reply_address("acme", "q-9")}
    message = await mesh.deliver(passes, FakeMessage(b'{"request_id": 3}', headers=headers))
    assert message.settled == [("term", None)]  # never redelivered: it would fail the same way
    [(subject, reply, _, _)] = mesh.published
    assert subject == subjects.reply_address("acme", "q-9") and reply["error"]["code"] == "invalid_request"
    assert "malformed envelope at guardrail" in reply["error"]["message"]
    assert subjects.RESULTS_BUCKET not in mesh.buckets  # nothing in it can be believed: not stored
    letter = json.loads(mesh.buckets[subjects.DEAD_LETTERS_BUCKET].values["poison.guardrail.42"])
    assert letter["reason"] == "malformed" and letter["request_id"] == "q-9"


async def test_a_hop_for_another_service_is_terminated():
    mesh = Recorder()
    message = await mesh.deliver(passes, FakeMessage(body(envelope(cursor=1))))  # retrieve: not the guardrail's
    assert message.settled == [("term", None)]
    assert json.loads(mesh.buckets[subjects.DEAD_LETTERS_BUCKET].values["poison.guardrail.42"])["reason"] == "wrong_service"


@pytest.mark.parametrize("delivered, pause", [(1, 0.25), (2, 0.5), (4, 2.0), (12, 30)])
async def test_when_the_publish_fails_the_message_comes_back_after_a_growing_pause(delivered, pause):
    mesh = Recorder(fail_publishes=1)
    message = await mesh.deliver(passes, FakeMessage(body(envelope()), delivered=delivered))
    assert message.settled == [("nak", pause)]  # capped at ack_wait_s; never acked: the hop is not lost


async def test_later_hands_the_message_back_after_the_asked_delay():
    mesh = Recorder()

    async def waits(message) -> None:
        raise Later(2.0)

    message = FakeMessage(b"{}")
    await mesh.runtime.settled(waits)(message)  # type: ignore[arg-type]
    assert message.settled == [("nak", 2.0)]


def test_the_chaos_crash_wraps_only_the_named_service():
    assert chaos_wrapped(passes, "guardrail", "") is passes  # unset: no check on any hop
    assert chaos_wrapped(passes, "guardrail", "retriever:BOOM") is passes
    assert chaos_wrapped(passes, "guardrail", "guardrail:BOOM") is not passes


async def test_a_hops_span_says_its_outcome_and_decisions():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from shared import attributes as A
    from shared.schema import Event

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def gate(verdict):
        async def step(env, record) -> None:
            env.events.append(Event(kind="gate", step="guard.input", data={"gate": "guard.input", "verdict": verdict, "score": 0.9, "reason": "r"}))
            if verdict == "fail":
                raise StepFailed(ErrorCode.INPUT_REJECTED, "guard.input refused: injection")
        return step

    mesh = Recorder()
    mesh.runtime.tracer = provider.get_tracer("test")
    await mesh.deliver(await gate("pass"), FakeMessage(body(envelope())))
    await mesh.deliver(await gate("fail"), FakeMessage(body(envelope())))
    passed, failed = exporter.get_finished_spans()
    assert passed.name == failed.name == "guard.input"
    assert passed.attributes[A.STEP_OUTCOME] == "ok" and passed.attributes[A.GATE_VERDICT] == "pass" and passed.attributes[A.REQUEST_ID] == "q-1"
    assert failed.attributes[A.STEP_OUTCOME] == "failed" and failed.attributes[A.GATE_VERDICT] == "fail"
    assert failed.attributes[A.ERROR_TYPE] == "input_rejected" and failed.status.status_code is StatusCode.ERROR
    provider.shutdown()
