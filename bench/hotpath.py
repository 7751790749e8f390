"""The tuning loop: Baton alone on the bench route, in about a minute.

    python -m bench.hotpath                          # tracing on, 64 in flight
    python -m bench.hotpath --tracing off --concurrency 16 --seconds 10
    python -m bench.hotpath --profile generator      # + py-spy shares for that service

`make bench` is the record (every system side by side, in rounds); this is the quick
before/after for one change to the hot path: sequential p50, closed-loop req/s, and
CPU per request for every process, from one mesh started the way `make bench` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from statistics import median

from rich.console import Console

from bench import profile
from bench.baton_bench import BatonLoad, BatonMesh, env_without_otel
from bench.load import CpuMeter, concurrent, sequential, summarize
from bench.run import Stub
from shared.settings import ROOT


def inclusive_functions(raw: Path, top: int) -> list[tuple[str, float]]:
    """The functions on the most sampled stacks (inclusive): where to look next."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            counts[re.sub(r"\(/.*/(site-packages|lib/python3\.\d+|main)/", "(", frame.strip())] += int(count)
    return [(frame, n / total) for frame, n in counts.most_common(top)] if total else []


def write_calls(groups: dict[str, list[int]]) -> dict[str, int]:
    """Write syscalls so far per group (/proc/<pid>/io syscw): each one a trip through the kernel."""
    out = {}
    for name, pids in groups.items():
        total = 0
        for pid in pids:
            try:
                fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                total += int(fields["syscw"])
            except (OSError, KeyError, ValueError):
                pass
        out[name] = total
    return out


def print_steps(console: Console, replies: list) -> None:
    """Where a request's time went, from the Replies' own step records."""
    steps: dict[str, list[tuple[float, float]]] = {}
    for reply, _ in replies:
        for step in reply.steps:
            steps.setdefault(step.step, []).append((step.queued_ms or 0.0, step.duration_ms))
    console.print("  per step (p50 queued / work): " + ", ".join(f"{name} {median(q for q, _ in v):.2f}/{median(w for _, w in v):.2f} ms" for name, v in steps.items()))
    console.print(f"  router envelope -> reply (Reply.latency_ms) p50 {median(r.latency_ms or 0 for r, _ in replies):.2f} ms")


async def main(args: argparse.Namespace) -> None:
    console = Console()
    env_without_otel()
    workdir = Path(tempfile.mkdtemp(prefix="baton-hotpath-"))
    stub = Stub().start()
    mesh = BatonMesh(workdir, workdir / "index", stub.base_url, args.tracing == "on", extra_env=dict(kv.split("=", 1) for kv in args.baton_env))
    try:
        from services.retriever.index import ingest

        await asyncio.to_thread(ingest, ROOT / "corpus", workdir / "index")
        await asyncio.to_thread(mesh.start)
        async with BatonLoad(mesh.url) as load:
            warm = await sequential(load.call, 30, 30)
            if warm.errors:
                raise SystemExit(f"warm-up failed: {load.bad or warm.first_error}")
            await concurrent(load.call, args.concurrency, 2, 10_000)
            load.replies = []
            seq = await sequential(load.call, args.sequential, 30)
            replies, load.replies = load.replies, None
            spy = None
            if args.profile:
                raw = workdir / f"{args.profile}.raw.txt"
                spy = profile.record(mesh.pids_by_service()[args.profile][0], args.seconds, raw, gil_only=args.gil)
                await asyncio.sleep(0.3)
            meter = CpuMeter(mesh.cpu_groups(stub.pid)).start()
            writes_before = write_calls(mesh.cpu_groups(stub.pid))
            load.replies = []
            result = await concurrent(load.call, args.concurrency, args.seconds, 200_000)
            cpu = meter.stop(result.completed)
            loaded, load.replies = load.replies, None
            writes = {name: (n - writes_before.get(name, 0)) / max(1, result.completed) for name, n in write_calls(mesh.cpu_groups(stub.pid)).items()}
            if spy is not None:
                await asyncio.to_thread(spy.communicate, None, args.seconds + 30)
        one = summarize(seq.latencies_s)
        console.print(f"[bold]tracing {args.tracing}[/]  sequential p50 [cyan]{one['p50_ms']:.2f} ms[/] p99 {one['p99_ms']:.2f} ms")
        print_steps(console, replies)
        many = summarize(result.latencies_s)
        console.print(f"[bold]{args.concurrency} in flight[/]: [green]{result.throughput:.0f} req/s[/] p50 {many['p50_ms']:.1f} ms, errors {result.errors} {load.bad[:1] or ''}")
        per = cpu["cpu_ms_per_request"]
        print_steps(console, loaded)
        console.print("CPU ms/request: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + f"  [bold]total {sum(per.values()):.2f}[/]")
        console.print("write syscalls/request: " + ", ".join(f"{k} {v:.1f}" for k, v in writes.items()))
        console.print("RSS after the load, MB: " + ", ".join(f"{k} {v:.0f}" for k, v in mesh.rss().items()))
        if spy is not None:
            shares = profile.analyse(raw, args.seconds, top=25)
            for group, share in list(shares.get("self_share", {}).items())[:10]:
                console.print(f"  {group:<32} {share * 100:5.1f}%")
            console.print("  [bold]inclusive[/]")
            for frame, share in inclusive_functions(raw, 30):
                console.print(f"    {share * 100:5.1f}%  {frame}")
            console.print("  [bold]self[/]")
            for leaf in shares.get("top_leaf_functions", []):
                console.print(f"    {leaf['share'] * 100:5.1f}%  {leaf['frame']}")
    finally:
        await asyncio.to_thread(mesh.stop)
        stub.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracing", choices=("on", "off"), default="on")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--profile", metavar="SERVICE", help="sample this service with py-spy during the load")
    parser.add_argument("--gil", action="store_true", help="with --profile: sample only the thread holding the GIL")
    parser.add_argument("--baton-env", action="append", default=[], metavar="KEY=VALUE")
    asyncio.run(main(parser.parse_args()))
