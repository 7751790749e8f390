"""`baton`: run the mesh and talk to it from a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from baton import render
from baton.client import BatonClient, BatonError
from baton.processes import MESH_SERVICES, STOP, MeshProcesses, MeshStartError, Stopped
from shared.config import ConfigError, load_config
from shared.natsd import NatsServerError
from shared.settings import ROOT, Settings, local_credentials, nats_credentials

app = typer.Typer(help="Baton: an AI orchestration mesh on NATS.", no_args_is_help=True, add_completion=False)
# Piped output (make, CI logs) gets room for the waterfall instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

SAMPLE_CORPUS = ROOT / "corpus"
SAMPLE_QUESTIONS = SAMPLE_CORPUS / "questions.yaml"


def _settings() -> Settings:
    return Settings()


def _state_file(settings: Settings) -> Path:
    return settings.state_dir / "mesh.json"


def _mesh_state(settings: Settings) -> dict:
    state = _state_file(settings)
    return json.loads(state.read_text()) if state.exists() else {}


def _nats_url(settings: Settings) -> str:
    """NATS_URL when set, else the URL of the mesh `baton up` started."""
    if "NATS_URL" in os.environ:
        return settings.nats_url
    return _mesh_state(settings).get("nats_url", settings.nats_url)


def _client(url: str, *, admin: bool = False, **options) -> BatonClient:
    """A client as the configured NATS user (NATS_USER / NATS_PASSWORD, else the CLI's user of
    the mesh `baton up` runs here): its id is the user name, so its requests, inbox and stored
    replies are the ones that user is allowed. `admin`: the operator commands (status,
    health, config) as the local mesh's admin user, when there is one."""
    settings = _settings()
    credentials = nats_credentials(settings)
    if admin and "NATS_USER" not in os.environ:
        user, password = local_credentials(settings.state_dir, url, user="admin")
        if user:
            credentials = {"user": user, "password": password}
            options.setdefault("client_id", user)  # its inbox is the one that user may read
    # A stable id, so `baton result` finds what an earlier `baton submit` stored.
    options.setdefault("client_id", settings.nats_user if credentials else os.environ.get("BATON_CLIENT_ID", "cli"))
    return BatonClient(url, **options, **credentials)


def _collector_url(settings: Settings) -> str:
    url = os.environ.get("BATON_COLLECTOR_URL") or _mesh_state(settings).get("collector_url")
    if not url:
        _fail("no collector known: start the mesh with `baton up` or set BATON_COLLECTOR_URL")
    return url


def _client_tracer(settings: Settings):
    """Trace the client's publish too, so the trace starts where the request does."""
    from shared.telemetry import setup_tracing

    collector = os.environ.get("BATON_COLLECTOR_URL") or _mesh_state(settings).get("collector_url")
    if collector and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    return setup_tracing("client")


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def parse_replicas(spec: str) -> dict[str, int]:
    """'generator=4,retriever=2' -> counts for every service (1 unless named)."""
    counts = {service: 1 for service in MESH_SERVICES}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        if name not in counts or not count.isdigit() or int(count) < 1:
            raise typer.BadParameter(f"{item!r}: use service=N with a service in {', '.join(MESH_SERVICES)} and N >= 1")
        counts[name] = int(count)
    return counts


@app.command()
def up(
    replicas: str = typer.Option("", help="replicas per service, e.g. generator=4,retriever=2"),
    collector: bool = typer.Option(True, help="start the trace collector and send every span to it"),
    gateway: bool = typer.Option(True, help="start the OpenAI-compatible HTTP gateway"),
    gateway_port: int = typer.Option(8080, help="the gateway's port on 127.0.0.1"),
    auth: bool = typer.Option(True, help="NATS with the generated least-privilege users and fresh passwords (credentials.json in the state folder); --no-auth: a NATS anyone on this machine may use"),
    clients: list[str] = typer.Option([], "--client", help="a client id to make a NATS user for (repeatable); the CLI's own is 'cli'"),
) -> None:
    """Start NATS (unless NATS_URL is set), the collector and every service; Ctrl-C stops them all."""
    STOP.install()  # before anything starts: a signal at any moment stops what has started
    settings = _settings()
    counts = parse_replicas(replicas)
    _check_ready_to_start(settings)
    lock = _lock_state_dir(settings)
    mesh = MeshProcesses(settings)
    try:
        if "NATS_URL" not in os.environ:
            mesh.start_nats(settings.state_dir / "nats", secure=auth, clients=tuple(clients))
        with console.status("starting the mesh..."):
            if collector:
                mesh.start_collector()
            mesh.start(counts)
            if gateway:
                mesh.start_gateway(gateway_port)
        state = {"nats_url": mesh.nats_url, "collector_url": mesh.collector_url, "gateway_url": mesh.gateway_url, "pid": os.getpid()}
        _state_file(settings).write_text(json.dumps(state))
        console.print(f"[green]mesh up[/] on {mesh.nats_url}: " + ", ".join(f"{s}×{n}" for s, n in counts.items()))
        if mesh.credentials:
            console.print(f"NATS users: {', '.join(u for u in mesh.credentials if u not in MESH_SERVICES)} (passwords in {settings.state_dir / 'credentials.json'})")
        if mesh.collector_url:
            console.print(f"traces: {mesh.collector_url}  (baton trace ID, baton stats)")
        if mesh.gateway_url:
            console.print(f"OpenAI-compatible API: {mesh.gateway_url}/v1  (model baton/auto)")
        console.print("ask it: [bold]baton ask \"How often should I replace my chain?\"[/]   stop: Ctrl-C")
        while True:
            STOP.check()
            _supervise(mesh)
            time.sleep(0.5)
    except Stopped:
        pass
    except (MeshStartError, NatsServerError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    except Exception as exc:  # whatever failed, say so in a sentence; the finally stops what started
        err.print(f"[bold red]error:[/] the mesh could not start: {type(exc).__name__}: {exc}")
        raise typer.Exit(1)
    finally:
        mesh.stop()
        _state_file(settings).unlink(missing_ok=True)
        lock.close()
        console.print("mesh stopped")


def _supervise(mesh: MeshProcesses) -> None:
    """Start again whatever died: NATS first (every replica reconnects to it), then replicas."""
    if mesh.nats_server is not None and not mesh.nats_server.alive:
        err.print(f"[yellow]nats-server exited ({mesh.nats_server.process.returncode}); restarting[/]")
        mesh.restart_nats()
    for replica in list(mesh.replicas):
        if not replica.alive:
            err.print(f"[yellow]{replica.service}-{replica.index} exited ({replica.process.returncode}); restarting[/]")
            mesh.replicas.remove(replica)
            mesh.spawn(replica.service)


def _lock_state_dir(settings: Settings):
    """One `baton up` per state folder: a second would share its NATS store and files."""
    import fcntl

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    path = settings.state_dir / "baton-up.lock"
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when this process ends
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        _fail(f"another `baton up` (pid {holder}) is running on the state folder {settings.state_dir}; stop it first, or give this one its own folder with BATON_STATE_DIR")
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _check_ready_to_start(settings: Settings) -> None:
    try:
        load_config(settings.config)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if not (settings.index_dir / "manifest.json").exists():
        _fail(f"no retrieval index in {settings.index_dir}: run `baton ingest {SAMPLE_CORPUS.relative_to(Path.cwd()) if SAMPLE_CORPUS.is_relative_to(Path.cwd()) else SAMPLE_CORPUS}` first", 2)


@app.command()
def ask(
    prompt: str = typer.Argument(..., help="the question"),
    route: Optional[str] = typer.Option(None, help="route hint: skip routing and use this route"),
    session: Optional[str] = typer.Option(None, help="session id: keep history across questions"),
    metadata: list[str] = typer.Option([], "--meta", help="metadata key=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the Reply as JSON"),
    timeout: float = typer.Option(30.0, help="seconds to wait for the reply"),
    show_trace: bool = typer.Option(False, "--trace", help="draw the request's waterfall after the answer"),
    stream: bool = typer.Option(False, "--stream", help="print the answer as it is generated"),
) -> None:
    """Publish a question onto the bus and print the answer."""
    from shared.telemetry import shutdown_tracing

    settings = _settings()
    meta = dict(item.split("=", 1) for item in metadata if "=" in item)
    fields = {"route": route, "session_id": session, "metadata": meta}
    if stream:
        reply = _run(_stream(_nats_url(settings), prompt, fields, timeout))
    else:
        reply = _run(_ask(_nats_url(settings), prompt, fields, timeout, _client_tracer(settings)))
    shutdown_tracing()  # flush the client's span before we read the trace back
    if as_json:
        print(reply.model_dump_json(indent=2))
    else:
        render.reply(console, prompt, reply)
    if show_trace:
        _show_trace(settings, reply.request_id)
    raise typer.Exit(0 if reply.ok else 3)


async def _ask(url: str, prompt: str, fields: dict, timeout: float, tracer=None):
    async with _client(url, timeout_s=timeout, tracer=tracer) as client:
        return await client.ask(prompt, **{k: v for k, v in fields.items() if v})


async def _stream(url: str, prompt: str, fields: dict, timeout: float):
    async with _client(url, timeout_s=timeout) as client:
        async for item in client.stream(prompt, **{k: v for k, v in fields.items() if v}):
            if isinstance(item, str):
                console.print(item, end="", highlight=False)
            else:
                console.print()
                return item


@app.command("trace")
def trace_command(request_id: str) -> None:
    """Draw a request's waterfall: every hop, its duration, its decision."""
    _show_trace(_settings(), request_id)


def _show_trace(settings: Settings, request_id: str, wait_s: float = 5.0) -> None:
    from services.collector.client import CollectorUnavailable, fetch_flow
    from services.collector.render import waterfall

    url = _collector_url(settings)
    deadline = time.monotonic() + wait_s
    try:
        flow = fetch_flow(url, request_id)
        while (flow is None or flow.outcome is None) and time.monotonic() < deadline:  # spans are exported in batches
            time.sleep(0.2)
            flow = fetch_flow(url, request_id)
    except CollectorUnavailable as exc:
        _fail(str(exc))
    if flow is None:
        _fail(f"the collector has no spans of request {request_id} (was tracing on when it ran?)", 4)
    console.print(waterfall(flow))


@app.command()
def stats(limit: int = typer.Option(1000, help="how many recent requests to include")) -> None:
    """Flow metrics from the collector: latency, steps, routing mix, fallbacks, gates, cost."""
    from services.collector.client import CollectorUnavailable, fetch_stats
    from services.collector.render import stats_table

    try:
        console.print(stats_table(fetch_stats(_collector_url(_settings()), limit)))
    except CollectorUnavailable as exc:
        _fail(str(exc))


@app.command()
def submit(prompt: str, route: Optional[str] = typer.Option(None)) -> None:
    """Queue a question and print its request id at once."""

    async def go() -> str:
        async with _client(_nats_url(_settings())) as client:
            return await client.submit(prompt, **({"route": route} if route else {}))

    print(_run(go()))


@app.command()
def result(request_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Fetch the stored Reply of a request."""

    async def go():
        async with _client(_nats_url(_settings())) as client:
            return await client.result(request_id)

    reply = _run(go())
    if reply is None:
        _fail(f"no result for {request_id} yet (still running, expired, or unknown)", 4)
    if as_json:
        print(reply.model_dump_json(indent=2))
    else:
        render.reply(console, None, reply)


@app.command()
def ingest(
    path: Path = typer.Argument(SAMPLE_CORPUS, help="a folder of Markdown / text files; subfolders become corpora"),
    index_dir: Optional[Path] = typer.Option(None, help="where to write the index (default: BATON_INDEX_DIR)"),
) -> None:
    """Build the BM25 retrieval index from a folder of documents."""
    from services.retriever.index import IngestError, ingest as build

    target = index_dir or _settings().index_dir
    with Progress(TextColumn("[bold blue]indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("files", total=None)
        try:
            stats = build(path, target, progress=lambda done, total: progress.update(task, completed=done, total=total))
        except IngestError as exc:
            _fail(str(exc), 2)
    corpora = ", ".join(f"{name} ({count})" for name, count in stats.corpora.items())
    console.print(f"[green]indexed[/] {stats.documents} documents into {stats.chunks} chunks in {stats.seconds:.2f}s → {target}\n  corpora: {corpora}")


@app.command()
def demo(
    questions: Path = typer.Option(SAMPLE_QUESTIONS, help="YAML list of sample questions"),
) -> None:
    """Ingest the sample corpus, start an embedded mesh, ask the sample questions, stop."""
    from baton.demo import run_demo

    try:
        ok = run_demo(_settings(), questions, console)
    except (MeshStartError, NatsServerError, ConfigError) as exc:
        _fail(str(exc), 2)
    raise typer.Exit(0 if ok else 1)


def _run(coro):
    try:
        return asyncio.run(coro)
    except BatonError as exc:
        _fail(str(exc), 3)
    except OSError as exc:
        _fail(f"cannot reach NATS ({exc}); start the mesh with `baton up` or set NATS_URL")


@app.command()
def health() -> None:
    """Circuit breakers of every model, as all replicas share them."""
    from rich.table import Table

    from shared import subjects
    from shared.breakers import Breaker

    async def go() -> dict[str, Breaker]:
        async with _client(_nats_url(_settings()), admin=True) as client:
            kv = await client.js.key_value(subjects.BREAKERS_BUCKET)
            states = {}
            for key in await _keys(kv):
                entry = await kv.get(key)
                if entry.value:
                    states[key] = Breaker(**json.loads(entry.value))
            return states

    states = _run(go())
    table = Table(title="model circuit breakers")
    for column in ("model", "state", "failures", "opened"):
        table.add_column(column)
    for model, breaker in sorted(states.items()):
        color = {"closed": "green", "open": "red", "half_open": "yellow"}[breaker.state]
        opened = time.strftime("%H:%M:%S", time.localtime(breaker.opened_at)) if breaker.opened_at else "-"
        table.add_row(model, f"[{color}]{breaker.state}[/]", str(breaker.failures), opened)
    if not states:
        console.print("[green]no breaker has tripped: every model is closed (healthy)[/]")
    else:
        console.print(table)


async def _keys(kv) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return await kv.keys()
    except NoKeysError:
        return []


eval_app = typer.Typer(help="Offline evaluations on labeled JSONL files.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("routing")
def eval_routing(
    path: Path = typer.Argument(ROOT / "tests" / "data" / "routing_eval.jsonl", help="JSONL: {prompt, route, metadata?} per line"),
    config: Optional[Path] = typer.Option(None, help="config file (default: BATON_CONFIG)"),
) -> None:
    """Route every labeled prompt with the real router; print accuracy and a confusion table."""
    from services.router.evaluate import LabeledDataError, evaluate, load_labeled, render as render_eval
    from services.router.routing import Router
    from shared.schema import Request

    try:
        items = load_labeled(path)
        router = Router(load_config(config or _settings().config))
    except (LabeledDataError, ConfigError, OSError) as exc:
        _fail(str(exc), 2)
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    console.print(render_eval(report))


@eval_app.command("guard")
def eval_guard(
    path: Path = typer.Argument(ROOT / "tests" / "data" / "guard_eval.jsonl", help="JSONL: {text, labels: [injection, pii]} per line"),
    config: Optional[Path] = typer.Option(None, help="config file whose guard section to use (default: BATON_CONFIG)"),
) -> None:
    """Precision, recall and false-positive rate of each gate on labeled examples."""
    from services.guardrail.evaluate import LabeledDataError, evaluate_guard, load_labeled, render as render_eval

    try:
        items = load_labeled(path)
        spec = load_config(config or _settings().config).guard
    except (LabeledDataError, ConfigError, OSError) as exc:
        _fail(str(exc), 2)
    console.print(render_eval(evaluate_guard(items, spec)))


@app.command()
def status() -> None:
    """Each service's consumer: replicas pulling, pending and in-flight messages, redeliveries."""
    from rich.table import Table

    from baton.processes import MESH_SERVICES
    from shared import subjects

    async def go():
        async with _client(_nats_url(_settings()), admin=True) as client:
            return [await client.js.consumer_info(subjects.STREAM, subjects.durable(s)) for s in MESH_SERVICES]

    table = Table(title="mesh status (JetStream consumers)")
    for column in ("service", "pulling", "pending", "in flight", "redelivered", "acked"):
        table.add_column(column, justify="right" if column != "service" else "left")
    for service, info in zip(MESH_SERVICES, _run(go())):
        color = "yellow" if (info.num_pending or 0) > 100 else "white"
        table.add_row(service, str(info.num_waiting or 0), f"[{color}]{info.num_pending or 0}[/]", str(info.num_ack_pending or 0), str(info.num_redelivered or 0), str(info.ack_floor.stream_seq if info.ack_floor else 0))
    console.print(table)
    console.print("[dim]pulling ≈ replicas waiting for work; pending = backlog (what KEDA scales on)[/]")


config_app = typer.Typer(help="Live configuration: validate, apply, show.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("apply")
def config_apply(path: Path) -> None:
    """Validate FILE and make it the active config of every running replica, without a restart."""
    from shared.config import parse_config
    from shared.live_config import publish_config
    from shared import subjects

    try:
        text = path.read_text()
        parse_config(text, str(path))  # refuse before touching the bus
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}", 2)
    except ConfigError as exc:
        _fail(f"{exc}\nthe running config is unchanged", 2)

    async def go():
        async with _client(_nats_url(_settings()), admin=True) as client:
            return await publish_config(await client.js.key_value(subjects.CONFIG_BUCKET), text, str(path))

    config = _run(go())
    console.print(f"[green]applied[/] config version {config.digest} ({len(config.routes)} routes: {', '.join(config.routes)})")


@config_app.command("show")
def config_show() -> None:
    """The active config version and its routes."""
    from shared import subjects
    from shared.config import parse_config
    from shared.live_config import ACTIVE

    async def go():
        async with _client(_nats_url(_settings()), admin=True) as client:
            kv = await client.js.key_value(subjects.CONFIG_BUCKET)
            return (await kv.get(ACTIVE)).value.decode()

    config = parse_config(_run(go()), "active")
    console.print(f"active config version {config.digest}")
    for name, route in config.routes.items():
        console.print(f"  [bold]{name}[/]: {' → '.join(step.name for step in route.steps)}  [dim]{route.description}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
