"""The transport floor: raw nats-py chains of HOPS hops, one process per hop, no framework.

Two chains, both carrying the same payload size as Baton's envelope:

- core: the client sends a request to hop 0; each hop re-publishes the message to the
  next hop with the original reply subject; the last hop answers it (request/reply).
- jetstream: a work-queue stream with one durable pull consumer per hop. Each hop
  fetches in batches (Baton's pull batch size) and handles a batch's messages
  concurrently, as FastStream does: publish to the next hop with a `Nats-Msg-Id` and
  wait for its PubAck, then ack the input. The client publishes durably and gets the
  answer on its inbox (core NATS), as Baton's client does.

Hop processes: `python -m bench.transport hop core|js INDEX NATS_URL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from shared import children

HOPS = 5
STREAM = "FLOOR"
PULL_BATCH = int(os.environ.get("BENCH_PULL_BATCH", "32"))  # the raw chain fetches in batches (Baton: one per fetch, max_workers at once)
PULL_TIMEOUT_S = float(os.environ.get("BENCH_PULL_TIMEOUT_S", "1.0"))  # the raw chain's fetch timeout (nats-py fetch)
H_REPLY = "Floor-Reply-To"
ROOT = Path(__file__).resolve().parent.parent


def core_subject(index: int) -> str:
    return f"floor.core.{index}"


def js_subject(index: int) -> str:
    return f"floor.js.{index}"


# --------------------------------------------------------------------------- hop processes


async def core_hop(index: int, url: str, stop: asyncio.Event) -> None:
    nc = await nats.connect(url, ping_interval=5)
    last = index == HOPS - 1

    async def on_message(msg) -> None:
        if last:
            await msg.respond(msg.data)
        else:
            await nc.publish(core_subject(index + 1), msg.data, reply=msg.reply)

    await nc.subscribe(core_subject(index), queue=f"hop{index}", cb=on_message, pending_msgs_limit=65536)
    await nc.flush()  # the server knows the subscription before we say ready: core NATS drops what no one hears
    print("ready", flush=True)
    await stop.wait()
    await nc.drain()


async def js_hop(index: int, url: str, stop: asyncio.Event) -> None:
    nc = await nats.connect(url, ping_interval=5)
    js = nc.jetstream()
    last = index == HOPS - 1
    sub = await js.pull_subscribe(js_subject(index), durable=f"hop{index}", stream=STREAM)
    await nc.flush()

    async def handle(msg) -> None:
        headers = msg.headers or {}
        if last:
            await nc.publish(headers[H_REPLY], msg.data)
        else:
            request_id = headers.get("Nats-Msg-Id", "").split(".")[0]
            await js.publish(js_subject(index + 1), msg.data, headers={"Nats-Msg-Id": f"{request_id}.{index + 1}", H_REPLY: headers[H_REPLY]}, timeout=5)
        await msg.ack()  # only after the next hop is stored: a crash in between is redelivered

    print("ready", flush=True)
    while not stop.is_set():
        try:
            messages = await sub.fetch(PULL_BATCH, timeout=PULL_TIMEOUT_S)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        await asyncio.gather(*(handle(msg) for msg in messages), return_exceptions=True)
    await nc.drain()


def hop_main(kind: str, index: int, url: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await (core_hop if kind == "core" else js_hop)(index, url, stop)

    asyncio.run(main())


# --------------------------------------------------------------------------- the harness side


async def provision_js(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_stream(STREAM)
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=["floor.js.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=120.0,
            )
        )
        for index in range(HOPS):
            await js.add_consumer(
                STREAM,
                ConsumerConfig(durable_name=f"hop{index}", filter_subject=js_subject(index), ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=4096, max_waiting=512),
            )
    finally:
        await nc.close()


@dataclass
class Chain:
    """HOPS hop processes of one kind; `stop()` always ends them."""

    kind: str
    url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self, timeout_s: float = 20.0) -> Chain:
        for index in range(HOPS):
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.transport", "hop", self.kind, str(index), self.url],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            # "ready" is printed once subscribed; a dead or silent hop fails the start.
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"a {self.kind} hop exited with {process.returncode}")
                line = process.stdout.readline() if process.stdout else b""
                if line.strip() == b"ready":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a {self.kind} hop did not start within {timeout_s:.0f}s")
        return self

    def stop(self) -> None:
        children.stop_all(self.processes, grace_s=5)
        for process in self.processes:
            if process.stdout:
                process.stdout.close()
        self.processes.clear()


class CoreClient:
    def __init__(self, url: str, payload: bytes):
        self.url, self.payload = url, payload

    async def __aenter__(self) -> CoreClient:
        self.nc = await nats.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def call(self, index: int) -> bool:
        reply = await self.nc.request(core_subject(0), self.payload, timeout=10)
        return len(reply.data) == len(self.payload)


class JetStreamClient:
    def __init__(self, url: str, payload: bytes):
        self.url, self.payload = url, payload
        self.pending: dict[str, asyncio.Future] = {}

    async def __aenter__(self) -> JetStreamClient:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        self.inbox = f"_INBOX.floor{uuid.uuid4().hex[:8]}"
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply, pending_msgs_limit=65536)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def _on_reply(self, msg) -> None:
        future = self.pending.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def call(self, index: int) -> bool:
        request_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self.js.publish(js_subject(0), self.payload, headers={"Nats-Msg-Id": f"{request_id}.0", H_REPLY: f"{self.inbox}.{request_id}"}, timeout=5)
            data = await asyncio.wait_for(future, 10)
        finally:
            self.pending.pop(request_id, None)
        return len(data) == len(self.payload)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "hop" or sys.argv[2] not in ("core", "js"):
        sys.exit("usage: python -m bench.transport hop core|js INDEX NATS_URL")
    hop_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
