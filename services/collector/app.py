"""The collector's HTTP face: OTLP/HTTP trace ingest plus a small JSON API over flows.

Endpoints:
  POST /v1/traces                 OTLP/HTTP, protobuf or JSON, optionally gzip/deflate
  GET  /api/flows?limit=N         most recent flows (summaries), newest first
  GET  /api/flows/{request_id}    one stitched flow with its hops (404 if unknown)
  GET  /api/traces/{trace_id}     the raw stored spans of a trace (404 if unknown)
  GET  /api/stats?limit=N         aggregate stats over the N most recent flows
  GET  /healthz                   liveness, span count, forwarder counters

Environment (read by main() only; create_app takes explicit arguments):
  BATON_COLLECTOR_HOST     bind address, default 127.0.0.1
  BATON_COLLECTOR_PORT     default 4318 (the standard OTLP/HTTP port)
  BATON_COLLECTOR_DB       SQLite file, default .baton/collector.sqlite3 (relative to cwd)
  BATON_COLLECTOR_FORWARD  OTLP/HTTP base URL to copy every accepted export to, e.g. http://jaeger:4318
  BATON_COLLECTOR_FORWARD_QUEUE  forward queue bound, default 1000 bodies
  BATON_COLLECTOR_ACCESS_LOG  1: log every HTTP request (off: only refused exports are logged)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.run import settle_memory

from .flows import Flow, flow_stats, stitch
from .forward import Forwarder
from .otlp import OTLPDecodeError, decode_records, is_json, is_protobuf, response_body
from .store import SpanStore

log = logging.getLogger("baton.collector")

DEFAULT_DB = Path(".baton") / "collector.sqlite3"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # after decompression; bounds memory and gzip bombs
DEFAULT_FLOW_LIMIT = 50
DEFAULT_STATS_LIMIT = 1000
MAX_LIMIT = 10_000

# google.rpc.Code values used in OTLP error Status bodies.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_UNAVAILABLE = 14

try:  # the OTLP spec's error body; googleapis-common-protos comes with the OTLP exporters
    from google.rpc.status_pb2 import Status as _Status
except ImportError:  # pragma: no cover - fall back to JSON errors only
    _Status = None


class _BadBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    db_path: str | Path = DEFAULT_DB,
    forward_url: str | None = None,
    *,
    forward_queue_size: int = 1000,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """Build the collector app. `db_path` may be ":memory:" (tests)."""
    store = SpanStore(db_path)
    forwarder = Forwarder(forward_url, max_queue=forward_queue_size) if forward_url else None

    async def export_traces(request: Request) -> Response:
        ctype = request.headers.get("content-type")
        if not (is_protobuf(ctype) or is_json(ctype)):
            return _error(
                415,
                f"unsupported content type {ctype!r}; use application/x-protobuf or application/json",
                ctype,
            )
        encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
        try:
            raw = await _read_body(request, max_body_bytes)
            body = _decompress(raw, encoding, max_body_bytes)
        except _BadBody as exc:
            return _error(exc.status, str(exc), ctype)
        try:
            records = decode_records(body, ctype)
        except OTLPDecodeError as exc:
            return _error(400, str(exc), ctype)
        except Exception as exc:  # a decoder edge case is still the sender's bad data, not a 500
            log.exception("unexpected error decoding an OTLP export")
            return _error(400, f"malformed OTLP export: {exc}", ctype)
        try:
            await run_in_threadpool(store.insert_records, records)
        except Exception:
            log.exception("storing %d spans failed", len(records))
            # 503 is retryable per OTLP/HTTP, so the exporter will resend the batch.
            return _error(503, "span store unavailable", ctype, code=_UNAVAILABLE)
        if forwarder is not None:
            headers = {"content-type": ctype or ""}
            if encoding != "identity":
                headers["content-encoding"] = request.headers["content-encoding"]
            forwarder.submit(raw, headers)
        content, media_type = response_body(ctype)
        return Response(content, media_type=media_type)

    async def list_flows(request: Request) -> Response:
        limit = _limit(request, DEFAULT_FLOW_LIMIT)
        if isinstance(limit, Response):
            return limit
        flows = await run_in_threadpool(_recent_flows, store, limit)
        return JSONResponse([f.summary() for f in flows])

    async def get_flow(request: Request) -> Response:
        request_id = request.path_params["request_id"]
        trace_id = await run_in_threadpool(store.trace_id_for_request, request_id)
        spans = await run_in_threadpool(store.spans, trace_id) if trace_id else []
        if not spans:
            return JSONResponse({"error": f"unknown request {request_id!r}"}, status_code=404)
        return JSONResponse(stitch(spans).to_dict())

    async def get_trace(request: Request) -> Response:
        trace_id = request.path_params["trace_id"].lower()
        spans = await run_in_threadpool(store.spans, trace_id)
        if not spans:
            return JSONResponse({"error": f"unknown trace {trace_id!r}"}, status_code=404)
        return JSONResponse(
            {
                "trace_id": trace_id,
                "spans": [s.to_dict() for s in spans],
                "orphans": list(stitch(spans).orphans),
            }
        )

    async def get_stats(request: Request) -> Response:
        limit = _limit(request, DEFAULT_STATS_LIMIT)
        if isinstance(limit, Response):
            return limit
        flows = await run_in_threadpool(_recent_flows, store, limit)
        return JSONResponse(flow_stats(flows).to_dict())

    async def healthz(request: Request) -> Response:
        spans = await run_in_threadpool(store.span_count)
        return JSONResponse(
            {
                "status": "ok",
                "spans": spans,
                "forward": forwarder.stats() if forwarder else None,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if forwarder is not None:
            await forwarder.start()
        await settle_memory()
        try:
            yield
        finally:
            if forwarder is not None:
                await forwarder.stop()
            store.close()

    app = Starlette(
        routes=[
            Route("/v1/traces", export_traces, methods=["POST"]),
            Route("/api/flows", list_flows, methods=["GET"]),
            Route("/api/flows/{request_id}", get_flow, methods=["GET"]),
            Route("/api/traces/{trace_id}", get_trace, methods=["GET"]),
            Route("/api/stats", get_stats, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.forwarder = forwarder
    return app


def _recent_flows(store: SpanStore, limit: int) -> list[Flow]:
    refs = store.requests(limit)
    by_trace = store.spans_of_traces(r.trace_id for r in refs)
    return [stitch(by_trace[r.trace_id]) for r in refs if by_trace.get(r.trace_id)]


def _limit(request: Request, default: int) -> int | Response:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        return JSONResponse({"error": f"limit must be an integer in 1..{MAX_LIMIT}"}, status_code=400)
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _BadBody(413, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadBody(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("identity", ""):
        return raw
    if encoding in ("gzip", "x-gzip"):
        return _inflate(raw, 16 + zlib.MAX_WBITS, limit, "gzip")
    if encoding == "deflate":
        # HTTP "deflate" is zlib-wrapped, but some clients send raw deflate; accept both.
        try:
            return _inflate(raw, zlib.MAX_WBITS, limit, "deflate")
        except _BadBody as exc:
            if exc.status == 413:
                raise
            return _inflate(raw, -zlib.MAX_WBITS, limit, "deflate")
    raise _BadBody(415, f"unsupported content encoding {encoding!r}; use gzip, deflate or none")


def _inflate(raw: bytes, wbits: int, limit: int, name: str) -> bytes:
    """Decompress with an output cap, across concatenated gzip members."""
    out = bytearray()
    data = raw
    try:
        while data:
            d = zlib.decompressobj(wbits)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise _BadBody(413, f"decompressed body larger than {limit} bytes")
            if not d.eof:
                raise _BadBody(400, f"truncated {name} body")
            data = d.unused_data if wbits > 16 else b""
    except zlib.error as exc:
        raise _BadBody(400, f"body is not valid {name}: {exc}") from exc
    return bytes(out)


def _error(status: int, message: str, ctype: str | None, code: int | None = None) -> Response:
    """OTLP/HTTP error: a google.rpc.Status in the request's encoding (JSON if unknown)."""
    log.warning("refused an export (%d): %s", status, message)
    if code is None:
        code = _RESOURCE_EXHAUSTED if status == 413 else _INVALID_ARGUMENT
    if is_protobuf(ctype) and _Status is not None:
        body = _Status(code=code, message=message).SerializeToString()
        return Response(body, status_code=status, media_type="application/x-protobuf")
    return Response(
        json.dumps({"code": code, "message": message}),
        status_code=status,
        media_type="application/json",
    )


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = os.environ.get("BATON_COLLECTOR_HOST", "127.0.0.1")
    port = int(os.environ.get("BATON_COLLECTOR_PORT", "4318"))
    db_path = os.environ.get("BATON_COLLECTOR_DB") or str(DEFAULT_DB)
    forward = os.environ.get("BATON_COLLECTOR_FORWARD") or None
    queue = int(os.environ.get("BATON_COLLECTOR_FORWARD_QUEUE", "1000"))
    # Every service posts a batch every 200 ms: a log line per POST is noise (and ~1.5 % of
    # the collector's CPU). Refused exports are logged by the app itself; set 1 to see all.
    access_log = os.environ.get("BATON_COLLECTOR_ACCESS_LOG", "") in ("1", "true")
    app = create_app(db_path, forward, forward_queue_size=queue)
    log.info("collector on http://%s:%d, db %s, forward %s", host, port, db_path, forward or "off")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)


if __name__ == "__main__":
    main()
