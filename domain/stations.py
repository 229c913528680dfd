"""Stations: provisioning, cabinet credentials, and the durable copy of what cabinets report."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.errors import Conflict, NotFound
from storage.models import DeviceEvent, PowerBank, Slot, Station


def hash_secret(secret: str) -> str:
    """Cabinet secrets are 32 random bytes, so a plain SHA-256 is enough (no password stretching needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


@dataclass(frozen=True, slots=True, kw_only=True)
class StationModel:
    """What a kiosk actor needs to know of its station."""

    serial_number: str
    boards: int
    holes_per_board: int
    maintenance: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotReport:
    slot_number: int
    state: int
    powerbank_sn: str | None
    soc: int | None


async def provision(
    session: AsyncSession,
    *,
    serial_number: str,
    name: str,
    address: str,
    latitude: float,
    longitude: float,
    boards: int,
    holes_per_board: int,
) -> tuple[Station, str]:
    """Create a station and issue its MQTT secret; the secret is returned this once and stored hashed."""
    if await session.scalar(select(Station.id).where(Station.serial_number == serial_number)) is not None:
        raise Conflict(f"Station {serial_number} already exists.", context={"serial_number": serial_number})
    secret = secrets.token_urlsafe(32)
    station = Station(
        serial_number=serial_number,
        name=name,
        address=address,
        latitude=latitude,
        longitude=longitude,
        boards=boards,
        holes_per_board=holes_per_board,
        mqtt_secret_hash=hash_secret(secret),
    )
    session.add(station)
    await session.flush()
    return station, secret


async def by_serial(session: AsyncSession, serial_number: str, *, lock: bool = False) -> Station:
    stmt = select(Station).where(Station.serial_number == serial_number)
    station = (await session.execute(stmt.with_for_update() if lock else stmt)).scalar_one_or_none()
    if station is None:
        raise NotFound(f"Station {serial_number} not found.", context={"serial_number": serial_number})
    return station


async def station_model(session: AsyncSession, serial_number: str) -> StationModel | None:
    station = (
        await session.execute(select(Station).where(Station.serial_number == serial_number))
    ).scalar_one_or_none()
    if station is None:
        return None
    return StationModel(
        serial_number=station.serial_number,
        boards=station.boards,
        holes_per_board=station.holes_per_board,
        maintenance=station.status == "MAINTENANCE",
    )


async def cabinet_secret_hash(session: AsyncSession, serial_number: str) -> str | None:
    return await session.scalar(
        select(Station.mqtt_secret_hash).where(Station.serial_number == serial_number)
    )


async def list_page(session: AsyncSession, *, page: int, page_size: int) -> tuple[Sequence[Station], int]:
    count = await session.scalar(select(func.count()).select_from(Station)) or 0
    rows = await session.scalars(
        select(Station).order_by(Station.serial_number).offset((page - 1) * page_size).limit(page_size)
    )
    return rows.all(), count


async def record_snapshot(session: AsyncSession, *, serial_number: str, slots: Sequence[SlotReport]) -> None:
    """Keep the durable copy of a cabinet's holes and where each power bank is."""
    station = await by_serial(session, serial_number)
    now = datetime.now(UTC)
    if slots:
        stmt = insert(Slot).values(
            [
                {
                    "station_id": station.id,
                    "slot_number": s.slot_number,
                    "state": s.state,
                    "powerbank_sn": s.powerbank_sn,
                    "updated_at": now,
                }
                for s in slots
            ]
        )
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["station_id", "slot_number"],
                set_={
                    "state": stmt.excluded.state,
                    "powerbank_sn": stmt.excluded.powerbank_sn,
                    "updated_at": now,
                },
            )
        )
    banks = [s for s in slots if s.powerbank_sn]
    if banks:
        stmt_b = insert(PowerBank).values(
            [
                {
                    "serial_number": s.powerbank_sn,
                    "soc": s.soc,
                    "station_id": station.id,
                    "slot_number": s.slot_number,
                    "rented_by": None,
                    "updated_at": now,
                }
                for s in banks
            ]
        )
        await session.execute(
            stmt_b.on_conflict_do_update(
                index_elements=["serial_number"],
                set_={
                    "soc": stmt_b.excluded.soc,
                    "station_id": station.id,
                    "slot_number": stmt_b.excluded.slot_number,
                    "rented_by": None,
                    "updated_at": now,
                },
            )
        )


async def record_event(
    session: AsyncSession, *, station_sn: str, kind: str, payload: dict[str, object]
) -> None:
    session.add(DeviceEvent(station_sn=station_sn, kind=kind, payload=payload))


async def rotate_secret(session: AsyncSession, serial_number: str) -> str:
    """Issue a new MQTT secret for a station; the old one stops working at the cabinet's next login."""
    station = await by_serial(session, serial_number, lock=True)
    secret = secrets.token_urlsafe(32)
    station.mqtt_secret_hash = hash_secret(secret)
    return secret


async def durable_views(
    session: AsyncSession,
) -> list[tuple[StationModel, dict[int, tuple[str, int | None]]]]:
    """Every station with the holes' last recorded contents, for a kiosk host that rebuilds its kiosks."""
    rows = (await session.execute(select(Station).order_by(Station.serial_number))).scalars().all()
    holes: dict[int, dict[int, tuple[str, int | None]]] = {}
    slot_rows = await session.execute(
        select(Slot.station_id, Slot.slot_number, Slot.powerbank_sn, PowerBank.soc)
        .outerjoin(PowerBank, PowerBank.serial_number == Slot.powerbank_sn)
        .where(Slot.powerbank_sn.is_not(None))
    )
    for station_id, slot_number, sn, soc in slot_rows:
        if sn:
            holes.setdefault(station_id, {})[slot_number] = (sn, soc)
    return [
        (
            StationModel(
                serial_number=s.serial_number,
                boards=s.boards,
                holes_per_board=s.holes_per_board,
                maintenance=s.status == "MAINTENANCE",
            ),
            holes.get(s.id, {}),
        )
        for s in rows
    ]
