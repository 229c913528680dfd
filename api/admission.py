"""Admission control: at most `limit` requests of one kind in flight per API process.

Beyond the limit a request is refused at once with 503 `overloaded` and `Retry-After`, before any work:
no rental is written, no cabinet is asked, and an `Idempotency-Key` is not claimed, so the client's
retry runs as a new request. Under a load the machine cannot serve, the rents it admits keep their
latency and the rest get a clear answer, instead of every rent waiting seconds in a queue.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from domain.errors import Overloaded
from telemetry import metrics

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, name: str, *, limit: int, retry_after_s: int) -> None:
        self.name = name
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            metrics.HTTP_OVERLOADED.labels(kind=self.name).inc()
            log.debug("event=request_overloaded kind=%s in_flight=%s", self.name, self.in_flight)
            raise Overloaded(context={"retry_after": self.retry_after_s, "in_flight_limit": self.limit})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
