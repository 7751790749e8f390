"""`baton`: run the mesh and talk to it from a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from baton import render
from baton.client import BatonClient, BatonError, InvalidRequest, Unreachable
from baton.processes import MESH_SERVICES, STOP, MeshProcesses, MeshStartError, Stopped
from shared.config import ConfigError, load_config
from shared.mesh_file import read_mesh_file, remove_mesh_file, write_mesh_file
from shared.natsd import NatsServerError, port_taken
from shared.settings import DEFAULT_NATS_PORT, ROOT, Settings, local_credentials, nats_credentials

# Exit codes, the same for every command (README "Exit codes").
OK, UNREACHABLE, BAD_INPUT, FAILED, NOT_FOUND = 0, 1, 2, 3, 4
EXIT_CODES = (
    "Exit codes: 0 done; 1 the mesh (NATS) cannot be reached; 2 bad input (arguments, request, config file); "
    "3 the request failed (an error Reply, not accepted, no reply in time); 4 not found (no stored result or trace yet)."
)

app = typer.Typer(help="Baton: an AI orchestration mesh on NATS.", epilog=EXIT_CODES, no_args_is_help=True, add_completion=False)
# Piped output (make, CI logs) gets room for the waterfall instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

SAMPLE_CORPUS = ROOT / "corpus"
SAMPLE_QUESTIONS = SAMPLE_CORPUS / "questions.yaml"


def _settings() -> Settings:
    return Settings()


def _mesh_state(settings: Settings) -> dict:
    return read_mesh_file(settings.state_dir)


def _nats_url(settings: Settings) -> str:
    """NATS_URL when set, else the URL of the mesh `baton up` started (Settings finds it)."""
    return settings.nats_url


def _client(url: str, *, admin: bool = False, **options) -> BatonClient:
    """A client as the configured NATS user (NATS_USER / NATS_PASSWORD, else the CLI's user of
    the mesh `baton up` runs here): its id is the user name, so its requests, inbox and stored
    replies are the ones that user is allowed. `admin`: the operator commands (status,
    health, config) as the local mesh's admin user, when there is one."""
    settings = _settings()
    credentials: dict[str, Any] = nats_credentials(settings)
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


def _fail(message: str, code: int = UNREACHABLE) -> None:
    # Escaped: a message quoting YAML or a list ("[1, 2]") must not be read as rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def parse_replicas(spec: str, custom: tuple[str, ...] = ()) -> dict[str, int]:
    """'generator=4,retriever=2' -> counts for every service (1 unless named); `custom`:
    the services of the steps started with --step."""
    counts = {service: 1 for service in (*MESH_SERVICES, *custom)}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        if name not in counts or not count.isdigit() or int(count) < 1:
            raise typer.BadParameter(f"{item!r}: use service=N with a service in {', '.join(counts)} and N >= 1")
        counts[name] = int(count)
    return counts


@app.command()
def up(
    replicas: str = typer.Option("", help="replicas per service, e.g. generator=4,retriever=2"),
    collector: bool = typer.Option(True, help="start the trace collector and send every span to it"),
    gateway: bool = typer.Option(True, help="start the OpenAI-compatible HTTP gateway"),
    gateway_port: int = typer.Option(8080, help="the gateway's port on 127.0.0.1"),
    nats_port: int = typer.Option(DEFAULT_NATS_PORT, help="the NATS port on 127.0.0.1 (ignored when NATS_URL is set)"),
    auth: bool = typer.Option(True, help="NATS with the generated least-privilege users and fresh passwords (credentials.json in the state folder); --no-auth: a NATS anyone on this machine may use"),
    clients: list[str] = typer.Option([], "--client", help="a client id to make a NATS user for (repeatable); the CLI's own is 'cli'"),
    steps: list[str] = typer.Option([], "--step", help="a module with your own @step (repeatable), run like `baton serve MODULE`; replicas with --replicas <its service>=N"),
) -> None:
    """Start NATS (unless NATS_URL is set), the collector and every service; Ctrl-C stops them all."""
    STOP.install()  # before anything starts: a signal at any moment stops what has started
    settings = _settings()
    step_modules = _step_modules(settings, steps)
    counts = parse_replicas(replicas, tuple(step_modules))
    _check_ready_to_start(settings)
    lock = _lock_state_dir(settings)
    own_nats = "NATS_URL" not in os.environ
    if own_nats and port_taken(nats_port):
        _fail(f"port {nats_port} is taken (another `baton up` or nats-server?): stop it, or start with --nats-port N", BAD_INPUT)
    if gateway and port_taken(gateway_port):
        _fail(f"port {gateway_port} is taken: start with --gateway-port N (or --no-gateway)", BAD_INPUT)
    mesh = MeshProcesses(settings, step_modules=step_modules)
    try:
        if own_nats:
            mesh.start_nats(settings.state_dir / "nats", port=nats_port, secure=auth, clients=tuple(clients))
        with console.status("starting the mesh..."):
            if collector:
                mesh.start_collector()
            mesh.start(counts)
            if gateway:
                mesh.start_gateway(gateway_port)
        write_mesh_file(settings.state_dir, {"nats_url": mesh.nats_url, "collector_url": mesh.collector_url, "gateway_url": mesh.gateway_url})
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
        remove_mesh_file(settings.state_dir)
        lock.close()
        console.print("mesh stopped")


def _step_modules(settings: Settings, modules: list[str]) -> dict[str, str]:
    """{service: module} for each --step module, checked now: one @step each, declared in the config."""
    from shared.config import ConfigError, load_config
    from shared.run import StartupError, step_of
    from shared.steps import config_problems

    found = {}
    try:
        config = load_config(settings.config)
        for module in modules:
            spec = step_of(module)
            service = config.custom_steps.get(spec.name)
            if service is None:
                raise StartupError(f"step {spec.name!r} ({module}) is not declared in {settings.config}: add `steps: {{{spec.name}: {{service: {spec.name}}}}}`")
            if problems := config_problems(spec, config.routes):
                raise StartupError(f"{settings.config} gives {module} parameters it refuses: " + " | ".join(problems))
            found[service] = str(Path(module).resolve()) if module.endswith(".py") else module
    except (ConfigError, StartupError) as exc:
        _fail(str(exc), BAD_INPUT)
    return found


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
        _fail(str(exc), BAD_INPUT)
    if not (settings.index_dir / "manifest.json").exists():
        _fail(f"no retrieval index in {settings.index_dir}: run `baton ingest {SAMPLE_CORPUS.relative_to(Path.cwd()) if SAMPLE_CORPUS.is_relative_to(Path.cwd()) else SAMPLE_CORPUS}` first", 2)


@app.command()
def serve(
    module: str = typer.Argument(..., help="a .py file or a module name with one @step(...) function"),
    step: Optional[str] = typer.Option(None, "--step", help="which step, when the module registers several"),
) -> None:
    """Run your own step as a service of the mesh (start it again for more replicas).

    Declare it in the config (`steps: {NAME: {service: NAME}}`) and name it in a route's steps."""
    from shared.run import serve as serve_step

    serve_step(module, step)


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
    fields = {"route": route, "session_id": session, "metadata": parse_meta(metadata)}
    streamed = None
    if stream:
        reply, streamed = _run(_stream(_nats_url(settings), prompt, fields, timeout, _client_tracer(settings), quiet=as_json))
    else:
        reply = _run(_ask(_nats_url(settings), prompt, fields, timeout, _client_tracer(settings)))
    shutdown_tracing()  # flush the client's span before we read the trace back
    if as_json:
        print(reply.model_dump_json(indent=2))
    else:
        # The streamed text is already on screen: show the answer again only when the
        # output gate changed it (e.g. redacted), since the Reply's answer is the one that counts.
        render.reply(console, prompt, reply, answer_shown=streamed is not None and streamed.strip() == (reply.answer or "").strip())
    if show_trace:
        _show_trace(settings, reply.request_id)
    raise typer.Exit(OK if reply.ok else FAILED)


def parse_meta(items: list[str]) -> dict[str, str]:
    """`--meta key=value` pairs; anything else is refused rather than dropped."""
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--meta {item!r}: use key=value, e.g. --meta risk=high", BAD_INPUT)
        meta[key.strip()] = value
    return meta


async def _ask(url: str, prompt: str, fields: dict, timeout: float, tracer=None):
    async with _client(url, timeout_s=timeout, tracer=tracer) as client:
        return await client.ask(prompt, **{k: v for k, v in fields.items() if v})


async def _stream(url: str, prompt: str, fields: dict, timeout: float, tracer=None, quiet: bool = False):
    """The final Reply and the text streamed before it (printed as it came unless quiet)."""
    import contextlib

    pieces = []
    async with _client(url, timeout_s=timeout, tracer=tracer) as client:
        # Closed before the client drains: its subscription ends while the connection is up.
        async with contextlib.aclosing(client.stream(prompt, **{k: v for k, v in fields.items() if v})) as items:
            async for item in items:
                if isinstance(item, str):
                    pieces.append(item)
                    if not quiet:
                        console.print(item, end="", markup=False, highlight=False)
                else:
                    if pieces and not quiet:
                        console.print()
                    return item, "".join(pieces)


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
        _fail(f"the collector has no spans of request {request_id} (was tracing on when it ran?)", NOT_FOUND)
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

    from shared.telemetry import shutdown_tracing

    settings = _settings()

    async def go() -> str:
        async with _client(_nats_url(settings), tracer=_client_tracer(settings)) as client:
            return await client.submit(prompt, **({"route": route} if route else {}))

    print(_run(go()))
    shutdown_tracing()  # the publish span is this request's root: send it before exiting


@app.command()
def result(request_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Fetch the stored Reply of a request."""

    async def go():
        async with _client(_nats_url(_settings())) as client:
            return await client.result(request_id)

    reply = _run(go())
    if reply is None:
        _fail(f"no result for {request_id} yet (still running, expired, or asked by another client id: set BATON_CLIENT_ID)", NOT_FOUND)
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
    except Unreachable as exc:
        _fail(str(exc), UNREACHABLE)
    except InvalidRequest as exc:
        _fail(str(exc), BAD_INPUT)
    except BatonError as exc:
        _fail(str(exc), FAILED)
    except OSError as exc:
        _fail(f"cannot reach NATS ({exc}); start the mesh with `baton up` or set NATS_URL", UNREACHABLE)


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
    paths: Optional[list[Path]] = typer.Argument(None, help="JSONL: {prompt, route, metadata?, source?} per line (default: the team's, fresh and blind sets)"),
    config: Optional[Path] = typer.Option(None, help="config file (default: BATON_CONFIG)"),
    split: str = typer.Option("held-out", help="held-out (default): the frozen 30 % of every set the router never learns from; dev: the part that "
                              "becomes route examples; all: both"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Route every labeled prompt with the real router: accuracy per source, per-route recall, confusion.

    The dev part of every set in tests/data is among the routes' examples, so only the held-out
    part measures the router; its misroutes are not listed, so that nobody tunes on them."""
    from services.router.evaluate import DEFAULT_SETS, SPLITS, LabeledDataError, evaluate, in_split, load_labeled, render as render_eval
    from services.router.routing import Router
    from shared.schema import Request

    if split not in SPLITS:
        _fail(f"--split must be one of {', '.join(SPLITS)}, not {split!r}", 2)
    try:
        items = in_split([item for path in (paths or DEFAULT_SETS) for item in load_labeled(path)], split)
        router = Router(load_config(config or _settings().config))
    except (LabeledDataError, ConfigError, OSError) as exc:
        _fail(str(exc), 2)
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    if as_json:
        figures = report.as_dict()
        if split == "held-out":  # counted, not shown
            figures["misrouted"] = len(figures["misrouted"])
        typer.echo(json.dumps(figures, indent=2))
    else:
        console.print(render_eval(report, max_misrouted=0 if split == "held-out" else 15))


@eval_app.command("guard")
def eval_guard(
    path: Path = typer.Argument(ROOT / "tests" / "data" / "guard_eval.jsonl", help="JSONL: {text, labels: [injection, pii]} per line"),
    config: Optional[Path] = typer.Option(None, help="config file whose guard section to use (default: BATON_CONFIG)"),
    loso: bool = typer.Option(False, "--loso", help="leave-one-source-out on the injection corpus instead (tests/data/injection_corpus.jsonl)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Precision, recall and false-positive rate of each gate; with --loso, injection recall and
    false-positive rate per left-out source of the public corpus, worst fold first in the summary."""
    from services.guardrail.evaluate import (CORPUS, LabeledDataError, evaluate_guard, leave_one_source_out, load_corpus,
                                             load_labeled, render as render_eval, render_loso)

    report: Any  # a GuardReport, or a LosoReport with --loso
    try:
        spec = load_config(config or _settings().config).guard
        if loso:
            report = leave_one_source_out(load_corpus(CORPUS if path.name == "guard_eval.jsonl" else path), spec)
        else:
            report = evaluate_guard(load_labeled(path), spec)
    except (LabeledDataError, ConfigError, OSError) as exc:
        _fail(str(exc), 2)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(render_loso(report) if loso else render_eval(report))


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
        table.add_row(service, str(info.num_waiting or 0), f"[{color}]{info.num_pending or 0}[/]", str(info.num_ack_pending or 0), str(info.num_redelivered or 0), str(acked_count(info)))
    console.print(table)
    console.print("[dim]pulling ≈ replicas waiting for work; pending = backlog (what KEDA scales on); acked = deliveries this consumer acknowledged[/]")


def acked_count(info) -> int:
    """How many deliveries the consumer has acknowledged: its own sequence, not the stream's
    (the stream's counts every service's messages)."""
    return info.ack_floor.consumer_seq if info.ack_floor and info.ack_floor.consumer_seq else 0


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
    main()  # typer exits with the command's code itself
