"""The fleet path's batching: `Outbox` and `Lookup` (actors.batching) and the Redis `Stream` (actors.bus)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from actors.batching import Lookup, Outbox
from actors.bus import Stream
from telemetry import metrics


class Receiver:
    """Records each batch; holds each call until released, so a test decides when one is in flight."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.called = asyncio.Event()

    async def send(self, batch: list[int]) -> None:
        self.batches.append(batch)
        self.called.set()
        await self.release.wait()


async def test_an_outbox_sends_one_batch_at_a_time_in_order() -> None:
    receiver = Receiver()
    outbox = Outbox[int]("test", receiver.send, limit=100, max_batch=3)
    outbox.put(1)
    await receiver.called.wait()  # the lone item went at once
    for item in range(2, 9):  # arrive while the first call is in flight
        outbox.put(item)
    assert receiver.batches == [[1]]
    receiver.release.set()
    await outbox.flushed()
    assert receiver.batches == [[1], [2, 3, 4], [5, 6, 7], [8]]


async def test_a_full_outbox_refuses_and_counts_and_a_failed_send_is_counted() -> None:
    def dropped() -> float:
        return metrics.OUTBOX_DROPPED.labels(outbox="full")._value.get()  # type: ignore[no-any-return]

    receiver = Receiver()
    outbox = Outbox[int]("full", receiver.send, limit=2, max_batch=10)
    before = dropped()
    assert outbox.put(1) and outbox.put(2)
    assert outbox.put(3) is False  # the first is still waiting for its call to start
    assert dropped() == before + 1
    receiver.release.set()
    await outbox.flushed()
    assert receiver.batches == [[1, 2]]

    async def failing(batch: list[int]) -> None:
        raise ConnectionError("receiver gone")

    broken = Outbox[int]("full", failing, limit=10, max_batch=10)
    broken.put(1)
    broken.put(2)
    await broken.flushed()
    assert dropped() == before + 3  # nothing retried, everything counted


async def test_a_lookup_answers_every_key_asked_meanwhile_with_one_fetch() -> None:
    fetches: list[list[str]] = []
    gate = asyncio.Event()

    async def fetch(keys: list[str]) -> dict[str, int]:
        fetches.append(sorted(keys))
        await gate.wait()
        return {k: len(k) for k in keys if k != "missing"}

    lookup = Lookup[str, int](fetch, default=-1)
    first = asyncio.create_task(lookup.get("a"))
    await asyncio.sleep(0)  # the first fetch starts with one key
    rest = [asyncio.create_task(lookup.get(k)) for k in ("bb", "ccc", "bb", "missing")]
    gate.set()
    assert await first == 1
    assert [await t for t in rest] == [2, 3, 2, -1]
    assert fetches == [["a"], ["bb", "ccc", "missing"]]


async def test_a_failed_lookup_fails_its_waiters_and_the_next_one_fetches_again() -> None:
    calls = 0

    async def fetch(keys: list[str]) -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("database slow")
        return dict.fromkeys(keys, 7)

    lookup = Lookup[str, int](fetch, default=0)
    with pytest.raises(TimeoutError):
        await lookup.get("x")
    assert await lookup.get("x") == 7


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_stream_delivers_batches_sent_after_reading_started_in_order(redis: Redis) -> None:
    name = f"test-stream-{uuid.uuid4().hex}"
    sender, reader = Stream(redis, name), Stream(redis, name)
    await sender.send(["before"])  # sent before the reader started: not for it
    got: list[list[object]] = []
    done = asyncio.Event()

    async def handle(batch: list[object]) -> None:
        got.append(batch)
        if len(got) == 50:
            done.set()

    await reader.start_reading(handle)
    try:
        for i in range(50):
            await sender.send([("SN1", "update", bytes([i]))])
        await asyncio.wait_for(done.wait(), 5)
    finally:
        reader.stop()
        await redis.delete(name)
    assert got == [[("SN1", "update", bytes([i]))] for i in range(50)]
