"""An ordered, batching sender between two processes (broker → kiosk host, kiosk host → broker).

A Ray call costs far more than the little it carries (a frame, a command), so each side puts what it has
for one receiver in an `Outbox`: one call is in flight at a time and carries everything that arrived
since the previous one was sent. Nothing waits for a timer: a lone item goes out at once, and under load
batches grow by themselves. Items keep their order (one call after the other). What cannot be sent is
counted and logged, never retried: the receivers recover from a lost message as from a lost frame (a
cabinet is asked for a snapshot; an eject whose command was lost is settled by `check`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from telemetry import metrics

T = TypeVar("T")
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
