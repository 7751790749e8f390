"""How a Reply looks in the terminal."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared.schema import Reply


def reply(console: Console, question: str | None, reply: Reply, answer_shown: bool = False) -> None:
    """The Reply in a panel; `answer_shown`: the answer was streamed already, show the rest only."""
    title = Text(question or reply.request_id, style="bold")
    if reply.ok:
        body = Text("" if answer_shown else reply.answer or "")
        if reply.citations:
            body.append("sources: " if answer_shown else "\n\nsources: ", style="dim")
            body.append(", ".join(f"[{c.index}] {c.source}" for c in reply.citations), style="cyan")
        style = "yellow" if reply.degraded else "green"
    else:
        body = Text(f"{reply.error.code.value}: {reply.error.message}", style="red")
        style = "red"
    console.print(Panel(Group(body, Text(""), summary(reply)), title=title, title_align="left", border_style=style))


def summary(reply: Reply) -> Table:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    flags = [flag for flag, on in (("cached", reply.cached), ("degraded", reply.degraded), ("fallbacks: " + ", ".join(reply.fallbacks), bool(reply.fallbacks))) if on]
    facts.add_row("route", f"{reply.route or '-'}" + (f"  [yellow]{' '.join(flags)}[/]" if flags else ""))
    facts.add_row("model", ", ".join(reply.models) or "-")
    gates = [e.data for e in reply.events if e.kind == "gate"]
    if gates:
        facts.add_row("gates", "  ".join(_gate(g) for g in gates))
    facts.add_row("cost", f"${reply.cost_usd:.6f}  ({reply.usage.input_tokens} in / {reply.usage.output_tokens} out tokens{', estimated' if reply.usage.estimated else ''})")
    steps = "  ".join(f"{s.step} {s.duration_ms:.1f}ms" + ("" if s.outcome == "ok" else f" [red]{s.outcome}[/]") for s in reply.steps)
    facts.add_row("steps", steps or "-")
    facts.add_row("latency", f"{reply.latency_ms:.1f} ms" if reply.latency_ms is not None else "-")
    facts.add_row("request", reply.request_id + (f"  trace {reply.trace_id}" if reply.trace_id else ""))
    return facts


def _gate(data: dict) -> str:
    color = {"pass": "green", "fixed": "yellow", "fail": "red"}.get(data.get("verdict"), "white")
    shown = f"{data.get('gate')} [{color}]{data.get('verdict')}[/]"
    return shown + (f" ({data['reason']})" if data.get("verdict") != "pass" and data.get("reason") else "")
