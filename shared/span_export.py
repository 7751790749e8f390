"""The span exporter every service uses: OTLP/HTTP protobuf, lean.

Same spans on the wire as the SDK's OTLPSpanExporter (the bytes come from
`shared.otlp_wire`, equal to the SDK encoder's), posted over one kept-alive
`http.client` connection instead of a `requests` session (about 1 ms less CPU per
export). It reads the same variables for what it does: the endpoint
(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as given, else OTEL_EXPORTER_OTLP_ENDPOINT +
/v1/traces), headers, timeout (seconds, as the Python SDK reads it) and compression
(none, gzip, deflate), each traces-specific variable before the general one; and it
retries as that exporter does (429, 502, 503, 504 and a dropped connection, with
exponential backoff or Retry-After, within the timeout).

`standard_exporter_reason()` names what only the standard exporter does (TLS
certificates and client keys, a credential provider, an https or gRPC endpoint, or
BATON_TRACE_EXPORTER=otlp); shared/telemetry.py then uses the standard one.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.util.re import parse_env_headers

from shared.otlp_wire import encode_spans

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://localhost:4318"
DEFAULT_TIMEOUT_S = 10.0
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 6  # as the SDK's exporter
_JITTER = 0.2
_CONNECTION_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timed out, closed by the server

# Settings the lean exporter does not implement: their presence selects the SDK's exporter.
_STANDARD_ONLY = (
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


@dataclass(frozen=True)
class ExportTarget:
    """Where and how spans are posted, from the OTEL_EXPORTER_OTLP_* variables."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: str = "none"  # "none" | "gzip" | "deflate"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ExportTarget:
        def setting(name: str) -> str:
            return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or ""

        url = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or f"{(environ.get('OTEL_EXPORTER_OTLP_ENDPOINT') or DEFAULT_ENDPOINT).removesuffix('/')}/v1/traces"
        compression = setting("COMPRESSION").strip().lower() or "none"
        if compression not in ("none", "gzip", "deflate"):
            log.warning("Unsupported compression type: %s", compression)
            compression = "none"
        raw_timeout = setting("TIMEOUT")
        try:
            timeout_s = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT_S
        except ValueError:
            log.warning("Invalid timeout value %r, using default of %s seconds", raw_timeout, DEFAULT_TIMEOUT_S)
            timeout_s = DEFAULT_TIMEOUT_S
        return cls(url, dict(parse_env_headers(setting("HEADERS"), liberal=True)), timeout_s, compression)


def standard_exporter_reason(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the SDK's own exporter must export instead of the lean one; None when it need not."""
    if environ.get("BATON_TRACE_EXPORTER", "").strip().lower() == "otlp":
        return "BATON_TRACE_EXPORTER=otlp"
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol.strip().lower() != "http/protobuf":
        return f"OTLP protocol {protocol}"
    for name in _STANDARD_ONLY:
        if environ.get(name):
            return name
    scheme = urlsplit(ExportTarget.from_environment(environ).url).scheme
    if scheme != "http":
        return f"a {scheme or 'schemeless'} endpoint"
    return None


class LeanSpanExporter(SpanExporter):
    """OTLP/HTTP protobuf exporter: hand-written bodies, one kept-alive connection.

    Called from the BatchSpanProcessor's worker thread only (it serializes exports)."""

    def __init__(self, target: ExportTarget | None = None) -> None:
        self.target = target or ExportTarget.from_environment()
        parts = urlsplit(self.target.url)
        self._host, self._port = parts.hostname or "localhost", parts.port or 80
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Lower-case names, as the SDK's exporter keeps them: a configured header replaces a default.
        self._headers = {"content-type": "application/x-protobuf", "user-agent": "baton-otlp-exporter",
                         **{name.lower(): value for name, value in self.target.headers.items()}}
        if self.target.compression != "none":
            self._headers.setdefault("content-encoding", self.target.compression)
        self._connection: http.client.HTTPConnection | None = None
        self._pid = os.getpid()  # a forked child opens its own connection
        self._stopping = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopping.is_set():
            log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        try:
            body = self._compress(encode_spans(spans))
        except Exception as error:
            log.error("Failed to encode span batch: %s", error)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if self._post(body) else SpanExportResult.FAILURE

    def _compress(self, body: bytes) -> bytes:
        if self.target.compression == "gzip":
            return gzip.compress(body, mtime=0)
        if self.target.compression == "deflate":
            return zlib.compress(body)
        return body

    def _post(self, body: bytes) -> bool:
        """POST with the SDK exporter's retries: True once the endpoint took the batch."""
        deadline = time.monotonic() + self.target.timeout_s
        for attempt in range(_MAX_ATTEMPTS):
            backoff = 2**attempt * random.uniform(1 - _JITTER, 1 + _JITTER)
            try:
                status, reason, retry_after = self._send(body, deadline)
            except _CONNECTION_ERRORS as error:
                status, reason, retry_after = None, f"{type(error).__name__}: {error}", None
            if status is not None and 200 <= status < 400:
                return True
            if status is not None and status not in _RETRYABLE:
                log.error("Failed to export spans batch code: %s, reason: %s", status, reason)
                return False
            if retry_after is not None:
                backoff = retry_after
            if attempt + 1 == _MAX_ATTEMPTS or backoff > deadline - time.monotonic() or self._stopping.is_set():
                log.error("Failed to export spans batch due to timeout, max retries or shutdown (last: %s %s).", status or "", reason)
                return False
            log.warning("Transient error %s encountered while exporting spans batch, retrying in %.2fs.", reason, backoff)
            if self._stopping.wait(backoff):
                return False
        return False

    def _send(self, body: bytes, deadline: float) -> tuple[int, str, float | None]:
        """One POST; a kept-alive connection the server has closed meanwhile is reopened once at once."""
        if self._pid != os.getpid():
            self._connection, self._pid = None, os.getpid()  # the parent's socket is not ours to use
        for reopened in (False, True):
            connection = self._connection
            fresh = connection is None
            if connection is None:
                connection = self._connection = http.client.HTTPConnection(self._host, self._port, timeout=max(0.001, deadline - time.monotonic()))
            else:
                connection.timeout = max(0.001, deadline - time.monotonic())
                if connection.sock is not None:
                    connection.sock.settimeout(connection.timeout)
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                response.read()
            except _CONNECTION_ERRORS:
                self._close()
                if fresh or reopened:
                    raise
                continue
            if response.will_close:
                self._close()
            return response.status, response.reason, _retry_after(response.getheader("retry-after"))
        raise AssertionError("unreachable")

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def shutdown(self) -> None:
        if self._stopping.is_set():
            log.warning("Exporter already shutdown, ignoring call")
            return
        self._stopping.set()
        self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from OTLP receivers: backoff then)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return max(0.0, seconds) if seconds is not None and seconds < float("inf") else None
