"""A kiosk host's batched writer (actors.sync): changed holes to PostgreSQL, live summaries to Redis."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, select

from actors.host import live_key
from actors.messages import KioskStatus
from actors.sync import StationSync
from domain import stations
from domain.stations import SlotReport
from storage.models import PowerBank, Slot, Station, User
from tests.conftest import new_phone


async def new_station(system: Any) -> str:
    sn = f"S{uuid.uuid4().hex[:12].upper()}"
    async with system.services.db.transaction() as session:
        await stations.provision(
            session,
            serial_number=sn,
            name=sn,
            address="",
            latitude=27.7,
            longitude=85.3,
            boards=1,
            holes_per_board=2,
        )
    return sn


def holes(*banks: str | None) -> tuple[SlotReport, ...]:
    return tuple(
        SlotReport(slot_number=n, state=1 if sn else 0, powerbank_sn=sn, soc=80 if sn else None)
        for n, sn in enumerate(banks, start=1)
    )


async def test_changed_holes_of_many_stations_are_written_in_one_transaction_and_unchanged_ones_not(
    system: Any,
) -> None:
    db, redis = system.services.db, system.services.redis
    a, b = await new_station(system), await new_station(system)
    bank_a, bank_b = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    sync = StationSync(db=db, redis=redis, live_key=live_key, interval_s=0.01)
    sync.known(a, holes(None, None))
    sync.known(b, holes(None, None))
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        sync.holes(a, holes(None, None))  # as known: nothing to write
        await sync.flushed()
        assert statements == []
        sync.holes(a, holes(bank_a, None))
        sync.holes(b, holes(None, None))
        sync.holes(b, holes(None, bank_b))  # the later report of a station wins
        await sync.flushed()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    assert len(statements) == 3  # station ids, holes of both, banks of both
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Station.serial_number, Slot.slot_number, Slot.powerbank_sn)
                .join(Slot, Slot.station_id == Station.id)
                .where(Station.serial_number.in_([a, b]), Slot.powerbank_sn.is_not(None))
            )
        ).all()
        banks = (
            await session.scalars(select(PowerBank).where(PowerBank.serial_number.in_([bank_a, bank_b])))
        ).all()
    assert sorted(rows) == sorted([(a, 1, bank_a), (b, 2, bank_b)])
    assert {bank.serial_number: bank.soc for bank in banks} == {bank_a: 80, bank_b: 80}


async def test_a_rented_bank_is_not_put_back_by_a_late_snapshot(system: Any) -> None:
    """A snapshot taken before an eject, written after it, leaves the rented bank where its rental put it."""
    db = system.services.db
    sn = await new_station(system)
    bank = uuid.uuid4().hex[:8]
    async with db.transaction() as session:
        renter = User(phone=new_phone())
        session.add(renter)
        await session.flush()
        session.add(PowerBank(serial_number=bank, soc=90, rented_by=renter.id))
    async with db.transaction() as session:
        await stations.record_snapshots(session, {sn: holes(bank, None)})
    async with db.transaction() as session:
        row = await session.get(PowerBank, bank)
    assert row is not None and row.station_id is None and row.rented_by == renter.id and row.soc == 90


async def test_live_summaries_go_to_redis_once_per_change(system: Any) -> None:
    redis = system.services.redis
    sn = await new_station(system)
    sync = StationSync(db=system.services.db, redis=redis, live_key=live_key, interval_s=0.01)
    status = KioskStatus(
        serial_number=sn, online=True, ready=True, total_slots=2, available_power_banks=1, empty_slots=1
    )
    sync.status(status)
    await sync.flushed()
    live = {k.decode(): v.decode() for k, v in (await redis.hgetall(live_key(sn))).items()}
    assert live == {
        "online": "1",
        "ready": "1",
        "total_slots": "2",
        "available_power_banks": "1",
        "empty_slots": "1",
    }
    await redis.delete(live_key(sn))
    sync.status(status)  # the same again: not written
    await sync.flushed()
    assert await redis.exists(live_key(sn)) == 0
