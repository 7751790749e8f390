"""`make run`: the whole mesh on embedded defaults, asked the sample questions."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

from baton import render
from baton.client import BatonClient, BatonError
from baton.processes import MESH_SERVICES, MeshProcesses
from shared.settings import ROOT, Settings


def run_demo(settings: Settings, questions_file: Path, console: Console) -> bool:
    questions = yaml.safe_load(questions_file.read_text())
    ensure_index(settings, ROOT / "corpus", console)
    mesh = MeshProcesses(settings)
    with tempfile.TemporaryDirectory(prefix="baton-demo-") as store:
        try:
            if "NATS_URL" not in os.environ:
                mesh.start_nats(Path(store))
            with console.status(f"starting {len(MESH_SERVICES)} services on {mesh.nats_url}..."):
                mesh.start({service: 1 for service in MESH_SERVICES})
            console.print(f"[green]mesh up[/]: {', '.join(MESH_SERVICES)} on {mesh.nats_url}\n")
            return asyncio.run(_ask_all(mesh.nats_url, questions, console))
        finally:
            mesh.stop()
            console.print("[dim]mesh stopped; nothing left running[/]")


async def _ask_all(url: str, questions: list[dict], console: Console) -> bool:
    ok = True
    latencies = []
    async with BatonClient(url, timeout_s=30) as client:
        for item in questions:
            try:
                reply = await client.ask(item["question"], **item.get("request", {}))
            except BatonError as exc:
                console.print(f"[red]{item['question']}: {exc}[/]")
                ok = False
                continue
            render.reply(console, item["question"], reply)
            ok = ok and reply.ok
            if reply.latency_ms is not None:
                latencies.append(reply.latency_ms)
    if latencies:
        console.print(f"{len(latencies)} answers; median latency {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms")
    return ok


def ensure_index(settings: Settings, corpus: Path, console: Console) -> None:
    """(Re)build the index when it is missing or older than the corpus."""
    from services.retriever.index import ingest

    manifest = settings.index_dir / "manifest.json"
    newest = max(path.stat().st_mtime for path in corpus.rglob("*.md"))
    if manifest.exists() and manifest.stat().st_mtime >= newest:
        return
    with console.status(f"indexing {corpus}..."):
        stats = ingest(corpus, settings.index_dir)
    console.print(f"[green]indexed[/] {stats.documents} documents, {stats.chunks} chunks")
