"""The shipped NATS configs on a real nats-server: who may publish and subscribe to what.

1. An authorization matrix: every user of deploy/nats/generate_auth.py's table x a fixed
   list of probe subjects x publish/subscribe. A denied operation shows up as a
   permissions violation on the connection's error callback; every cell must be exactly
   what the table says, and a list of hand-written rules (a client never reads another
   client's inbox, a service never publishes a request, ...) must hold as well. The
   matrix is printed (pytest -s) and kept in deploy/nats/authz-matrix.md.
2. Real JetStream work under each role: a client's request is accepted (PubAck) and its
   stored Reply readable the way BatonClient.result() reads it (a direct get of its own
   key, without binding to the bucket); a service pulls, acks, forwards and stores; the
   refusals a client and a service must meet, among them every way of reading another
   client's stored Reply (its key, a wildcard, by sequence, a consumer on the bucket)
   and of listing the stored keys (binding, stream info);
   deploy/provision.py as admin, switching an older results bucket to direct gets.
3. The five real service processes, least-privilege users, provisioning off: questions
   answered end to end (session, stream, malformed request, cache hit), every Reply read
   back with result() from a new connection, the `baton` CLI as a client user, and no
   permissions violation in the server log.
4. The 3-node cluster configs form a JetStream cluster with the same users.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.errors import KeyWrongLastSequenceError

from shared import subjects
from shared.natsd import NatsServer, find_binary, free_port
from shared.provision import buckets, provision
from shared.settings import ROOT, Settings
from tests.conftest import eventually, eventually_sync

NATS_DIR = ROOT / "deploy" / "nats"
SINGLE_CONF = NATS_DIR / "single.conf"
MATRIX_FILE = NATS_DIR / "authz-matrix.md"


def _load_auth():
    spec = importlib.util.spec_from_file_location("baton_generate_auth", NATS_DIR / "generate_auth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


auth = _load_auth()
USERS = auth.USERS
ACME, GLOBEX = auth.CLIENTS
VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')


# -- servers -------------------------------------------------------------------------------


@contextmanager
def password_env() -> Iterator[None]:
    """The dev passwords in this process's environment while a server starts (it reads them)."""
    saved = {k: os.environ.get(k) for k in auth.DEV_PASSWORDS}
    os.environ.update(auth.DEV_PASSWORDS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def secured_server(log_dir: Path) -> Iterator[NatsServer]:
    """single.conf on a free loopback port, monitoring off, the log in a file; always stopped."""
    log = log_dir / "nats.log"
    server = NatsServer(config_file=SINGLE_CONF, extra_args=["-m", "0", "-l", str(log)])
    with password_env():
        server.start()
    server.log = log  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def violations_in_log(log: Path, since: int = 0) -> list[str]:
    """The server's permissions-violation lines, from byte offset `since` on."""
    with open(log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [line.strip() for line in text.splitlines() if "Violation" in line and "[ERR]" in line]


# -- connections -----------------------------------------------------------------------------


class Conn:
    """One user's connection; the permissions violations it was told about, lower-cased."""

    def __init__(self) -> None:
        self.nc: nats.NATS | None = None
        self.violations: list[tuple[str, str]] = []

    async def on_error(self, exc: Exception) -> None:
        match = VIOLATION.search(str(exc).lower())
        if match:
            self.violations.append(("pub" if match[1] == "publish" else "sub", match[2]))

    def denied(self, action: str, subject: str) -> bool:
        return (action, subject.lower()) in self.violations

    async def settle(self) -> None:
        """Every earlier operation reached the server and any -ERR came back."""
        await self.nc.flush(timeout=5)
        await asyncio.sleep(0.05)
        await self.nc.flush(timeout=5)


async def connect(url: str, name: str) -> Conn:
    conn = Conn()
    user = USERS[name]
    conn.nc = await asyncio.wait_for(
        nats.connect(
            url,
            user=name,
            password=auth.DEV_PASSWORDS[user.password_var],
            inbox_prefix=user.inbox_prefix.encode(),
            error_cb=conn.on_error,
            allow_reconnect=False,
        ),
        timeout=10,
    )
    return conn


# -- 1. the authorization matrix ---------------------------------------------------------------

S = subjects
KV_R = f"KV_{S.RESULTS_BUCKET}"
KV_C = f"KV_{S.CONFIG_BUCKET}"
KV_S = f"KV_{S.SESSIONS_BUCKET}"


def direct_get(key: str) -> str:
    """A direct get of a results key: the key is in the subject, where permissions see it."""
    return f"$JS.API.DIRECT.GET.{KV_R}.$KV.{S.RESULTS_BUCKET}.{key}"


async def read_stored_reply(conn: Conn, key: str, timeout: float = 5):
    """A client reads a stored Reply the way BatonClient.result() does: a direct get of
    its key, without binding to the bucket (binding asks for the stream info, refused to
    clients because it lists every stored key)."""
    return await conn.nc.jetstream(timeout=timeout).get_msg(KV_R, subject=f"$KV.{S.RESULTS_BUCKET}.{key}", direct=True)


ACME_RESULT = S.result_key(ACME, "r1")  # where the services store acme's Reply to request r1
GLOBEX_RESULT = S.result_key(GLOBEX, "r1")
GATEWAY_RESULT = S.result_key(auth.GATEWAY, "r1")

PUB_PROBES = [
    S.request(ACME),
    S.request(GLOBEX),
    S.request(auth.GATEWAY),
    S.step("guardrail"),
    S.step("generator"),
    S.FALLBACK,
    S.step("router"),
    f"{S.inbox_prefix(ACME)}.reply.r1",
    f"{S.inbox_prefix(GLOBEX)}.reply.r1",
    f"{S.inbox_prefix(ACME)}.chunk.r1",
    f"{S.inbox_prefix(ACME)}.anything",
    f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.router",
    f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.generator",
    f"$JS.API.CONSUMER.INFO.{S.STREAM}.generator",
    f"$JS.ACK.{S.STREAM}.router.1.1.1.1.1.0",
    f"$JS.ACK.{S.STREAM}.generator.1.1.1.1.1.0",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{S.STREAM}.probe",
    f"$JS.API.CONSUMER.DELETE.{S.STREAM}.generator",
    "$JS.API.STREAM.CREATE.PROBE",
    f"$JS.API.STREAM.DELETE.{S.STREAM}",
    f"$JS.API.STREAM.MSG.GET.{S.STREAM}",
    f"$JS.API.STREAM.MSG.DELETE.{S.STREAM}",
    f"$JS.API.STREAM.PURGE.{KV_R}",
    f"$JS.API.STREAM.MSG.DELETE.{KV_R}",
    f"$JS.API.STREAM.INFO.{KV_R}",  # binding; with a subjects filter it lists every stored key
    f"$JS.API.STREAM.MSG.GET.{KV_R}",
    f"$JS.API.DIRECT.GET.{KV_R}",  # by sequence (in the body): no key in the subject
    direct_get(ACME_RESULT),
    direct_get(GLOBEX_RESULT),
    direct_get(GATEWAY_RESULT),
    direct_get(S.result_key(S.ANONYMOUS, "r1")),
    direct_get("r1"),  # the old key form, request id alone
    direct_get(">"),  # wildcards in the key: the last Reply of anyone
    direct_get("*.r1"),
    direct_get(f"{ACME}.>"),
    f"$KV.{S.RESULTS_BUCKET}.{ACME_RESULT}",
    f"$JS.API.STREAM.MSG.GET.{KV_S}",
    f"$KV.{S.SESSIONS_BUCKET}.s1",
    f"$JS.API.STREAM.INFO.{KV_C}",  # binding to the live config bucket
    f"$JS.API.STREAM.MSG.GET.{KV_C}",
    f"$KV.{S.CONFIG_BUCKET}.active",
    f"$JS.API.CONSUMER.CREATE.{KV_C}",
    f"$KV.{S.BREAKERS_BUCKET}.gpt-small",
    f"$KV.{S.DEAD_LETTERS_BUCKET}.r1",
    f"$KV.{S.CACHE_BUCKET}.k1",
    f"$KV.{S.BUDGETS_BUCKET}.t1",
    f"$KV.{S.SHADOW_BUCKET}.r1",
    f"$JS.API.CONSUMER.CREATE.{KV_R}",
    "$JS.API.INFO",
    "$JS.API.STREAM.LIST",
    "$SYS.REQ.SERVER.PING",
    S.FINISHED,
]
SUB_PROBES = [
    f"{S.inbox_prefix(ACME)}.>",
    f"{S.inbox_prefix(ACME)}.reply.*",
    f"{S.inbox_prefix(GLOBEX)}.>",
    f"{S.inbox_prefix('router')}.>",
    f"{S.inbox_prefix('generator')}.>",
    f"{S.inbox_prefix('admin')}.>",
    f"{S.inbox_prefix(auth.GATEWAY)}.>",
    "_INBOX.>",
    ">",
    S.ALL,
    S.REQUESTS,
    S.step("generator"),
    f"$KV.{S.RESULTS_BUCKET}.>",
    "$JS.API.>",
    S.MAX_DELIVERIES_ADVISORY,
    "$JS.EVENT.ADVISORY.>",
    "$JS.ACK.>",
    S.FINISHED,
]
PROBES = [("pub", s) for s in PUB_PROBES] + [("sub", s) for s in SUB_PROBES]

# Rules stated on their own, not read from the table: the table must satisfy them too.
SERVICES = list(S.SERVICES)
RULES: list[tuple[str, str, str, bool, str]] = [
    (ACME, "pub", S.request(ACME), True, "a client publishes its own requests"),
    (ACME, "sub", f"{S.inbox_prefix(ACME)}.>", True, "a client receives in its own inbox"),
    (ACME, "pub", direct_get(ACME_RESULT), True, "a client reads its own stored Replies"),
    (ACME, "pub", direct_get(f"{ACME}.>"), True, "a client reads its own stored Replies"),
    (GLOBEX, "pub", direct_get(GLOBEX_RESULT), True, "a client reads its own stored Replies"),
    (ACME, "pub", direct_get(GLOBEX_RESULT), False, "no client reads another client's stored Reply"),
    (GLOBEX, "pub", direct_get(ACME_RESULT), False, "no client reads another client's stored Reply"),
    (GLOBEX, "pub", direct_get(GATEWAY_RESULT), False, "no client reads another client's stored Reply"),
    (GLOBEX, "pub", direct_get(S.result_key(S.ANONYMOUS, "r1")), False, "no client reads Replies of requests without a reply address"),
    (GLOBEX, "pub", direct_get("r1"), False, "no client reads a key outside its own"),
    (GLOBEX, "pub", direct_get(">"), False, "no client reads Replies by wildcard"),
    (GLOBEX, "pub", direct_get("*.r1"), False, "no client reads Replies by wildcard"),
    (GLOBEX, "pub", f"$JS.API.STREAM.MSG.GET.{KV_R}", False, "no client reads a Reply by sequence"),
    (GLOBEX, "pub", f"$JS.API.DIRECT.GET.{KV_R}", False, "no client reads a Reply by sequence"),
    *[(name, "pub", f"$JS.API.STREAM.INFO.{KV_R}", False, "no client lists the stored Reply keys (clients read without binding)") for name in (*auth.CLIENTS, auth.GATEWAY)],
    *[(svc, "pub", f"$JS.API.STREAM.INFO.{KV_R}", True, "services bind to the results bucket") for svc in SERVICES],
    (auth.GATEWAY, "pub", f"$JS.API.STREAM.INFO.{KV_C}", True, "the gateway binds to the live config bucket (not to the results)"),
    (ACME, "pub", f"$JS.API.STREAM.INFO.{KV_C}", False, "a client other than the gateway does not follow the live config"),
    (auth.GATEWAY, "pub", direct_get(GATEWAY_RESULT), True, "the gateway reads its own stored Replies"),
    (auth.GATEWAY, "pub", direct_get(ACME_RESULT), False, "the gateway reads only its own stored Replies"),
    (auth.GATEWAY, "pub", f"$JS.API.STREAM.MSG.GET.{KV_R}", False, "the gateway reads only its own stored Replies"),
    *[(svc, "pub", direct_get(ACME_RESULT), True, "any service re-reads a stored Reply (a redelivered last hop)") for svc in SERVICES],
    *[(svc, "pub", f"$JS.API.STREAM.MSG.GET.{KV_R}", False, "services read Replies by key, not by sequence") for svc in SERVICES],
    (ACME, "sub", f"{S.inbox_prefix(GLOBEX)}.>", False, "no client reads another client's inbox"),
    (GLOBEX, "sub", f"{S.inbox_prefix(ACME)}.>", False, "no client reads another client's inbox"),
    (ACME, "sub", "_INBOX.>", False, "no client reads every inbox"),
    (ACME, "pub", S.request(GLOBEX), False, "no client publishes as another client"),
    (ACME, "pub", S.step("generator"), False, "no client skips the router and its gates"),
    (ACME, "pub", S.FALLBACK, False, "no client talks to the fallback directly"),
    (ACME, "pub", f"$KV.{S.RESULTS_BUCKET}.{ACME_RESULT}", False, "no client writes a Reply, not even its own"),
    (ACME, "pub", f"$JS.API.STREAM.PURGE.{KV_R}", False, "no client purges the results"),
    (ACME, "pub", f"$JS.API.STREAM.MSG.DELETE.{KV_R}", False, "no client deletes a Reply"),
    (ACME, "pub", f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.router", False, "no client pulls requests off the router's queue"),
    (ACME, "pub", f"$KV.{S.CONFIG_BUCKET}.active", False, "no client changes routing"),
    (ACME, "sub", S.REQUESTS, False, "no client sees other clients' requests"),
    *[(svc, "pub", S.request(ACME), False, "no service publishes a request (impersonating a client)") for svc in SERVICES],
    *[(svc, "sub", f"{S.inbox_prefix(ACME)}.>", False, "no service reads a client's inbox") for svc in SERVICES],
    *[(svc, "pub", f"$JS.API.STREAM.DELETE.{S.STREAM}", False, "no service deletes the stream") for svc in SERVICES],
    *[(svc, "pub", f"$JS.API.CONSUMER.DURABLE.CREATE.{S.STREAM}.probe", False, "no service creates consumers") for svc in SERVICES],
    *[(svc, "pub", f"$KV.{S.CONFIG_BUCKET}.active", False, "no service changes routing") for svc in SERVICES],
    *[(svc, "pub", f"{S.inbox_prefix(ACME)}.reply.r1", True, "any service may end a request") for svc in SERVICES],
    *[(svc, "pub", f"$KV.{S.RESULTS_BUCKET}.{ACME_RESULT}", True, "any service may store a Reply") for svc in SERVICES],
    ("router", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.generator", False, "a service pulls only from its own consumer"),
    ("generator", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.router", False, "a service pulls only from its own consumer"),
    ("generator", "pub", f"$JS.ACK.{S.STREAM}.router.1.1.1.1.1.0", False, "a service acks only its own messages"),
    ("router", "sub", f"{S.inbox_prefix('generator')}.>", False, "a service reads only its own inbox"),
    ("router", "sub", S.FINISHED, True, "the router learns which requests finished (the per-client limit)"),
    ("guardrail", "pub", S.FINISHED, True, "a service that finishes a request tells the router"),
    ("fallback", "pub", S.FINISHED, True, "a service that finishes a request tells the router"),
    (ACME, "pub", S.FINISHED, False, "no client frees its own slots: it would escape its in-flight limit"),
    (ACME, "sub", S.FINISHED, False, "no client sees which requests of others finished"),
    ("router", "sub", f"{S.inbox_prefix(ACME)}.reply.*", False, "the router does not read clients' Replies"),
    (auth.GATEWAY, "pub", S.request(auth.GATEWAY), True, "the gateway is a client under its own id"),
    (auth.GATEWAY, "pub", S.request(ACME), False, "the gateway does not publish as another client"),
    (auth.GATEWAY, "sub", f"{S.inbox_prefix(ACME)}.>", False, "the gateway reads only its own inbox"),
    (ACME, "pub", f"$JS.API.STREAM.MSG.GET.{S.STREAM}", False, "no client reads hops in flight"),
    *[(svc, "pub", f"$JS.API.STREAM.MSG.GET.{S.STREAM}", svc == "fallback", "only the fallback reads a hop by sequence (dead letters)") for svc in SERVICES],
    *[(svc, "sub", S.MAX_DELIVERIES_ADVISORY, svc == "fallback", "only the fallback handles the max-deliveries advisory") for svc in SERVICES],
    *[(svc, "pub", f"$KV.{S.BREAKERS_BUCKET}.gpt-small", svc in ("generator", "guardrail"), "only the generator and the guardrail (its judge) move circuit breakers") for svc in SERVICES],
    *[(svc, "pub", f"{S.inbox_prefix(ACME)}.chunk.r1", svc == "generator", "only the generator streams chunks") for svc in SERVICES],
    ("router", "pub", f"$KV.{S.SESSIONS_BUCKET}.s1", False, "the router only reads sessions"),
    ("router", "pub", f"$KV.{S.CACHE_BUCKET}.k1", True, "the router writes the semantic cache's question index (in the cache bucket)"),
    (ACME, "pub", f"$KV.{S.CACHE_BUCKET}.k1", False, "no client poisons the answer cache"),
    (ACME, "pub", f"$KV.{S.BUDGETS_BUCKET}.t1", False, "no client resets a tenant's spend"),
    ("admin", "pub", "$JS.API.STREAM.CREATE.PROBE", True, "the admin provisions"),
    ("admin", "pub", f"$KV.{S.CONFIG_BUCKET}.active", True, "the admin applies the live config"),
    ("admin", "sub", f"{S.inbox_prefix(ACME)}.>", False, "not even the admin reads a client's inbox"),
    ("admin", "pub", S.request(ACME), False, "the admin does not publish requests"),
    *[(name, "pub", "$SYS.REQ.SERVER.PING", False, "nobody reaches the system account") for name in USERS],
]


async def observe(url: str, name: str) -> dict[tuple[str, str], bool]:
    """Allowed (True) or denied (False) for every probe, as the server decided for `name`."""
    conn = await connect(url, name)
    try:
        for action, subject in PROBES:
            if action == "pub":
                await conn.nc.publish(subject, b"probe")
            else:
                await conn.nc.subscribe(subject)
        await conn.settle()
        return {(action, subject): not conn.denied(action, subject) for action, subject in PROBES}
    finally:
        await conn.nc.close()


def render_matrix(observed: dict[str, dict[tuple[str, str], bool]]) -> tuple[str, dict[str, int]]:
    names = list(USERS)
    short = {n: n.removeprefix("client-") for n in names}
    header = "| op | subject | " + " | ".join(short[n] for n in names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    rows = [header, rule]
    counts = {"checks": 0, "allowed": 0, "denied": 0, "mismatches": 0}
    for action, subject in PROBES:
        cells = []
        for name in names:
            got = observed[name][(action, subject)]
            want = auth.allowed(USERS[name], action, subject)
            counts["checks"] += 1
            counts["allowed" if got else "denied"] += 1
            mark = "allow" if got else "·"
            if got != want:
                counts["mismatches"] += 1
                mark += " (!)"
            cells.append(mark)
        rows.append(f"| {action} | `{subject}` | " + " | ".join(cells) + " |")
    return "\n".join(rows), counts


def matrix_document(table: str, counts: dict[str, int]) -> str:
    return (
        "# NATS authorization matrix (observed on a real nats-server)\n\n"
        "GENERATED by tests/integration/test_nats_auth.py from what nats-server "
        f"{_server_version()} allowed (`allow`) or refused (`·`) each user, with "
        "deploy/nats/single.conf and auth.conf. `(!)` would mark a cell that differs from "
        "the table in generate_auth.py. Regenerate: "
        "`BATON_WRITE_AUTHZ_MATRIX=1 .venv/bin/python -m pytest tests/integration/test_nats_auth.py -k matrix`.\n\n"
        f"{counts['checks']} checks ({len(USERS)} users x {len(PROBES)} probes: "
        f"{len(PUB_PROBES)} publish, {len(SUB_PROBES)} subscribe): {counts['allowed']} allowed, "
        f"{counts['denied']} denied, {counts['mismatches']} different from the table; "
        f"{len(RULES)} hand-written rules hold.\n\n"
        f"{table}\n"
    )


def _server_version() -> str:
    out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return out.split()[-1] if out else "?"


async def test_authorization_matrix_is_exactly_the_table(tmp_path):
    with secured_server(tmp_path) as server:
        observed = {name: await observe(server.url, name) for name in USERS}

    table, counts = render_matrix(observed)
    document = matrix_document(table, counts)
    print("\n" + document)
    if os.environ.get("BATON_WRITE_AUTHZ_MATRIX") == "1":
        MATRIX_FILE.write_text(document)

    mismatches = [
        f"{name} {action} {subject}: server {'allowed' if got else 'denied'}, table says {'allow' if auth.allowed(USERS[name], action, subject) else 'deny'}"
        for name, cells in observed.items()
        for (action, subject), got in cells.items()
        if got != auth.allowed(USERS[name], action, subject)
    ]
    assert not mismatches, "\n".join(mismatches)

    broken = []
    for name, action, subject, want, why in RULES:
        got = observed[name].get((action, subject))
        if got is None:  # a rule about a subject that is not a probe: ask the table and the server separately
            broken.append(f"rule not probed: {name} {action} {subject}")
        elif got != want or auth.allowed(USERS[name], action, subject) != want:
            broken.append(f"{why}: {name} {action} {subject} is {'allowed' if got else 'denied'}")
    assert not broken, "\n".join(broken)
    assert counts["checks"] == len(USERS) * len(PROBES)

    if MATRIX_FILE.exists() and os.environ.get("BATON_WRITE_AUTHZ_MATRIX") != "1":
        assert MATRIX_FILE.read_text() == document, (
            f"{MATRIX_FILE.relative_to(ROOT)} is out of date: rerun with BATON_WRITE_AUTHZ_MATRIX=1"
        )


# -- 2. real JetStream work under each role -------------------------------------------------------


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Iterator[NatsServer]:
    """single.conf, provisioned by the admin user the way deploy/provision.py does."""
    with secured_server(tmp_path_factory.mktemp("nats-auth")) as server:

        async def as_admin() -> None:
            conn = await connect(server.url, "admin")
            try:
                await provision(conn.nc.jetstream(), Settings())
                assert not conn.violations, conn.violations
            finally:
                await conn.nc.close()

        asyncio.run(as_admin())
        yield server


async def test_client_request_is_accepted_and_its_stored_reply_readable(provisioned):
    client = await connect(provisioned.url, ACME)
    service = await connect(provisioned.url, "guardrail")
    try:
        ack = await client.nc.jetstream().publish(
            S.request(ACME), b'{"prompt": "hi"}', headers={S.H_MSG_ID: "acme-1", S.H_REQUEST_ID: "acme-1"}, timeout=5
        )
        assert ack.stream == S.STREAM

        results = await service.nc.jetstream().key_value(S.RESULTS_BUCKET)  # services bind
        assert results._direct, "the results bucket must allow direct gets (shared/provision.py ensure_bucket)"
        await results.create(S.result_key(ACME, "acme-1"), b'{"answer": "hello"}')
        stored = await read_stored_reply(client, S.result_key(ACME, "acme-1"))
        assert stored.data == b'{"answer": "hello"}'

        await client.settle()
        await service.settle()
        assert client.violations == [] and service.violations == []
    finally:
        await client.nc.close()
        await service.nc.close()


async def test_client_cannot_write_results_nor_read_another_clients_replies(provisioned):
    acme = await connect(provisioned.url, ACME)
    globex = await connect(provisioned.url, GLOBEX)
    service = await connect(provisioned.url, "fallback")
    try:
        js = acme.nc.jetstream(timeout=1)
        with pytest.raises(nats.errors.TimeoutError):  # binding asks for the stream info: refused
            await js.key_value(S.RESULTS_BUCKET)
        # What KeyValue.put sends, without a binding: no PubAck, the server dropped the write.
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(f"$KV.{S.RESULTS_BUCKET}.forged", b"{}")
        with pytest.raises(nats.errors.TimeoutError):  # not even under its own key
            await js.publish(f"$KV.{S.RESULTS_BUCKET}.{S.result_key(ACME, 'forged')}", b"{}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(S.step("generator"), b"{}")

        got_acme: list[bytes] = []
        got_globex: list[bytes] = []
        await acme.nc.subscribe(f"{S.inbox_prefix(ACME)}.reply.*", cb=collect(got_acme))
        await globex.nc.subscribe(f"{S.inbox_prefix(ACME)}.>", cb=collect(got_globex))
        await acme.settle()  # both subscriptions are in place before the reply goes out
        await globex.settle()
        await service.nc.publish(f"{S.inbox_prefix(ACME)}.reply.r9", b"for acme only")
        await service.settle()
        await acme.settle()
        await globex.settle()

        assert got_acme == [b"for acme only"]
        assert got_globex == []
        assert acme.denied("pub", f"$JS.API.STREAM.INFO.{KV_R}")
        assert acme.denied("pub", f"$KV.{S.RESULTS_BUCKET}.forged")
        assert acme.denied("pub", f"$KV.{S.RESULTS_BUCKET}.{S.result_key(ACME, 'forged')}")
        assert acme.denied("pub", S.step("generator"))
        assert globex.denied("sub", f"{S.inbox_prefix(ACME)}.>")
    finally:
        for conn in (acme, globex, service):
            await conn.nc.close()


def collect(into: list[bytes]):
    async def on_message(msg) -> None:
        into.append(msg.data)

    return on_message


async def test_service_pulls_acks_forwards_and_stores_under_its_own_user(provisioned):
    client = await connect(provisioned.url, ACME)
    router = await connect(provisioned.url, "router")
    guardrail = await connect(provisioned.url, "guardrail")
    admin = await connect(provisioned.url, "admin")
    try:
        await admin.nc.jetstream().purge_stream(S.STREAM)  # what earlier tests queued
        replies: list[bytes] = []
        await client.nc.subscribe(f"{S.inbox_prefix(ACME)}.reply.>", cb=collect(replies))
        await client.settle()
        await client.nc.jetstream().publish(S.request(ACME), b'{"prompt": "chain?"}', headers={S.H_MSG_ID: "e2e-1", S.H_REQUEST_ID: "e2e-1"})

        # The router pulls the request from its durable consumer and passes the baton.
        js = router.nc.jetstream()
        sub = await js.pull_subscribe_bind(durable=S.durable("router"), stream=S.STREAM, inbox_prefix=f"{S.inbox_prefix('router')}.".encode())
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.headers[S.H_REQUEST_ID] == "e2e-1"
        await msg.in_progress()
        ack = await js.publish(S.step("guardrail"), b'{"hop": 1}', headers={S.H_MSG_ID: "e2e-1.0.1"})
        assert ack.stream == S.STREAM
        await msg.ack_sync()

        # The guardrail pulls the hop, ends the request: stores the Reply and answers.
        gjs = guardrail.nc.jetstream()
        gsub = await gjs.pull_subscribe_bind(durable=S.durable("guardrail"), stream=S.STREAM, inbox_prefix=f"{S.inbox_prefix('guardrail')}.".encode())
        [hop] = await gsub.fetch(1, timeout=5)
        assert hop.data == b'{"hop": 1}'
        results = await gjs.key_value(S.RESULTS_BUCKET)
        key = S.result_key(ACME, "e2e-1")
        await results.create(key, b'{"answer": "0.5% wear"}')
        with pytest.raises(KeyWrongLastSequenceError):  # a redelivered last hop finds the first Reply
            await results.create(key, b'{"answer": "again"}')
        assert (await results.get(key)).value == b'{"answer": "0.5% wear"}'
        await guardrail.nc.publish(f"{S.inbox_prefix(ACME)}.reply.e2e-1", b'{"answer": "0.5% wear"}')
        await hop.ack_sync()
        await guardrail.settle()
        await client.settle()
        assert replies == [b'{"answer": "0.5% wear"}']

        # Work-queue retention: both hops are gone once acknowledged.
        ajs = admin.nc.jetstream()
        for durable in ("router", "guardrail"):
            info = await ajs.consumer_info(S.STREAM, S.durable(durable))
            assert info.num_pending == 0 and info.num_ack_pending == 0
        assert all(not c.violations for c in (client, router, guardrail, admin))
    finally:
        for conn in (client, router, guardrail, admin):
            await conn.nc.close()


async def test_service_cannot_impersonate_a_client_nor_administer(provisioned):
    router = await connect(provisioned.url, "router")
    try:
        js = router.nc.jetstream(timeout=1)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(S.request(ACME), b'{"prompt": "forged"}')
        # Another service's queue: binding sends nothing, the pull is refused.
        sub = await js.pull_subscribe_bind(durable=S.durable("generator"), stream=S.STREAM, inbox_prefix=f"{S.inbox_prefix('router')}.".encode())
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        with pytest.raises(nats.errors.TimeoutError):
            await js.consumer_info(S.STREAM, S.durable("generator"))
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(S.STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(S.STREAM, durable_name="sneaky", filter_subject=S.REQUESTS)
        await router.settle()
        assert router.denied("pub", S.request(ACME))
        assert router.denied("pub", f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM}.generator")
        assert router.denied("pub", f"$JS.API.STREAM.DELETE.{S.STREAM}")
    finally:
        await router.nc.close()


async def _bare_request(conn: Conn, subject: str, body: bytes = b""):
    """A raw request, the way a hostile client would send it: no client library checks."""
    return await conn.nc.request(subject, body, timeout=1)


async def test_a_client_cannot_read_another_clients_stored_reply(provisioned):
    """Replies are keyed <client>.<request id> and read by direct get: every other way in is refused."""
    from baton.client import BatonClient
    from shared.schema import Reply

    service = await connect(provisioned.url, "generator")
    globex = await connect(provisioned.url, GLOBEX)
    password = auth.DEV_PASSWORDS[USERS[ACME].password_var]
    try:
        results = await service.nc.jetstream().key_value(S.RESULTS_BUCKET)
        assert results._direct, "the results bucket must allow direct gets (shared/provision.py ensure_bucket)"
        secret = Reply(request_id="private-1", ok=True, answer="for acme only").model_dump_json().encode()
        seq = await results.create(S.result_key(ACME, "private-1"), secret)

        # acme reads it the way BatonClient.result() does (its own key, direct get).
        acme = await connect(provisioned.url, ACME)
        try:
            mine = await read_stored_reply(acme, S.result_key(ACME, "private-1"))
            assert mine.data == secret
            await acme.settle()
            assert acme.violations == []
        finally:
            await acme.nc.close()

        js = globex.nc.jetstream(timeout=1)
        with pytest.raises(nats.errors.TimeoutError):  # binding (stream info) is refused
            await js.key_value(S.RESULTS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):  # the other client's key, by name (as result() asks)
            await read_stored_reply(globex, S.result_key(ACME, "private-1"), timeout=1)
        for key in (">", "*.private-1", f"{ACME}.>", f"{ACME}.*"):  # wildcards in the key
            with pytest.raises(nats.errors.TimeoutError):
                await _bare_request(globex, direct_get(key))
        with pytest.raises(nats.errors.TimeoutError):  # by sequence, no key needed
            await js.get_msg(KV_R, seq)
        with pytest.raises(nats.errors.TimeoutError):  # by subject in the body: no permission could see it
            await js.get_msg(KV_R, subject=f"$KV.{S.RESULTS_BUCKET}.{S.result_key(ACME, 'private-1')}")
        with pytest.raises(nats.errors.TimeoutError):  # the direct form of "by sequence"
            await js.get_msg(KV_R, seq, direct=True)
        with pytest.raises(nats.errors.TimeoutError):  # a consumer on the bucket would deliver every Reply
            await js.add_consumer(KV_R, deliver_subject=f"{S.inbox_prefix(GLOBEX)}.steal")
        # Its own key space does not have it: not found, not someone else's Reply.
        with pytest.raises(nats.js.errors.NotFoundError):
            await read_stored_reply(globex, S.result_key(GLOBEX, "private-1"), timeout=1)
        async with BatonClient(provisioned.url, client_id=GLOBEX, user=GLOBEX, password=auth.DEV_PASSWORDS[USERS[GLOBEX].password_var]) as other:
            assert await other.result("private-1") is None
        async with BatonClient(provisioned.url, client_id=ACME, user=ACME, password=password) as owner:
            stored = await owner.result("private-1")
            assert stored is not None and stored.answer == "for acme only"

        await globex.settle()
        refused = {subject for action, subject in globex.violations if action == "pub"}
        expected = {
            f"$JS.API.STREAM.INFO.{KV_R}",
            direct_get(S.result_key(ACME, "private-1")),
            *(direct_get(k) for k in (">", "*.private-1", f"{ACME}.>", f"{ACME}.*")),
            f"$JS.API.STREAM.MSG.GET.{KV_R}",
            f"$JS.API.DIRECT.GET.{KV_R}",
            f"$JS.API.CONSUMER.CREATE.{KV_R}",
        }
        assert {e.lower() for e in expected} <= refused, sorted(refused)
        assert direct_get(S.result_key(GLOBEX, "private-1")).lower() not in refused  # its own key: asked, not found
    finally:
        await service.nc.close()
        await globex.nc.close()


async def test_a_client_cannot_list_other_clients_result_keys(provisioned):
    """Stream info with a subjects filter lists every stored key (client ids and request
    ids): a service, which binds, gets the list; every client and the gateway are refused."""
    listing = b'{"subjects_filter": ">"}'
    listed = f"$KV.{S.RESULTS_BUCKET}.{S.result_key(ACME, 'listed-1')}"
    service = await connect(provisioned.url, "generator")
    try:
        results = await service.nc.jetstream().key_value(S.RESULTS_BUCKET)
        await results.put(S.result_key(ACME, "listed-1"), b"{}")
        answer = await _bare_request(service, f"$JS.API.STREAM.INFO.{KV_R}", listing)
        assert listed in ((json.loads(answer.data).get("state") or {}).get("subjects") or {})  # what a client would learn
    finally:
        await service.nc.close()

    for name in (*auth.CLIENTS, auth.GATEWAY):
        client = await connect(provisioned.url, name)
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await _bare_request(client, f"$JS.API.STREAM.INFO.{KV_R}", listing)
            with pytest.raises(nats.errors.TimeoutError):
                await client.nc.jetstream(timeout=1).stream_info(KV_R, subjects_filter=">")
            await client.settle()
            assert client.denied("pub", f"$JS.API.STREAM.INFO.{KV_R}"), name
        finally:
            await client.nc.close()


async def _an_older_results_bucket(url: str) -> None:
    """What an earlier version of Baton left behind: a results bucket without direct gets."""
    admin = await connect(url, "admin")
    try:
        from nats.js.api import KeyValueConfig

        await admin.nc.jetstream().create_key_value(KeyValueConfig(bucket=S.RESULTS_BUCKET, history=1, direct=False))
    finally:
        await admin.nc.close()


async def _every_bucket_allows_direct_gets_and_acme_reads_its_reply(url: str) -> None:
    admin = await connect(url, "admin")
    service = await connect(url, "guardrail")
    acme = await connect(url, ACME)
    try:
        ajs = admin.nc.jetstream()
        for bucket, _ in buckets(Settings()):
            assert (await ajs.stream_info(f"KV_{bucket}")).config.allow_direct, bucket
        await (await service.nc.jetstream().key_value(S.RESULTS_BUCKET)).put(S.result_key(ACME, "old-1"), b"{}")
        entry = await read_stored_reply(acme, S.result_key(ACME, "old-1"), timeout=2)  # a direct get: needs the switch
        assert entry.data == b"{}"
        for conn in (service, acme):
            await conn.settle()
            assert conn.violations == []
    finally:
        for conn in (admin, service, acme):
            await conn.nc.close()


def test_deploy_provision_script_provisions_as_admin_and_is_refused_to_a_service(tmp_path):
    """deploy/provision.py, as compose and the Kubernetes Job run it."""
    script = ROOT / "deploy" / "provision.py"
    with secured_server(tmp_path) as server:
        asyncio.run(_an_older_results_bucket(server.url))
        base = {**os.environ, "NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
        admin = {**base, "NATS_USER": "admin", "NATS_PASSWORD": auth.DEV_PASSWORDS[USERS["admin"].password_var]}
        done = subprocess.run([sys.executable, str(script), "--wait", "10"], env=admin, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ready" in done.stdout
        assert f"direct gets turned on for existing buckets {S.RESULTS_BUCKET}" in done.stdout
        again = subprocess.run([sys.executable, str(script), "--wait", "10"], env=admin, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr  # idempotent
        assert "direct gets turned on" not in again.stdout
        asyncio.run(_every_bucket_allows_direct_gets_and_acme_reads_its_reply(server.url))

        router = {**base, "NATS_USER": "router", "NATS_PASSWORD": auth.DEV_PASSWORDS[USERS["router"].password_var]}
        refused = subprocess.run([sys.executable, str(script), "--wait", "10"], env=router, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "permissions violation" in refused.stderr


# -- 3. the real services, least privilege, provisioning off ------------------------------------

# What a regression of the service code looks like, and the fix: named in the failure.
DIAGNOSES = {
    "unexpected keyword argument 'user'": "shared/runtime.py must connect with nats_credentials(settings) (shared/settings.py)",
}


async def _apply_config_as_admin(admin: Conn) -> None:
    """What deploy/provision.py does after provisioning: the live config, as the admin."""
    try:
        from shared.live_config import publish_config
    except ImportError:  # a build without live configuration
        return
    bucket = await admin.nc.jetstream().key_value(S.CONFIG_BUCKET)
    await publish_config(bucket, Settings().config.read_text(), "default")


def _pull_inbox_violation(lines: list[str]) -> bool:
    # A pull subscription's inbox outside `_INBOX.<service>.`: the subscriber was not given
    # inbox_prefix (FastStream's pull subscriber ignores the broker's inbox prefix).
    return any("Subscription Violation" in line and re.search(r'Subject "_INBOX\.[A-Za-z0-9]{20,}"', line) for line in lines)


async def _ask_as_a_client(url: str) -> list[str]:
    """acme's session with the mesh; the request ids whose Replies the services stored."""
    from baton.client import BatonClient

    user = USERS[ACME]
    async with BatonClient(url, client_id=ACME, user=ACME, password=auth.DEV_PASSWORDS[user.password_var], timeout_s=20) as client:
        reply = await client.ask("How often should I replace my chain?", session_id="least-privilege")
        assert reply.ok, reply.error
        assert reply.answer
        follow_up = await client.ask("And the cassette?", session_id="least-privilege")  # session read + write
        assert follow_up.ok, follow_up.error
        items = [item async for item in client.stream("How do I fix a puncture?")]  # chunks to the inbox
        assert items and items[-1].ok
        refused = await asyncio.wait_for(await client.send_raw(b"not json"), 20)  # the router's error reply
        assert refused.error is not None
        again = await client.ask("How often should I replace my chain?")  # a cache hit, answered by the router
        assert again.ok, again.error
        answered = [reply, follow_up, items[-1], refused, again]

    # After the fact, from a new connection: each Reply as the services stored it, under
    # <client>.<request id>, read through acme's own direct-get permission.
    async with BatonClient(url, client_id=ACME, user=ACME, password=auth.DEV_PASSWORDS[user.password_var]) as later:
        for earlier in answered:
            stored = await later.result(earlier.request_id)
            assert stored is not None, f"no stored Reply for {earlier.request_id}"
            assert stored.request_id == earlier.request_id and stored.ok == earlier.ok
    return [r.request_id for r in answered]


def _cli(url: str, user: str, *args: str) -> subprocess.CompletedProcess:
    """`baton <args>` as a NATS user: NATS_USER / NATS_PASSWORD, the client id is the user name."""
    env = {
        **os.environ,
        "NATS_URL": url,
        "NATS_USER": user,
        "NATS_PASSWORD": auth.DEV_PASSWORDS[USERS[user].password_var],
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in ("BATON_COLLECTOR_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        env.pop(key, None)
    code = "import sys; from baton.cli import main; sys.argv[0] = 'baton'; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _cli_as_clients(url: str, acme_request_id: str) -> None:
    asked = _cli(url, ACME, "ask", "How often should I replace my chain?", "--json", "--timeout", "20")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    request_id = json.loads(asked.stdout)["request_id"]
    fetched = _cli(url, ACME, "result", request_id, "--json")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert json.loads(fetched.stdout)["request_id"] == request_id
    # Another client asking for acme's request id looks in its own key space: nothing there.
    other = _cli(url, GLOBEX, "result", acme_request_id, "--json")
    assert other.returncode == 4, other.stdout + other.stderr


async def test_the_five_services_run_with_least_privilege_users(provisioned, index_dir, tmp_path):
    since = provisioned.log.stat().st_size  # earlier tests provoked violations on purpose
    admin = await connect(provisioned.url, "admin")
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        await admin.nc.jetstream().purge_stream(S.STREAM)  # what earlier tests queued
        await _apply_config_as_admin(admin)
        for svc in SERVICES:
            user = USERS[svc]
            env = {
                **os.environ,
                "NATS_URL": provisioned.url,
                "NATS_USER": svc,
                "NATS_PASSWORD": auth.DEV_PASSWORDS[user.password_var],
                "BATON_PROVISION": "false",
                "BATON_INDEX_DIR": str(index_dir),
                "BATON_STATE_DIR": str(tmp_path),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
            env.pop("BATON_METRICS_PORT", None)
            logs[svc] = tmp_path / f"{svc}.log"
            with open(logs[svc], "wb") as out:
                procs[svc] = subprocess.Popen([sys.executable, "-m", "shared.run", svc], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        ajs = admin.nc.jetstream()
        waiting = set(SERVICES)

        async def all_pulling() -> bool:
            for svc, proc in procs.items():
                if proc.poll() is not None:
                    text = logs[svc].read_text(errors="replace")
                    fixes = [fix for needle, fix in DIAGNOSES.items() if needle in text]
                    pytest.fail(f"{svc} exited with {proc.returncode}: {'; '.join(fixes)}\n{text[-3000:]}")
            for svc in list(waiting):
                if ((await ajs.consumer_info(S.STREAM, S.durable(svc))).num_waiting or 0) >= 1:
                    waiting.discard(svc)
            lines = violations_in_log(provisioned.log, since)
            if lines:
                why = "the pull subscription's inbox is _INBOX.<nuid>: shared/mesh.py Mesh.subscriber must pass inbox_prefix=b'_INBOX.<service>.'; " if _pull_inbox_violation(lines) else ""
                pytest.fail(f"{why}not pulling: {sorted(waiting)}; server violations:\n" + "\n".join(lines))
            return not waiting

        await eventually(all_pulling, 45, every=0.2, what=lambda: f"not pulling: {sorted(waiting)}; no server violations")

        try:
            request_ids = await _ask_as_a_client(provisioned.url)
            await asyncio.to_thread(_cli_as_clients, provisioned.url, request_ids[0])
        except Exception as exc:  # say which permission was missing, not just "timed out"
            lines = violations_in_log(provisioned.log, since)
            raise AssertionError(f"{type(exc).__name__}: {exc}\nserver violations:\n" + "\n".join(lines)) from exc

        lines = violations_in_log(provisioned.log, since)
        assert not lines, "permissions violations while the mesh ran:\n" + "\n".join(lines)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        await admin.nc.close()


# -- 4. the cluster configs -------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 15) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"nats-server exited {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    eventually_sync(listening, timeout_s, what=f"nats-server not listening on {port}")


@contextmanager
def local_cluster(tmp: Path) -> Iterator[list[str]]:
    """deploy/nats/cluster/node-{1,2,3}.conf with their ports moved to free ones."""
    (tmp / "cluster").mkdir()
    shutil.copy(NATS_DIR / "auth.conf", tmp / "auth.conf")
    client_ports = [free_port() for _ in range(3)]
    route_ports = [free_port() for _ in range(3)]
    moves = {**{str(4222 + i): str(p) for i, p in enumerate(client_ports)}, **{str(6222 + i): str(p) for i, p in enumerate(route_ports)}}
    for i in range(1, 4):
        text = (NATS_DIR / "cluster" / f"node-{i}.conf").read_text()
        text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: "127.0.0.1:" + moves.get(m[1], m[1]), text)
        text = re.sub(r"^http: .*$", "", text, flags=re.M)  # no monitoring port in tests
        text = text.replace(f"/tmp/baton-nats/node-{i}", str(tmp / f"store-{i}"))
        (tmp / "cluster" / f"node-{i}.conf").write_text(text)
    procs: list[subprocess.Popen] = []
    try:
        with password_env():
            for i in range(1, 4):
                log = tmp / f"node-{i}.log"
                procs.append(subprocess.Popen([find_binary(), "-c", str(tmp / "cluster" / f"node-{i}.conf"), "-l", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for i, (port, proc) in enumerate(zip(client_ports, procs), start=1):
            _wait_port(port, proc, tmp / f"node-{i}.log")
        yield [f"nats://127.0.0.1:{p}" for p in client_ports]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def test_cluster_configs_form_a_jetstream_cluster_with_the_same_users(tmp_path):
    with local_cluster(tmp_path) as urls:
        admin = await connect(urls[0], "admin")
        client = await connect(urls[2], ACME)
        try:
            js = admin.nc.jetstream(timeout=5)
            refusals: list[Exception] = []

            async def provisioned_on_three() -> bool:  # JetStream answers once the three nodes elected a meta leader
                try:
                    await provision(js, Settings(), replicas=3)
                    return True
                except (nats.errors.TimeoutError, nats.js.errors.APIError, nats.errors.NoRespondersError) as exc:
                    refusals[:] = [exc]
                    return False

            await eventually(provisioned_on_three, 30, every=0.5, what=lambda: f"no JetStream meta leader: {refusals}")
            info = await js.stream_info(S.STREAM)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2

            ack = await client.nc.jetstream(timeout=10).publish(S.request(ACME), b'{"prompt": "hi"}', headers={S.H_MSG_ID: "c-1"})
            assert ack.stream == S.STREAM
            await client.nc.subscribe(f"{S.inbox_prefix(GLOBEX)}.>")
            await client.settle()
            assert client.denied("sub", f"{S.inbox_prefix(GLOBEX)}.>")
            assert not admin.violations
        finally:
            await admin.nc.close()
            await client.nc.close()
