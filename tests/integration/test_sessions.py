"""Sessions on a real JetStream KV bucket: caps, expiry, concurrent writers."""

import asyncio

import pytest

from shared.schema import ChatMessage
from shared.sessions import SessionStore, capped


def turn(i: int, role: str = "user", size: int = 10) -> ChatMessage:
    return ChatMessage(role=role, content=f"{i:0{size}d}")


def test_the_cap_drops_the_oldest_turns_first():
    turns = [turn(i) for i in range(10)]
    assert capped(turns, max_turns=3, max_chars=1000) == turns[-3:]
    assert capped(turns, max_turns=100, max_chars=25) == turns[-2:]  # 10 chars each


@pytest.fixture
async def kv(kv_bucket):
    return await kv_bucket(ttl=1.0)


async def test_history_accumulates_and_is_capped(kv):
    store = SessionStore(kv, max_turns=4, max_chars=10_000)
    for i in range(3):
        await store.append("s1", turn(i), turn(i, "assistant"))
    history = await store.history("s1")
    assert [t.content for t in history] == [turn(1).content, turn(1).content, turn(2).content, turn(2).content]
    assert await store.history("unknown") == []


async def test_idle_sessions_expire_with_the_bucket_ttl(kv):
    store = SessionStore(kv)
    await store.append("s2", turn(1))
    assert len(await store.history("s2")) == 1
    await asyncio.sleep(1.6)
    assert await store.history("s2") == []


async def test_concurrent_writers_lose_no_turn(kv):
    stores = [SessionStore(kv, max_turns=100) for _ in range(2)]  # two replicas
    await asyncio.gather(*(stores[i % 2].append("s3", turn(i)) for i in range(10)))
    assert sorted(t.content for t in await stores[0].history("s3")) == sorted(turn(i).content for i in range(10))
