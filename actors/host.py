"""Kiosk-host Ray actors: each hosts many Kiosk actors (placement: `actors.placement`).

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
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import ray
from redis.asyncio import Redis

from actors.batching import Lookup, Outbox
from actors.bus import Stream, commands_stream, events_stream
from actors.kiosk import HTTP_UPLOAD, Kiosk, KioskConfig, Returned
from actors.messages import (
    CabinetConnected,
    CabinetDisconnected,
    CabinetEvent,
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
    RentRefused,
    RentRequest,
    SlotView,
    Tick,
    kiosk_message,
    outcome_reason,
)
from actors.placement import host_names, owner
from actors.sync import StationSync
from config import Settings
from domain import rentals, stations
from domain.errors import DomainError, NotFound
from domain.stations import SlotReport, StationModel
from storage.db import Database
from telemetry import logs, metrics

log = logging.getLogger(__name__)
SettleKey = tuple[str, tuple[str, ...]]  # (station SN, power banks that appeared in its holes)
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
        self._loading: dict[str, list[KioskMessage]] = {}  # messages for kiosks being built, in order
        self._loads: set[asyncio.Task[None]] = set()
        self._models = Lookup[str, StationModel | None](self._station_models, default=None)
        self._settle_checks = Lookup[SettleKey, tuple[set[str], bool]](
            self._to_settle, default=(set(), False)
        )
        self._broker: Any = None
        self._events = Stream(self.redis, events_stream(settings.ray_namespace, name))
        self._commands = Outbox[tuple[str, bytes]](
            f"{name}-to-broker",
            Stream(self.redis, commands_stream(settings.ray_namespace)).send,
            limit=settings.outbox_limit,
            max_batch=settings.outbox_max_batch,
        )
        self._started: asyncio.Task[None] | None = None
        self.sync = StationSync(
            db=self.db, redis=self.redis, live_key=live_key, interval_s=settings.station_sync_interval_s
        )
        self._rents: dict[str, _PendingRent] = {}  # rentals whose eject is queued or in flight, by id
        self._gauges: dict[str, Gauges] = {}  # each kiosk's part of the fleet gauges, kept on every change
        self._totals = Gauges()

    def _kiosk(self, model: StationModel, known: dict[int, tuple[str, int | None]] | None = None) -> Kiosk:
        kiosk = Kiosk(
            serial_number=model.serial_number,
            boards=model.boards,
            holes_per_board=model.holes_per_board,
            config=self.config,
            ports=self,
            known=known,
            maintenance=model.maintenance,
        )
        self.sync.known(model.serial_number, _reports(kiosk.slot_views()))
        self._count(kiosk)
        return kiosk

    async def started(self) -> None:
        """Build this host's kiosks from the database once, then resync with the cabinets still connected."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._rebuild())
        await asyncio.shield(self._started)

    async def _rebuild(self) -> None:
        await self._events.start_reading(self.on_cabinet_events)  # what arrives meanwhile waits in _loading
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
    async def on_cabinet_events(self, events: list[CabinetEvent]) -> None:
        """What the broker saw of this host's cabinets (connects, subscribes, disconnects, frames), in arrival
        order, one batch at a time (`broker.actor.FleetRouter`, over `actors.bus`)."""
        ready = self._started is not None and self._started.done()
        for serial_number, kind, payload in events:
            message = kiosk_message(kind, payload)
            kiosk = self.kiosks.get(serial_number) if ready else None
            if kiosk is not None:
                kiosk.tell(message)
            elif serial_number in self._loading:  # keep the order behind what waits for the kiosk
                self._loading[serial_number].append(message)
            else:
                self._loading[serial_number] = [message]
                task = asyncio.get_running_loop().create_task(self._load(serial_number))
                self._loads.add(task)
                task.add_done_callback(self._loads.discard)

    async def _load(self, serial_number: str) -> None:
        """Deliver what waits for a kiosk not built yet (the host is starting, or the station is new)."""
        try:
            kiosk = await self._owned(serial_number)
        finally:
            waiting = self._loading.pop(serial_number, [])
        if kiosk is None:
            metrics.MQTT_DROPPED.labels(reason="unknown_cabinet").inc(len(waiting))
            log.warning(
                "event=message_for_unknown_cabinet station_sn=%s messages=%s", serial_number, len(waiting)
            )
            return
        for message in waiting:
            kiosk.tell(message)

    async def on_upload(self, serial_number: str, payload: bytes) -> None:
        """A frame posted over HTTP by anyone who knows the SN: only a hint (see `Kiosk._on_upload`)."""
        await self._tell(serial_number, FrameReceived(kind=HTTP_UPLOAD, payload=payload))

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
            model = await self._models.get(serial_number)
            kiosk = self.kiosks.get(serial_number)  # built meanwhile?
            if kiosk is None and model is not None:
                kiosk = self.kiosks[serial_number] = self._kiosk(model)
        return kiosk

    async def _station_models(self, serial_numbers: list[str]) -> dict[str, StationModel | None]:
        async with self.db.transaction() as session:
            return dict(await stations.station_models(session, serial_numbers))

    async def _tell(self, serial_number: str, message: KioskMessage) -> None:
        kiosk = await self._owned(serial_number)
        if kiosk is None:
            metrics.MQTT_DROPPED.labels(reason="unknown_cabinet").inc()
            log.warning("event=message_for_unknown_cabinet station_sn=%s message=%r", serial_number, message)
            return
        kiosk.tell(message)

    # --- requests from the API ---------------------------------------------------------------------------
    async def rent(self, serial_number: str, request: RentRequest) -> EjectOutcome | RentRefused:
        """Eject a power bank for a new rental and record it. The cabinet's state is checked first (offline,
        not ready, no bank: nothing is written); then, for the bank chosen, the rental rules run and the
        PENDING_POPUP rental is written with its bank in one transaction, just before the command goes out;
        the cabinet's answer makes it ACTIVE (charged) or CANCELLED (nothing charged), or it stays
        PENDING_POPUP until the cabinet's next snapshot settles it (unconfirmed)."""
        rental_id = request.rental_id
        kiosk = await self._owned(serial_number)
        if kiosk is None:
            error = NotFound(f"Station {serial_number} not found.", context={"serial_number": serial_number})
            return RentRefused(request_id=rental_id, error=error)
        pending = self._rents[rental_id] = _PendingRent(request=request, station_sn=serial_number)
        try:
            outcome = await kiosk.eject(request_id=rental_id)
        finally:
            del self._rents[rental_id]
        if pending.refusal is not None:
            return RentRefused(request_id=rental_id, error=pending.refusal)
        if not pending.written or isinstance(outcome, EjectUnconfirmed):
            return outcome
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
            self._count(kiosk, gone=True)
        self.sync.forget(serial_number)
        await self.sync.flushed()
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
            if kiosk.needs_tick(now):
                kiosk.tell(Tick(now=now))
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.pending_popup_resolve_s)
        abandon = datetime.now(UTC) - timedelta(seconds=self.settings.pending_popup_abandon_s)
        async with self.db.transaction() as session:
            stale = [
                sn for sn in await rentals.pending_stations(session, older_than=cutoff) if sn in self.kiosks
            ]
            for sn in stale:
                if not self.kiosks[sn].ready:  # offline too long to tell: nothing is charged
                    await rentals.cancel_pending_before(session, station_sn=sn, before=abandon)
        for sn in stale:
            await self.kiosks[sn].settle_stale(cutoff)

    async def settle_stale(
        self, serial_number: str, *, present: set[str], in_flight: str | None, older_than: datetime
    ) -> None:
        async with self.db.transaction() as session:
            await rentals.resolve_pending(
                session, station_sn=serial_number, present=present, exclude=in_flight, older_than=older_than
            )

    def metric_families(self) -> list[Any]:
        """This host's part of the fleet metrics (its gauges are kept current as kiosks change)."""
        return metrics.local_families()

    def _count(self, kiosk: Kiosk, *, gone: bool = False) -> None:
        """Move the fleet gauges by the change in this kiosk's part of them."""
        before = self._gauges.pop(kiosk.serial_number, Gauges())
        after = Gauges() if gone else Gauges.of(kiosk)
        if not gone:
            self._gauges[kiosk.serial_number] = after
        if after != before:
            self._totals = self._totals.plus(after, before)
            self._totals.publish()

    async def drained(self) -> None:
        """Wait until every kiosk has handled what it was told and its commands went to the broker (tests use
        it instead of sleeping)."""
        await asyncio.gather(*self._loads)
        await asyncio.gather(*(k.drained() for k in self.kiosks.values()))
        await self._commands.flushed()
        await self.sync.flushed()

    # --- KioskPorts ---------------------------------------------------------------------------------------
    def _broker_actor(self) -> Any:
        if self._broker is None:
            self._broker = ray.get_actor(BROKER_ACTOR, namespace=self.settings.ray_namespace)
        return self._broker

    async def publish(self, serial_number: str, payload: bytes) -> None:
        """Queue a command for the broker (sent in order, batched with the others of this host)."""
        self._commands.put((serial_number, payload))

    async def eject_dispatched(
        self, request_id: str, slot_number: int, powerbank_sn: str, soc: int | None
    ) -> bool:
        """The kiosk is about to eject `powerbank_sn` for a rental: apply the rental rules and write the
        PENDING_POPUP rental with its bank. False (nothing is sent) when the rules refuse."""
        pending = self._rents[request_id]
        request = pending.request
        bank = rentals.EjectTarget(powerbank_sn=powerbank_sn, slot_number=slot_number, soc=soc)
        try:
            async with self.db.transaction() as session:
                if pending.written:  # a bank that failed in its hole: the next one
                    return await rentals.retarget(session, rental_id=uuid.UUID(request_id), bank=bank)
                await rentals.begin(
                    session,
                    user_id=uuid.UUID(request.user_id),
                    station_sn=pending.station_sn,
                    package_id=request.package_id,
                    settings=self.settings,
                    rental_id=uuid.UUID(request_id),
                    bank=bank,
                )
        except DomainError as exc:
            pending.refusal = exc
            return False
        pending.written = True
        return True

    async def snapshot_received(self, serial_number: str, slots: list[SlotView]) -> None:
        self.sync.holes(serial_number, _reports(slots))

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
        """Close the rentals of banks that came back without a 0x40 reaching us, and settle the station's
        PENDING_POPUP rentals from its holes. Usually there is nothing to do (a cabinet reconnecting with its
        own banks): one query, shared by every kiosk asking meanwhile, tells."""
        banks = tuple(sorted(bank.powerbank_sn for bank in appeared))
        rented, pending = await self._settle_checks.get((serial_number, banks))
        if not rented and not pending:
            return
        async with self.db.transaction() as session:
            for bank in appeared:
                if bank.powerbank_sn not in rented:  # in its hole all along, as far as rentals know
                    continue
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
            if pending:
                await rentals.resolve_pending(
                    session, station_sn=serial_number, present=present, exclude=in_flight
                )

    async def _to_settle(self, keys: list[SettleKey]) -> dict[SettleKey, tuple[set[str], bool]]:
        """For each (station, banks that appeared): the banks out on a rental, whether it has PENDING_POPUP
        rentals."""
        async with self.db.transaction() as session:
            rented = await rentals.rented_out(session, [bank for _, banks in keys for bank in banks])
            pending = await rentals.stations_with_pending(session, [sn for sn, _ in keys])
        return {(sn, banks): (rented.intersection(banks), sn in pending) for sn, banks in keys}

    async def status_changed(self, status: KioskStatus) -> None:
        """The station's live summary (for station lists and the geo index) and the fleet gauges."""
        self.sync.status(status)
        kiosk = self.kiosks.get(status.serial_number)
        if kiosk is not None:
            self._count(kiosk)


@dataclass(slots=True)
class _PendingRent:
    request: RentRequest
    station_sn: str
    written: bool = False  # the PENDING_POPUP rental is in the database
    refusal: DomainError | None = None  # ... or the rental rules refused it


def _reports(slots: list[SlotView]) -> tuple[SlotReport, ...]:
    return tuple(
        SlotReport(slot_number=s.slot_number, state=s.state, powerbank_sn=s.powerbank_sn, soc=s.battery_level)
        for s in slots
    )


@dataclass(frozen=True, slots=True)
class Gauges:
    """One kiosk's part of the fleet gauges (or their sum over a host's kiosks)."""

    online: int = 0
    ready: int = 0
    rentable: int = 0
    slots: tuple[int, ...] = (0, 0, 0, 0)  # available, occupied, maintenance, error

    @classmethod
    def of(cls, kiosk: Kiosk) -> Gauges:
        by_state = Counter(view.status for view in kiosk.slot_views())
        return cls(
            online=int(kiosk.online),
            ready=int(kiosk.ready),
            rentable=kiosk.status().available_power_banks,
            slots=tuple(by_state[state] for state in SLOT_STATES),
        )

    def plus(self, add: Gauges, minus: Gauges) -> Gauges:
        return Gauges(
            online=self.online + add.online - minus.online,
            ready=self.ready + add.ready - minus.ready,
            rentable=self.rentable + add.rentable - minus.rentable,
            slots=tuple(a + b - c for a, b, c in zip(self.slots, add.slots, minus.slots, strict=True)),
        )

    def publish(self) -> None:
        metrics.CABINETS_ONLINE.set(self.online)
        metrics.CABINETS_READY.set(self.ready)
        metrics.POWER_BANKS_RENTABLE.set(self.rentable)
        for state, count in zip(SLOT_STATES, self.slots, strict=True):
            metrics.SLOTS.labels(state=state.lower()).set(count)


SLOT_STATES = ("AVAILABLE", "OCCUPIED", "MAINTENANCE", "ERROR")


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
