"""What a kiosk host's cabinets report, written out in batches: holes to PostgreSQL, live summaries to Redis.

A kiosk tells its host every snapshot and every status change. Written one by one, a fleet connecting at
once (each cabinet's first snapshot) or uploading snapshots would be a transaction and several Redis round
trips per message. Instead `StationSync` keeps, per station, only the latest report that differs from what
was last written, and a writer task writes whatever is pending every `interval_s`: the holes of all changed
stations in one transaction, all changed live summaries (and their place in the geo index of rentable
stations) in one Redis pipeline. A report equal to what is written costs nothing.

The durable holes are a copy for a restarted host (it rebuilds its kiosks from them, then asks every cabinet
for a snapshot anyway); the live summaries feed station lists. Neither is read on the rental path, so a
fraction of a second of delay changes nothing that matters; `flushed()` waits for it (tests, shutdown).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

from actors.messages import KioskStatus
from domain import stations
from domain.stations import SlotReport
from storage.db import Database

log = logging.getLogger(__name__)

Holes = tuple[SlotReport, ...]


class StationSync:
    def __init__(
        self, *, db: Database, redis: Redis, live_key: Callable[[str], str], interval_s: float
    ) -> None:
        self.db, self.redis, self.live_key, self.interval_s = db, redis, live_key, interval_s
        self._written_holes: dict[str, Holes] = {}
        self._written_status: dict[str, KioskStatus] = {}
        self._holes: dict[str, Holes] = {}
        self._statuses: dict[str, KioskStatus] = {}
        self._writer: asyncio.Task[None] | None = None

    def known(self, serial_number: str, holes: Holes) -> None:
        """What the database already holds for a station (the host read it when it built the kiosk)."""
        self._written_holes[serial_number] = holes

    def holes(self, serial_number: str, holes: Holes) -> None:
        if self._written_holes.get(serial_number) == holes:
            self._holes.pop(serial_number, None)
        else:
            self._holes[serial_number] = holes
            self._wake()

    def status(self, status: KioskStatus) -> None:
        if self._written_status.get(status.serial_number) == status:
            self._statuses.pop(status.serial_number, None)
        else:
            self._statuses[status.serial_number] = status
            self._wake()

    def forget(self, serial_number: str) -> None:
        """The station was deleted: nothing more is written for it."""
        for table in (self._written_holes, self._written_status, self._holes, self._statuses):
            table.pop(serial_number, None)

    def _wake(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_soon(), name="station-sync")

    async def _write_soon(self) -> None:
        try:
            await asyncio.sleep(self.interval_s)
            while self._holes or self._statuses:
                await self._write()
        finally:
            self._writer = None

    async def _write(self) -> None:
        holes, self._holes = self._holes, {}
        statuses, self._statuses = self._statuses, {}
        try:
            if holes:
                async with self.db.transaction() as session:
                    await stations.record_snapshots(session, holes)
                self._written_holes.update(holes)
            if statuses:
                pipe = self.redis.pipeline(transaction=False)
                for status in statuses.values():
                    key = self.live_key(status.serial_number)
                    pipe.hset(
                        key,
                        mapping={
                            "online": int(status.online),
                            "ready": int(status.ready),
                            "total_slots": status.total_slots,
                            "available_power_banks": status.available_power_banks,
                            "empty_slots": status.empty_slots,
                        },
                    )
                    stations.stage_geo_availability(pipe, status.serial_number, live=key)
                await pipe.execute()
                self._written_status.update(statuses)
        except Exception as exc:  # keep what failed pending (unless newer reports replaced it) and retry
            log.warning("event=station_sync_failed stations=%s error=%r", len(holes) + len(statuses), exc)
            self._holes = {**holes, **self._holes}
            self._statuses = {**statuses, **self._statuses}
            await asyncio.sleep(self.interval_s)

    async def flushed(self) -> None:
        """Wait until every report so far is written."""
        while self._writer is not None:
            await asyncio.shield(self._writer)
