"""Where a service's CPU goes under load: py-spy samples, grouped by library.

`py-spy record --format raw` gives collapsed stacks ("frame;frame;... count"). Each
sample is charged to the innermost frame that belongs to a known group (pydantic,
FastStream, nats-py, OpenTelemetry, ...): the library doing the work, with the
stdlib it calls (re, uuid, ...) charged to it. `inclusive` is the share of samples in
which the group appears anywhere on the stack.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Checked in order against each frame's file path; the first group that matches names the frame.
GROUPS: list[tuple[str, re.Pattern[str]]] = [
    ("pydantic", re.compile(r"/site-packages/pydantic(_core|_settings)?/")),
    ("FastStream", re.compile(r"/site-packages/(faststream|fast_depends)/")),
    ("anyio", re.compile(r"/site-packages/anyio/")),
    ("nats-py", re.compile(r"/site-packages/nats/")),
    ("OpenTelemetry (spans)", re.compile(r"/site-packages/opentelemetry/")),
    ("httpx/httpcore", re.compile(r"/site-packages/(httpx|httpcore|h11|h2)/")),
    ("prometheus metrics", re.compile(r"/site-packages/prometheus_client/")),
    ("logging", re.compile(r"/logging/")),
    ("json", re.compile(r"/json/")),
    ("bm25s/numpy", re.compile(r"/site-packages/(bm25s|numpy|scipy)/")),
    ("OpenTelemetry (spans)", re.compile(re.escape(str(ROOT)) + r"/shared/(lean_tracer|otlp_wire|span_export)\.py")),  # Baton's own tracer and exporter
    ("Baton code", re.compile(re.escape(str(ROOT)) + r"/(services|shared|baton)/")),
    ("event loop (asyncio/uvloop)", re.compile(r"/asyncio/|uvloop|/selectors\.py")),
]
# A thread parked in one of these is waiting, not working (py-spy cannot always tell).
_WAITING = re.compile(r"^(Condition\.wait|Event\.wait|Queue\.get|_worker|select|poll|wait) \(.*/(threading|queue|selectors|concurrent/futures/thread)\.py")
OTHER = "other (stdlib, ...)"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    if found.exists():
        return str(found)
    return shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path, rate: int = 200, gil_only: bool = False) -> subprocess.Popen:
    """Start sampling `pid` for `seconds` (returns the py-spy process; wait on it).

    `gil_only` samples only the thread holding the GIL: Python's own CPU, without a
    thread waiting for the GIL (after a syscall, say) counted as busy."""
    binary = available()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install -r bench/requirements.txt)")
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate), "--format", "raw", "--full-filenames", "--nonblocking", "--output", str(output), *(["--gil"] if gil_only else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _group_of(frame: str) -> str | None:
    match = _FRAME.match(frame.strip())
    where = match.group("file") if match else frame
    for name, pattern in GROUPS:
        if pattern.search(where):
            return name
    return None


def analyse(raw_file: Path, seconds: float, rate: int = 200, top: int = 12) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf_functions: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frame.strip() for frame in stack.split(";") if frame and not frame.startswith(("process ", "thread "))]
        if not frames or _WAITING.match(frames[-1]):
            continue
        total += samples
        groups = [_group_of(frame) for frame in frames]
        owner = next((group for group in reversed(groups) if group is not None), OTHER)
        self_counts[owner] += samples
        for group in set(g for g in groups if g is not None):
            inclusive[group] += samples
        leaf_functions[re.sub(r" \(/.*/(site-packages|lib/python3\.\d+)/", " (", frames[-1])] += samples
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "busy_share": round(total / (seconds * rate), 3),  # py-spy skips idle samples
        "self_share": {name: round(count / total, 3) for name, count in self_counts.most_common()},
        "inclusive_share": {name: round(count / total, 3) for name, count in inclusive.most_common()},
        "top_leaf_functions": [{"frame": frame, "share": round(count / total, 3)} for frame, count in leaf_functions.most_common(top)],
    }
