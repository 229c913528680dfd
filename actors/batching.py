"""Batching without timers, for work that costs far more per call than per item.

A Ray call costs far more than the frame or command it carries, and a query far more than the row it
reads; a connect storm makes thousands of each per second. Both helpers keep one call in flight at a time,
and whatever arrives meanwhile goes in the next call: a lone item goes at once, and under load batches grow
by themselves.

- `Outbox`: an ordered, fire-and-forget sender between two processes (broker → kiosk host, kiosk host →
  broker). Items keep their order. What cannot be sent is counted and logged, never retried: the receivers
  recover from a lost message as from a lost frame (a cabinet is asked for a snapshot; an eject whose
  command was lost is settled by `check`).
- `Lookup`: request/response by key (a cabinet's credentials, a station's model): `await lookup.get(key)`,
  answered from one query for every key asked meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from telemetry import metrics

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
log = logging.getLogger(__name__)


class Outbox(Generic[T]):
    """`put` items for one receiver; `send(batch)` delivers a batch (a Ray call), one at a time.

    `limit` bounds what may wait: beyond it an item is refused (`put` returns False; counted as
    `powerbank_outbox_dropped_total{outbox}`), so a receiver that stops answering cannot exhaust memory."""

    def __init__(
        self, name: str, send: Callable[[list[T]], Awaitable[object]], *, limit: int, max_batch: int
    ) -> None:
        self.name = name
        self._send = send
        self._limit = limit
        self._max_batch = max_batch
        self._waiting: list[T] = []
        self._sender: asyncio.Task[None] | None = None

    def put(self, item: T) -> bool:
        if len(self._waiting) >= self._limit:
            metrics.OUTBOX_DROPPED.labels(outbox=self.name).inc()
            log.warning("event=outbox_full outbox=%s limit=%s", self.name, self._limit)
            return False
        self._waiting.append(item)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._drain(), name=f"outbox-{self.name}")
        return True

    def __len__(self) -> int:
        return len(self._waiting)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                metrics.OUTBOX_BATCH.labels(outbox=self.name).observe(len(batch))
                try:
                    await self._send(batch)
                except Exception as exc:
                    metrics.OUTBOX_DROPPED.labels(outbox=self.name).inc(len(batch))
                    log.warning(
                        "event=outbox_send_failed outbox=%s items=%s error=%r", self.name, len(batch), exc
                    )
        finally:
            self._sender = None

    async def flushed(self) -> None:
        """Wait until everything put so far has been handed to the receiver (tests, shutdown)."""
        while self._sender is not None:
            await asyncio.shield(self._sender)


class Lookup(Generic[K, V]):
    """`await get(key)`: `fetch(keys)` answers many keys at once (missing keys: `default`)."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, default: V) -> None:
        self._fetch = fetch
        self._default = default
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._fetcher: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._fetcher is None:
            self._fetcher = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                try:
                    found = await self._fetch(list(waiting))
                except Exception as exc:
                    for futures in waiting.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in waiting.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(key, self._default))
        finally:
            self._fetcher = None
