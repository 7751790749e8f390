"""LeanJetStream (shared/jetstream.py) on a real JetStream: its publish returns and raises
exactly what nats-py's own JetStream publish does, for hops and for key-value writes."""

from __future__ import annotations

import asyncio
import uuid

import nats
import nats.errors
import pytest
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError

from shared.jetstream import LeanJetStream
from shared.natsd import NatsServer, free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def jetstreams(nats_url: str):
    """(lean, nats-py's own) on one connection, with a fresh stream `S<n>` on `<n>.>`."""
    nc = await nats.connect(nats_url)
    lean, plain = LeanJetStream(nc), nc.jetstream()
    name = f"s{uuid.uuid4().hex[:8]}"
    await plain.add_stream(StreamConfig(name=name.upper(), subjects=[f"{name}.>"], duplicate_window=60))
    yield lean, plain, name
    await plain.delete_stream(name.upper())
    await nc.close()


async def test_a_publish_is_acked_as_nats_py_acks_it_and_a_repeated_message_id_is_a_duplicate(jetstreams) -> None:
    lean, plain, name = jetstreams
    first = await lean.publish(f"{name}.a", b"one", stream=name.upper(), headers={"Nats-Msg-Id": "m1"})
    second = await plain.publish(f"{name}.a", b"two", stream=name.upper(), headers={"Nats-Msg-Id": "m2"})
    again = await lean.publish(f"{name}.a", b"one again", stream=name.upper(), headers={"Nats-Msg-Id": "m1"})
    assert (first.stream, first.seq, first.duplicate) == (name.upper(), 1, None)
    assert (second.seq, again.seq, again.duplicate) == (2, 1, True)
    stored = await plain.get_msg(name.upper(), 1)
    assert stored.data == b"one" and stored.headers is not None and stored.headers["Nats-Msg-Id"] == "m1"


async def test_many_publishes_at_once_each_get_their_own_ack(jetstreams) -> None:
    lean, _, name = jetstreams
    acks = await asyncio.gather(*(lean.publish(f"{name}.b", str(i).encode(), stream=name.upper(), headers={"Nats-Msg-Id": f"b{i}"}) for i in range(200)))
    assert sorted(ack.seq for ack in acks) == list(range(1, 201))


async def test_errors_are_nats_pys_errors(jetstreams, nats_url: str) -> None:
    lean, _, name = jetstreams
    with pytest.raises(NoStreamResponseError):  # no stream takes this subject
        await lean.publish(f"nostream{uuid.uuid4().hex[:6]}.x", b"lost?")
    with pytest.raises(APIError) as wrong_stream:  # a stream takes it, but not the one expected
        await lean.publish(f"{name}.c", b"x", stream="NOT_THIS_ONE")
    assert wrong_stream.value.err_code == 10060
    async def hear_and_never_answer(msg: object) -> None:
        pass

    listener = await nats.connect(nats_url)
    try:
        await listener.subscribe("silent.subject", cb=hear_and_never_answer)
        await listener.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await lean.publish("silent.subject", b"anyone?", timeout=0.3)
    finally:
        await listener.close()
    assert not lean._acks  # nothing left waiting


async def test_key_value_writes_go_through_it_with_their_own_errors(jetstreams) -> None:
    lean, plain, _ = jetstreams
    bucket = f"kv{uuid.uuid4().hex[:8]}"
    await plain.create_key_value(KeyValueConfig(bucket=bucket))
    try:
        kv = await lean.key_value(bucket)
        assert await kv.create("k", b"first") == 1
        with pytest.raises(KeyWrongLastSequenceError):  # a create is first-writer-wins
            await kv.create("k", b"second")
        assert await kv.update("k", b"third", last=1) == 2
        assert (await kv.get("k")).value == b"third"
    finally:
        await plain.delete_key_value(bucket)


async def test_acks_still_arrive_after_the_server_restarts(tmp_path) -> None:
    """The one ack subscription is made again on reconnect, like every other subscription."""
    store, port = tmp_path / "jetstream", free_port()
    server = NatsServer(port=port, store_dir=store).start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        lean = LeanJetStream(nc)
        await nc.jetstream().add_stream(StreamConfig(name="R", subjects=["r.>"]))
        assert (await lean.publish("r.x", b"before", stream="R")).seq == 1
        server.stop()
        server = NatsServer(port=port, store_dir=store).start()
        ack = None
        for _ in range(20):  # as with nats-py's own publish, the first try may time out while reconnecting
            try:
                ack = await lean.publish("r.x", b"after", stream="R", headers={"Nats-Msg-Id": "after"}, timeout=1)
                break
            except nats.errors.TimeoutError:
                continue
        assert ack is not None and ack.seq == 2  # the same message id: stored once, however many tries
        assert not lean._acks
        await nc.close()
    finally:
        server.stop()
