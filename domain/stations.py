"""Stations: provisioning, cabinet credentials, and the durable copy of what cabinets report;
around a rental: the geo index of stations near a user, favorites and issue reports."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from sqlalchemy import Table, delete, func, literal, or_, select
from sqlalchemy import update as update_
from sqlalchemy.dialects.postgresql import aggregate_order_by, insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.errors import Conflict, InvalidState, NotFound, RateLimited
from storage.models import OPEN_RENTAL_STATUSES, DeviceEvent, PowerBank, Rental, Slot, Station, StationStatus
from storage.station_models import StationFavorite, StationIssueReport, StationIssueType

log = logging.getLogger(__name__)


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
    return (await station_models(session, [serial_number])).get(serial_number)


async def station_models(session: AsyncSession, serial_numbers: Sequence[str]) -> dict[str, StationModel]:
    """What kiosks need of these stations (those that exist), in one query."""
    rows = await session.execute(
        select(Station.serial_number, Station.boards, Station.holes_per_board, Station.status).where(
            Station.serial_number.in_(serial_numbers)
        )
    )
    return {
        sn: StationModel(
            serial_number=sn,
            boards=boards,
            holes_per_board=holes,
            maintenance=status == StationStatus.MAINTENANCE,
        )
        for sn, boards, holes, status in rows.tuples()
    }


async def cabinet_secret_hashes(session: AsyncSession, serial_numbers: Sequence[str]) -> dict[str, str]:
    """The stored hash of each provisioned cabinet's MQTT secret, in one query (a connect storm)."""
    rows = await session.execute(
        select(Station.serial_number, Station.mqtt_secret_hash).where(
            Station.serial_number.in_(serial_numbers)
        )
    )
    return dict(rows.tuples().all())


async def list_page(session: AsyncSession, *, page: int, page_size: int) -> tuple[Sequence[Station], int]:
    count = await session.scalar(select(func.count()).select_from(Station)) or 0
    rows = await session.scalars(
        select(Station).order_by(Station.serial_number).offset((page - 1) * page_size).limit(page_size)
    )
    return rows.all(), count


async def record_snapshots(session: AsyncSession, snapshots: Mapping[str, Sequence[SlotReport]]) -> None:
    """Keep the durable copy of many cabinets' holes (and where each power bank is) in a few statements.

    A bank that is rented out is left as its rental put it: only a return (or the reconciliation of a
    return whose 0x40 was lost) brings it back, so a snapshot that was taken before an eject and written
    after it cannot undo the eject's bookkeeping."""
    ids = dict(
        (
            await session.execute(
                select(Station.serial_number, Station.id).where(Station.serial_number.in_(list(snapshots)))
            )
        )
        .tuples()
        .all()
    )
    now = datetime.now(UTC)
    slot_rows, bank_rows = [], {}
    for serial_number, slots in snapshots.items():
        station_id = ids.get(serial_number)
        if station_id is None:  # deleted meanwhile
            continue
        for s in slots:
            slot_rows.append(
                {
                    "station_id": station_id,
                    "slot_number": s.slot_number,
                    "state": s.state,
                    "powerbank_sn": s.powerbank_sn,
                    "updated_at": now,
                }
            )
            if s.powerbank_sn:
                bank_rows[s.powerbank_sn] = {  # a bank seen in two cabinets of the batch: the later wins
                    "serial_number": s.powerbank_sn,
                    "soc": s.soc,
                    "station_id": station_id,
                    "slot_number": s.slot_number,
                    "updated_at": now,
                }
    if slot_rows:  # many rows, one statement each (executemany: compiled once, sent in batches)
        upsert_slots = insert(cast(Table, Slot.__table__))
        await session.execute(
            upsert_slots.on_conflict_do_update(
                index_elements=["station_id", "slot_number"],
                set_={
                    "state": upsert_slots.excluded.state,
                    "powerbank_sn": upsert_slots.excluded.powerbank_sn,
                    "updated_at": upsert_slots.excluded.updated_at,
                },
            ),
            slot_rows,
        )
    if bank_rows:
        upsert_banks = insert(cast(Table, PowerBank.__table__))
        await session.execute(
            upsert_banks.on_conflict_do_update(
                index_elements=["serial_number"],
                set_={
                    "soc": upsert_banks.excluded.soc,
                    "station_id": upsert_banks.excluded.station_id,
                    "slot_number": upsert_banks.excluded.slot_number,
                    "updated_at": upsert_banks.excluded.updated_at,
                },
                where=PowerBank.rented_by.is_(None),
            ),
            list(bank_rows.values()),
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


def boot_call_refusal(station: Station, now: datetime) -> str | None:
    """Why the boot call (`/api/iot/client/con`, unsigned: anyone who knows the SN) may not issue new MQTT
    credentials to this cabinet now, or None. Credentials go to a cabinet that has never logged in, or
    inside a re-provisioning window an operator opened; otherwise an impostor could take over an offline
    cabinet (new credentials lock the real one out)."""
    if station.first_connected_at is None:
        return None
    if station.reprovision_until is not None and now < station.reprovision_until:
        return None
    return "registered"


async def issue_boot_credentials(session: AsyncSession, serial_number: str, *, ip: str, now: datetime) -> str:
    """New MQTT credentials for the boot call (its refusal checked by the caller under this row lock): the
    issue is recorded (when, to which IP) and a re-provisioning window is used up."""
    station = await by_serial(session, serial_number, lock=True)
    secret = secrets.token_urlsafe(32)
    station.mqtt_secret_hash = hash_secret(secret)
    station.credentials_issued_at, station.credentials_issued_ip = now, ip
    station.reprovision_until = None
    return secret


async def open_reprovision_window(session: AsyncSession, serial_number: str, *, until: datetime) -> Station:
    """Let the boot call issue new credentials to this cabinet once, until `until`."""
    station = await by_serial(session, serial_number, lock=True)
    station.reprovision_until = until
    await session.flush()
    return station


async def mark_connected(session: AsyncSession, serial_numbers: Sequence[str]) -> None:
    """These cabinets logged in over MQTT: from now on the boot call needs an operator's window."""
    await session.execute(
        update_(Station)
        .where(Station.serial_number.in_(serial_numbers), Station.first_connected_at.is_(None))
        .values(first_connected_at=func.now())
    )


async def set_maintenance(session: AsyncSession, serial_number: str, *, on: bool) -> Station:
    """Take a station out of service (no rentals start there) or put it back."""
    station = await by_serial(session, serial_number, lock=True)
    station.status = StationStatus.MAINTENANCE if on else StationStatus.ACTIVE
    await session.flush()
    return station


STATION_FIELDS = ("name", "address", "latitude", "longitude", "opening_time", "closing_time")


async def update(session: AsyncSession, serial_number: str, **changes: object) -> Station:
    """Change a station's descriptive fields (`STATION_FIELDS`); the caller re-syncs the geo index."""
    station = await by_serial(session, serial_number, lock=True)
    for name, value in changes.items():
        if name not in STATION_FIELDS:
            raise ValueError(f"{name} is not a station field an operator may change")
        setattr(station, name, value)
    await session.flush()
    return station


async def delete_station(session: AsyncSession, serial_number: str) -> Station:
    """Remove a station that never had a rental. With open rentals, or with a rental history (rentals
    keep their station), it is refused: put the station in maintenance instead."""
    station = await by_serial(session, serial_number, lock=True)
    open_count = await session.scalar(
        select(func.count())
        .select_from(Rental)
        .where(
            or_(Rental.station_id == station.id, Rental.return_station_id == station.id),
            Rental.status.in_(OPEN_RENTAL_STATUSES),
        )
    )
    if open_count:
        raise Conflict(
            f"Station {serial_number} has open rentals: end them first.",
            context={"serial_number": serial_number, "open_rentals": open_count},
        )
    any_rental = await session.scalar(
        select(Rental.id)
        .where(or_(Rental.station_id == station.id, Rental.return_station_id == station.id))
        .limit(1)
    )
    if any_rental is not None:
        raise Conflict(
            f"Station {serial_number} has a rental history, which keeps it: put it in maintenance instead.",
            context={"serial_number": serial_number},
        )
    await session.delete(station)
    await session.flush()
    return station


async def bank_taken_out(
    session: AsyncSession, *, serial_number: str, slot_number: int, powerbank_sn: str | None
) -> None:
    """An operator ejected a hole: the hole is empty and its bank is in nobody's cabinet."""
    station = await by_serial(session, serial_number)
    await session.execute(
        update_(Slot)
        .where(Slot.station_id == station.id, Slot.slot_number == slot_number)
        .values(powerbank_sn=None, state=0, updated_at=datetime.now(UTC))
    )
    if powerbank_sn:
        await session.execute(
            update_(PowerBank)
            .where(PowerBank.serial_number == powerbank_sn, PowerBank.station_id == station.id)
            .values(station_id=None, slot_number=None, updated_at=datetime.now(UTC))
        )


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


# --- the geo index: where stations are, and which of them can rent now ----------------------------------
#
# Two Redis GEO sets. GEO_KEY holds every station's position, rebuilt from the database whenever the
# stations table no longer matches the fingerprint stored beside it (so stations provisioned before the
# index existed, a flushed Redis or a new station all converge on the next query). GEO_AVAILABLE_KEY holds
# the stations that are online with at least one rentable power bank; the kiosk hosts keep it current from
# the live summaries they write (`stage_geo_availability` with every status change), and a rebuild
# recomputes it from those summaries. Both updates run as Lua scripts, so one always sees a station's
# summary and position together.

GEO_KEY = "stations:geo"
GEO_AVAILABLE_KEY = "stations:geo:available"
GEO_FINGERPRINT_KEY = "stations:geo:fingerprint"
GEO_MAX_LATITUDE = 85.05112878  # Redis GEO (web mercator) cannot index beyond this
LiveKey = Callable[[str], str]  # station SN -> the Redis hash of its live summary (written by the hosts)

_AVAILABILITY_LUA = """
local function refresh(geo, available, live, sn)
  local online = redis.call('HGET', live, 'online')
  local banks = tonumber(redis.call('HGET', live, 'available_power_banks') or '0') or 0
  local score = redis.call('ZSCORE', geo, sn)
  if online == '1' and banks > 0 and score then
    redis.call('ZADD', available, score, sn)
    return 1
  end
  redis.call('ZREM', available, sn)
  return 0
end
"""
# KEYS: geo, available, live hash   ARGV: sn
_REFRESH_ONE = _AVAILABILITY_LUA + "return refresh(KEYS[1], KEYS[2], KEYS[3], ARGV[1])"
# KEYS: geo, available, fingerprint, live hash of each station   ARGV: fingerprint, then lng, lat, sn each
_REBUILD = (
    _AVAILABILITY_LUA
    + """
redis.call('DEL', KEYS[1], KEYS[2])
local n = (#ARGV - 1) / 3
for first = 2, #ARGV, 300 do
  redis.call('GEOADD', KEYS[1], unpack(ARGV, first, math.min(first + 299, #ARGV)))
end
local available = 0
for i = 1, n do
  available = available + refresh(KEYS[1], KEYS[2], KEYS[3 + i], ARGV[1 + 3 * i])
end
redis.call('SET', KEYS[3], ARGV[1])
return available
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def geo_fingerprint(session: AsyncSession) -> str:
    """A digest of every station's SN and position: changes when a station is added, moved or removed."""
    row = func.concat_ws(" ", Station.serial_number, Station.latitude, Station.longitude)
    digest = await session.scalar(
        select(
            func.md5(func.coalesce(func.string_agg(row, aggregate_order_by(literal(","), Station.id)), ""))
        )
    )
    return str(digest)


async def sync_geo_index(
    session: AsyncSession, redis: Redis, *, live_key: LiveKey, fingerprint: str | None = None
) -> int:
    """Rebuild both geo sets from the database and the live summaries; how many stations it indexed."""
    # The fingerprint is read before the rows: a station added in between makes the next check rebuild
    # again, never leaves the index claiming a state newer than it holds.
    fingerprint = fingerprint or await geo_fingerprint(session)
    rows = (
        await session.execute(
            select(Station.serial_number, Station.latitude, Station.longitude).order_by(Station.id)
        )
    ).all()
    members = [(sn, lat, lng) for sn, lat, lng in rows if abs(lat) <= GEO_MAX_LATITUDE]
    if len(members) < len(rows):
        log.warning("event=geo_index_skipped count=%s reason=latitude_beyond_85", len(rows) - len(members))
    args: list[str | float] = [fingerprint]
    for sn, lat, lng in members:
        args += [lng, lat, sn]
    keys = [GEO_KEY, GEO_AVAILABLE_KEY, GEO_FINGERPRINT_KEY, *(live_key(sn) for sn, _, _ in members)]
    available = await redis.eval(_REBUILD, len(keys), *keys, *args)
    log.info("event=geo_index_rebuilt stations=%s available=%s", len(members), available)
    return len(members)


async def ensure_geo_index(session: AsyncSession, redis: Redis, *, live_key: LiveKey) -> bool:
    """Rebuild the geo index if it no longer matches the stations table; whether it did."""
    fingerprint = await geo_fingerprint(session)
    stored = await redis.get(GEO_FINGERPRINT_KEY)
    if stored is not None and _text(stored) == fingerprint:
        return False
    await sync_geo_index(session, redis, live_key=live_key, fingerprint=fingerprint)
    return True


def stage_geo_availability(pipe: Pipeline, serial_number: str, *, live: str) -> None:
    """Put the station in (or take it out of) the available set from its live summary, staged in a pipeline
    (a kiosk host writes many summaries at once)."""
    pipe.eval(_REFRESH_ONE, 3, GEO_KEY, GEO_AVAILABLE_KEY, live, serial_number)


async def nearby_page(
    session: AsyncSession,
    redis: Redis,
    *,
    latitude: float,
    longitude: float,
    radius_km: float,
    available_only: bool,
    page: int,
    page_size: int,
) -> tuple[list[tuple[Station, float]], int]:
    """Stations within `radius_km` of a point, nearest first, with their distance in km; and how many.

    `available_only` searches the available set and leaves out stations under maintenance."""
    hits = await redis.geosearch(
        GEO_AVAILABLE_KEY if available_only else GEO_KEY,
        longitude=longitude,
        latitude=latitude,
        radius=radius_km,
        unit="km",
        sort="ASC",
        withdist=True,
    )
    ranked = [(_text(sn), float(distance)) for sn, distance in cast(list[tuple[bytes, str]], hits)]
    if available_only and ranked:
        resting = set(
            await session.scalars(
                select(Station.serial_number).where(
                    Station.serial_number.in_([sn for sn, _ in ranked]),
                    Station.status == StationStatus.MAINTENANCE,
                )
            )
        )
        ranked = [(sn, d) for sn, d in ranked if sn not in resting]
    window = ranked[(page - 1) * page_size : page * page_size]
    rows = {
        s.serial_number: s
        for s in await session.scalars(
            select(Station).where(Station.serial_number.in_([sn for sn, _ in window]))
        )
    }
    return [(rows[sn], d) for sn, d in window if sn in rows], len(ranked)


# --- favorites ------------------------------------------------------------------------------------------


async def _lock(session: AsyncSession, name: str) -> None:
    """A transaction-scoped advisory lock: serializes one user's check-then-insert."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(name, 0))))


async def add_favorite(
    session: AsyncSession, *, user_id: uuid.UUID, serial_number: str, limit: int
) -> tuple[Station, datetime, bool]:
    """Mark a station as the user's favorite (idempotent): the station, since when, and whether it is new."""
    station = await by_serial(session, serial_number)
    mine = select(StationFavorite.created_at).where(
        StationFavorite.user_id == user_id, StationFavorite.station_id == station.id
    )
    if (since := await session.scalar(mine)) is not None:
        return station, since, False
    await _lock(session, f"station_favorites:{user_id}")
    count = await session.scalar(
        select(func.count()).select_from(StationFavorite).where(StationFavorite.user_id == user_id)
    )
    if (count or 0) >= limit:
        raise InvalidState(
            f"You can keep at most {limit} favorite stations: remove one first.", context={"limit": limit}
        )
    since = await session.scalar(
        insert(StationFavorite)
        .values(user_id=user_id, station_id=station.id)
        .on_conflict_do_nothing(index_elements=["user_id", "station_id"])
        .returning(StationFavorite.created_at)
    )
    if since is None:  # the same user's concurrent request won
        since = await session.scalar(mine)
        assert since is not None
        return station, since, False
    return station, since, True


async def remove_favorite(session: AsyncSession, *, user_id: uuid.UUID, serial_number: str) -> bool:
    """Unmark a station (idempotent); whether it was a favorite."""
    station = await by_serial(session, serial_number)
    result = await session.execute(
        delete(StationFavorite)
        .where(StationFavorite.user_id == user_id, StationFavorite.station_id == station.id)
        .returning(StationFavorite.id)
    )
    return result.first() is not None


async def favorites(session: AsyncSession, *, user_id: uuid.UUID) -> list[tuple[Station, datetime]]:
    """The user's favorite stations, most recently added first."""
    rows = await session.execute(
        select(Station, StationFavorite.created_at)
        .join(StationFavorite, StationFavorite.station_id == Station.id)
        .where(StationFavorite.user_id == user_id)
        .order_by(StationFavorite.created_at.desc(), StationFavorite.id.desc())
    )
    return [(station, since) for station, since in rows.tuples()]


# --- issue reports --------------------------------------------------------------------------------------


async def report_issue(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    serial_number: str,
    issue_type: StationIssueType,
    description: str,
    per_hour: int,
) -> tuple[Station, StationIssueReport]:
    """Record an OPEN issue report; at most `per_hour` reports per user in any hour (then RateLimited)."""
    station = await by_serial(session, serial_number)
    await _lock(session, f"station_issue_reports:{user_id}")
    now = datetime.now(UTC)
    window = now - timedelta(hours=1)
    count, oldest = (
        await session.execute(
            select(func.count(), func.min(StationIssueReport.created_at)).where(
                StationIssueReport.user_id == user_id, StationIssueReport.created_at > window
            )
        )
    ).one()
    if count >= per_hour and oldest is not None:
        retry_after = max(1, math.ceil((oldest - window).total_seconds()))
        raise RateLimited(
            f"You can report at most {per_hour} issues an hour: try again later.",
            context={"retry_after": retry_after},
        )
    report = StationIssueReport(
        station_id=station.id,
        user_id=user_id,
        issue_type=issue_type,
        description=description,
        created_at=now,
    )
    session.add(report)
    await session.flush()
    log.info(
        "event=station_issue_reported station_sn=%s issue_type=%s report_id=%s",
        station.serial_number,
        issue_type.value,
        report.id,
    )
    return station, report
