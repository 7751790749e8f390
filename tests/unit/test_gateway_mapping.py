"""The gateway's pure parts: error mapping, request parsing, response shapes, API keys."""

from __future__ import annotations

import json

import pytest
from nats.errors import ConnectionClosedError

from baton.client import NotAccepted, ReplyTimeout, RequestTooLarge
from services.gateway import errors, mapping
from services.gateway.auth import Authenticator, parse_keys
from shared.schema import Citation, Error, ErrorCode, Reply, Usage

ROUTES = ["factual", "smalltalk", "support"]


def body(**fields) -> bytes:
    return json.dumps({"model": "baton/auto", "messages": [{"role": "user", "content": "How do I fix a puncture?"}], **fields}).encode()


def parse(raw: bytes, tenant: str | None = None) -> mapping.ChatCall:
    return mapping.parse_chat_request(raw, routes=ROUTES, tenant=tenant)


def bad(raw: bytes) -> errors.GatewayError:
    with pytest.raises(errors.GatewayError) as caught:
        parse(raw)
    return caught.value


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "openai_code"),
    [
        (ErrorCode.INVALID_REQUEST, 400, "invalid_request"),
        (ErrorCode.PAYLOAD_TOO_LARGE, 413, "payload_too_large"),
        (ErrorCode.UNKNOWN_ROUTE, 404, "model_not_found"),
        (ErrorCode.INPUT_REJECTED, 400, "content_filter"),
        (ErrorCode.OUTPUT_REJECTED, 400, "content_filter"),
        (ErrorCode.NO_CONTEXT, 422, "no_context"),
        (ErrorCode.BUDGET_EXCEEDED, 429, "insufficient_quota"),
        (ErrorCode.MODEL_NOT_ALLOWED, 403, "model_not_allowed"),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "deadline_exceeded"),
        (ErrorCode.MODEL_ERROR, 502, "model_error"),
        (ErrorCode.REDELIVERY_EXHAUSTED, 502, "redelivery_exhausted"),
        (ErrorCode.UNAVAILABLE, 503, "unavailable"),
        (ErrorCode.INTERNAL, 500, "internal_error"),
    ],
)
def test_each_mesh_error_code_has_its_status_and_openai_body(code, status, openai_code):
    error = errors.from_error(Error(code=code, message="what went wrong"), "req-1")
    assert error.status == status
    assert error.body() == {"error": {"message": "what went wrong", "type": error.type, "param": None, "code": openai_code, "baton_code": code.value}}
    assert error.type == ("invalid_request_error" if status in (400, 404, 413, 422) else error.type)
    assert error.headers()["x-baton-request-id"] == "req-1"


def test_every_error_code_is_mapped():
    assert set(errors.STATUS) == set(ErrorCode)


def test_client_errors_are_never_retried_and_server_errors_only_when_retryable():
    assert errors.from_error(Error(code=ErrorCode.INPUT_REJECTED, message="x", retryable=True)).headers()["x-should-retry"] == "false"
    assert errors.from_error(Error(code=ErrorCode.BUDGET_EXCEEDED, message="x")).headers()["x-should-retry"] == "false"
    assert errors.from_error(Error(code=ErrorCode.MODEL_ERROR, message="x")).retry is False
    assert errors.from_error(Error(code=ErrorCode.UNAVAILABLE, message="x", retryable=True)).retry is True
    assert errors.from_error(Error(code=ErrorCode.DEADLINE_EXCEEDED, message="x", retryable=True)).retry is False


def test_a_failed_reply_without_an_error_is_a_500():
    assert errors.from_reply(Reply(request_id="r", ok=False)).status == 500


@pytest.mark.parametrize(
    ("exc", "status", "code", "phrase"),
    [
        (NotAccepted("NoRespondersError"), 503, "mesh_unavailable", "not reachable"),
        (RequestTooLarge("the request is 2000000 bytes"), 413, "payload_too_large", "bytes"),
        (ReplyTimeout("req-9", 60), 504, "timeout", "no reply to request req-9 within 60.0s"),
        (ConnectionClosedError(), 503, "mesh_unavailable", "not reachable"),
        (RuntimeError("secret internals"), 500, "internal_error", "internal"),
    ],
)
def test_client_exceptions_map_to_statuses(exc, status, code, phrase):
    error = errors.from_exception(exc)
    assert (error.status, error.code) == (status, code)
    assert phrase in error.message
    assert "secret internals" not in error.message


def test_unauthorized_never_echoes_the_key():
    assert errors.unauthorized(missing=False).status == 401
    assert errors.unauthorized(missing=False).body()["error"]["code"] == "invalid_api_key"


# -- request ------------------------------------------------------------------------


def test_a_plain_body_becomes_a_request_the_router_decides():
    call = parse(body())
    assert call.model == "baton/auto" and call.stream is False
    assert call.request.route is None
    assert [(m.role, m.content) for m in call.request.messages] == [("user", "How do I fix a puncture?")]
    assert call.request.metadata == {}


def test_the_model_names_the_route_and_unknown_models_are_404():
    assert parse(body(model="baton/support")).request.route == "support"
    for model in ("gpt-4o", "baton/nope", "baton/", "factual"):
        error = bad(body(model=model))
        assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
        assert model in error.message and "baton/factual" in error.message


def test_messages_map_roles_and_text_parts():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and then?"},
    ]
    request = parse(body(messages=messages)).request
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[1].content == "part one\npart two"
    assert request.text == "and then?"


def test_tenant_user_metadata_stream_and_schema_are_carried():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    raw = body(
        user="alice@example.com",
        metadata={"risk": "high", "tenant": "spoofed"},
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        max_latency_ms=5000,
        max_cost_usd=0.01,
        max_tokens=100,
        temperature=0.3,
        cache=False,
    )
    call = parse(raw, tenant="acme")
    request = call.request
    assert call.stream and call.include_usage and request.stream
    assert request.metadata == {"risk": "high", "tenant": "acme"}  # the key's tenant wins
    assert request.response_schema == schema
    assert request.max_latency_ms == 5000 and request.max_cost_usd == 0.01
    assert request.cache is False and parse(body()).request.cache is True
    assert request.session_id.startswith("u-")
    assert request.session_id != parse(raw, tenant="other").request.session_id  # tenants never share a session


def test_session_ids_pass_through_without_a_tenant_when_valid():
    assert mapping.session_id_for("rider-7", None) == "rider-7"
    assert mapping.session_id_for("rider-7", "acme").startswith("u-")
    assert mapping.session_id_for("not valid!", None).startswith("u-")
    assert mapping.session_id_for(None, "acme") is None


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (b'{"model": 5, "messages": []}', "model"),
        (body(messages=[]), "messages"),
        (body(messages=["hi"]), "messages[0]"),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages[0].content[0]"),
        (body(messages=[{"role": "assistant", "content": "hi", "tool_calls": [{"id": "1"}]}]), "messages[0].tool_calls"),
        (body(messages=[{"role": "system", "content": "only a system prompt"}]), "messages"),
        (body(messages=[{"role": "user", "content": "   "}]), "messages"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(temperature=3), "temperature"),
        (body(n=2), "n"),
        (body(tools=[{"type": "function"}]), "tools"),
        (body(user=7), "user"),
        (body(metadata={"a": 1}), "metadata.a"),
        (body(metadata="x"), "metadata"),
        (body(response_format={"type": "json_schema", "json_schema": {}}), "response_format.json_schema.schema"),
        (body(response_format={"type": "xml"}), "response_format.type"),
        (body(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
        (body(max_latency_ms=0), "max_latency_ms"),
        (body(cache="no"), "cache"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(raw, param):
    error = bad(raw)
    assert error.status == 400 and error.type == "invalid_request_error"
    assert error.param == param
    if param:
        assert param.split("[")[0].split(".")[0] in error.message


def test_response_format_variants():
    assert parse(body(response_format={"type": "text"})).request.response_schema is None
    assert parse(body(response_format={"type": "json_object"})).request.response_schema == {"type": "object"}


# -- reply --------------------------------------------------------------------------


def reply(**fields) -> Reply:
    base = dict(
        request_id="abc123",
        ok=True,
        answer="Use mineral oil [1].",
        citations=[Citation(index=1, source="handbook/hydraulic-disc-brakes.md")],
        route="factual",
        models=["local-extractive"],
        usage=Usage(input_tokens=12, output_tokens=5),
        cost_usd=0.0000125,
        trace_id="t" * 32,
        config_version="cfg1",
    )
    return Reply(**{**base, **fields})


def test_an_answer_the_model_cut_at_max_tokens_says_length():
    assert mapping.completion(reply(finish_reason="length"), model="baton/auto", created=1)["choices"][0]["finish_reason"] == "length"
    assert mapping.completion(reply(finish_reason=None), model="baton/auto", created=1)["choices"][0]["finish_reason"] == "stop"


def test_a_reply_becomes_a_chat_completion_with_the_baton_extra():
    out = mapping.completion(reply(), model="baton/auto", created=1700000000)
    assert out["id"] == "chatcmpl-abc123" and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"] == "Use mineral oil [1]."
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    extra = out["baton"]
    assert extra["route"] == "factual" and extra["request_id"] == "abc123" and extra["models"] == ["local-extractive"]
    assert extra["citations"][0]["source"] == "handbook/hydraulic-disc-brakes.md"
    assert json.loads(json.dumps(out)) == out  # plain JSON


def test_reply_headers():
    headers = mapping.reply_headers(reply())
    assert headers == {"x-baton-request-id": "abc123", "x-baton-cost-usd": "0.0000125", "x-baton-route": "factual", "x-baton-trace-id": "t" * 32}
    assert mapping.reply_headers(reply(cost_usd=0.0, route=None, trace_id=None)) == {"x-baton-request-id": "abc123", "x-baton-cost-usd": "0"}


def test_chunks_and_sse():
    first = mapping.chunk("chatcmpl-1", created=1, model="baton/auto", delta={"role": "assistant", "content": ""}, include_usage=True)
    assert first["choices"][0]["delta"]["role"] == "assistant" and first["usage"] is None
    last = mapping.chunk("chatcmpl-1", created=1, model="baton/auto", choices=False, include_usage=True, usage_value={"total_tokens": 3})
    assert last["choices"] == [] and last["usage"] == {"total_tokens": 3}
    assert "usage" not in mapping.chunk("chatcmpl-1", created=1, model="m")
    assert mapping.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert mapping.DONE == b"data: [DONE]\n\n"


def test_models_list():
    listed = mapping.models_list(ROUTES, created=5)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["baton/auto", "baton/factual", "baton/smalltalk", "baton/support"]
    assert all(m["object"] == "model" and m["owned_by"] == "baton" and m["created"] == 5 for m in listed["data"])


# -- API keys -----------------------------------------------------------------------


def test_parse_keys():
    assert parse_keys(None) is None
    assert parse_keys("k1=acme, k2=globex,") == {"k1": "acme", "k2": "globex"}
    assert parse_keys("k=a=b") == {"k": "a=b"}
    for text in ("", "justakey", "=tenant", "k1=a,k1=b"):
        with pytest.raises(ValueError) as caught:
            parse_keys(text)
        assert "justakey" not in str(caught.value) and "k1" not in str(caught.value)  # keys never in messages


def test_authenticator():
    off = Authenticator(None)
    assert off.tenant(None) is None and off.tenant("Bearer anything") is None
    auth = Authenticator({"sk-1": "acme"})
    assert auth.tenant("Bearer sk-1") == "acme" and auth.tenant("bearer  sk-1 ") == "acme"
    for header, missing in ((None, True), ("", True), ("Basic sk-1", True), ("Bearer", True), ("Bearer sk-2", False)):
        with pytest.raises(errors.GatewayError) as caught:
            auth.tenant(header)
        assert caught.value.status == 401
        assert ("didn't provide" in caught.value.message) == missing


# -- the SSE sequence (a fake client stands in for the mesh) ---------------------------


class FakeClient:
    def __init__(self, items):
        self.items = items
        self.closed = False

    async def stream(self, request, *, timeout_s=None, request_id=None):
        try:
            for item in self.items:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed = True


async def sse_events(items, include_usage=False):
    from services.gateway.app import _stream

    client = FakeClient(items)
    call = parse(body(stream=True, stream_options={"include_usage": include_usage}))
    response = await _stream(client, call, 5)
    raw = b"".join([part async for part in response.body_iterator])
    assert client.closed
    lines = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line]
    assert lines[-1] == b"[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def deltas(events):
    return [e["choices"][0]["delta"].get("content") for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]


async def test_stream_sends_role_then_deltas_then_finish_then_usage():
    events = await sse_events(["Use mineral oil ", "[1]."] + [reply()], include_usage=True)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(events) == ["Use mineral oil ", "[1]."]
    finish = events[-2]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["baton"]["request_id"] == "abc123"
    assert "answer" not in finish["baton"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 17
    assert all(e["usage"] is None for e in events[:-1])
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)


async def test_stream_without_partial_text_sends_the_answer_as_one_delta():
    events = await sse_events([reply()])
    assert deltas(events) == ["Use mineral oil [1]."]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]


async def test_stream_completes_a_prefix_and_flags_an_answer_the_gate_changed():
    completed = await sse_events(["Use mineral "] + [reply()])
    assert deltas(completed) == ["Use mineral ", "oil [1]."]
    redacted = await sse_events(["Mail bob@example.com"] + [reply(answer="Mail [email].")])
    assert deltas(redacted) == ["Mail bob@example.com"]
    assert redacted[-1]["baton"]["answer"] == "Mail [email]."


async def test_an_error_after_the_stream_started_is_an_error_event_before_done():
    rejected = Reply(request_id="r1", ok=False, error=Error(code=ErrorCode.OUTPUT_REJECTED, message="guard.output refused: too long"))
    events = await sse_events(["partial "] + [rejected])
    assert deltas(events) == ["partial "]
    assert events[-1] == {"error": {"message": "guard.output refused: too long", "type": "invalid_request_error", "param": None, "code": "content_filter", "baton_code": "output_rejected"}}
    timed_out = await sse_events(["partial ", ReplyTimeout("r2", 5)])
    assert timed_out[-1]["error"]["code"] == "timeout" and "r2" in timed_out[-1]["error"]["message"]


async def test_a_stream_refused_at_once_raises_before_any_event():
    from services.gateway.app import _stream

    refused = FakeClient([Reply(request_id="r3", ok=False, error=Error(code=ErrorCode.INPUT_REJECTED, message="possible prompt injection"))])
    with pytest.raises(errors.GatewayError) as caught:
        await _stream(refused, parse(body(stream=True)), 5)
    assert caught.value.status == 400 and caught.value.code == "content_filter"
    assert refused.closed
    unreachable = FakeClient([NotAccepted("NoRespondersError")])
    with pytest.raises(NotAccepted):
        await _stream(unreachable, parse(body(stream=True)), 5)


# -- the HTTP app without a mesh (the lifespan, which connects to NATS, is not run) ----


@pytest.fixture
def http():
    from starlette.testclient import TestClient

    from services.gateway.app import create_app
    from shared.settings import Settings

    return TestClient(create_app("nats://127.0.0.1:1", config_path=Settings().config, api_keys={"sk-1": "acme"}, max_body_bytes=1000))


def test_the_app_answers_openai_style_before_any_mesh_call(http):
    auth = {"authorization": "Bearer sk-1"}
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models").headers["www-authenticate"] == "Bearer"
    assert http.get("/v1/models", headers={"authorization": "Bearer sk-2"}).json()["error"]["code"] == "invalid_api_key"
    assert "baton/factual" in [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]]
    assert http.get("/v1/models/baton/factual", headers=auth).json()["id"] == "baton/factual"
    assert http.get("/v1/models/baton/nope", headers=auth).status_code == 404
    wrong_method = http.get("/v1/chat/completions", headers=auth)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST" and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert http.post("/v1/chat/completions", headers=auth, content=b"x" * 1001).status_code == 413
    assert http.post("/v1/chat/completions", headers=auth, content=b"{").json()["error"]["param"] is None
    not_connected = http.post("/v1/chat/completions", headers=auth, json={"model": "baton/auto", "messages": [{"role": "user", "content": "hi"}]})
    assert not_connected.status_code == 503 and "not reachable" in not_connected.json()["error"]["message"]
    assert http.get("/healthz").status_code == 503 and http.get("/healthz").json()["nats"] == "connecting"


def test_main_refuses_a_bad_key_list_without_printing_it():
    import os
    import subprocess
    import sys

    from shared.settings import ROOT

    env = {**os.environ, "BATON_GATEWAY_KEYS": "sk-very-secret", "NATS_URL": "nats://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "BATON_GATEWAY_KEYS" in done.stderr and "sk-very-secret" not in done.stderr + done.stdout


# -- sampling parameters: forwarded, and nothing silently ignored (issue 17) -------------


def test_max_tokens_temperature_and_top_p_are_forwarded_on_the_request():
    request = parse(body(max_tokens=50, temperature=0.7, top_p=0.9)).request
    assert (request.max_output_tokens, request.temperature, request.top_p) == (50, 0.7, 0.9)
    assert parse(body(max_completion_tokens=40)).request.max_output_tokens == 40


@pytest.mark.parametrize("field", ["presence_penalty", "stop", "seed", "logit_bias"])
def test_an_openai_parameter_baton_does_not_act_on_is_refused_by_name(field):
    error = bad(body(**{field: 1}))
    assert error.status == 400 and field in error.message
