"""Load drivers, statistics and /proc accounting shared by every benchmark.

Every loop here is bounded twice: by a request count and by a wall-clock deadline.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

Call = Callable[[int], Awaitable[bool]]  # one request, given its sequence number; True when correct


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(latencies_s: list[float]) -> dict[str, float]:
    ms = [value * 1000 for value in latencies_s]
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
    }


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    mode: str  # "sequential" or "concurrent"
    concurrency: int
    completed: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    first_error: str | None = None
    cpu: dict[str, Any] = field(default_factory=dict)
    rounds_rps: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "completed": self.completed,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_rps": round(self.throughput, 1),
            "latency": summarize(self.latencies_s),
            "first_error": self.first_error,
            "rounds_rps": self.rounds_rps,
            "cpu": self.cpu,
        }


def merge(results: list[LoadResult]) -> LoadResult:
    """Several rounds of the same phase as one: pooled latencies, summed counts, time and CPU."""
    out = LoadResult(results[0].mode, results[0].concurrency)
    cpu_s: dict[str, float] = {}
    wall = busy = 0.0
    for result in results:
        out.completed += result.completed
        out.errors += result.errors
        out.elapsed_s += result.elapsed_s
        out.latencies_s += result.latencies_s
        out.first_error = out.first_error or result.first_error
        out.rounds_rps.append(round(result.throughput, 1))
        wall += result.cpu.get("wall_s", 0.0)
        busy += result.cpu.get("machine_busy_s", 0.0)
        for name, value in result.cpu.get("cpu_s", {}).items():
            cpu_s[name] = round(cpu_s.get(name, 0.0) + value, 3)
    out.cpu = _cpu_summary(cpu_s, wall, busy, out.completed)
    return out


def _cpu_summary(cpu_s: dict[str, float], wall: float, busy: float, requests: int) -> dict[str, Any]:
    ours = sum(cpu_s.values())
    out: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "cpu_s": cpu_s,
        "machine_busy_s": round(busy, 3),
        # CPU used by processes this run did not start (other engineers' tests, ...).
        "foreign_cpu_share": round(max(0.0, busy - ours) / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None,
    }
    if requests:
        out["cpu_ms_per_request"] = {name: round(value * 1000 / requests, 3) for name, value in cpu_s.items()}
    return out


async def _one(call: Call, index: int, result: LoadResult) -> None:
    started = time.perf_counter()
    try:
        ok = await call(index)
    except Exception as exc:  # a failed request is counted, never fatal to the run
        ok = False
        if result.first_error is None:
            result.first_error = f"{type(exc).__name__}: {exc}"[:300]
    if ok:
        result.latencies_s.append(time.perf_counter() - started)
        result.completed += 1
    else:
        result.errors += 1
        if result.first_error is None:
            result.first_error = "an answer that failed its check"


async def sequential(call: Call, count: int, max_s: float, tick: Callable[[], None] | None = None) -> LoadResult:
    """`count` requests one after another (stops early at `max_s`)."""
    result = LoadResult("sequential", 1)
    started = time.perf_counter()
    deadline = started + max_s
    for index in range(count):
        if time.perf_counter() > deadline:
            break
        await _one(call, index, result)
        if tick:
            tick()
    result.elapsed_s = time.perf_counter() - started
    return result


async def concurrent(call: Call, concurrency: int, duration_s: float, max_count: int, tick: Callable[[], None] | None = None) -> LoadResult:
    """Closed loop: `concurrency` workers send back to back for `duration_s` (or `max_count` requests)."""
    result = LoadResult("concurrent", concurrency)
    counter = iter(range(max_count))
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker() -> None:
        for index in counter:
            if time.perf_counter() > deadline:
                return
            await _one(call, index, result)
            if tick:
                tick()

    # A stuck request cannot hold the run: every call has its own timeout, and this caps the rest.
    gathered = asyncio.gather(*(worker() for _ in range(concurrency)))
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # an interrupted run is not an error to log
    try:
        await asyncio.wait_for(gathered, duration_s + 60)
    except TimeoutError:
        result.first_error = result.first_error or "the load phase overran its time cap"
    result.elapsed_s = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- /proc accounting


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads, not its children), in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    """All descendants of `pid` (for process trees such as a proxy with workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def system_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuMeter:
    """CPU seconds of named groups of processes over a phase, and what the rest of the machine used."""

    def __init__(self, groups: dict[str, Iterable[int]]):
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.groups.setdefault("bench client", [os.getpid()])
        self._start: dict[int, float] = {}
        self._sys_start = (0.0, 0.0)
        self._wall = 0.0

    def _sample(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) or 0.0 for pids in self.groups.values() for pid in pids}

    def start(self) -> CpuMeter:
        self._start = self._sample()
        self._sys_start = system_busy_seconds()
        self._wall = time.perf_counter()
        return self

    def stop(self, requests: int) -> dict[str, Any]:
        end = self._sample()
        busy_end, _ = system_busy_seconds()
        wall = time.perf_counter() - self._wall
        per_group = {name: round(sum(end.get(pid, 0.0) - self._start.get(pid, 0.0) for pid in pids), 3) for name, pids in self.groups.items()}
        return _cpu_summary(per_group, wall, busy_end - self._sys_start[0], requests)
