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
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.client import BatonClient
from shared import subjects
from shared.schema import ErrorCode
from tests.conftest import mesh_settings, running_mesh, ONE_OF_EACH

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


@pytest.fixture(scope="module")
def mesh(nats_url, index_dir, tmp_path_factory):
    settings_ = mesh_settings(tmp_path_factory.mktemp("hostile"), index_dir)
    with running_mesh(nats_url, settings_, ONE_OF_EACH) as running:
        yield running


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
