"""The Anthropic Messages provider against a real fake server on loopback
(tests/fakes/fake_anthropic.py), and the fake server itself."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.generator.anthropic import DEFAULT_ANTHROPIC_BASE_URL, AnthropicMessages, split_messages
from services.generator.providers import Generation, ProviderError, build_messages, estimate_tokens
from shared.config import ModelSpec
from shared.schema import ChatMessage, Passage
from tests.fakes.fake_anthropic import FakeAnthropic

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ant-test-secret-456"

QUESTION = [{"role": "user", "content": "How often should I lubricate the chain?"}]
EXPECTED_ANSWER = "Fake answer to: How often should I lubricate the chain?"

# A conversation as the mesh builds it, with the awkward parts Anthropic does not accept
# as-is: system text at the start and in the middle, and two user turns in a row.
CONVERSATION = [
    {"role": "system", "content": "You are a bike-shop assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "system", "content": "Answer in one sentence."},
    ChatMessage(role="user", content="My chain squeaks."),
    {"role": "user", "content": [{"type": "text", "text": "How often should I lubricate it?"}]},
]


@pytest.fixture(scope="module")
def fake(claude: FakeAnthropic) -> FakeAnthropic:
    """Here the fake provider is the Anthropic one."""
    return claude


@pytest_asyncio.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicMessages]:
    client = AnthropicMessages(fake.base_url, KEY, "claude-test", timeout_s=5)
    yield client
    await client.aclose()


async def collect(provider: AnthropicMessages, messages: list, **options) -> tuple[list[str], Generation]:
    deltas: list[str] = []
    final = None
    async for item in provider.stream(messages, **options):
        if isinstance(item, Generation):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


async def call(provider: AnthropicMessages, streamed: bool, **options) -> Generation:
    if streamed:
        return (await collect(provider, QUESTION, **options))[1]
    return await provider.generate(QUESTION, **options)


# -- plain completion and the request's shape -------------------------------------------------


async def test_completion_with_usage(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    result = await provider.generate(QUESTION, max_tokens=64)
    assert result.text == EXPECTED_ANSWER and result.citations == []
    assert (result.model, result.provider, result.finish_reason) == ("claude-test", "anthropic", "stop")
    assert result.usage.estimated is False
    assert result.usage.output_tokens == len(EXPECTED_ANSWER.split()) and result.usage.input_tokens > 0
    [recorded] = fake.calls
    assert (recorded["method"], recorded["path"]) == ("POST", "/v1/messages")
    assert recorded["api_key"] is True and recorded["anthropic_version"] == "2023-06-01"
    assert recorded["authorization"] is False  # Anthropic takes x-api-key, not a bearer token
    assert recorded["headers"]["content-type"] == "application/json"
    assert "x-api-key" not in recorded["headers"] and KEY not in json.dumps(recorded)
    assert recorded["body"] == {
        "model": "claude-test",
        "max_tokens": 64,
        "messages": QUESTION,
        "temperature": 0.2,
        "stream": False,
    }  # no system field when there is no system text


async def test_request_body_takes_system_apart_and_merges_roles(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    result = await provider.generate(CONVERSATION, max_tokens=100, temperature=0.5)
    body = fake.calls[-1]["body"]
    assert body["system"] == "You are a bike-shop assistant.\n\nAnswer in one sentence."
    assert body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "My chain squeaks.\n\nHow often should I lubricate it?"},
    ]
    assert (body["model"], body["max_tokens"], body["temperature"], body["stream"]) == ("claude-test", 100, 0.5, False)
    # The fake answers the last user turn, so the merged turn is what the model saw.
    assert result.text == "Fake answer to: My chain squeaks. How often should I lubricate it?"


async def test_grounded_messages_from_build_messages(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    passages = [Passage(text="Lubricate the chain every 150 to 300 km.", score=1.0, source="chain.md", title="Chain")]
    history = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello!")]
    fake.script([{"mode": "ok", "text": "Every 150 to 300 km [1]."}])
    result = await provider.generate(build_messages("How often should I lube?", passages, history))
    assert result.text == "Every 150 to 300 km [1]." and result.citations == [1]
    body = fake.calls[-1]["body"]
    assert "[1] Chain — chain.md\nLubricate the chain every 150 to 300 km." in body["system"]
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "How often should I lube?"


def test_split_messages_drops_empty_turns_and_rejects_unknown_roles() -> None:
    system, turns = split_messages([{"role": "user", "content": "  "}, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}])
    assert system == "" and turns == [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}]
    with pytest.raises(ProviderError) as caught:
        split_messages([{"role": "tool", "content": "42"}])
    assert caught.value.kind == "bad_request" and "'tool'" in str(caught.value)


async def test_temperature_is_clamped_to_anthropics_range(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    await provider.generate(QUESTION, temperature=1.7)  # the fake, like the API, would 400 above 1
    assert fake.calls[-1]["body"]["temperature"] == 1.0


async def test_max_tokens_truncation_is_finish_reason_length(provider: AnthropicMessages) -> None:
    result = await provider.generate(QUESTION, max_tokens=3)
    assert result.text == "Fake answer to: " and result.finish_reason == "length"
    _, final = await collect(provider, QUESTION, max_tokens=3)
    assert final.text == "Fake answer to: " and final.finish_reason == "length"


async def test_base_url_may_already_end_in_v1(fake: FakeAnthropic) -> None:
    async with AnthropicMessages(f"{fake.base_url}/v1/", KEY, "claude-test") as client:
        result = await client.generate(QUESTION)
    assert result.text == EXPECTED_ANSWER and fake.calls[-1]["path"] == "/v1/messages"


async def test_no_key_header_without_a_key(fake: FakeAnthropic) -> None:
    async with AnthropicMessages(fake.base_url, None, "claude-test") as keyless:
        await keyless.generate(QUESTION)
    assert fake.calls[-1]["api_key"] is False and fake.calls[-1]["anthropic_version"] == "2023-06-01"


# -- streaming ---------------------------------------------------------------------------------


async def test_stream_deltas_join_to_the_full_text(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    deltas, final = await collect(provider, CONVERSATION)
    expected = "Fake answer to: My chain squeaks. How often should I lubricate it?"
    assert len(deltas) == len(expected.split()) and deltas[0] == "Fake "
    assert "".join(deltas) == final.text == expected
    assert (final.model, final.provider, final.finish_reason) == ("claude-test", "anthropic", "stop")
    assert final.usage.estimated is False and final.usage.output_tokens == len(deltas) and final.usage.input_tokens > 0
    recorded = fake.calls[-1]
    assert recorded["body"]["stream"] is True and recorded["body"]["system"].startswith("You are a bike-shop")
    assert recorded["headers"]["accept"] == "text/event-stream" and recorded["api_key"] is True


async def test_stream_and_plain_report_the_same_usage(provider: AnthropicMessages) -> None:
    plain = await provider.generate(QUESTION)
    _, streamed = await collect(provider, QUESTION)
    assert streamed.usage == plain.usage and streamed.text == plain.text


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    "behaviour, kind, status, detail",
    [
        ({"mode": "error500"}, "server_error", 500, "api_error: Internal server error"),
        ({"mode": "overloaded"}, "server_error", 529, "overloaded_error: Overloaded"),
        ({"mode": "auth"}, "auth", 401, "authentication_error: invalid x-api-key"),
        ({"mode": "malformed"}, "malformed", None, "not valid JSON"),
        ({"mode": "bad_request", "text": "max_tokens: 9999999 > 64000"}, "bad_request", 400, "invalid_request_error: max_tokens: 9999999 > 64000"),
    ],
)
async def test_faults_map_to_error_kinds(
    provider: AnthropicMessages, fake: FakeAnthropic, streamed: bool, behaviour: dict, kind: str, status: int | None, detail: str
) -> None:
    fake.script([behaviour])
    with pytest.raises(ProviderError) as caught:
        await call(provider, streamed)
    error = caught.value
    assert (error.kind, error.status) == (kind, status)
    assert error.retryable is (kind in ("server_error", "malformed"))
    assert detail in str(error) and str(error).startswith("anthropic/claude-test: ")
    if status is not None:
        assert "(request-id req_fake_" in str(error)


@pytest.mark.parametrize("streamed", [False, True])
async def test_rate_limit_carries_retry_after(provider: AnthropicMessages, fake: FakeAnthropic, streamed: bool) -> None:
    fake.script([{"mode": "rate_limit", "retry_after": 2.5}])
    with pytest.raises(ProviderError) as caught:
        await call(provider, streamed)
    assert (caught.value.kind, caught.value.status, caught.value.retry_after) == ("rate_limited", 429, 2.5)
    assert caught.value.retryable and "rate_limit_error" in str(caught.value)


async def test_overloaded_with_retry_after_keeps_it(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "overloaded", "retry_after": 4}])
    with pytest.raises(ProviderError) as caught:
        await provider.generate(QUESTION)
    assert (caught.value.kind, caught.value.status, caught.value.retry_after) == ("server_error", 529, 4.0)


@pytest.mark.parametrize("streamed", [False, True])
async def test_hang_times_out_quickly(provider: AnthropicMessages, fake: FakeAnthropic, streamed: bool) -> None:
    fake.script([{"mode": "hang"}])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await call(provider, streamed, timeout_s=0.3)
    assert caught.value.kind == "timeout" and caught.value.retryable and "0.3s" in str(caught.value)
    assert time.monotonic() - started < 1.0


async def test_slow_but_in_time_answer_is_fine(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "ok", "latency_s": 0.2}])
    assert (await provider.generate(QUESTION, timeout_s=2)).text == EXPECTED_ANSWER


async def test_cut_stream_is_malformed(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "cut_stream"}, {"mode": "cut_stream"}])
    deltas: list[str] = []
    with pytest.raises(ProviderError, match="stream cut") as caught:
        async for item in provider.stream(QUESTION):
            deltas.append(item)
    assert caught.value.kind == "malformed" and caught.value.retryable
    assert deltas and EXPECTED_ANSWER.startswith("".join(deltas))  # some text arrived before the cut
    assert not any(isinstance(item, Generation) for item in deltas)
    with pytest.raises(ProviderError) as caught:  # the same fault without streaming: a truncated body
        await provider.generate(QUESTION)
    assert caught.value.kind == "malformed"


async def test_error_event_inside_a_stream(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "mid_stream_error"}])
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async for item in provider.stream(QUESTION):
            deltas.append(item)
    assert caught.value.kind == "server_error" and caught.value.retryable and caught.value.status is None
    assert "overloaded_error: Overloaded" in str(caught.value) and deltas == ["Fake "]


async def test_missing_usage_is_estimated(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "no_usage"}, {"mode": "no_usage"}])
    result = await provider.generate(QUESTION)
    assert result.text == EXPECTED_ANSWER
    assert result.usage.estimated is True
    assert result.usage.output_tokens == estimate_tokens(EXPECTED_ANSWER)
    assert result.usage.input_tokens == estimate_tokens(QUESTION[0]["content"])
    deltas, final = await collect(provider, QUESTION)
    assert "".join(deltas) == final.text == EXPECTED_ANSWER
    assert final.usage == result.usage  # the same estimate either way


async def test_error_messages_and_repr_never_contain_the_key(provider: AnthropicMessages, fake: FakeAnthropic) -> None:
    fake.script([{"mode": "auth", "text": f"invalid x-api-key: {KEY}"}])
    with pytest.raises(ProviderError) as caught:
        await provider.generate(QUESTION)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value) and "[redacted]" in str(caught.value)
    assert KEY not in repr(provider) and "key=set" in repr(provider)
    assert all(KEY not in json.dumps(recorded) for recorded in fake.calls)


async def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AnthropicMessages(f"http://127.0.0.1:{port}", KEY, "m", timeout_s=2) as dead:
        for streamed in (False, True):
            with pytest.raises(ProviderError) as caught:
                await call(dead, streamed)
            assert caught.value.kind == "connection" and caught.value.retryable and KEY not in str(caught.value)


# -- from_spec -----------------------------------------------------------------------------------


def test_from_spec_names_the_missing_key_variable() -> None:
    spec = ModelSpec(provider="anthropic", model="claude-test", api_key_env="BATON_TEST_ANTHROPIC_KEY")
    with pytest.raises(ProviderError, match="set the environment variable BATON_TEST_ANTHROPIC_KEY") as caught:
        AnthropicMessages.from_spec(spec, {"BATON_TEST_ANTHROPIC_KEY": ""})
    assert caught.value.kind == "missing_key" and not caught.value.retryable


def test_from_spec_defaults_to_the_anthropic_url() -> None:
    provider = AnthropicMessages.from_spec(ModelSpec(provider="anthropic", model="claude-test"), {})
    assert provider.base_url == DEFAULT_ANTHROPIC_BASE_URL == "https://api.anthropic.com"
    assert provider._url == "https://api.anthropic.com/v1/messages"


async def test_from_spec_resolves_url_and_key_from_the_environment(fake: FakeAnthropic) -> None:
    spec = ModelSpec(
        provider="anthropic", api_key_env="BATON_TEST_ANTHROPIC_KEY", base_url_env="BATON_TEST_ANTHROPIC_URL", timeout_s=3
    )
    env = {"BATON_TEST_ANTHROPIC_KEY": KEY, "BATON_TEST_ANTHROPIC_URL": fake.base_url}
    async with AnthropicMessages.from_spec(spec, env, name="claude-small") as provider:
        assert (provider.model, provider.timeout_s, provider.base_url) == ("claude-small", 3, fake.base_url)
        result = await provider.generate(QUESTION)
    assert result.text == EXPECTED_ANSWER
    assert fake.calls[-1]["api_key"] is True and fake.calls[-1]["body"]["model"] == "claude-small"


# -- the fake server itself ------------------------------------------------------------------------


def test_fake_checks_requests_like_the_api() -> None:
    with FakeAnthropic() as server, httpx.Client(base_url=server.base_url, timeout=5) as http:
        versioned = {"anthropic-version": "2023-06-01"}
        body = {"model": "m", "max_tokens": 10, "messages": QUESTION}
        no_version = http.post("/v1/messages", json=body)
        assert no_version.status_code == 400 and "anthropic-version" in no_version.json()["error"]["message"]
        system_turn = http.post("/v1/messages", json={**body, "messages": [{"role": "system", "content": "x"}, *QUESTION]}, headers=versioned)
        assert system_turn.status_code == 400 and system_turn.json()["error"]["type"] == "invalid_request_error"
        no_max = http.post("/v1/messages", json={"model": "m", "messages": QUESTION}, headers=versioned)
        assert no_max.status_code == 400 and "max_tokens" in no_max.json()["error"]["message"]
        ok = http.post("/v1/messages", json=body, headers=versioned).json()
        assert ok["type"] == "message" and ok["content"] == [{"type": "text", "text": EXPECTED_ANSWER}]
        assert ok["stop_reason"] == "end_turn" and set(ok["usage"]) == {"input_tokens", "output_tokens"}


def test_fake_server_runs_standalone_and_is_scriptable_over_http() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_anthropic", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the fake server did not print its ready line"
        line = process.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:")
        root = line.split(" ", 1)[1]
        headers = {"anthropic-version": "2023-06-01", "x-api-key": KEY}
        body = {"model": "m", "max_tokens": 50, "messages": QUESTION}
        with httpx.Client(base_url=root, timeout=5) as http:
            assert http.get("/v1/models").json()["data"][0]["id"] == "fake-claude"
            assert http.post("/_control/script", json=[{"mode": "nope"}]).status_code == 400
            http.post("/_control/script", json=[{"mode": "overloaded"}, {"mode": "rate_limit", "retry_after": 3}])
            http.post("/_control/default", json={"mode": "ok", "text": "scripted over HTTP"})
            overloaded = http.post("/v1/messages", json=body, headers=headers)
            assert overloaded.status_code == 529 and overloaded.json()["error"]["type"] == "overloaded_error"
            limited = http.post("/v1/messages", json=body, headers=headers)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
            answer = http.post("/v1/messages", json=body, headers=headers)
            assert answer.json()["content"][0]["text"] == "scripted over HTTP"
            calls = http.get("/_control/calls").json()
            assert [c.get("mode") for c in calls] == [None, "overloaded", "rate_limit", "ok"]  # GET /models first
            assert calls[1]["api_key"] is True and KEY not in json.dumps(calls)
            http.post("/_control/reset")
            assert http.get("/_control/calls").json() == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
