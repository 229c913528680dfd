"""Kiosk-host Ray actors: each hosts many Kiosk actors (see shared/design/ARCHITECTURE.md, placement).

A host owns the cabinets that rendezvous hashing gives it. It is the kiosks' way to the world: it
publishes their commands through the broker actor, records what they report through the domain, and
keeps each station's live summary in Redis for station lists. When Ray restarts a host after a crash,
it rebuilds its kiosks from the database and asks every cabinet the broker still has connected for a
snapshot, which reconciles what happened meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import ray
from redis.asyncio import Redis

from actors.kiosk import HTTP_UPLOAD, Kiosk, KioskConfig, Returned
from actors.messages import (
    CabinetConnected,
    CabinetDisconnected,
    CabinetSubscribed,
    CommandOutcome,
    Ejected,
    EjectOutcome,
    EjectUnconfirmed,
    FrameReceived,
    HoleEjected,
    KioskMessage,
    KioskOffline,
    KioskStatus,
    RemoteCommand,
    SlotView,
    Tick,
    outcome_reason,
)
from actors.placement import host_names, owner
from config import Settings
from domain import rentals, stations
from domain.stations import StationModel
from storage.db import Database
from telemetry import logs, metrics

log = logging.getLogger(__name__)
BROKER_ACTOR = "mqtt-broker"


def live_key(serial_number: str) -> str:
    return f"station:{serial_number}:live"


class KioskHost:
    """Plain async class; `KioskHostActor` below is its Ray actor form."""

    def __init__(self, settings: Settings, name: str) -> None:
        logs.configure(settings.log_level)
        self.settings = settings
        self.name = name
        self.hosts = host_names(settings.kiosk_hosts)
        self.config = KioskConfig(
            eject_timeout_s=settings.eject_timeout_s,
            min_soc=settings.rental_min_soc,
            max_temperature_c=settings.slot_max_temperature_c,
            eject_queue_limit=settings.eject_queue_limit,
            eject_banks_tried=settings.eject_banks_tried,
            slot_quarantine_s=settings.slot_quarantine_s,
            silence_timeout_s=settings.cabinet_silence_timeout_s,
            strict_checksum=settings.strict_checksum,
            upload_check_interval_s=settings.upload_check_interval_s,
        )
        assert settings.database_url and settings.redis_url, "hosts get resolved DATABASE_URL and REDIS_URL"
        self.db = Database(settings.database_url, pool_size=3)
        self.redis: Redis = Redis.from_url(settings.redis_url)
        self.kiosks: dict[str, Kiosk] = {}
        self._broker: Any = None
        self._started: asyncio.Task[None] | None = None

    def _kiosk(self, model: StationModel, known: dict[int, tuple[str, int | None]] | None = None) -> Kiosk:
        return Kiosk(
            serial_number=model.serial_number,
            boards=model.boards,
            holes_per_board=model.holes_per_board,
            config=self.config,
            ports=self,
            known=known,
            maintenance=model.maintenance,
        )

    async def started(self) -> None:
        """Build this host's kiosks from the database once, then resync with the cabinets still connected."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._rebuild())
        await asyncio.shield(self._started)

    async def _rebuild(self) -> None:
        async with self.db.transaction() as session:
            views = await stations.durable_views(session)
        for model, known in views:
            if owner(model.serial_number, self.hosts) == self.name and model.serial_number not in self.kiosks:
                self.kiosks[model.serial_number] = self._kiosk(model, known)
        try:
            connected = await self._broker_actor().connected_cabinets.remote()
        except Exception as exc:  # the broker may be (re)starting: cabinets will reconnect
            log.warning("event=host_resync_skipped host=%s error=%r", self.name, exc)
            connected = []
        for sn in connected:
            if sn in self.kiosks:
                self.kiosks[sn].tell(CabinetConnected())
                self.kiosks[sn].tell(CabinetSubscribed())
        log.info(
            "event=host_started host=%s kiosks=%s connected=%s", self.name, len(self.kiosks), len(connected)
        )

    # --- the cabinet's session, as the broker sees it ------------------------------------------------
    async def authenticate(self, serial_number: str, password: str) -> bool:
        await self.started()
        async with self.db.transaction() as session:
            stored = await stations.cabinet_secret_hash(session, serial_number)
            model = await stations.station_model(session, serial_number)
        if stored is None or model is None or not stations.secret_matches(password, stored):
            return False
        kiosk = self.kiosks.get(serial_number)
        if kiosk is None or kiosk.holes_per_board != model.holes_per_board:
            self.kiosks[serial_number] = self._kiosk(model)
        return True

    async def on_connect(self, serial_number: str) -> None:
        await self._tell(serial_number, CabinetConnected())

    async def on_subscribe(self, serial_number: str) -> None:
        await self._tell(serial_number, CabinetSubscribed())

    async def on_disconnect(self, serial_number: str) -> None:
        await self.started()
        kiosk = self.kiosks.get(serial_number)
        if kiosk is not None:  # no kiosk (not built yet, or its station was deleted): nothing is online
            kiosk.tell(CabinetDisconnected())

    async def on_frame(self, serial_number: str, kind: str, payload: bytes) -> None:
        await self._tell(serial_number, FrameReceived(kind=kind, payload=payload))

    async def on_upload(self, serial_number: str, payload: bytes) -> None:
        """A frame posted over HTTP by anyone who knows the SN: only a hint (see `Kiosk._on_upload`)."""
        await self._tell(serial_number, FrameReceived(kind=HTTP_UPLOAD, payload=payload))

    async def session_answers(self, serial_number: str, timeout_s: float) -> bool:
        """Whether the cabinet holds a live MQTT session that answers within `timeout_s`."""
        kiosk = await self._owned(serial_number)
        return kiosk is not None and await kiosk.session_answers(timeout_s)

    async def broker_restarted(self) -> None:
        """The broker lost every connection: every cabinet is offline until it reconnects."""
        await self.started()
        for kiosk in self.kiosks.values():
            kiosk.tell(CabinetDisconnected())

    async def _owned(self, serial_number: str) -> Kiosk | None:
        """The station's kiosk, built from the database if it was provisioned after this host started."""
        await self.started()
        kiosk = self.kiosks.get(serial_number)
        if kiosk is None:
            async with self.db.transaction() as session:
                model = await stations.station_model(session, serial_number)
            if model is not None:
                kiosk = self.kiosks[serial_number] = self._kiosk(model)
        return kiosk

    async def _tell(self, serial_number: str, message: KioskMessage) -> None:
        kiosk = await self._owned(serial_number)
        if kiosk is None:
            metrics.MQTT_DROPPED.labels(reason="unknown_cabinet").inc()
            log.warning("event=message_for_unknown_cabinet station_sn=%s message=%r", serial_number, message)
            return
        kiosk.tell(message)

    # --- requests from the API ---------------------------------------------------------------------------
    async def rent(self, serial_number: str, rental_id: str) -> EjectOutcome:
        """Eject for a PENDING_POPUP rental and record the outcome durably (ACTIVE, or CANCELLED)."""
        await self.started()
        kiosk = self.kiosks.get(serial_number)
        outcome = (
            await kiosk.eject(request_id=rental_id)
            if kiosk is not None
            else KioskOffline(request_id=rental_id)
        )
        if isinstance(outcome, EjectUnconfirmed):
            return outcome  # stays PENDING_POPUP, resolved from the cabinet's next snapshot
        async with self.db.transaction() as session:
            if isinstance(outcome, Ejected):
                await rentals.activate(
                    session,
                    rental_id=uuid.UUID(rental_id),
                    powerbank_sn=outcome.powerbank_sn,
                    slot_number=outcome.slot_number,
                    soc=outcome.soc,
                    at=datetime.now(UTC),
                )
            else:
                await rentals.cancel_pending(
                    session, rental_id=uuid.UUID(rental_id), reason=outcome_reason(outcome)
                )
        return outcome

    async def command(self, serial_number: str, request: RemoteCommand) -> CommandOutcome:
        """An operator's command (see `Kiosk.command`); a bank ejected from its hole is recorded."""
        kiosk = await self._owned(serial_number)
        if kiosk is None:
            return KioskOffline(request_id=request.request_id)
        outcome = await kiosk.command(request)
        if isinstance(outcome, HoleEjected) and outcome.success:
            async with self.db.transaction() as session:
                await stations.record_event(
                    session,
                    station_sn=serial_number,
                    kind="operator_eject",
                    payload={
                        "request_id": request.request_id,
                        "slot_number": outcome.hole,
                        "powerbank_sn": outcome.powerbank_sn,
                        "reply_lost": outcome.reply_lost,
                    },
                )
                await stations.bank_taken_out(
                    session,
                    serial_number=serial_number,
                    slot_number=outcome.hole,
                    powerbank_sn=outcome.powerbank_sn,
                )
        return outcome

    async def set_maintenance(self, serial_number: str, on: bool) -> bool:
        """Tell the live kiosk its station is (no longer) under maintenance; False if unknown here."""
        kiosk = await self._owned(serial_number)
        if kiosk is None:
            return False
        await kiosk.set_maintenance(on)
        return True

    async def remove(self, serial_number: str) -> bool:
        """The station was deleted: drop its kiosk and its live summary; whether there was a kiosk."""
        await self.started()
        kiosk = self.kiosks.pop(serial_number, None)
        if kiosk is not None:
            kiosk.stop()
        await self.redis.delete(live_key(serial_number))
        await self.redis.zrem(stations.GEO_AVAILABLE_KEY, serial_number)
        log.info("event=kiosk_removed station_sn=%s had_kiosk=%s", serial_number, kiosk is not None)
        return kiosk is not None

    async def status(self, serial_number: str) -> KioskStatus | None:
        await self.started()
        kiosk = self.kiosks.get(serial_number)
        return kiosk.status() if kiosk is not None else None

    async def slots(self, serial_number: str) -> list[SlotView] | None:
        await self.started()
        kiosk = self.kiosks.get(serial_number)
        return kiosk.slot_views() if kiosk is not None else None

    async def tick(self) -> None:
        """Periodic (driven by the system's supervisor): silence timeouts and stale PENDING_POPUP rentals."""
        await self.started()
        now = time.monotonic()
        for kiosk in self.kiosks.values():
            kiosk.tell(Tick(now=now))
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.pending_popup_resolve_s)
        abandon = datetime.now(UTC) - timedelta(seconds=self.settings.pending_popup_abandon_s)
        async with self.db.transaction() as session:
            stale = await rentals.pending_stations(session, older_than=cutoff)
            for sn in stale:
                owned = self.kiosks.get(sn)
                if owned is not None and not owned.ready:  # offline too long to tell: nothing is charged
                    await rentals.cancel_pending_before(session, station_sn=sn, before=abandon)
        for sn in stale:
            owned = self.kiosks.get(sn)
            if owned is not None:
                await owned.settle_stale(cutoff)

    async def settle_stale(
        self, serial_number: str, *, present: set[str], in_flight: str | None, older_than: datetime
    ) -> None:
        async with self.db.transaction() as session:
            await rentals.resolve_pending(
                session, station_sn=serial_number, present=present, exclude=in_flight, older_than=older_than
            )

    def metric_families(self) -> list[Any]:
        kiosks = list(self.kiosks.values())
        metrics.CABINETS_ONLINE.set(sum(k.online for k in kiosks))
        metrics.CABINETS_READY.set(sum(k.ready for k in kiosks))
        metrics.POWER_BANKS_RENTABLE.set(sum(k.status().available_power_banks for k in kiosks))
        counts = {"available": 0, "occupied": 0, "maintenance": 0, "error": 0}
        for kiosk in kiosks:
            for view in kiosk.slot_views():
                counts[view.status.lower()] += 1
        for state, count in counts.items():
            metrics.SLOTS.labels(state=state).set(count)
        return metrics.local_families()

    async def drained(self) -> None:
        """Wait until every kiosk has handled what it was told (tests use it instead of sleeping)."""
        await asyncio.gather(*(k.drained() for k in self.kiosks.values()))

    # --- KioskPorts ---------------------------------------------------------------------------------------
    def _broker_actor(self) -> Any:
        if self._broker is None:
            self._broker = ray.get_actor(BROKER_ACTOR, namespace=self.settings.ray_namespace)
        return self._broker

    async def publish(self, serial_number: str, payload: bytes) -> None:
        await self._broker_actor().publish_command.remote(serial_number, payload)

    async def eject_dispatched(
        self, request_id: str, slot_number: int, powerbank_sn: str, soc: int | None
    ) -> bool:
        async with self.db.transaction() as session:
            return await rentals.dispatch_eject(
                session,
                rental_id=uuid.UUID(request_id),
                powerbank_sn=powerbank_sn,
                slot_number=slot_number,
                soc=soc,
            )

    async def snapshot_received(self, serial_number: str, slots: list[SlotView]) -> None:
        reports = [
            stations.SlotReport(
                slot_number=s.slot_number, state=s.state, powerbank_sn=s.powerbank_sn, soc=s.battery_level
            )
            for s in slots
        ]
        async with self.db.transaction() as session:
            await stations.record_snapshot(session, serial_number=serial_number, slots=reports)

    async def powerbank_returned(
        self, serial_number: str, slot_number: int, powerbank_sn: str, soc: int
    ) -> None:
        async with self.db.transaction() as session:
            await stations.record_event(
                session,
                station_sn=serial_number,
                kind="return",
                payload={"slot_number": slot_number, "powerbank_sn": powerbank_sn, "soc": soc},
            )
            await self._close_rental(session, serial_number, slot_number, powerbank_sn, soc)

    async def _close_rental(
        self, session: Any, serial_number: str, slot_number: int, powerbank_sn: str, soc: int | None
    ) -> rentals.Returned | None:
        return await rentals.complete_by_return(
            session,
            powerbank_sn=powerbank_sn,
            station_sn=serial_number,
            slot_number=slot_number,
            soc=soc,
            at=datetime.now(UTC),
            late_fee_per_hour=self.settings.late_fee_per_hour,
        )

    async def reconcile(
        self, serial_number: str, *, present: set[str], appeared: list[Returned], in_flight: str | None
    ) -> None:
        async with self.db.transaction() as session:
            for bank in appeared:
                closed = await self._close_rental(
                    session, serial_number, bank.slot_number, bank.powerbank_sn, bank.soc
                )
                if closed is not None:  # its 0x40 never reached us
                    await stations.record_event(
                        session,
                        station_sn=serial_number,
                        kind="return_reconciled",
                        payload={"slot_number": bank.slot_number, "powerbank_sn": bank.powerbank_sn},
                    )
            await rentals.resolve_pending(
                session, station_sn=serial_number, present=present, exclude=in_flight
            )

    async def status_changed(self, status: KioskStatus) -> None:
        """Write the station's live summary, then its place in the geo index of rentable stations."""
        await self.redis.hset(
            live_key(status.serial_number),
            mapping={
                "online": int(status.online),
                "ready": int(status.ready),
                "total_slots": status.total_slots,
                "available_power_banks": status.available_power_banks,
                "empty_slots": status.empty_slots,
            },
        )
        await stations.refresh_geo_availability(
            self.redis, status.serial_number, live=live_key(status.serial_number)
        )


KioskHostActor = ray.remote(KioskHost)


async def read_live(redis: Redis, serial_numbers: list[str]) -> dict[str, KioskStatus]:
    """Live summaries written by the hosts, for station lists (one Redis round trip)."""
    pipe = redis.pipeline()
    for sn in serial_numbers:
        pipe.hgetall(live_key(sn))
    rows = await pipe.execute()
    live = {}
    for sn, row in zip(serial_numbers, rows, strict=True):
        if row:
            values = {k.decode(): int(v) for k, v in row.items()}
            live[sn] = KioskStatus(
                serial_number=sn,
                online=bool(values["online"]),
                ready=bool(values["ready"]),
                total_slots=values["total_slots"],
                available_power_banks=values["available_power_banks"],
                empty_slots=values["empty_slots"],
            )
    return live
