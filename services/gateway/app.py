"""The HTTP gateway: the OpenAI Chat Completions API in front of the Baton mesh.

Endpoints:
  POST /v1/chat/completions   OpenAI Chat Completions, plain or streamed (SSE).
                              model `baton/auto` lets the router decide; `baton/<route>`
                              is a route hint. The response carries an extra `baton`
                              object and x-baton-* headers.
  GET  /v1/models             baton/auto and baton/<route> for every configured route
  GET  /v1/models/{model}     one of them
  GET  /healthz               200 when the NATS connection is up, else 503

Any OpenAI client works against it, e.g. the official SDK:

    OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="...").chat.completions.create(
        model="baton/auto", messages=[{"role": "user", "content": "How do I fix a puncture?"}])

Environment (read by main() only; create_app takes explicit arguments):
  BATON_GATEWAY_HOST       bind address, default 127.0.0.1
  BATON_GATEWAY_PORT       default 8080
  BATON_GATEWAY_KEYS       "key1=tenant1,key2=tenant2"; unset = no auth (local development)
  BATON_GATEWAY_TIMEOUT_S  seconds to wait for a reply, default 60
  BATON_GATEWAY_CLIENT_ID  the gateway's Baton client id (its NATS inbox), default "gateway";
                           give each replica its own
  NATS_URL, NATS_USER, NATS_PASSWORD, BATON_CONFIG   as for the rest of the mesh
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from baton.client import BatonClient, NotAccepted
from services.gateway import errors, mapping
from services.gateway.auth import KEYS_ENV, Authenticator, parse_keys
from shared import attributes as A
from shared import subjects, telemetry
from shared.config import ConfigError, MeshConfig, load_config
from shared.schema import Reply

log = logging.getLogger("baton.gateway")

DEFAULT_MAX_BODY = 1024 * 1024  # the mesh refuses requests over 256 KiB anyway


def create_app(
    nats_url: str,
    *,
    config_path: str | Path,
    api_keys: dict[str, str] | None,
    client_id: str = "gateway",
    timeout_s: float = 60,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    tracer: trace.Tracer | None = None,
    **connect_options: Any,
) -> Starlette:
    """Build the gateway. `api_keys` maps key -> tenant; None turns auth off.

    Raises ConfigError for a bad config file. Extra keyword arguments go to
    `nats.connect` (e.g. user/password); by default the connection reconnects forever.
    """
    holder = _ConfigHolder(load_config(config_path))
    server_span = functools.partial(_server_span, tracer or trace.get_tracer("baton.gateway"))
    auth = Authenticator(api_keys)
    started = int(time.time())
    state: dict[str, BatonClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The HTTP side starts at once; NATS connects in the background (and nats-py
        # reconnects forever), so a gateway started before NATS, or cut off from it,
        # answers 503 and /healthz says why, instead of hanging or exiting.
        events = _ConnectionLog(client_id)
        options = {
            "max_reconnect_attempts": -1,
            "name": f"baton-gateway-{client_id}",
            "error_cb": events.error,
            "disconnected_cb": events.disconnected,
            "reconnected_cb": events.reconnected,
            **connect_options,
        }
        client = BatonClient(nats_url, client_id=client_id, timeout_s=timeout_s, tracer=tracer, **options)

        async def connect() -> None:
            try:
                await client.connect()
            except Exception as exc:  # nats-py retries connection failures itself; this is something else
                log.error("the gateway cannot use NATS (%s: %s); every request gets 503", type(exc).__name__, exc)
                raise
            await holder.follow(client)
            state["client"] = client
            log.info("gateway connected to NATS as client %s; models: %s", client_id, ", ".join(mapping.model_ids(holder.routes)))

        connecting = asyncio.create_task(connect())
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            await holder.stop()
            await _close(client)

    def connected_client() -> BatonClient:
        client = state.get("client")
        if client is None:
            raise NotAccepted("the gateway has not connected to NATS yet")
        return client

    @_openai_errors
    async def chat_completions(request: HttpRequest) -> Response:
        tenant = auth.tenant(request.headers.get("authorization"))
        body = await _read_body(request, max_body_bytes)
        call = mapping.parse_chat_request(body, routes=holder.routes, tenant=tenant)
        client = connected_client()
        if call.stream:
            return await _stream(client, call, timeout_s)
        reply = await client.ask(call.request, timeout_s=timeout_s)
        if not reply.ok:
            telemetry.mark_refused(trace.get_current_span(), reply)
            raise errors.from_reply(reply)
        return JSONResponse(mapping.completion(reply, model=call.model, created=int(time.time())), headers=mapping.reply_headers(reply))

    @_openai_errors
    async def list_models(request: HttpRequest) -> Response:
        auth.tenant(request.headers.get("authorization"))
        return JSONResponse(mapping.models_list(holder.routes, started))

    @_openai_errors
    async def get_model(request: HttpRequest) -> Response:
        auth.tenant(request.headers.get("authorization"))
        model = request.path_params["model"]
        mapping.route_of(model, holder.routes)  # 404 when unknown
        return JSONResponse(mapping.model_object(model, started))

    async def healthz(request: HttpRequest) -> Response:
        client = state.get("client")
        nc = client.nc if client else None
        connected = bool(nc and nc.is_connected)
        if connected:
            status = "connected"
        elif client is None:
            status = "connecting"
        else:
            status = "reconnecting" if nc and nc.is_reconnecting else "disconnected"
        body = {"status": "ok" if connected else "unavailable", "nats": status, "config_version": holder.config.digest, "auth": auth.enabled}
        return JSONResponse(body, status_code=200 if connected else 503)

    async def http_exception(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error_response(errors.http_error(exc.status_code, exc.detail, dict(exc.headers or {})))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", server_span("/v1/chat/completions", chat_completions), methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_exception},
        lifespan=lifespan,
    )


async def _close(client: BatonClient, drain_s: float = 5.0) -> None:
    """Drain when connected (bounded); close at once when not: draining waits for a reconnect."""
    nc = client.nc
    if nc is None or nc.is_closed:
        return
    if nc.is_connected:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), drain_s)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await nc.close()


class _ConnectionLog:
    """nats-py's callbacks as short log lines: no traceback every reconnect attempt."""

    QUIET_S = 30.0

    def __init__(self, client_id: str):
        self.client_id = client_id
        self._last_error: tuple[str, float] | None = None

    async def error(self, exc: Exception) -> None:
        text, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        if self._last_error is None or self._last_error[0] != text or now - self._last_error[1] > self.QUIET_S:
            log.warning("NATS connection (client %s): %s; retrying", self.client_id, text)
            self._last_error = (text, now)

    async def disconnected(self) -> None:
        log.warning("NATS connection (client %s) lost; reconnecting", self.client_id)

    async def reconnected(self) -> None:
        self._last_error = None
        log.info("NATS connection (client %s) restored", self.client_id)


class _ConfigHolder:
    """The routes the gateway offers: the file's, then the mesh's live config when there is one."""

    def __init__(self, config: MeshConfig):
        self._initial = config
        self._store: Any = None

    @property
    def config(self) -> MeshConfig:
        return self._store.current if self._store is not None else self._initial

    @property
    def routes(self) -> list[str]:
        return list(self.config.routes)

    async def follow(self, client: BatonClient) -> None:
        """Follow the active config in the KV bucket, as every service does (best effort)."""
        try:
            from shared.live_config import ConfigStore

            kv = await client.js.key_value(getattr(subjects, "CONFIG_BUCKET", "baton_config"))
            store = ConfigStore(self._initial)
            await store.attach(kv)
            self._store = store
        except Exception as exc:  # no bucket, no permission: the file's routes stay
            log.info("not following the live config (%s); serving the routes of the config file", type(exc).__name__)

    async def stop(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.detach()


def _openai_errors(endpoint: Callable[[HttpRequest], Awaitable[Response]]) -> Callable[[HttpRequest], Awaitable[Response]]:
    """Every failure of an endpoint as an OpenAI-style error response."""

    @functools.wraps(endpoint)
    async def wrapped(request: HttpRequest) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            error = errors.from_exception(exc)
            if error.status >= 500:
                if error.code == "internal_error" and not isinstance(exc, errors.GatewayError):
                    log.exception("%s %s failed", request.method, request.url.path)
                else:
                    log.warning("%s %s -> %d %s: %s", request.method, request.url.path, error.status, error.code, error.message)
            return _error_response(error)

    return wrapped


def _server_span(tracer: trace.Tracer, route: str, endpoint: Callable[[HttpRequest], Awaitable[Response]]) -> Callable[[HttpRequest], Awaitable[Response]]:
    """An HTTP server span around `endpoint` (HTTP semconv), continuing the caller's W3C
    `traceparent`; the request's bus publish is its child. A streamed response's span
    ends when the stream does, so its duration is the request's."""

    @functools.wraps(endpoint)
    async def traced(request: HttpRequest) -> Response:
        span = tracer.start_span(f"{request.method} {route}", context=telemetry.extract(request.headers), kind=SpanKind.SERVER, attributes=_http_attributes(request, route))
        try:
            with trace.use_span(span, end_on_exit=False):
                response = await endpoint(request)
        except BaseException:
            span.end()  # use_span recorded the exception and the error status
            raise
        telemetry.record_http_status(span, response.status_code)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _ending(response.body_iterator, span)
        else:
            span.end()
        return response

    return traced


async def _ending(body: AsyncIterable[Any], span: trace.Span) -> AsyncIterator[Any]:
    try:
        async for part in body:
            yield part
    finally:
        span.end()


def _http_attributes(request: HttpRequest, route: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        A.OI_KIND: A.CHAIN,
        A.HTTP_METHOD: request.method,
        A.HTTP_ROUTE: route,
        A.URL_PATH: request.url.path,
        A.URL_SCHEME: request.url.scheme,
    }
    if request.url.hostname:
        attributes[A.SERVER_ADDRESS] = request.url.hostname
    if request.url.port:
        attributes[A.SERVER_PORT] = request.url.port
    if request.client is not None:
        attributes[A.CLIENT_ADDRESS] = request.client.host
    if request.headers.get("user-agent"):
        attributes[A.USER_AGENT] = request.headers["user-agent"]
    return attributes


def _error_response(error: errors.GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.body_too_large(limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise errors.body_too_large(limit)
        parts.append(part)
    return b"".join(parts)


async def _stream(client: BatonClient, call: mapping.ChatCall, timeout_s: float) -> Response:
    """Server-sent chunks: role, content deltas, finish (and usage), then [DONE].

    The first item is awaited before the response starts, so a request refused at once
    (bad route, input gate, mesh unreachable) gets a real HTTP status, not a 200 stream.
    """
    request_id = uuid.uuid4().hex
    items = client.stream(call.request, timeout_s=timeout_s, request_id=request_id)
    try:
        first = await anext(items)
    except BaseException:
        await items.aclose()
        raise
    if isinstance(first, Reply) and not first.ok:
        await items.aclose()
        telemetry.mark_refused(trace.get_current_span(), first)
        raise errors.from_reply(first)

    chunk_id = f"chatcmpl-{request_id}"  # the mesh's request id, as for plain completions
    created = int(time.time())
    chunk = functools.partial(mapping.chunk, chunk_id, created=created, model=call.model, include_usage=call.include_usage)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield mapping.sse(chunk(delta={"role": "assistant", "content": ""}))
            pieces: list[str] = []
            item: str | Reply = first
            while isinstance(item, str):
                if item:
                    pieces.append(item)
                    yield mapping.sse(chunk(delta={"content": item}))
                item = await anext(items)
            final = item
            if not final.ok:
                yield mapping.sse(errors.from_reply(final).body())
            else:
                answer, streamed = final.answer or "", "".join(pieces)
                extra = mapping.baton_extra(final)
                if answer.startswith(streamed):
                    if answer[len(streamed):]:  # nothing streamed (or only a prefix): send the rest
                        yield mapping.sse(chunk(delta={"content": answer[len(streamed):]}))
                else:
                    # The gates changed the text after it was streamed (e.g. redaction):
                    # a delta cannot retract it, so the authoritative answer travels here.
                    extra["answer"] = answer
                yield mapping.sse(chunk(finish_reason=mapping.finish_reason(final), extra={"baton": extra}))
                if call.include_usage:
                    yield mapping.sse(chunk(choices=False, usage_value=mapping.usage(final)))
        except StopAsyncIteration:
            yield mapping.sse(errors.GatewayError(502, "the stream ended without a final reply", type=errors.SERVER, code="internal_error").body())
        except Exception as exc:
            error = errors.from_exception(exc)
            log.warning("stream %s failed: %d %s: %s", chunk_id, error.status, error.code, error.message)
            yield mapping.sse(error.body())
        finally:
            await items.aclose()
        yield mapping.DONE

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-baton-request-id": request_id}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _without_credentials(url: str) -> str:
    """A NATS URL fit for a log line: any user:password@ part removed."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url.rpartition("@")[2]


def main() -> None:
    import uvicorn

    from shared.settings import Settings, nats_credentials
    from shared.telemetry import setup_tracing, shutdown_tracing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()  # NATS_URL, BATON_CONFIG (default shared/default_config.yaml)
    host = os.environ.get("BATON_GATEWAY_HOST", "127.0.0.1")
    port = int(os.environ.get("BATON_GATEWAY_PORT", "8080"))
    timeout_s = float(os.environ.get("BATON_GATEWAY_TIMEOUT_S", "60"))
    client_id = os.environ.get("BATON_GATEWAY_CLIENT_ID", "gateway")
    credentials: dict[str, Any] = nats_credentials(settings)
    try:
        api_keys = parse_keys(os.environ.get(KEYS_ENV))
        app = create_app(
            settings.nats_url,
            config_path=settings.config,
            api_keys=api_keys,
            client_id=client_id,
            timeout_s=timeout_s,
            tracer=setup_tracing("gateway"),
            **credentials,
        )
    except (ValueError, ConfigError) as exc:  # ConfigError is a ValueError; neither names a key
        print(f"baton gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if api_keys is None:
        log.warning("%s is not set: authentication is OFF (local development only)", KEYS_ENV)
    else:
        log.info("authentication on: %d API key(s)", len(api_keys))
    log.info("gateway on http://%s:%d/v1 -> NATS %s, config %s", host, port, _without_credentials(settings.nats_url), settings.config)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", lifespan="on")
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
