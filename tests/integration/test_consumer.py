"""PullConsumer on a real JetStream: delivery, idle pulls, concurrency, replicas, long
work, server restarts, stop() and failing handlers.

Each test makes its own work-queue stream and durable pull consumer and removes them.
Waits poll a condition with a deadline (`eventually`), so a test fails fast and clearly
instead of hanging.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from shared.consumer import PullConsumer
from shared.natsd import NatsServer, free_port

pytestmark = pytest.mark.timeout(20)


async def eventually(check: Callable[[], object], timeout_s: float = 5.0, every_s: float = 0.02, what: str = "") -> float:
    """Poll `check` (sync or async) until it is truthy; return the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or check}")
        await asyncio.sleep(every_s)


@dataclass
class Recorder:
    """A handler that records what it saw and acks; optional work time and failures."""

    work_s: float = 0.0
    ack: bool = True
    seen: Counter = field(default_factory=Counter)  # payload -> times handled
    finished: Counter = field(default_factory=Counter)  # payload -> times acked
    active: int = 0
    peak: int = 0
    handled_at: dict[bytes, float] = field(default_factory=dict)

    async def __call__(self, msg: Msg) -> None:
        self.seen[msg.data] += 1
        self.handled_at.setdefault(msg.data, time.monotonic())
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.work_s:
                await asyncio.sleep(self.work_s)
            if self.ack:
                await msg.ack()
                self.finished[msg.data] += 1
        finally:
            self.active -= 1


class Bench:
    """One connection, and the streams, consumers and connections a test made (all removed)."""

    def __init__(self, nc: Client):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.streams: list[str] = []
        self.consumers: list[PullConsumer] = []
        self.connections: list[Client] = []

    async def stream(self, *, ack_wait_s: float = 30.0, storage: StorageType = StorageType.MEMORY) -> tuple[str, str, str]:
        """A work-queue stream and its durable explicit-ack pull consumer: (stream, durable, subject)."""
        tag = uuid.uuid4().hex[:10]
        stream, durable, subject = f"CTEST_{tag}", f"worker_{tag}", f"ctest.{tag}"
        await self.js.add_stream(StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE, storage=storage))
        self.streams.append(stream)
        await self.js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s))
        return stream, durable, subject

    async def connect(self, url: str, **options) -> Client:
        nc = await nats.connect(url, **options)
        self.connections.append(nc)
        return nc

    async def consumer(self, stream: str, durable: str, handler, *, nc: Client | None = None, **options) -> PullConsumer:
        consumer = PullConsumer(nc or self.nc, stream, durable, handler, **options)
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def publish(self, subject: str, *payloads: bytes) -> None:
        for payload in payloads:
            await self.js.publish(subject, payload)

    async def info(self, stream: str, durable: str):
        return await self.js.consumer_info(stream, durable)

    async def drained(self, stream: str, durable: str) -> bool:
        info = await self.info(stream, durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    async def close(self) -> None:
        for consumer in self.consumers:
            if not consumer.stopping:
                await consumer.stop(grace_s=2.0)
        for stream in self.streams:
            try:
                await self.js.delete_stream(stream)
            except Exception:  # the server of a restart test may be gone already
                pass
        for nc in [*self.connections, self.nc]:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture
async def bench(nats_url) -> AsyncIterator[Bench]:
    b = Bench(await nats.connect(nats_url))
    try:
        yield b
    finally:
        await b.close()


def payloads(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


# -- 1. every message once ----------------------------------------------------------


async def test_every_message_is_handled_exactly_once_and_acked(bench):
    stream, durable, subject = await bench.stream()
    before, after = payloads(100, "before"), payloads(100, "after")
    await bench.publish(subject, *before)  # waiting when the consumer starts
    handler = Recorder()
    await bench.consumer(stream, durable, handler, max_workers=16)
    await bench.publish(subject, *after)  # arriving while it runs

    await eventually(lambda: len(handler.finished) == 200, what=f"200 handled, got {len(handler.finished)}")
    await eventually(lambda: bench.drained(stream, durable), what="num_ack_pending and num_pending at 0")
    info = await bench.info(stream, durable)
    assert set(handler.seen) == set(before + after)
    assert all(times == 1 for times in handler.seen.values()), [p for p, n in handler.seen.items() if n > 1]
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 200


# -- 2. idle pulls are renewed ------------------------------------------------------


async def test_a_message_after_a_long_idle_is_delivered_promptly(bench, caplog):
    caplog.set_level(logging.INFO, logger="baton.consumer")
    stream, durable, subject = await bench.stream()
    handler = Recorder()
    await bench.consumer(stream, durable, handler, max_workers=8, expires_s=1.0, heartbeat_s=0.3)
    await bench.publish(subject, b"first")
    await eventually(lambda: handler.finished[b"first"] == 1, what="first message handled")

    await asyncio.sleep(2.3)  # the idle spell itself: more than two pull expiries (1 s each)

    sent = time.monotonic()
    await bench.publish(subject, b"after idle")
    await eventually(lambda: handler.finished[b"after idle"] == 1, timeout_s=3.0, every_s=0.005, what="message after idle handled")
    assert handler.handled_at[b"after idle"] - sent < 0.5
    # The expired pulls came back as 408s with their credit: no pull was lost, reset or retried.
    problems = [r.getMessage() for r in caplog.records if r.name == "baton.consumer" and r.levelno >= logging.INFO]
    assert problems == []


# -- 3. bounded concurrency ---------------------------------------------------------


async def test_at_most_max_workers_handlers_run_at_once(bench):
    stream, durable, subject = await bench.stream()
    handler = Recorder(work_s=0.1)
    consumer = await bench.consumer(stream, durable, handler, max_workers=4)
    await bench.publish(subject, *payloads(40))

    await eventually(lambda: len(handler.finished) == 40, timeout_s=8.0, what=f"40 handled, got {len(handler.finished)}")
    assert handler.peak == 4  # bounded, and the bound is used
    assert all(times == 1 for times in handler.seen.values())
    await eventually(lambda: bench.drained(stream, durable), what="all acked")
    assert consumer.busy == 0 and not consumer.tasks


# -- 4. replicas share a durable ----------------------------------------------------


async def test_two_replicas_share_the_work_without_duplicates(bench, nats_url):
    stream, durable, subject = await bench.stream()
    a, b = Recorder(work_s=0.02), Recorder(work_s=0.02)
    await bench.consumer(stream, durable, a, nc=await bench.connect(nats_url), max_workers=4)
    await bench.consumer(stream, durable, b, nc=await bench.connect(nats_url), max_workers=4)
    sent = payloads(100)
    await bench.publish(subject, *sent)

    await eventually(lambda: len(a.finished) + len(b.finished) == 100, timeout_s=8.0, what="100 handled by the two replicas")
    await eventually(lambda: bench.drained(stream, durable), what="all acked")
    assert a.seen and b.seen, (len(a.seen), len(b.seen))  # both took a share
    assert not set(a.seen) & set(b.seen)  # nothing handled by both
    assert set(a.seen) | set(b.seen) == set(sent)
    assert all(times == 1 for times in (a.seen + b.seen).values())
    assert (await bench.info(stream, durable)).num_redelivered == 0


# -- 5. long work is kept alive -----------------------------------------------------


async def test_a_handler_longer_than_ack_wait_is_not_redelivered(bench):
    stream, durable, subject = await bench.stream(ack_wait_s=1.0)
    handler = Recorder(work_s=2.5)
    await bench.consumer(stream, durable, handler, max_workers=4, progress_every_s=0.3)
    await bench.publish(subject, b"long")
    await eventually(lambda: handler.seen[b"long"] == 1, what="long message started")

    await asyncio.sleep(1.7)  # past ack_wait, the handler still working
    info = await bench.info(stream, durable)
    assert (info.num_ack_pending, info.num_redelivered, info.delivered.consumer_seq) == (1, 0, 1)

    await eventually(lambda: handler.finished[b"long"] == 1, timeout_s=5.0, what="long message handled")
    await eventually(lambda: bench.drained(stream, durable), what="acked")
    info = await bench.info(stream, durable)
    assert handler.seen[b"long"] == 1  # no second copy started while the first was working
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 1


# -- 6. server restart --------------------------------------------------------------


class RestartableServer:
    """One nats-server with a file store that can stop and come back on the same port
    and store: streams and consumers survive, pulls and connections do not."""

    def __init__(self, tmp_path: Path):
        self.store, self.port = tmp_path / "jetstream", free_port()
        self.server = NatsServer(port=self.port, store_dir=self.store).start()

    def restart(self) -> None:
        self.server = NatsServer(port=self.port, store_dir=self.store).start()

    def stop(self) -> None:
        self.server.stop()

    async def __aenter__(self) -> Bench:
        self.bench = Bench(await nats.connect(self.server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2))
        return self.bench

    async def __aexit__(self, *exc: object) -> None:
        await self.bench.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableServer]:
    running = RestartableServer(tmp_path)
    try:
        yield running
    finally:
        running.stop()


async def test_pulls_resume_after_a_server_restart(server: RestartableServer):
    async with server as bench:
        stream, durable, subject = await bench.stream(storage=StorageType.FILE)
        handler = Recorder()
        await bench.consumer(stream, durable, handler, max_workers=4, heartbeat_s=0.3)  # default 15 s pulls: only the watchdog can renew them in time
        await bench.publish(subject, b"before restart")
        await eventually(lambda: handler.finished[b"before restart"] == 1, what="message before the restart")

        server.stop()
        await eventually(lambda: not bench.nc.is_connected, what="client noticed the server went away")
        server.restart()
        await eventually(lambda: bench.nc.is_connected, what="client reconnected")

        await eventually(lambda: _publish(bench.js, subject, b"after restart"), what="publish after the restart")
        sent = time.monotonic()
        await eventually(lambda: handler.finished[b"after restart"] == 1, timeout_s=5.0, what="message after the restart handled")
        assert handler.handled_at[b"after restart"] - sent < 3.0
        assert handler.seen[b"before restart"] == 1


async def test_a_long_outage_does_not_break_the_concurrency_bound(server: RestartableServer):
    async with server as bench:
        stream, durable, subject = await bench.stream(storage=StorageType.FILE)
        handler = Recorder(work_s=0.2)
        await bench.consumer(stream, durable, handler, max_workers=2, heartbeat_s=0.3)

        server.stop()
        await asyncio.sleep(3.0)  # the outage itself: about three watchdog rounds
        server.restart()
        await eventually(lambda: bench.nc.is_connected, what="client reconnected")
        sent = payloads(20)
        for payload in sent:
            await eventually(lambda p=payload: _publish(bench.js, subject, p), what="publish after the restart")

        await eventually(lambda: len(handler.finished) == 20, timeout_s=8.0, what=f"20 handled, got {len(handler.finished)}")
        assert handler.peak <= 2, f"{handler.peak} handlers ran at once with max_workers=2"


async def _publish(js: JetStreamContext, subject: str, payload: bytes) -> bool:
    try:
        await js.publish(subject, payload, timeout=1.0)
        return True
    except Exception:  # JetStream still recovering its streams
        return False


# -- 7. stop() ----------------------------------------------------------------------


async def test_stop_waits_for_work_in_hand_and_leaves_later_messages_to_other_replicas(bench, nats_url):
    stream, durable, subject = await bench.stream(ack_wait_s=30.0)  # a message lost to the stopped replica would sit for 30 s
    release = asyncio.Event()
    started = asyncio.Event()
    acked: list[bytes] = []

    async def slow(msg: Msg) -> None:
        started.set()
        await release.wait()
        await msg.ack()
        acked.append(msg.data)

    first = await bench.consumer(stream, durable, slow, nc=await bench.connect(nats_url), max_workers=4)
    await bench.publish(subject, b"in hand")
    await asyncio.wait_for(started.wait(), 5.0)

    stopping = asyncio.create_task(first.stop(grace_s=5.0))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # stop() waits for the handler in flight
    release.set()
    await asyncio.wait_for(stopping, 5.0)
    assert acked == [b"in hand"]  # it finished, and acked, before stop() returned
    await eventually(lambda: bench.drained(stream, durable), what="the in-hand message acked")

    await bench.publish(subject, b"after stop")
    await asyncio.sleep(0.3)  # would be plenty for the stopped replica, had it still been pulling
    assert acked == [b"in hand"]
    info = await bench.info(stream, durable)
    assert (info.num_pending, info.num_ack_pending) == (1, 0)  # still in the stream, handed to no one

    second = Recorder()
    sent = time.monotonic()
    await bench.consumer(stream, durable, second, max_workers=4)
    await eventually(lambda: second.finished[b"after stop"] == 1, timeout_s=3.0, what="the next replica got it")
    assert second.handled_at[b"after stop"] - sent < 1.0  # promptly, not after ack_wait
    await eventually(lambda: bench.drained(stream, durable), what="all acked")


async def test_a_message_arriving_as_stop_begins_goes_to_another_replica_promptly(bench, nats_url):
    stream, durable, subject = await bench.stream(ack_wait_s=30.0)
    first = Recorder()
    stopping = await bench.consumer(stream, durable, first, nc=await bench.connect(nats_url), max_workers=4)
    await bench.nc.flush()
    await asyncio.sleep(0.1)  # its pull is standing on the server

    # Deterministic timing: with this event loop blocked, the message is stored and delivered into the
    # stopping replica's socket before stop() begins (a busy replica under load sees the same).
    def publish_elsewhere() -> None:
        async def go() -> None:
            nc = await nats.connect(nats_url)
            await nc.jetstream().publish(subject, b"in transit")
            await nc.close()

        asyncio.run(go())

    thread = threading.Thread(target=publish_elsewhere)
    thread.start()
    thread.join(5.0)
    time.sleep(0.3)  # blocks the loop on purpose: the delivery lands in the socket
    await stopping.stop(grace_s=2.0)
    assert not first.seen  # stop() began before the replica read the message

    second = Recorder()
    await bench.consumer(stream, durable, second, max_workers=4)
    await eventually(lambda: second.finished[b"in transit"] == 1, timeout_s=2.0, what="the next replica got it (not after ack_wait)")


# -- 8. a failing handler -----------------------------------------------------------


async def test_a_failing_handler_does_not_stop_the_consumer(bench, caplog):
    stream, durable, subject = await bench.stream(ack_wait_s=1.0)
    seen: Counter = Counter()
    acked: list[bytes] = []

    async def flaky(msg: Msg) -> None:
        seen[msg.data] += 1
        if msg.data == b"boom" and seen[msg.data] == 1:
            raise RuntimeError("handler failed on purpose")
        await msg.ack()
        acked.append(msg.data)

    await bench.consumer(stream, durable, flaky, max_workers=4)
    await bench.publish(subject, b"boom")
    await eventually(lambda: seen[b"boom"] == 1, what="the failing message was tried")
    await bench.publish(subject, *payloads(5, "later"))

    await eventually(lambda: set(payloads(5, "later")) <= set(acked), what="later messages handled")
    assert any("handler failed" in r.getMessage() for r in caplog.records if r.name == "baton.consumer")
    # Not acked, so JetStream redelivers it after ack_wait (1 s), and this time it succeeds.
    await eventually(lambda: b"boom" in acked, timeout_s=4.0, what="the failed message redelivered and handled")
    assert seen[b"boom"] == 2
    await eventually(lambda: bench.drained(stream, durable), what="all acked")
    assert (await bench.info(stream, durable)).delivered.consumer_seq == 7  # 6 messages, one delivered twice


# -- 9. a cluster elects a new consumer leader ----------------------------------------


@pytest.mark.timeout(45)
async def test_a_new_consumer_leader_is_pulled_from_at_once(tmp_path: Path, caplog, capsys):
    """Kill the consumer's leader (its standing pulls die with it, silently): the new
    leader's advisory (or its 409 to the pull, whichever comes first) makes the replica
    pull again at once, long before the silence
    watchdog would: it needs 3 x heartbeat_s of silence, and the last heartbeat came at
    most heartbeat_s before the kill, so never sooner than 2 x 10 s after it."""
    from tests.chaos.test_cluster import start_nodes, wait_for_jetstream  # the chaos tests' 3-node cluster

    caplog.set_level(logging.INFO, logger="baton.consumer")
    nodes: dict[str, NatsServer] = {}
    bench: Bench | None = None
    try:
        start_nodes(tmp_path, nodes)
        await wait_for_jetstream(",".join(node.url for node in nodes.values()), timeout_s=15.0)

        # Stream and consumer, R3; then the consumer's leader decides which node the replica talks to.
        tag = uuid.uuid4().hex[:10]
        stream, durable, subject = f"CTEST_{tag}", f"worker_{tag}", f"ctest.{tag}"
        setup = await nats.connect([node.url for node in nodes.values()])
        try:
            sjs = setup.jetstream()
            await sjs.add_stream(StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, num_replicas=3))
            await sjs.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, num_replicas=3))

            async def consumer_leader() -> str | None:
                info = await sjs.consumer_info(stream, durable)
                return info.cluster.leader if info.cluster and info.cluster.replicas and len(info.cluster.replicas) == 2 else None

            await eventually(consumer_leader, timeout_s=10.0, every_s=0.1, what="an R3 consumer with a leader and two replicas")
            leader = await consumer_leader()
        finally:
            await setup.close()
        survivor = next(name for name in nodes if name != leader)

        # Only the survivor's URL: the replica's connection never moves, only the consumer's leader does.
        bench = Bench(await nats.connect(nodes[survivor].url, max_reconnect_attempts=-1, reconnect_time_wait=0.2))
        bench.streams.append(stream)
        handler = Recorder()
        consumer = await bench.consumer(
            stream, durable, handler, nc=await bench.connect(nodes[survivor].url, max_reconnect_attempts=-1, reconnect_time_wait=0.2),
            max_workers=4, expires_s=30.0, heartbeat_s=10.0,
        )
        await bench.publish(subject, b"before")
        await eventually(lambda: handler.finished[b"before"] == 1, what="message before the kill")
        await eventually(lambda: bench.drained(stream, durable), what="acked")

        async def standing_on_the_leader() -> bool:
            info = await bench.info(stream, durable)
            return info.cluster.leader == leader and info.num_waiting >= 1

        await eventually(standing_on_the_leader, what=f"the replica's pull waiting on the consumer leader {leader}")
        assert consumer.credit > 0

        nodes[leader].kill()
        killed_at = time.monotonic()

        async def new_leader() -> str | None:
            try:
                info = await bench.js.consumer_info(stream, durable, timeout=1.0)
            except Exception:  # no leader yet to answer
                return None
            return info.cluster.leader if info.cluster and info.cluster.leader not in (None, "", leader) else None

        elected_s = await eventually(new_leader, timeout_s=12.0, every_s=0.1, what="a new consumer leader")
        successor = await new_leader()
        assert successor in nodes and nodes[successor].process.poll() is None

        await eventually(lambda: _publish(bench.js, subject, b"after"), timeout_s=8.0, every_s=0.1, what="publish after the kill")
        sent = time.monotonic()
        await eventually(lambda: handler.finished[b"after"] == 1, timeout_s=5.0, every_s=0.005, what="message after the kill handled")
        took = handler.handled_at[b"after"] - sent

        messages = [r.getMessage() for r in caplog.records if r.name == "baton.consumer"]
        with capsys.disabled():
            print(f"\nconsumer leader {leader} killed; {successor} elected after {elected_s:.1f} s; "
                  f"published {sent - killed_at:.1f} s after the kill, handled {took * 1000:.0f} ms later")
        assert took < 2.0, f"handled {took:.1f} s after the publish"
        assert handler.handled_at[b"after"] - killed_at < 2 * consumer.heartbeat_s  # too soon for the watchdog
        # The new leader's advisory or its 409 to the pull, whichever came first: not the watchdog.
        assert any("a new consumer leader was elected" in m or "leadership changed" in m for m in messages), messages
        assert not any("no heartbeat" in m for m in messages), messages
        assert handler.seen[b"before"] == 1 and handler.seen[b"after"] == 1

        # The new leader announced itself twice (advisory and a 409 to the pull): the
        # replica pulled once, so a burst still runs on at most max_workers at a time.
        handler.work_s, handler.peak = 0.2, 0
        burst = [f"burst {i}".encode() for i in range(12)]
        for payload in burst:
            await bench.publish(subject, payload)
        await eventually(lambda: all(handler.finished[p] == 1 for p in burst), timeout_s=10.0, what="the burst after the failover")
        assert handler.peak <= 4, f"{handler.peak} handlers ran at once with max_workers=4"
    finally:
        if bench is not None:
            await bench.close()
        for node in nodes.values():
            node.stop()
