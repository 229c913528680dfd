"""The rental state machine: PENDING_POPUP → ACTIVE → COMPLETED, PENDING_POPUP → CANCELLED.

Each transition is one transaction on a locked rental row and is idempotent: repeating it (a retried
call, a duplicate 0x40) changes nothing and moves no money.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from domain import stations, wallet
from domain.errors import ActiveRentalExists, InsufficientBalance, NotFound, StationMaintenance
from domain.pricing import money, rental_charges
from storage.models import (
    OPEN_RENTAL_STATUSES,
    EntryType,
    PaymentModel,
    PaymentStatus,
    PowerBank,
    Rental,
    RentalPackage,
    RentalStatus,
    Station,
    StationStatus,
)
from telemetry.metrics import RENTALS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Returned:
    rental_id: uuid.UUID
    user_id: uuid.UUID
    charged: Decimal
    due: Decimal


async def packages(session: AsyncSession) -> list[RentalPackage]:
    rows = await session.scalars(
        select(RentalPackage).where(RentalPackage.is_active).order_by(RentalPackage.id)
    )
    return list(rows.all())


async def open_rental(session: AsyncSession, user_id: uuid.UUID) -> Rental | None:
    stmt = select(Rental).where(Rental.user_id == user_id, Rental.status.in_(OPEN_RENTAL_STATUSES))
    return (await session.execute(stmt)).scalar_one_or_none()


async def get(session: AsyncSession, rental_id: uuid.UUID, *, lock: bool = False) -> Rental:
    stmt = select(Rental).where(Rental.id == rental_id)
    if lock:
        stmt = stmt.with_for_update(of=Rental)
    rental = (await session.execute(stmt)).unique().scalar_one_or_none()
    if rental is None:
        raise NotFound("Rental not found.", context={"rental_id": str(rental_id)})
    return rental


async def history(
    session: AsyncSession, user_id: uuid.UUID, *, page: int, page_size: int
) -> tuple[list[Rental], int]:
    count = (
        await session.scalar(select(func.count()).select_from(Rental).where(Rental.user_id == user_id)) or 0
    )
    rows = await session.scalars(
        select(Rental)
        .where(Rental.user_id == user_id)
        .order_by(Rental.created_at.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.unique().all()), count


async def begin(session: AsyncSession, *, user_id: uuid.UUID, station_sn: str, package_id: int) -> Rental:
    """Check the user may rent here and write the PENDING_POPUP rental (nothing is charged yet)."""
    station = await stations.by_serial(session, station_sn)
    if station.status == StationStatus.MAINTENANCE:
        raise StationMaintenance(context={"station_sn": station_sn})
    package = await session.get(RentalPackage, package_id)
    if package is None or not package.is_active:
        raise NotFound("Package not found.", context={"package_id": package_id})
    if await open_rental(session, user_id) is not None:
        raise ActiveRentalExists()
    account = await wallet.wallet_for(session, user_id)
    if package.payment_model == PaymentModel.PREPAID and account.balance < package.price:
        raise InsufficientBalance(
            context={
                "required": str(package.price),
                "balance": str(account.balance),
                "currency": account.currency,
            }
        )
    rental = Rental(
        rental_code=secrets.token_hex(4).upper(),
        user_id=user_id,
        package_id=package.id,
        station_id=station.id,
        status=RentalStatus.PENDING_POPUP,
        payment_status=PaymentStatus.PENDING,
    )
    session.add(rental)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:  # a concurrent request for the same user won the race
        raise ActiveRentalExists() from exc
    return rental


async def dispatch_eject(
    session: AsyncSession, *, rental_id: uuid.UUID, powerbank_sn: str, slot_number: int, soc: int | None
) -> bool:
    """Record which bank an eject is about to be sent for, so a crash can be resolved later.
    False when the rental is no longer PENDING_POPUP: then the eject must not be sent."""
    rental = await get(session, rental_id, lock=True)
    if rental.status != RentalStatus.PENDING_POPUP:
        return False
    rental.powerbank_sn, rental.slot_number, rental.start_battery_level = powerbank_sn, slot_number, soc
    return True


async def resolve_pending(
    session: AsyncSession,
    *,
    station_sn: str,
    present: set[str],
    exclude: str | None,
    older_than: datetime | None = None,
) -> list[Rental]:
    """Settle PENDING_POPUP rentals of a station from what its holes now hold: the attempted bank gone →
    it was ejected (ACTIVE); still there → CANCELLED with nothing charged. Rentals whose eject was never
    sent are waiting in the cabinet's queue and are left alone, unless older than `older_than` (their
    request died with its API process): those are cancelled."""
    stmt = (
        select(Rental)
        .join(Rental.station)
        .where(Station.serial_number == station_sn, Rental.status == RentalStatus.PENDING_POPUP)
        .with_for_update(of=Rental)
    )
    if older_than is not None:
        stmt = stmt.where(Rental.created_at < older_than)
    settled = []
    for rental in (await session.execute(stmt)).unique().scalars():
        if str(rental.id) == exclude or (rental.powerbank_sn is None and older_than is None):
            continue
        sn, slot_number = rental.powerbank_sn, rental.slot_number
        if sn is not None and slot_number is not None and sn not in present:
            holder = await session.scalar(
                select(Rental.id).where(
                    Rental.powerbank_sn == sn, Rental.status.in_((RentalStatus.ACTIVE, RentalStatus.OVERDUE))
                )
            )
            if holder is None:
                await activate(
                    session,
                    rental_id=rental.id,
                    powerbank_sn=sn,
                    slot_number=slot_number,
                    soc=rental.start_battery_level,
                    at=datetime.now(UTC),
                )
                settled.append(rental)
                continue
            log.error(
                "event=bank_claimed_twice powerbank_sn=%s rental_id=%s holder=%s", sn, rental.id, holder
            )
        await cancel_pending(session, rental_id=rental.id, reason="unresolved_eject")
        settled.append(rental)
    return settled


async def open_counts(session: AsyncSession) -> dict[RentalStatus, int]:
    rows = await session.execute(
        select(Rental.status, func.count())
        .where(Rental.status.in_(OPEN_RENTAL_STATUSES))
        .group_by(Rental.status)
    )
    counts = dict.fromkeys(OPEN_RENTAL_STATUSES, 0)
    counts.update({status: n for status, n in rows.tuples()})
    return counts


async def pending_stations(session: AsyncSession, *, older_than: datetime) -> list[str]:
    """Stations that have PENDING_POPUP rentals older than `older_than`."""
    rows = await session.scalars(
        select(Station.serial_number)
        .join(Rental, Rental.station_id == Station.id)
        .where(Rental.status == RentalStatus.PENDING_POPUP, Rental.created_at < older_than)
        .distinct()
    )
    return list(rows.all())


async def cancel_pending_before(session: AsyncSession, *, station_sn: str, before: datetime) -> None:
    stmt = (
        select(Rental.id)
        .join(Station, Rental.station_id == Station.id)
        .where(
            Station.serial_number == station_sn,
            Rental.status == RentalStatus.PENDING_POPUP,
            Rental.created_at < before,
        )
    )
    for rental_id in (await session.scalars(stmt)).all():
        await cancel_pending(session, rental_id=rental_id, reason="cabinet_unreachable")


async def activate(
    session: AsyncSession,
    *,
    rental_id: uuid.UUID,
    powerbank_sn: str,
    slot_number: int,
    soc: int | None,
    at: datetime,
) -> Rental:
    """The cabinet reported the power bank out: the rental runs from now."""
    rental = await get(session, rental_id, lock=True)
    if rental.status != RentalStatus.PENDING_POPUP:
        return rental
    rental.status = RentalStatus.ACTIVE
    rental.powerbank_sn = powerbank_sn
    rental.slot_number = slot_number
    rental.start_battery_level = soc
    rental.started_at = at
    rental.due_at = at + timedelta(minutes=rental.package.duration_minutes)
    bank = await session.get(PowerBank, powerbank_sn, with_for_update=True)
    if bank is None:
        bank = PowerBank(serial_number=powerbank_sn)
        session.add(bank)
    bank.station_id, bank.slot_number, bank.rented_by, bank.soc = None, None, rental.user_id, soc
    RENTALS.labels(outcome="started").inc()
    log.info("event=rental_active rental_id=%s powerbank_sn=%s slot=%s", rental.id, powerbank_sn, slot_number)
    return rental


async def cancel_pending(session: AsyncSession, *, rental_id: uuid.UUID, reason: str) -> Rental:
    """The eject did not happen: the rental ends with nothing charged."""
    rental = await get(session, rental_id, lock=True)
    if rental.status != RentalStatus.PENDING_POPUP:
        return rental
    rental.status = RentalStatus.CANCELLED
    rental.payment_status = PaymentStatus.NOT_CHARGED
    rental.failure_reason = reason
    rental.ended_at = datetime.now(UTC)
    RENTALS.labels(outcome="failed").inc()
    log.info("event=rental_cancelled rental_id=%s reason=%s", rental.id, reason)
    return rental


async def complete_by_return(
    session: AsyncSession,
    *,
    powerbank_sn: str,
    station_sn: str,
    slot_number: int,
    soc: int | None,
    at: datetime,
    late_fee_per_hour: Decimal,
) -> Returned | None:
    """A power bank came back into any cabinet: close its open rental and charge, exactly once."""
    station = await stations.by_serial(session, station_sn)
    bank = await session.get(PowerBank, powerbank_sn, with_for_update=True)
    if bank is None:
        bank = PowerBank(serial_number=powerbank_sn)
        session.add(bank)
    bank.station_id, bank.slot_number, bank.rented_by, bank.soc = station.id, slot_number, None, soc
    stmt = (
        select(Rental)
        .where(
            Rental.powerbank_sn == powerbank_sn,
            Rental.status.in_((RentalStatus.ACTIVE, RentalStatus.OVERDUE)),
        )
        .with_for_update(of=Rental)
    )
    rental = (await session.execute(stmt)).unique().scalar_one_or_none()
    if rental is None:
        return None  # a duplicate 0x40, or a bank that was not rented out
    assert rental.due_at is not None
    charges = rental_charges(
        price=rental.package.price, due_at=rental.due_at, ended_at=at, late_fee_per_hour=late_fee_per_hour
    )
    reference = f"rental:{rental.id}"
    charged = await _charge_up_to(
        session, rental.user_id, charges.package_price, EntryType.RENTAL_CHARGE, reference
    )
    charged += await _charge_up_to(session, rental.user_id, charges.late_fee, EntryType.LATE_FEE, reference)
    due = money(charges.total - charged)
    rental.status = RentalStatus.COMPLETED
    rental.ended_at = at
    rental.return_station_id = station.id
    rental.return_battery_level = soc
    rental.amount_paid = money(charged)
    rental.overdue_amount = due
    rental.payment_status = PaymentStatus.DUE if due > 0 else PaymentStatus.PAID
    RENTALS.labels(outcome="completed").inc()
    log.info(
        "event=rental_completed rental_id=%s station_sn=%s charged=%s due=%s",
        rental.id,
        station_sn,
        charged,
        due,
    )
    return Returned(rental_id=rental.id, user_id=rental.user_id, charged=money(charged), due=due)


async def _charge_up_to(
    session: AsyncSession, user_id: uuid.UUID, amount: Decimal, type: EntryType, reference: str
) -> Decimal:
    """Debit as much of `amount` as the wallet holds; what is left stays due on the rental."""
    if amount <= 0:
        return Decimal("0.00")
    account = await wallet.wallet_for(session, user_id, lock=True)
    take = min(amount, account.balance)
    if take <= 0:
        return Decimal("0.00")
    await wallet.debit(session, user_id=user_id, amount=take, type=type, reference=reference)
    return money(take)
