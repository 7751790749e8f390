"""Chaos: one client floods the mesh with hostile messages while another keeps a ledger.

The flood (BATON_HOSTILE_MESSAGES, 3,000 in `make chaos`) mixes random bodies, poisoned
reply addresses, requests that reuse the other client's request ids, and forged hops
published straight onto the step subjects (this mesh's NATS has no users, so only the
services' own checks stand in their way). It comes in bursts over the whole window in
which the other client asks its questions. The other client's requests must all be
answered, none `ok` after its deadline, and its p50 within 3x its baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest
from nats.js.errors import NoKeysError

from baton.client import BatonClient
from shared import subjects
from shared.config import load_config
from shared.schema import Envelope, Request
from shared.settings import Settings
from tests.chaos.ledger import run_load
from tests.conftest import MeshSpec, eventually

pytestmark = pytest.mark.chaos

HOSTILE = int(os.environ.get("BATON_HOSTILE_MESSAGES", "600"))
VICTIM_REQUESTS = int(os.environ.get("BATON_HOSTILE_VICTIM_REQUESTS", "40"))
WINDOW_S = float(os.environ.get("BATON_HOSTILE_SECONDS", "8"))
BURSTS = int(os.environ.get("BATON_HOSTILE_BURSTS", "10"))  # 1: the whole flood at once
CONCURRENCY = 2
DEFAULT_CONFIG = Settings().config


CLIENT_LIMIT = os.environ.get("BATON_HOSTILE_CLIENT_LIMIT")  # to measure the mesh with another per-client limit


def client_limit_config(path) -> None:
    path.write_text(DEFAULT_CONFIG.read_text() + f"\nlimits:\n  max_in_flight_per_client: {int(CLIENT_LIMIT)}\n")


MESH = MeshSpec("hostile-flood", config=client_limit_config if CLIENT_LIMIT else None)


def hostile_messages(rng: random.Random, flooder: str, victim: str, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(subject, body, headers) of every kind the issue found, in a fixed random order."""
    now = time.time()
    messages = []
    for i in range(count):
        kind = i % 4
        request_id = f"q-{i % 50}"  # the ids the victim uses too
        headers = {subjects.H_REQUEST_ID: request_id, subjects.H_MSG_ID: f"{flooder}.{i}"}
        if kind == 0:  # random bodies
            body = rng.randbytes(rng.randint(0, 300)) if i % 8 else json.dumps({"prompt": rng.random()}).encode()
            headers[subjects.H_REPLY_TO] = subjects.reply_address(flooder, request_id)
            messages.append((subjects.request(flooder), body, headers))
        elif kind == 1:  # poisoned reply addresses
            poison = rng.choice([f"_INBOX.{flooder}.reply.{request_id} x", f"_INBOX.{flooder}..{request_id}", f"_INBOX.{flooder}.reply.*", f"_INBOX.{flooder}.reply.>", subjects.reply_address(victim, request_id), subjects.request(victim)])
            headers[subjects.H_REPLY_TO] = poison
            messages.append((subjects.request(flooder), b'{"prompt": "How do I fix a puncture?", "cache": false}', headers))
        elif kind == 2:  # colliding ids: real requests under the victim's ids
            headers[subjects.H_REPLY_TO] = subjects.reply_address(flooder, request_id)
            messages.append((subjects.request(flooder), b'{"prompt": "How often should I lube my chain?", "cache": false}', headers))
        else:  # forged hops: a finished answer for the victim, straight onto a step subject
            env = Envelope(
                request_id=request_id, client=victim, reply_to=subjects.reply_address(victim, request_id),
                request=Request(prompt="forged"), route="factual", cursor=0, created_at=now, deadline=now + 3600,
                slip=[{"service": "guardrail", "name": rng.choice(["guard.output", "guard.nope", "retrieve"])}] * rng.choice([1, 1, 50]),
            )
            env.context.outputs["answer"] = "FORGED"
            service = rng.choice(["guardrail", "retriever", "generator", "fallback"])
            messages.append((subjects.step(service), env.model_dump_json().encode(), {subjects.H_REQUEST_ID: request_id, subjects.H_MSG_ID: f"forged.{i}"}))
    return messages


async def flood(url: str, messages: list, stop_after_s: float) -> float:
    """Publish the messages in bursts spread over the window; returns how long it took."""
    started = time.monotonic()
    async with BatonClient(url, client_id="flooder") as flooder:
        per_burst = -(-len(messages) // BURSTS)
        for burst in range(BURSTS):
            chunk = messages[burst * per_burst : (burst + 1) * per_burst]
            await asyncio.gather(*(flooder.js.publish(s, b, headers=h, timeout=10) for s, b, h in chunk))
            await asyncio.sleep(max(0.0, started + (burst + 1) * stop_after_s / BURSTS - time.monotonic()))
    return time.monotonic() - started


async def dead_letter_keys(client: BatonClient) -> list[str]:
    """The dead letters' keys; none yet is an empty list. nats-py's `keys()` reads them with a
    watcher, which once in a `make chaos` run (after the cluster test, machine loaded) found
    none while the services' logs showed about 750 kept, none refused: asked again, it finds them."""
    bucket = await client.js.key_value(subjects.DEAD_LETTERS_BUCKET)
    try:
        return await bucket.keys()
    except NoKeysError:
        return []


async def test_one_clients_hostile_flood_does_not_hurt_another_client(mesh, capsys):
    config = load_config(mesh.settings.config)
    budgets = {name: route.latency_budget_ms for name, route in config.routes.items()}
    await run_load(mesh.nats_url, 10, CONCURRENCY)  # warm: the first requests of a fresh mesh are slower
    baseline = await run_load(mesh.nats_url, 40, CONCURRENCY, budgets_ms=budgets)

    messages = hostile_messages(random.Random(18), "flooder", "victim", HOSTILE)
    flooding = asyncio.create_task(flood(mesh.nats_url, messages, WINDOW_S))
    await asyncio.sleep(0.2)  # the first burst is in
    during = await run_load(mesh.nats_url, VICTIM_REQUESTS, CONCURRENCY, WINDOW_S, budgets_ms=budgets, client_id="victim", id_prefix="q-")
    flood_s = await flooding

    async with BatonClient(mesh.nats_url, client_id="victim") as victim:
        stored = [await victim.result(f"q-{i}") for i in range(min(50, VICTIM_REQUESTS))]
        router = await victim.js.consumer_info(subjects.STREAM, "router")
        letters = await eventually(lambda: dead_letter_keys(victim), 30, every=0.5, what="no dead letter was kept")
    terminated = sum(1 for key in letters if key.startswith("poison."))
    report = "\n".join(
        [
            baseline.line("victim, no flood"),
            during.line(f"victim, while {HOSTILE} hostile messages came in {flood_s:.1f}s"),
            f"p50 ratio {during.percentile(50) / baseline.percentile(50):.2f}x; router redelivered {router.num_redelivered}; "
            f"{terminated} poison messages terminated and kept as dead letters",
        ]
    )
    with capsys.disabled():
        print("\n" + report)
    (mesh.settings.state_dir / "hostile-ledger.txt").write_text(report + "\n")

    assert all(r.alive for r in mesh.replicas)
    assert not [r.service for r in mesh.replicas if "Traceback" in r.log_path.read_text(errors="replace")]
    assert during.sent == during.accepted == during.answered == VICTIM_REQUESTS, during.line("victim")
    assert during.lost == during.duplicates == 0
    assert "FORGED" not in during.answers and all(r is not None and r.answer != "FORGED" for r in stored)
    assert baseline.late_ok == during.late_ok == 0
    assert during.percentile(50) <= 3 * baseline.percentile(50), report
