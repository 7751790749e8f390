"""The generator's model layer: the local extractive generator, and the OpenAI-compatible
provider against a real fake server on loopback (tests/fakes/fake_openai.py)."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.generator import (
    DEFAULT_OPENAI_BASE_URL,
    NOT_FOUND,
    Generation,
    LocalExtractive,
    OpenAICompatible,
    ProviderError,
    build_messages,
    estimate_tokens,
    parse_retry_after,
)
from shared.config import ModelSpec
from shared.schema import ChatMessage, Passage
from tests.conftest import eventually_sync
from tests.fakes.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]

PASSAGES = [
    Passage(
        text="Tyre pressure matters. Road tyres usually run at 80 to 100 psi, while mountain bike tyres "
        "run at 25 to 35 psi. Check the pressure weekly with a floor pump.",
        score=12.1,
        source="tyres.md",
        title="Tyres",
    ),
    Passage(
        text="# Chain care\nLubricate the chain every 150 to 300 km, or after riding in the rain. Wipe off "
        "excess lube with a rag so it does not attract dirt. A worn chain wears out the cassette.",
        score=10.4,
        source="chain.md",
        title="Chain",
    ),
    Passage(
        text="Disc brakes need new pads when the pad material is thinner than 1.5 mm. Squealing brakes are "
        "often contaminated with oil; clean the rotor with isopropyl alcohol.",
        score=9.0,
        source="brakes.md",
    ),
    Passage(
        text="Store the bike indoors, e.g. in a garage, to protect it from rust. Cover it if stored outside.",
        score=5.0,
        source="storage.md",
    ),
]

QUESTION = [{"role": "user", "content": "How often should I lubricate the chain?"}]
EXPECTED_ANSWER = "Fake answer to: How often should I lubricate the chain?"


# -- the local generator -----------------------------------------------------------------------


@pytest.fixture
def local() -> LocalExtractive:
    return LocalExtractive()


def test_answers_from_the_right_passage_with_a_citation(local: LocalExtractive) -> None:
    result = local.generate("How often should I lubricate the chain?", PASSAGES)
    assert result.text == "Lubricate the chain every 150 to 300 km, or after riding in the rain [2]."
    assert result.citations == [2]
    assert result.grounded is True
    assert (result.provider, result.model, result.finish_reason) == ("local", "local-extractive", "stop")
    assert result.usage.estimated is True
    assert result.usage.input_tokens > 50 and result.usage.output_tokens == estimate_tokens(result.text)


def test_answer_picks_other_passages_and_keeps_sentences_whole(local: LocalExtractive) -> None:
    tyres = local.generate("What pressure for mountain bike tyres?", PASSAGES)
    assert "mountain bike tyres run at 25 to 35 psi." in tyres.text and tyres.text.endswith("[1].")
    assert tyres.citations == [1]
    storage = local.generate("Where should I store my bike?", PASSAGES)
    # "e.g." does not end a sentence; "rust." does.
    assert storage.text.startswith("Store the bike indoors, e.g. in a garage, to protect it from rust.")
    assert storage.citations == [4]


def test_answer_joins_supporting_sentences_and_respects_max_sentences(local: LocalExtractive) -> None:
    question = "Where should I store my bike outside?"
    both = local.generate(question, PASSAGES)
    # Two sentences of one passage: in reading order, cited once at the end of the run.
    assert both.text == "Store the bike indoors, e.g. in a garage, to protect it from rust. Cover it if stored outside [4]."
    one = local.generate(question, PASSAGES, max_sentences=1)
    assert one.text == "Cover it if stored outside [4]." and one.citations == [4]
    assert local.generate(question, PASSAGES, max_sentences=1) == one  # deterministic


def test_follow_up_uses_the_previous_user_turn(local: LocalExtractive) -> None:
    history = [
        ChatMessage(role="user", content="What tyre pressure should I use?"),
        ChatMessage(role="assistant", content="Road tyres usually run at 80 to 100 psi [1]."),
    ]
    result = local.generate("And for mountain bikes?", PASSAGES, history=history)
    assert result.citations == [1] and "25 to 35 psi" in result.text


@pytest.mark.parametrize(
    "question, passages",
    [
        ("What is the capital of France?", PASSAGES),
        ("Who won the Tour de France bike race?", PASSAGES),  # one shared word is not an answer
        ("How often should I lubricate the chain?", []),
    ],
)
def test_says_plainly_when_it_cannot_answer(local: LocalExtractive, question: str, passages: list[Passage]) -> None:
    result = local.generate(question, passages)
    assert result.text == NOT_FOUND == "I could not find an answer to that in the knowledge base."
    assert result.citations == [] and result.grounded is False


@pytest.mark.parametrize(
    "message, expected",
    [
        ("hi there!", "Hello! How can I help with your bike today?"),
        ("Thanks a lot", "You're welcome! Let me know if there's anything else I can help with."),
        ("how are you?", "I'm doing well, thanks for asking! How can I help with your bike today?"),
        ("what's the weather like", "I can help with questions about bikes: maintenance, repairs, parts and riding. What would you like to know?"),
    ],
)
def test_small_talk(local: LocalExtractive, message: str, expected: str) -> None:
    result = local.generate(message, [], task="chat")
    assert result.text == expected and result.citations == []


def test_summarize_keeps_the_central_sentences_in_order(local: LocalExtractive) -> None:
    text = (
        "The chain is the heart of the drivetrain. A dirty chain wears the cassette and the chainrings. "
        "Clean the chain and lube the chain every few hundred km. My neighbour has a red car. "
        "A stretched chain should be replaced before it damages the cassette. Chain checkers measure the stretch."
    )
    result = local.generate(f"Summarize this: {text}", [], task="summarize")
    sentences = [s for s in result.text.split(". ") if s]
    assert 2 <= len(sentences) <= 3
    assert "red car" not in result.text
    positions = [text.index(s.rstrip(".")) for s in sentences]
    assert positions == sorted(positions)  # original order


def test_summarize_passages_cites_the_ones_used(local: LocalExtractive) -> None:
    result = local.generate("summarize the passages", PASSAGES, task="summarize")
    assert result.citations and set(result.citations) <= {1, 2, 3, 4}
    assert all(f"[{n}]" in result.text for n in result.citations)


def test_rewrite_is_a_light_clean_up(local: LocalExtractive) -> None:
    result = local.generate("Rewrite:  i can't   find the manual ,it's not in the box.  the shop won't reply", [], task="rewrite")
    assert result.text == "I cannot find the manual, it is not in the box. The shop will not reply."
    long = (
        "rewrite: the bike arrived on monday and the box was damaged on one side, but the frame itself looks "
        "fine and the wheels spin true although the rear brake rubs a little when I ride"
    )
    sentences = local.generate(long, [], task="rewrite").text.split(". ")
    assert len(sentences) == 2 and sentences[1].startswith("But the frame itself looks fine")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Classify: My new bike arrived with a broken wheel and I want a refund.", "complaint"),
        ("How do I adjust the gears on my bike?", "question"),
        ("I love this bike, the ride is so smooth!", "praise"),
        ("The package is blue.", "other"),
    ],
)
def test_classify_with_default_labels(local: LocalExtractive, text: str, expected: str) -> None:
    assert local.generate(text, [], task="classify").text == f"Label: {expected}"


def test_classify_with_given_labels(local: LocalExtractive) -> None:
    result = local.generate("The brake lever feels loose", [], task="classify", labels=["gears", "brakes", "tyres"])
    assert result.text == "Label: brakes"


def test_unknown_task_is_a_mistake(local: LocalExtractive) -> None:
    with pytest.raises(ValueError, match="unknown task 'translate'"):
        local.generate("hola", [], task="translate")


# -- helpers ---------------------------------------------------------------------------------------


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hi") == 1
    assert estimate_tokens("x" * 400) == 100


def test_build_messages_numbers_passages_and_ends_with_the_question() -> None:
    history = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="Hello!")]
    messages = build_messages("How often should I lubricate the chain?", PASSAGES[:2], history)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert "only the numbered context passages" in system and "[1]" in system
    assert "[1] Tyres — tyres.md\nTyre pressure matters." in system
    assert "[2] Chain — chain.md\n# Chain care" in system
    assert messages[-1] == {"role": "user", "content": "How often should I lubricate the chain?"}
    assert "(no passages were found)" in build_messages("q", [])[0]["content"]
    assert build_messages("q", [], system_prompt="Classify the text.")[0] == {"role": "system", "content": "Classify the text."}


def test_parse_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412500.0) == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_provider_error_retryable_by_kind() -> None:
    assert ProviderError("rate_limited", "x").retryable and ProviderError("malformed", "x").retryable
    assert not ProviderError("auth", "x").retryable and not ProviderError("missing_key", "x").retryable
    with pytest.raises(ValueError):
        ProviderError("weird", "x")


# -- the OpenAI-compatible provider against the fake server -----------------------------------------


@pytest_asyncio.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatible]:
    client = OpenAICompatible(fake.base_url, "sk-test-secret-123", "fake-model", timeout_s=5)
    yield client
    await client.aclose()


async def collect(provider: OpenAICompatible, messages: list[dict], **options) -> tuple[list[str], Generation]:
    deltas: list[str] = []
    final = None
    async for item in provider.stream(messages, **options):
        if isinstance(item, Generation):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


@pytest.mark.asyncio
async def test_completion_with_usage(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    result = await provider.generate(QUESTION, max_tokens=64)
    assert result.text == EXPECTED_ANSWER
    assert (result.model, result.provider, result.finish_reason) == ("fake-model", "openai", "stop")
    assert result.usage.estimated is False
    assert result.usage.output_tokens == len(EXPECTED_ANSWER.split()) and result.usage.input_tokens > 0
    [call] = fake.calls
    assert call["path"] == "/v1/chat/completions"
    assert call["body"]["messages"] == QUESTION and call["body"]["max_tokens"] == 64
    assert call["authorization"] is True
    assert "sk-test-secret-123" not in json.dumps(call)  # the fake records presence, never the key


@pytest.mark.asyncio
async def test_no_authorization_header_without_a_key(fake: FakeOpenAI) -> None:
    async with OpenAICompatible(fake.base_url, None, "local-llm") as keyless:
        await keyless.generate(QUESTION)
    assert fake.calls[-1]["authorization"] is False


@pytest.mark.asyncio
async def test_stream_deltas_join_to_the_full_text(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    deltas, final = await collect(provider, QUESTION)
    assert len(deltas) > 3
    assert "".join(deltas) == final.text == EXPECTED_ANSWER
    assert final.usage.estimated is False and final.usage.output_tokens == len(deltas)
    body = fake.calls[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.asyncio
async def test_scripted_text_and_citations(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    fake.script([{"mode": "ok", "text": "Lube it every 200 km [2], more in rain [2][1]."}])
    result = await provider.generate(QUESTION)
    assert result.text == "Lube it every 200 km [2], more in rain [2][1]." and result.citations == [2, 1]


@pytest.mark.asyncio
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    "behaviour, kind, status",
    [
        ({"mode": "error500"}, "server_error", 500),
        ({"mode": "auth"}, "auth", 401),
        ({"mode": "malformed"}, "malformed", None),
        ({"mode": "bad_request", "text": "max_tokens is too large"}, "bad_request", 400),
    ],
)
async def test_faults_map_to_error_kinds(
    provider: OpenAICompatible, fake: FakeOpenAI, streamed: bool, behaviour: dict, kind: str, status: int | None
) -> None:
    fake.script([behaviour])
    with pytest.raises(ProviderError) as caught:
        if streamed:
            await collect(provider, QUESTION)
        else:
            await provider.generate(QUESTION)
    assert caught.value.kind == kind and caught.value.status == status
    assert caught.value.retryable is (kind in ("server_error", "malformed"))
    if kind == "bad_request":
        assert "max_tokens is too large" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("streamed", [False, True])
async def test_rate_limit_carries_retry_after(provider: OpenAICompatible, fake: FakeOpenAI, streamed: bool) -> None:
    fake.script([{"mode": "rate_limit", "retry_after": 2.5}])
    with pytest.raises(ProviderError) as caught:
        if streamed:
            await collect(provider, QUESTION)
        else:
            await provider.generate(QUESTION)
    assert (caught.value.kind, caught.value.status, caught.value.retry_after) == ("rate_limited", 429, 2.5)
    assert caught.value.retryable


@pytest.mark.asyncio
@pytest.mark.parametrize("streamed", [False, True])
async def test_hang_times_out_quickly(provider: OpenAICompatible, fake: FakeOpenAI, streamed: bool) -> None:
    fake.script([{"mode": "hang"}])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        if streamed:
            await collect(provider, QUESTION, timeout_s=0.3)
        else:
            await provider.generate(QUESTION, timeout_s=0.3)
    assert caught.value.kind == "timeout" and caught.value.retryable
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_cut_stream_is_malformed(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    fake.script([{"mode": "cut_stream"}, {"mode": "cut_stream"}])
    with pytest.raises(ProviderError, match="stream cut") as caught:
        await collect(provider, QUESTION)
    assert caught.value.kind == "malformed"
    with pytest.raises(ProviderError) as caught:  # the same fault without streaming: a truncated body
        await provider.generate(QUESTION)
    assert caught.value.kind == "malformed"


@pytest.mark.asyncio
async def test_missing_usage_is_estimated(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    fake.script([{"mode": "no_usage"}, {"mode": "no_usage"}])
    result = await provider.generate(QUESTION)
    assert result.text == EXPECTED_ANSWER
    assert result.usage.estimated is True and result.usage.output_tokens == estimate_tokens(EXPECTED_ANSWER)
    deltas, final = await collect(provider, QUESTION)
    assert "".join(deltas) == final.text and final.usage.estimated is True and final.usage.input_tokens > 0


@pytest.mark.asyncio
async def test_error_messages_never_contain_the_key(provider: OpenAICompatible, fake: FakeOpenAI) -> None:
    fake.script([{"mode": "bad_request", "text": "Incorrect API key provided: sk-test-secret-123"}])
    with pytest.raises(ProviderError) as caught:
        await provider.generate(QUESTION)
    assert "sk-test-secret-123" not in str(caught.value) and "[redacted]" in str(caught.value)
    assert "sk-test-secret-123" not in repr(provider)


@pytest.mark.asyncio
async def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with OpenAICompatible(f"http://127.0.0.1:{port}/v1", None, "m", timeout_s=2) as dead:
        with pytest.raises(ProviderError) as caught:
            await dead.generate(QUESTION)
    assert caught.value.kind == "connection" and caught.value.retryable


def test_from_spec_names_the_missing_key_variable() -> None:
    spec = ModelSpec(provider="openai", model="gpt-test", api_key_env="BATON_TEST_OPENAI_KEY")
    with pytest.raises(ProviderError, match="set the environment variable BATON_TEST_OPENAI_KEY") as caught:
        OpenAICompatible.from_spec(spec, {})
    assert caught.value.kind == "missing_key" and not caught.value.retryable


def test_from_spec_defaults_to_the_openai_url() -> None:
    provider = OpenAICompatible.from_spec(ModelSpec(provider="openai", model="gpt-test"), {})
    assert provider.base_url == DEFAULT_OPENAI_BASE_URL == "https://api.openai.com/v1"


@pytest.mark.asyncio
async def test_from_spec_resolves_url_and_key_from_the_environment(fake: FakeOpenAI) -> None:
    spec = ModelSpec(
        provider="openai", api_key_env="BATON_TEST_OPENAI_KEY", base_url_env="BATON_TEST_OPENAI_URL", timeout_s=3
    )
    env = {"BATON_TEST_OPENAI_KEY": "sk-from-env", "BATON_TEST_OPENAI_URL": fake.base_url}
    async with OpenAICompatible.from_spec(spec, env, name="small") as provider:
        assert (provider.model, provider.timeout_s, provider.base_url) == ("small", 3, fake.base_url)
        result = await provider.generate(QUESTION)
    assert result.text == EXPECTED_ANSWER
    assert fake.calls[-1]["authorization"] is True and fake.calls[-1]["body"]["model"] == "small"


# -- the fake server itself, standalone and scripted over HTTP -------------------------------------


def test_fake_server_runs_standalone_and_is_scriptable_over_http() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_openai", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the fake server did not print its ready line"
        line = process.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:")
        base_url = line.split(" ", 1)[1]
        root = base_url.removesuffix("/v1")
        with httpx.Client(timeout=5) as http:
            assert http.get(f"{base_url}/models").json()["data"][0]["id"] == "fake-model"
            assert http.post(f"{root}/_control/script", json=[{"mode": "rate_limit", "retry_after": 3}]).status_code == 200
            assert http.post(f"{root}/_control/script", json=[{"mode": "nope"}]).status_code == 400
            http.post(f"{root}/_control/script", json=[{"mode": "rate_limit", "retry_after": 3}])
            http.post(f"{root}/_control/default", json={"mode": "ok", "text": "scripted over HTTP"})
            limited = http.post(f"{base_url}/chat/completions", json={"model": "m", "messages": QUESTION})
            assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
            answer = http.post(f"{base_url}/chat/completions", json={"model": "m", "messages": QUESTION})
            assert answer.json()["choices"][0]["message"]["content"] == "scripted over HTTP"
            calls = http.get(f"{root}/_control/calls").json()
            assert [call.get("mode") for call in calls] == [None, "rate_limit", "ok"]  # GET /models first
            http.post(f"{root}/_control/reset")
            assert http.get(f"{root}/_control/calls").json() == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_fake_close_releases_a_hung_request() -> None:
    server = FakeOpenAI()
    server.set_default({"mode": "hang"})
    with httpx.Client(timeout=10) as http:
        # The request hangs in a handler thread; closing the server must not wait 60 s for it.
        thread = threading.Thread(
            target=lambda: _swallow(lambda: http.post(f"{server.base_url}/chat/completions", json={"messages": QUESTION}))
        )
        thread.start()
        eventually_sync(lambda: server.calls, 5, every=0.01)
        started = time.monotonic()
        server.close()
        thread.join(timeout=5)
    assert time.monotonic() - started < 2 and not thread.is_alive()


def _swallow(call) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


@pytest.mark.asyncio
async def test_the_answer_keeps_the_providers_model_and_id_for_the_trace(provider: OpenAICompatible) -> None:
    result = await provider.generate(QUESTION, max_tokens=64)
    assert result.response_id and result.response_id.startswith("chatcmpl-")
    result.model = "gpt-small"  # the pool names the catalog alias that served the step
    assert result.response_model == "fake-model"  # gen_ai.response.model: what the provider said
    deltas, streamed = await collect(provider, QUESTION)
    assert streamed.response_id and streamed.response_model == "fake-model"


@pytest.mark.asyncio
async def test_the_clients_sampling_settings_reach_the_provider_capped_by_the_model(fake: FakeOpenAI) -> None:
    from services.generator.models import ModelCall

    spec = ModelSpec(provider="openai", max_output_tokens=100)
    call = ModelCall(question="q", passages=[], history=[], max_tokens=500, temperature=0.9, top_p=0.5)
    async with OpenAICompatible(fake.base_url, None, "fake-model") as client:
        await client.generate(QUESTION, **call.sampling(spec))
    sent = fake.calls[-1]["body"]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (100, 0.9, 0.5)
