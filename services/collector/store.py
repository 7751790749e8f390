"""SQLite span store: one file (or `:memory:`), WAL, stdlib sqlite3.

Spans are keyed by (trace_id, span_id), so exporter retries and forwarded duplicates
are harmless. A small `requests` table maps baton.request_id -> trace id and first-seen
start, which is what the flow list and the request lookup need without scanning spans.

One connection shared by all callers behind a lock: the collector is a single process,
writes are tiny, and a `:memory:` database only exists on the connection that made it.

The spans table is a rowid table with a unique (trace_id, span_id) index, not a
WITHOUT ROWID table keyed on the ids: ids are random, so keying the ~500-byte rows on
them made every insert land on a different table page (the whole table rewritten into
the WAL over and over); a rowid table appends the rows and only the narrow index is
random. That is about a third of the ingest CPU. A file made by an older collector keeps
its WITHOUT ROWID layout (CREATE ... IF NOT EXISTS) and works unchanged, only slower.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .otlp import SpanRecord, SpanRow, record_of

log = logging.getLogger("baton.collector")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT,
    name TEXT NOT NULL,
    service TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    status_message TEXT NOT NULL,
    request_id TEXT,
    attributes TEXT NOT NULL,
    UNIQUE (trace_id, span_id)
);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    trace_id TEXT NOT NULL,
    started_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started_ns DESC);
"""

_WAL_CHECKPOINT_PAGES = 8000  # 4 KB pages
_WAL_LIMIT_BYTES = 2 * _WAL_CHECKPOINT_PAGES * 4096
_CHECKPOINT_SPANS = 16 * 512  # about _WAL_CHECKPOINT_PAGES of WAL with Baton's spans
_KNOWN_STARTS_MAX = 16384
_UNKNOWN = 1 << 64  # later than any start

_COLUMNS = (
    "trace_id, span_id, parent_span_id, name, service, start_ns, end_ns,"
    " status_code, kind, status_message, attributes"
)


@dataclass(frozen=True)
class RequestRef:
    """A request the store has seen: enough to fetch and stitch its trace."""

    request_id: str
    trace_id: str
    started_ns: int


class SpanStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        path = str(path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per export.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers don't block the ingest writer
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is crash-safe, just not durable to the last commit
            # Checkpoints run in the background (Checkpointer), not in the export that
            # happens to fill the WAL: a checkpoint syncs the file, and an export waiting on
            # it stalled ingest for up to a second. This bound only catches a checkpointer
            # that falls far behind.
            self._conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES * 8}")
            self._conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")  # a restarted WAL shrinks back
            self._conn.executescript(_SCHEMA)
        # request id -> a start the stored one is at or before (committed): an upper bound,
        # so an upsert from a later span can be skipped. Bounded: cleared when full.
        self._known_starts: dict[str, int] = {}
        self._checkpointer = Checkpointer(path, self._lock) if path != ":memory:" else None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            self._conn.close()

    def insert(self, rows: Sequence[SpanRow]) -> int:
        """Store one export's spans atomically; returns how many were new."""
        return self.insert_records([record_of(r) for r in rows])

    def insert_records(self, records: Sequence[SpanRecord]) -> int:
        """`insert` for spans the ingest path decoded straight to records."""
        if not records:
            return 0
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    f"INSERT OR IGNORE INTO spans ({_COLUMNS}, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    records,
                )
                inserted = self._conn.total_changes - before
                # A request's start is its earliest span seen so far; spans arrive out of order.
                # Each request comes in one export per service: skip the upserts that could
                # not lower what is stored, and let the rest write only when they do.
                known = self._known_starts
                upserts = [r for r in _earliest_per_request(records) if known.get(r[0], _UNKNOWN) > r[2]]
                self._conn.executemany(
                    "INSERT INTO requests (request_id, trace_id, started_ns) VALUES (?, ?, ?)"
                    " ON CONFLICT (request_id) DO UPDATE SET started_ns = excluded.started_ns"
                    " WHERE excluded.started_ns < requests.started_ns",
                    upserts,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if self._checkpointer is not None:
                self._checkpointer.wrote(len(records))
            if len(known) + len(upserts) > _KNOWN_STARTS_MAX:
                known.clear()
            for request_id, _, started_ns in upserts:
                known[request_id] = started_ns  # the stored start is this or earlier
        return inserted

    def spans(self, trace_id: str) -> list[SpanRow]:
        """All spans of a trace, earliest first."""
        with self._lock:
            cur = self._conn.execute(
                f"SELECT {_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id",
                (trace_id.lower(),),
            )
            return [_from_row(r) for r in cur.fetchall()]

    def spans_of_traces(self, trace_ids: Iterable[str]) -> dict[str, list[SpanRow]]:
        """Spans of many traces in one query (for lists and stats), earliest first."""
        ids = list(dict.fromkeys(t.lower() for t in trace_ids))
        out: dict[str, list[SpanRow]] = {t: [] for t in ids}
        # Chunk to stay under SQLite's bound-parameter limit.
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                cur = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM spans WHERE trace_id IN ({marks})"
                    " ORDER BY start_ns, span_id",
                    chunk,
                )
                fetched = cur.fetchall()
            for r in fetched:
                out[r[0]].append(_from_row(r))
        return out

    def trace_id_for_request(self, request_id: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT trace_id FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
        return row[0] if row else None

    def requests(self, limit: int = 50) -> list[RequestRef]:
        """The flow list: most recently started requests first."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT request_id, trace_id, started_ns FROM requests"
                " ORDER BY started_ns DESC, request_id LIMIT ?",
                (limit,),
            )
            return [RequestRef(*r) for r in cur.fetchall()]

    def span_count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM spans").fetchone()[0]


class Checkpointer:
    """Copies the WAL back into the database file from its own thread and connection.

    A PASSIVE checkpoint neither waits for nor blocks the ingest writer, and its file
    sync is off the export path. It runs once every `_CHECKPOINT_SPANS` spans written
    (about every 32 MB of WAL, not SQLite's 4 MB: each export rewrites index pages
    scattered by the random ids, and a rarer checkpoint copies each page back once
    instead of again and again), and after a second of quiet with spans pending.

    Under sustained ingest a passive checkpoint may not finish between two exports, and
    only a finished one lets the WAL start over; so when the WAL has grown past twice
    the interval, the few frames written meanwhile are copied with the writer held
    (`lock`, the store's) and the WAL restarts: its size stays bounded."""

    def __init__(self, path: str, lock: threading.Lock) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
        self._writer_lock = lock
        self._pending = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="collector-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self, spans: int) -> None:
        self._pending += spans
        if self._pending >= _CHECKPOINT_SPANS:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._pending and not self._stopping:
                self._pending = 0
                try:
                    self.checkpoint()
                except sqlite3.Error:
                    log.exception("WAL checkpoint failed (the next one retries)")

    def checkpoint(self) -> None:
        _, wal_frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if wal_frames > 2 * _WAL_CHECKPOINT_PAGES:
            with self._writer_lock:
                self._conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(10)
        self._conn.close()


def _earliest_per_request(records: Sequence[SpanRecord]) -> list[tuple[str, str, int]]:
    """(request_id, trace_id, earliest start) once per request of an export, not per span."""
    earliest: dict[str, tuple[str, str, int]] = {}
    for r in records:
        if r.request_id is None:
            continue
        seen = earliest.get(r.request_id)
        if seen is None or r.start_ns < seen[2]:
            # The first span's trace id wins, as the upsert keeps the stored one.
            earliest[r.request_id] = (r.request_id, seen[1] if seen else r.trace_id, r.start_ns)
    return list(earliest.values())


def _from_row(r: tuple[object, ...]) -> SpanRow:
    return SpanRow(
        trace_id=r[0],  # type: ignore[arg-type]
        span_id=r[1],  # type: ignore[arg-type]
        parent_span_id=r[2],  # type: ignore[arg-type]
        name=r[3],  # type: ignore[arg-type]
        service=r[4],  # type: ignore[arg-type]
        start_ns=r[5],  # type: ignore[arg-type]
        end_ns=r[6],  # type: ignore[arg-type]
        status_code=r[7],  # type: ignore[arg-type]
        kind=r[8],  # type: ignore[arg-type]
        status_message=r[9],  # type: ignore[arg-type]
        attributes=json.loads(r[10]),  # type: ignore[arg-type]
    )
