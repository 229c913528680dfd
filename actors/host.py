"""Kiosk-host Ray actors: each hosts many Kiosk actors (see shared/design/ARCHITECTURE.md, placement).

A host owns the cabinets that rendezvous hashing gives it. It is the kiosks' way to the world: it
publishes their commands through the broker actor, records what they report through the domain, and
keeps each station's live summary in Redis for station lists.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import ray
from redis.asyncio import Redis

from actors.kiosk import Kiosk, KioskConfig
from actors.messages import (
    CabinetConnected,
    CabinetDisconnected,
    CabinetSubscribed,
    Ejected,
    EjectOutcome,
    FrameReceived,
    KioskOffline,
    KioskStatus,
    SlotView,
    outcome_reason,
)
from config import Settings
from domain import rentals, stations
from storage.db import Database
from telemetry import metrics

log = logging.getLogger(__name__)
BROKER_ACTOR = "mqtt-broker"


def live_key(serial_number: str) -> str:
    return f"station:{serial_number}:live"


class KioskHost:
    """Plain async class; `KioskHostActor` below is its Ray actor form."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = KioskConfig(
            eject_timeout_s=settings.eject_timeout_s,
            min_soc=settings.rental_min_soc,
            max_temperature_c=settings.slot_max_temperature_c,
        )
        assert settings.database_url and settings.redis_url, "hosts get resolved DATABASE_URL and REDIS_URL"
        self.db = Database(settings.database_url, pool_size=3)
        self.redis: Redis = Redis.from_url(settings.redis_url)
        self.kiosks: dict[str, Kiosk] = {}
        self._broker: Any = None

    # --- the cabinet's session, as the broker sees it ------------------------------------------------
    async def authenticate(self, serial_number: str, password: str) -> bool:
        async with self.db.transaction() as session:
            stored = await stations.cabinet_secret_hash(session, serial_number)
            model = await stations.station_model(session, serial_number)
        if stored is None or model is None or not stations.secret_matches(password, stored):
            return False
        kiosk = self.kiosks.get(serial_number)
        if kiosk is None or kiosk.holes_per_board != model.holes_per_board:
            self.kiosks[serial_number] = Kiosk(
                serial_number=serial_number,
                boards=model.boards,
                holes_per_board=model.holes_per_board,
                config=self.config,
                ports=self,
            )
        return True

    def on_connect(self, serial_number: str) -> None:
        self._tell(serial_number, CabinetConnected())

    def on_subscribe(self, serial_number: str) -> None:
        self._tell(serial_number, CabinetSubscribed())

    def on_disconnect(self, serial_number: str) -> None:
        self._tell(serial_number, CabinetDisconnected())

    def on_frame(self, serial_number: str, kind: str, payload: bytes) -> None:
        self._tell(serial_number, FrameReceived(kind=kind, payload=payload))

    def _tell(self, serial_number: str, message: Any) -> None:
        kiosk = self.kiosks.get(serial_number)
        if kiosk is None:
            metrics.MQTT_DROPPED.labels(reason="unknown_cabinet").inc()
            log.warning("event=message_for_unknown_cabinet station_sn=%s message=%r", serial_number, message)
            return
        kiosk.tell(message)

    # --- requests from the API ---------------------------------------------------------------------------
    async def rent(self, serial_number: str, rental_id: str) -> EjectOutcome:
        """Eject for a PENDING_POPUP rental and record the outcome durably (ACTIVE, or CANCELLED)."""
        kiosk = self.kiosks.get(serial_number)
        outcome = (
            await kiosk.eject(request_id=rental_id)
            if kiosk is not None
            else KioskOffline(request_id=rental_id)
        )
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

    def status(self, serial_number: str) -> KioskStatus | None:
        kiosk = self.kiosks.get(serial_number)
        return kiosk.status() if kiosk is not None else None

    def slots(self, serial_number: str) -> list[SlotView] | None:
        kiosk = self.kiosks.get(serial_number)
        return kiosk.slot_views() if kiosk is not None else None

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

    # --- KioskPorts ---------------------------------------------------------------------------------------
    async def publish(self, serial_number: str, payload: bytes) -> None:
        if self._broker is None:
            self._broker = ray.get_actor(BROKER_ACTOR, namespace=self.settings.ray_namespace)
        await self._broker.publish_command.remote(serial_number, payload)

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
            await rentals.complete_by_return(
                session,
                powerbank_sn=powerbank_sn,
                station_sn=serial_number,
                slot_number=slot_number,
                soc=soc,
                at=datetime.now(UTC),
                late_fee_per_hour=self.settings.late_fee_per_hour,
            )

    async def status_changed(self, status: KioskStatus) -> None:
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
