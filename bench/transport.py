"""The transport floor: raw nats-py chains of HOPS hops, one process per hop, no framework.

Three chains, all carrying Baton's envelope (its size, or for `checked` a real one):

- core: the client sends a request to hop 0; each hop re-publishes the message to the
  next hop with the original reply subject; the last hop answers it (request/reply).
- jetstream: a work-queue stream with one durable pull consumer per hop. Each hop
  fetches in batches (Baton's pull batch size) and handles a batch's messages
  concurrently, as FastStream does: publish to the next hop with a `Nats-Msg-Id` and
  wait for its PubAck, then ack the input. The client publishes durably and gets the
  answer on its inbox (core NATS), as Baton's client does.
- checked: the jetstream chain plus what every Baton hop must do whatever its step:
  read the envelope with the shared schema (pydantic), write it back, and trace the hop
  (a consumer span, child of the previous hop's, exported to the collector). No step,
  no runtime, no reply store, no fairness: the floor of a durable, validated, traced
  5-hop pipeline in Python, against which Baton's own cost can be read.

Hop processes: `python -m bench.transport hop core|js|checked INDEX NATS_URL` (checked
traces to $OTEL_EXPORTER_OTLP_ENDPOINT when it is set).
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
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from shared import children, telemetry
from shared.schema import Envelope

HOPS = 5
STREAM = "FLOOR"
PULL_BATCH = int(os.environ.get("BENCH_PULL_BATCH", "32"))  # the raw chain fetches in batches (Baton: one per fetch, max_workers at once)
PULL_TIMEOUT_S = float(os.environ.get("BENCH_PULL_TIMEOUT_S", "1.0"))  # the raw chain's fetch timeout (nats-py fetch)
H_REPLY = "Floor-Reply-To"
ROOT = Path(__file__).resolve().parent.parent


def core_subject(index: int) -> str:
    return f"floor.core.{index}"


def js_subject(index: int, kind: str = "js") -> str:
    """The hop's subject; the js and checked chains share the stream, not the consumers."""
    return f"floor.{kind}.{index}"


def durable(index: int, kind: str) -> str:
    return f"hop{index}" if kind == "js" else f"{kind}{index}"


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


async def js_hop(index: int, url: str, stop: asyncio.Event, checked: bool = False) -> None:
    nc = await nats.connect(url, ping_interval=5)
    js = nc.jetstream()
    last = index == HOPS - 1
    kind = "checked" if checked else "js"
    sub = await js.pull_subscribe(js_subject(index, kind), durable=durable(index, kind), stream=STREAM)
    await nc.flush()
    work = checked_work(index) if checked else None

    async def handle(msg) -> None:
        headers = msg.headers or {}
        if work is not None:
            with work.span(headers, msg.subject):
                await forward(work.rewrite(msg.data), telemetry.inject({"Nats-Msg-Id": headers.get("Nats-Msg-Id", ""), H_REPLY: headers[H_REPLY]}))
        else:
            await forward(msg.data, headers)
        await msg.ack()  # only after the next hop is stored: a crash in between is redelivered

    async def forward(data: bytes, headers: dict[str, str]) -> None:
        if last:
            await nc.publish(headers[H_REPLY], data)
        else:
            request_id = headers.get("Nats-Msg-Id", "").split(".")[0]
            await js.publish(js_subject(index + 1, kind), data, headers={**headers, "Nats-Msg-Id": f"{request_id}.{index + 1}"}, timeout=5)

    print("ready", flush=True)
    while not stop.is_set():
        try:
            messages = await sub.fetch(PULL_BATCH, timeout=PULL_TIMEOUT_S)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        await asyncio.gather(*(handle(msg) for msg in messages), return_exceptions=True)
    await nc.drain()


@dataclass
class CheckedWork:
    """What a Baton hop does to every message besides its step: the schema and the span."""

    tracer: Any

    def span(self, headers: dict[str, str], subject: str):
        return telemetry.hop_span(self.tracer, "floor hop", headers, subject, {})

    @staticmethod
    def rewrite(data: bytes) -> bytes:
        envelope = Envelope.model_validate_json(data)
        envelope.cursor += 1
        return envelope.model_dump_json().encode()


def checked_work(index: int) -> CheckedWork:
    return CheckedWork(telemetry.setup_tracing(f"floor-hop{index}"))


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
        if kind == "core":
            await core_hop(index, url, stop)
        else:
            await js_hop(index, url, stop, checked=kind == "checked")
        telemetry.shutdown_tracing()

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
                subjects=["floor.js.*", "floor.checked.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=120.0,
            )
        )
        for kind, index in ((kind, index) for kind in ("js", "checked") for index in range(HOPS)):
            await js.add_consumer(
                STREAM,
                ConsumerConfig(durable_name=durable(index, kind), filter_subject=js_subject(index, kind), ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=4096, max_waiting=512),
            )
    finally:
        await nc.close()


@dataclass
class Chain:
    """HOPS hop processes of one kind; `stop()` always ends them."""

    kind: str
    url: str
    env: dict[str, str] = field(default_factory=dict)  # e.g. where the checked chain sends its spans
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
                    env={**os.environ, **self.env},
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
    def __init__(self, url: str, payload: bytes, kind: str = "js"):
        self.url, self.payload, self.kind = url, payload, kind
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
            await self.js.publish(js_subject(0, self.kind), self.payload, headers={"Nats-Msg-Id": f"{request_id}.0", H_REPLY: f"{self.inbox}.{request_id}"}, timeout=5)
            data = await asyncio.wait_for(future, 10)
        finally:
            self.pending.pop(request_id, None)
        return len(data) == len(self.payload)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "hop" or sys.argv[2] not in ("core", "js", "checked"):
        sys.exit("usage: python -m bench.transport hop core|js|checked INDEX NATS_URL")
    hop_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
