"""Rich renderers for flows and stats (the CLI prints these; nothing here does I/O)."""

from __future__ import annotations

from rich.bar import Bar
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .flows import Flow, Hop, Percentiles, Stats

BAR_WIDTH = 40

_OUTCOME_STYLE = {"answered": "green", "degraded": "yellow", "error": "red"}


def waterfall(flow: Flow, *, bar_width: int = BAR_WIDTH) -> RenderableType:
    """One row per hop, each bar placed by start offset and sized by duration on a shared axis."""
    # The axis is the whole flow; a zero-length flow still needs a non-zero scale.
    total = max(flow.latency_ms, 1e-6)
    title = Text.assemble(
        ("request ", "dim"),
        (flow.request_id or "?", "bold"),
        "  route ",
        (flow.route or "-", "cyan"),
        "  ",
        (flow.outcome or "pending", _OUTCOME_STYLE.get(flow.outcome or "", "dim")),
        f"  {flow.latency_ms:.1f} ms",
        f"  {_usd(flow.cost_usd)}" if flow.cost_usd is not None else "",
    )
    table = Table(title=title, title_justify="left")
    table.add_column("service", style="bold")
    table.add_column("step")
    table.add_column(f"0 … {flow.latency_ms:.1f} ms", width=bar_width, no_wrap=True)
    table.add_column("ms", justify="right")
    table.add_column("queued", justify="right", style="dim")
    table.add_column("decision")
    for hop in flow.hops:
        table.add_row(
            hop.service,
            hop.step,
            Bar(
                size=total,
                begin=hop.start_offset_ms,
                # A hop too short to see still gets a sliver.
                end=hop.start_offset_ms + max(hop.duration_ms, total / (bar_width * 8)),
                width=bar_width,
                color=_hop_color(hop),
            ),
            f"{hop.duration_ms:.1f}",
            "" if hop.queued_ms is None else f"{hop.queued_ms:.2f}",
            ", ".join(d.label() for d in hop.decisions),
        )
    notes = []
    if flow.error_code:
        notes.append(Text(f"error code: {flow.error_code}", style="red"))
    if flow.orphans:
        notes.append(
            Text(f"{len(flow.orphans)} orphan span(s) (parent missing): {', '.join(flow.orphans)}", style="yellow")
        )
    return Group(table, *notes) if notes else table


def stats_table(stats: Stats) -> RenderableType:
    """Overview, per-step timings, routing mix and gates, as a group of tables."""
    overview = Table(title="flows", title_justify="left", show_header=True)
    overview.add_column("metric")
    for col in ("p50", "p95", "p99", "value"):
        overview.add_column(col, justify="right")
    overview.add_row("requests", "", "", "", str(stats.count))
    overview.add_row("latency ms", *_pcts(stats.latency_ms, "{:.1f}"), "")
    overview.add_row("cost / completed", *_pcts(stats.cost_usd, "${:.6f}"), f"mean {_usd(stats.cost_mean_usd)}")
    overview.add_row("completed", "", "", "", str(stats.completed))
    overview.add_row("fallback rate", "", "", "", _rate(stats.fallback_rate, stats.fallbacks, stats.count))
    overview.add_row(
        "gate failure rate", "", "", "", _rate(stats.gate_failure_rate, stats.gate_failures, stats.gate_spans)
    )

    steps = Table(title="steps (ms)", title_justify="left")
    steps.add_column("step")
    steps.add_column("hops", justify="right")
    for col in ("dur p50", "dur p95", "dur p99", "queued p50", "queued p95", "queued p99"):
        steps.add_column(col, justify="right")
    for name, s in stats.steps.items():
        steps.add_row(name, str(s.count), *_pcts(s.duration_ms, "{:.1f}"), *_pcts(s.queued_ms, "{:.1f}"))

    routes = Table(title="routing mix", title_justify="left")
    routes.add_column("route")
    routes.add_column("count", justify="right")
    routes.add_column("share", justify="right")
    for name, r in stats.routes.items():
        routes.add_row(name, str(r.count), f"{r.share:.1%}")

    overview.add_row("cache hits", "", "", "", str(stats.cache_hits))
    overview.add_row("shadowed", "", "", "", str(stats.shadowed))
    parts: list[RenderableType] = [overview, steps, routes]
    if stats.variants:
        experiments = Table(title="experiments (A/B arms)", title_justify="left")
        experiments.add_column("route/variant")
        experiments.add_column("requests", justify="right")
        for name, n in stats.variants.items():
            experiments.add_row(name, str(n))
        parts.append(experiments)
    if stats.gates:
        gates = Table(title="gates", title_justify="left")
        gates.add_column("gate")
        gates.add_column("checks", justify="right")
        gates.add_column("failed", justify="right")
        gates.add_column("rate", justify="right")
        for name, g in stats.gates.items():
            gates.add_row(name, str(g.spans), str(g.failures), f"{g.failure_rate:.1%}")
        parts.append(gates)
    return Group(*parts)


def _hop_color(hop: Hop) -> str:
    if hop.error:
        return "red"
    if hop.step == "fallback":
        return "yellow"
    if any(d.kind == "verdict" and d.value == "fail" for d in hop.decisions):
        return "magenta"
    return "green"


def _pcts(p: Percentiles, fmt: str) -> tuple[str, str, str]:
    return tuple("-" if v is None else fmt.format(v) for v in (p.p50, p.p95, p.p99))  # type: ignore[return-value]


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _rate(rate: float | None, num: int, den: int) -> str:
    return "-" if rate is None else f"{rate:.1%} ({num}/{den})"
