"""The rental state machine: PENDING_POPUP → ACTIVE (→ OVERDUE) → COMPLETED, PENDING_POPUP → CANCELLED
(eject failed: nothing charged), ACTIVE/COMPLETED → CANCELLED (the cancel window: everything refunded).

Each transition is one transaction on a locked rental row and is idempotent: repeating it (a retried
call, a duplicate 0x40) changes nothing and moves no money.

Money. Every amount a rental costs is a line of `rental_charges` (package, extension, POSTPAID usage,
late fee, lost-bank penalty, refunds as negative lines); `paid` on each line is what was collected.
The rental's `amount_paid` (net of refunds) and `overdue_amount` (still owed) are sums over its lines.
A charge takes what the wallet holds and leaves the rest due (payment_status DUE): wallets never go
negative. Ledger references are `rental:<id>:line:<line id>:<stage>`, so a line moves money at most
once per stage (charge, return, lost, deposit, due).

- PREPAID: the package price is charged at activation, in the activation's transaction.
- POSTPAID: the price per minute (price / duration_minutes) for every started minute up to
  `due_at` is charged at return; time past `due_at` is the late fee's, as for PREPAID.
- Late fees: the active late-fee configuration (see `domain.pricing.LateFeeRule`), charged at return.
- Deposit (per package, optional): held at activation (wallet → hold account); at the end it covers
  what the wallet could not (captured to revenue) and the rest is released to the wallet.
- Lost: OVERDUE for LOST_AFTER_OVERDUE_S → completed with the LOST_BANK_PENALTY (no late fee) and the
  bank marked lost; if it comes back, the penalty is cut to the late fee accrued until then and the
  difference goes to what is still due, then back to the wallet (REFUND).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings, get_settings
from domain import kyc, notifications, stations, wallet
from domain.errors import (
    ActiveRentalExists,
    InsufficientBalance,
    InvalidState,
    NotFound,
    StationMaintenance,
    ValidationFailed,
)
from domain.pricing import (
    LateFeeRule,
    TaxBreakdown,
    hourly_rate,
    late_fee,
    money,
    postpaid_usage,
    tax_breakdown,
)
from storage.models import (
    OPEN_RENTAL_STATUSES,
    PaymentModel,
    PaymentStatus,
    PowerBank,
    Rental,
    RentalPackage,
    RentalStatus,
    Station,
    StationStatus,
)
from storage.rental_models import (
    ChargeKind,
    LateFeeConfiguration,
    LateFeeType,
    RentalCharge,
    RentalIssue,
    RentalIssueType,
)
from telemetry.metrics import RENTALS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Returned:
    rental_id: uuid.UUID
    user_id: uuid.UUID
    charged: Decimal  # collected at this return (a PREPAID package was collected at activation)
    due: Decimal  # what the rental still owes
    refunded: Decimal = Decimal("0.00")  # a lost bank that came back: penalty given back


@dataclass(frozen=True, slots=True, kw_only=True)
class RentalEvent:
    """What a job did to one rental (for the notifications the caller sends)."""

    rental_id: uuid.UUID
    user_id: uuid.UUID
    rental_code: str
    due_at: datetime | None
    charged: Decimal = Decimal("0.00")
    due: Decimal = Decimal("0.00")


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
        # The row as it is once the lock is ours, even if this session read it (unlocked) before.
        stmt = stmt.with_for_update(of=Rental).execution_options(populate_existing=True)
    rental = (await session.execute(stmt)).unique().scalar_one_or_none()
    if rental is None:
        raise NotFound("Rental not found.", context={"rental_id": str(rental_id)})
    return rental


async def history(
    session: AsyncSession, user_id: uuid.UUID, *, page: int, page_size: int
) -> tuple[list[Rental], int]:
    """The user's own rentals, newest first."""
    return await admin_page(session, page=page, page_size=page_size, user_id=user_id)


async def begin(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    station_sn: str,
    package_id: int,
    settings: Settings | None = None,
    rental_id: uuid.UUID | None = None,
    bank: EjectTarget | None = None,
) -> Rental:
    """Check the user may rent here and write the PENDING_POPUP rental (nothing is charged yet).

    The wallet must cover a PREPAID package's price, or POSTPAID_MIN_BALANCE for POSTPAID, plus the
    package's deposit; a user who still owes money on an earlier rental settles it first (pay-due).
    `bank`: the power bank the cabinet is about to eject for it, recorded before the command goes out so
    that a crash in between can be resolved from the cabinet's holes (`resolve_pending`). After
    ActiveRentalExists the transaction cannot go on (roll it back)."""
    settings = settings or get_settings()
    station = (
        await session.execute(select(Station.id, Station.status).where(Station.serial_number == station_sn))
    ).first()
    if station is None:
        raise NotFound(f"Station {station_sn} not found.", context={"serial_number": station_sn})
    if station.status == StationStatus.MAINTENANCE:
        raise StationMaintenance(context={"station_sn": station_sn})
    package = await session.get(RentalPackage, package_id)
    if package is None or not package.is_active:
        raise NotFound("Package not found.", context={"package_id": package_id})
    earlier = (
        await session.execute(  # an open rental, or one with money still owed on it
            select(Rental.id, Rental.status, Rental.overdue_amount)
            .where(
                Rental.user_id == user_id,
                or_(Rental.status.in_(OPEN_RENTAL_STATUSES), Rental.overdue_amount > 0),
            )
            .order_by(Rental.status.in_(OPEN_RENTAL_STATUSES).desc())
            .limit(1)
        )
    ).all()
    if earlier and earlier[0].status in OPEN_RENTAL_STATUSES:
        raise ActiveRentalExists()
    if settings.kyc_required_to_rent:
        await kyc.require_approved(session, user_id)
    if earlier:
        owing = earlier[0]
        raise InsufficientBalance(
            "Settle what you owe on your last rental first.",
            context={"rental_id": str(owing.id), "due": str(owing.overdue_amount), "currency": "NPR"},
        )
    account = await wallet.wallet_for(session, user_id)
    needed = package.price if package.payment_model == PaymentModel.PREPAID else settings.postpaid_min_balance
    required = money(needed + package.deposit_amount)
    if account.balance < required:
        raise InsufficientBalance(
            context={
                "required": str(required),
                "balance": str(account.balance),
                "currency": account.currency,
            }
        )
    rental = Rental(
        id=rental_id or uuid.uuid4(),
        rental_code=secrets.token_hex(4).upper(),
        user_id=user_id,
        package_id=package.id,
        station_id=station.id,
        status=RentalStatus.PENDING_POPUP,
        payment_status=PaymentStatus.PENDING,
    )
    if bank is not None:
        rental.powerbank_sn, rental.slot_number = bank.powerbank_sn, bank.slot_number
        rental.start_battery_level = bank.soc
    session.add(rental)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent request for the same user won: this transaction is over
        raise ActiveRentalExists() from exc
    return rental


async def retarget(session: AsyncSession, *, rental_id: uuid.UUID, bank: EjectTarget) -> bool:
    """The first bank failed in its hole: record the next one the cabinet is about to eject. False when
    the rental is no longer PENDING_POPUP: then the eject must not be sent."""
    rental = await get(session, rental_id, lock=True)
    if rental.status != RentalStatus.PENDING_POPUP:
        return False
    rental.powerbank_sn, rental.slot_number = bank.powerbank_sn, bank.slot_number
    rental.start_battery_level = bank.soc
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectTarget:
    """The bank a cabinet is about to eject for a rental, and where it is."""

    powerbank_sn: str
    slot_number: int
    soc: int | None


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
    """Cancel this station's PENDING_POPUP rentals older than `before` whose eject never had a bank
    recorded. One with a bank stays open whatever its age (the bank may well have come out, and the user
    kept it): the cabinet's next snapshot settles it, or an operator does (`settle_unconfirmed`)."""
    stmt = (
        select(Rental.id)
        .join(Station, Rental.station_id == Station.id)
        .where(
            Station.serial_number == station_sn,
            Rental.status == RentalStatus.PENDING_POPUP,
            Rental.powerbank_sn.is_(None),
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
    out = {"station_id": None, "slot_number": None, "rented_by": rental.user_id, "soc": soc}
    await session.execute(  # the bank is with the user now (one statement, whether we knew it or not)
        pg_insert(PowerBank)
        .values(serial_number=powerbank_sn, **out)
        .on_conflict_do_update(index_elements=[PowerBank.serial_number], set_=out)
    )
    await _charge_at_start(session, rental)
    await notifications.rental_started(
        session,
        user_id=rental.user_id,
        rental_id=rental.id,
        rental_code=rental.rental_code,
        station_sn=rental.station.serial_number,
        due_at=rental.due_at,
    )
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
    await notifications.eject_failed(
        session,
        user_id=rental.user_id,
        rental_id=rental.id,
        rental_code=rental.rental_code,
        station_sn=rental.station.serial_number,
    )
    RENTALS.labels(outcome="failed").inc()
    log.info("event=rental_cancelled rental_id=%s reason=%s", rental.id, reason)
    return rental


async def unsettled(session: AsyncSession, *, older_than: datetime, limit: int = 200) -> list[Rental]:
    """PENDING_POPUP rentals older than `older_than`, oldest first: ejects nobody could confirm yet."""
    stmt = (
        select(Rental)
        .where(Rental.status == RentalStatus.PENDING_POPUP, Rental.created_at < older_than)
        .order_by(Rental.created_at)
        .limit(limit)
    )
    return list((await session.scalars(stmt)).all())


async def settle_unconfirmed(
    session: AsyncSession, *, rental_id: uuid.UUID, ejected: bool, reason: str
) -> Rental:
    """An operator settles an unconfirmed eject: the bank came out (ACTIVE from the eject, charged by the
    rules, once) or it did not (CANCELLED, nothing charged). Anything but PENDING_POPUP is InvalidState."""
    rental = await get(session, rental_id, lock=True)
    if rental.status != RentalStatus.PENDING_POPUP:
        raise InvalidState(
            f"Only a PENDING_POPUP rental can be settled; this one is {rental.status.value}.",
            context={"rental_id": str(rental.id), "status": rental.status.value},
        )
    if not ejected:
        return await cancel_pending(session, rental_id=rental_id, reason=f"operator: {reason}")
    if rental.powerbank_sn is None or rental.slot_number is None:
        raise InvalidState(
            "No bank was recorded for this eject: it can only be settled as not ejected.",
            context={"rental_id": str(rental.id)},
        )
    return await activate(
        session,
        rental_id=rental_id,
        powerbank_sn=rental.powerbank_sn,
        slot_number=rental.slot_number,
        soc=rental.start_battery_level,
        at=rental.created_at,
    )


async def rented_out(session: AsyncSession, powerbank_sns: list[str]) -> set[str]:
    """Which of these banks a return would concern: out on an open rental, or written off as lost and not
    yet recovered (see `complete_by_return`). One query, for a cabinet reporting all its banks."""
    if not powerbank_sns:
        return set()
    rows = await session.scalars(
        select(Rental.powerbank_sn).where(
            Rental.powerbank_sn.in_(powerbank_sns),
            or_(
                Rental.status.in_((RentalStatus.ACTIVE, RentalStatus.OVERDUE)),
                Rental.lost_at.is_not(None) & Rental.recovered_at.is_(None),
            ),
        )
    )
    return {sn for sn in rows if sn is not None}


async def stations_with_pending(session: AsyncSession, station_sns: list[str]) -> set[str]:
    """Which of these stations have PENDING_POPUP rentals (to be settled from their holes)."""
    rows = await session.scalars(
        select(Station.serial_number)
        .join(Rental, Rental.station_id == Station.id)
        .where(Station.serial_number.in_(station_sns), Rental.status == RentalStatus.PENDING_POPUP)
        .distinct()
    )
    return set(rows.all())


async def complete_by_return(
    session: AsyncSession,
    *,
    powerbank_sn: str,
    station_sn: str,
    slot_number: int,
    soc: int | None,
    at: datetime,
    late_fee_per_hour: Decimal,
    late_fee_rule: LateFeeRule | None = None,
) -> Returned | None:
    """A power bank came back into any cabinet: close its open rental and charge, exactly once.

    The late fee follows `late_fee_rule`, else the active late-fee configuration, else (no row active,
    which the database does not allow) a flat `late_fee_per_hour`. A bank that was written off as lost
    reverses its penalty down to the late fee (see the module docstring)."""
    station = await stations.by_serial(session, station_sn)
    bank = await session.get(PowerBank, powerbank_sn, with_for_update=True)
    if bank is None:
        bank = PowerBank(serial_number=powerbank_sn)
        session.add(bank)
    bank.station_id, bank.slot_number, bank.rented_by, bank.soc = station.id, slot_number, None, soc
    bank.lost_at = None
    # Its open rental or, failing that, the rental that wrote it off as lost (`rented_out` finds the banks
    # of a snapshot that need this).
    stmt = (
        select(Rental)
        .where(
            Rental.powerbank_sn == powerbank_sn,
            or_(
                Rental.status.in_((RentalStatus.ACTIVE, RentalStatus.OVERDUE)),
                Rental.lost_at.is_not(None) & Rental.recovered_at.is_(None),
            ),
        )
        .order_by(Rental.lost_at.is_not(None), Rental.lost_at.desc())
        .limit(1)
        .with_for_update(of=Rental)
    )
    rental = (await session.execute(stmt)).unique().scalar_one_or_none()
    if rental is None:
        return None  # a duplicate 0x40, or a bank that was not rented out
    rule = late_fee_rule or await active_late_fee_rule(session) or LateFeeRule.flat(late_fee_per_hour)
    if rental.status == RentalStatus.COMPLETED:
        return await _came_back(session, rental, station=station, soc=soc, at=at, rule=rule)
    return await _complete(
        session, rental, station=station, soc=soc, at=at, rule=rule, event="rental_completed"
    )


async def _complete(
    session: AsyncSession,
    rental: Rental,
    *,
    station: Station | None,
    soc: int | None,
    at: datetime,
    rule: LateFeeRule,
    event: str,
) -> Returned:
    """End an ACTIVE/OVERDUE rental at `at` (returned into `station`, or handed back when None): charge what
    is owed once (ledger references `rental:<id>:…`), tell the user, count it."""
    lines = await _lines(session, rental.id)
    await _assess_end(session, rental, lines, ended_at=at, rule=rule)
    rental.status = RentalStatus.COMPLETED
    rental.ended_at = at
    rental.return_station = station
    rental.return_battery_level = soc
    charged = await _close(session, rental, lines, stage="return")
    station_sn = (station or rental.station).serial_number
    await notifications.rental_returned(
        session,
        user_id=rental.user_id,
        rental_id=rental.id,
        rental_code=rental.rental_code,
        station_sn=station_sn,
        charged=charged,
        due=rental.overdue_amount,
    )
    RENTALS.labels(outcome="completed").inc()
    log.info(
        "event=%s rental_id=%s station_sn=%s charged=%s due=%s",
        event,
        rental.id,
        station_sn,
        charged,
        rental.overdue_amount,
    )
    return Returned(rental_id=rental.id, user_id=rental.user_id, charged=charged, due=rental.overdue_amount)


# --- charge lines -------------------------------------------------------------------------------------


async def _lines(session: AsyncSession, rental_id: uuid.UUID) -> list[RentalCharge]:
    rows = await session.scalars(
        select(RentalCharge).where(RentalCharge.rental_id == rental_id).order_by(RentalCharge.id)
    )
    return list(rows.all())


async def _add_line(
    session: AsyncSession,
    rental: Rental,
    lines: list[RentalCharge],
    kind: ChargeKind,
    amount: Decimal,
    description: str,
    *,
    package_id: int | None = None,
    minutes: int | None = None,
) -> RentalCharge:
    amount = money(amount)
    line = RentalCharge(
        rental_id=rental.id,
        kind=kind,
        amount=amount,
        paid=amount if kind == ChargeKind.REFUND else Decimal("0.00"),
        description=description[:200],
        package_id=package_id,
        minutes=minutes,
    )
    session.add(line)
    await session.flush()
    lines.append(line)
    return line


def _reference(rental: Rental, line: RentalCharge, stage: str) -> str:
    return f"rental:{rental.id}:line:{line.id}:{stage}"


async def _collect(session: AsyncSession, rental: Rental, lines: list[RentalCharge], stage: str) -> Decimal:
    """Charge what each line still owes from the wallet, up to its balance; what was taken."""
    taken = Decimal("0.00")
    for line in lines:
        if line.unpaid > 0:
            got = await wallet.charge_up_to(
                session,
                user_id=rental.user_id,
                amount=line.unpaid,
                type=line.entry_type,
                reference=_reference(rental, line, stage),
            )
            line.paid = money(line.paid + got)
            taken += got
    return money(taken)


async def _settle_deposit(session: AsyncSession, rental: Rental, lines: list[RentalCharge]) -> None:
    """The rental is over: its deposit covers what the wallet could not, the rest goes back."""
    left = money(rental.deposit_amount - rental.deposit_captured)
    for line in lines:
        take = min(line.unpaid, left)
        if take > 0:
            await wallet.capture(
                session, amount=take, type=line.entry_type, reference=_reference(rental, line, "deposit")
            )
            line.paid = money(line.paid + take)
            rental.deposit_captured = money(rental.deposit_captured + take)
            left -= take
    if left > 0:
        await wallet.release(
            session, user_id=rental.user_id, amount=left, reference=f"rental:{rental.id}:deposit"
        )


def _totals(rental: Rental, lines: list[RentalCharge]) -> None:
    rental.amount_paid = money(sum((line.paid for line in lines), Decimal("0.00")))
    rental.overdue_amount = money(sum((line.unpaid for line in lines), Decimal("0.00")))
    refunded = any(line.kind == ChargeKind.REFUND for line in lines)
    charged = any(line.amount > 0 for line in lines)
    if rental.overdue_amount > 0:
        rental.payment_status = PaymentStatus.DUE
    elif rental.status == RentalStatus.CANCELLED:
        rental.payment_status = PaymentStatus.REFUNDED if refunded else PaymentStatus.NOT_CHARGED
    elif refunded and rental.amount_paid == 0:
        rental.payment_status = PaymentStatus.REFUNDED
    elif not charged and rental.status in (RentalStatus.ACTIVE, RentalStatus.OVERDUE):
        rental.payment_status = PaymentStatus.PENDING
    else:
        rental.payment_status = PaymentStatus.PAID


async def _charge_at_start(session: AsyncSession, rental: Rental) -> None:
    """Activation: a PREPAID package is paid now, and the package's deposit is held."""
    await wallet.wallet_for(session, rental.user_id, lock=True)
    package = rental.package
    lines = await _lines(session, rental.id)
    if package.payment_model == PaymentModel.PREPAID and not lines:
        await _add_package_line(session, rental, lines)
        await _collect(session, rental, lines, "charge")
    if package.deposit_amount > 0 and rental.deposit_amount == 0:
        rental.deposit_amount = await wallet.hold_up_to(
            session,
            user_id=rental.user_id,
            amount=package.deposit_amount,
            reference=f"rental:{rental.id}:deposit",
        )
    _totals(rental, lines)


async def _add_package_line(session: AsyncSession, rental: Rental, lines: list[RentalCharge]) -> None:
    package = rental.package
    await _add_line(
        session,
        rental,
        lines,
        ChargeKind.PACKAGE,
        package.price,
        f"{package.name} ({package.duration_minutes} min, prepaid)",
        package_id=package.id,
        minutes=package.duration_minutes,
    )


async def _assess_end(
    session: AsyncSession,
    rental: Rental,
    lines: list[RentalCharge],
    *,
    ended_at: datetime,
    rule: LateFeeRule | None,
    penalty: Decimal | None = None,
) -> None:
    """The lines a rental's end adds: POSTPAID usage up to due_at, then the late fee (`rule`) or, for
    a lost bank, the penalty."""
    assert rental.started_at is not None and rental.due_at is not None
    package = rental.package
    if package.payment_model == PaymentModel.PREPAID:
        if not any(line.kind == ChargeKind.PACKAGE for line in lines):  # activated before 0005: due now
            await _add_package_line(session, rental, lines)
    else:
        usage = postpaid_usage(
            price=package.price,
            duration_minutes=package.duration_minutes,
            started_at=rental.started_at,
            until=min(ended_at, rental.due_at),
        )
        if usage.amount > 0:
            rate = money(package.price / package.duration_minutes)
            await _add_line(
                session,
                rental,
                lines,
                ChargeKind.USAGE,
                usage.amount,
                f"{package.name}: {usage.minutes} min at {rate}/min",
                package_id=package.id,
                minutes=usage.minutes,
            )
    if penalty is not None:
        if penalty > 0:
            await _add_line(session, rental, lines, ChargeKind.PENALTY, penalty, "Power bank not returned")
    elif rule is not None:
        fee = late_fee(
            rule,
            hourly_rate=hourly_rate(price=package.price, duration_minutes=package.duration_minutes),
            due_at=rental.due_at,
            ended_at=ended_at,
        )
        if fee.amount > 0:
            await _add_line(
                session,
                rental,
                lines,
                ChargeKind.LATE_FEE,
                fee.amount,
                f"Late return: {fee.hours} h past due",
            )


async def _close(session: AsyncSession, rental: Rental, lines: list[RentalCharge], *, stage: str) -> Decimal:
    """Collect what the lines owe from the wallet, then the deposit; what was collected now."""
    await wallet.wallet_for(session, rental.user_id, lock=True)
    before = sum((line.paid for line in lines), Decimal("0.00"))
    await _collect(session, rental, lines, stage)
    await _settle_deposit(session, rental, lines)
    _totals(rental, lines)
    return money(sum((line.paid for line in lines), Decimal("0.00")) - before)


async def _came_back(
    session: AsyncSession,
    rental: Rental,
    *,
    station: Station,
    soc: int | None,
    at: datetime,
    rule: LateFeeRule,
) -> Returned:
    """A bank written off as lost is back (`rental` is locked): the penalty becomes the late fee accrued
    until now (never more than the penalty); the difference pays what is still due, the rest is
    refunded."""
    assert rental.due_at is not None
    await wallet.wallet_for(session, rental.user_id, lock=True)
    lines = await _lines(session, rental.id)
    package = rental.package
    fee = late_fee(
        rule,
        hourly_rate=hourly_rate(price=package.price, duration_minutes=package.duration_minutes),
        due_at=rental.due_at,
        ended_at=at,
    )
    refunded = Decimal("0.00")
    for line in lines:
        if line.kind != ChargeKind.PENALTY:
            continue
        owed = min(fee.amount, line.amount)
        excess = money(max(Decimal("0.00"), line.paid - owed))
        line.description = (
            f"Power bank returned {fee.hours} h past due: penalty {line.amount} reduced to the late fee"
        )
        line.amount, line.paid = owed, min(line.paid, owed)
        for other in lines:
            move = min(other.unpaid, excess)
            if move > 0:
                other.paid = money(other.paid + move)
                excess -= move
        if excess > 0:
            await wallet.refund(
                session, user_id=rental.user_id, amount=excess, reference=f"rental:{rental.id}:recovered"
            )
            refunded += excess
    rental.recovered_at = at
    rental.return_station = station
    rental.return_battery_level = soc
    _totals(rental, lines)
    RENTALS.labels(outcome="recovered").inc()
    log.info(
        "event=lost_bank_returned rental_id=%s powerbank_sn=%s station_sn=%s late_fee=%s refunded=%s",
        rental.id,
        rental.powerbank_sn,
        station.serial_number,
        fee.amount,
        refunded,
    )
    return Returned(
        rental_id=rental.id,
        user_id=rental.user_id,
        charged=Decimal("0.00"),
        due=rental.overdue_amount,
        refunded=money(refunded),
    )


# --- jobs (bodies; the scheduler calls them) ----------------------------------------------------------


async def mark_overdue(session: AsyncSession, *, now: datetime) -> list[RentalEvent]:
    """ACTIVE rentals past due_at plus the active configuration's grace period become OVERDUE (their
    `overdue_at` is when that happened, however late the job runs). Idempotent."""
    rule = await active_late_fee_rule(session)
    grace = timedelta(minutes=rule.grace_period_minutes if rule else 0)
    rows = await session.execute(
        update(Rental)
        .where(Rental.status == RentalStatus.ACTIVE, Rental.due_at <= now - grace)
        .values(status=RentalStatus.OVERDUE, overdue_at=Rental.due_at + grace)
        .returning(Rental.id, Rental.user_id, Rental.rental_code, Rental.due_at)
        .execution_options(synchronize_session=False)
    )
    events = [
        RentalEvent(rental_id=rid, user_id=uid, rental_code=code, due_at=due_at)
        for rid, uid, code, due_at in rows.tuples()
    ]
    for event in events:
        log.info("event=rental_overdue rental_id=%s", event.rental_id)
    return events


async def complete_lost(
    session: AsyncSession, *, now: datetime, settings: Settings, limit: int = 200
) -> list[RentalEvent]:
    """OVERDUE for LOST_AFTER_OVERDUE_S → COMPLETED with LOST_BANK_PENALTY (PENALTY, up to the balance
    and the deposit, the rest due) and the bank marked lost. Idempotent; at most `limit` per call."""
    cutoff = now - timedelta(seconds=settings.lost_after_overdue_s)
    candidates = (
        await session.execute(
            select(Rental.id, Rental.powerbank_sn)
            .where(Rental.status == RentalStatus.OVERDUE, Rental.overdue_at <= cutoff)
            .order_by(Rental.overdue_at)
            .limit(limit)
        )
    ).all()
    events = []
    for rental_id, powerbank_sn in candidates:
        # Bank before rental, as a return takes them: the two never wait on each other.
        bank = await session.get(PowerBank, powerbank_sn, with_for_update=True) if powerbank_sn else None
        rental = await get(session, rental_id, lock=True)
        if rental.status != RentalStatus.OVERDUE or rental.overdue_at is None or rental.overdue_at > cutoff:
            continue
        lines = await _lines(session, rental.id)
        await _assess_end(session, rental, lines, ended_at=now, rule=None, penalty=settings.lost_bank_penalty)
        rental.status = RentalStatus.COMPLETED
        rental.ended_at = now
        rental.lost_at = now
        charged = await _close(session, rental, lines, stage="lost")
        if bank is not None:
            bank.lost_at = now
        RENTALS.labels(outcome="lost").inc()
        log.info(
            "event=rental_lost rental_id=%s powerbank_sn=%s charged=%s due=%s",
            rental.id,
            powerbank_sn,
            charged,
            rental.overdue_amount,
        )
        events.append(
            RentalEvent(
                rental_id=rental.id,
                user_id=rental.user_id,
                rental_code=rental.rental_code,
                due_at=rental.due_at,
                charged=charged,
                due=rental.overdue_amount,
            )
        )
    return events


# --- the user's actions on a rental -------------------------------------------------------------------


async def owned(
    session: AsyncSession, rental_id: uuid.UUID, user_id: uuid.UUID, *, lock: bool = False
) -> Rental:
    """The user's rental; someone else's is NotFound, as an unknown one is."""
    rental = await get(session, rental_id, lock=lock)
    if rental.user_id != user_id:
        raise NotFound("Rental not found.", context={"rental_id": str(rental_id)})
    return rental


async def cancel(
    session: AsyncSession,
    *,
    rental_id: uuid.UUID,
    user_id: uuid.UUID,
    now: datetime,
    window_s: int,
    reason: str = "",
) -> Rental:
    """Cancel within `window_s` of the start, once the power bank is back in a cabinet (its return
    normally completed the rental already): CANCELLED, and everything paid is refunded."""
    rental = await owned(session, rental_id, user_id)
    bank = (
        await session.get(PowerBank, rental.powerbank_sn, with_for_update=True)
        if rental.powerbank_sn
        else None
    )
    rental = await get(session, rental_id, lock=True)
    context = {"rental_id": str(rental.id), "status": rental.status.value}
    if rental.status in (RentalStatus.CANCELLED, RentalStatus.PENDING_POPUP) or rental.lost_at is not None:
        raise InvalidState("This rental cannot be cancelled.", context=context)
    assert rental.started_at is not None
    if (now - rental.started_at).total_seconds() > window_s:
        raise InvalidState(
            f"Rentals can be cancelled only within {window_s // 60} minutes of the start.",
            context={**context, "cancel_window_s": window_s},
        )
    still_out = rental.status in (RentalStatus.ACTIVE, RentalStatus.OVERDUE)
    if still_out and (bank is None or bank.station_id is None or bank.lost_at is not None):
        raise InvalidState("Put the power bank back into any station first, then cancel.", context=context)
    await wallet.wallet_for(session, user_id, lock=True)
    lines = await _lines(session, rental.id)
    for line in lines:
        line.amount = line.paid  # nothing more is owed
    paid = money(sum((line.paid for line in lines), Decimal("0.00")))
    if paid > 0:
        await wallet.refund(session, user_id=user_id, amount=paid, reference=f"rental:{rental.id}:cancel")
        await _add_line(
            session, rental, lines, ChargeKind.REFUND, -paid, "Cancelled within the window: refunded"
        )
    if still_out:
        assert bank is not None
        rental.ended_at = now
        rental.return_station = await session.get(Station, bank.station_id)
        await _settle_deposit(session, rental, lines)
    rental.status = RentalStatus.CANCELLED
    rental.failure_reason = "cancelled_by_user"
    _totals(rental, lines)
    RENTALS.labels(outcome="cancelled").inc()
    log.info(
        "event=rental_cancelled_by_user rental_id=%s refunded=%s reason=%r", rental.id, paid, reason[:200]
    )
    return rental


@dataclass(frozen=True, slots=True, kw_only=True)
class Extension:
    id: int
    package_name: str
    extended_minutes: int
    extension_cost: Decimal
    extended_at: datetime
    extensions_used: int


async def extend(
    session: AsyncSession,
    *,
    rental_id: uuid.UUID,
    user_id: uuid.UUID,
    package_id: int,
    max_extensions: int,
) -> tuple[Rental, Extension]:
    """Add a package's minutes to an ACTIVE rental's due_at, at most `max_extensions` times. A PREPAID
    rental pays the extension's price now (the whole of it, or 402); a POSTPAID one is billed for the
    minutes at return, at its own per-minute rate."""
    rental = await owned(session, rental_id, user_id, lock=True)
    if rental.status != RentalStatus.ACTIVE:
        message = (
            "An overdue rental cannot be extended: return the power bank."
            if rental.status == RentalStatus.OVERDUE
            else "Only an active rental can be extended."
        )
        raise InvalidState(message, context={"rental_id": str(rental.id), "status": rental.status.value})
    if rental.extension_count >= max_extensions:
        raise InvalidState(
            f"A rental can be extended at most {max_extensions} times.",
            context={"rental_id": str(rental.id), "max_extensions": max_extensions},
        )
    package = await session.get(RentalPackage, package_id)
    if package is None or not package.is_active:
        raise NotFound("Package not found.", context={"package_id": package_id})
    if package.payment_model != rental.package.payment_model:
        raise ValidationFailed(
            f"Extend a {rental.package.payment_model.value} rental with a"
            f" {rental.package.payment_model.value} package.",
            context={"package_id": package_id, "payment_model": rental.package.payment_model.value},
        )
    prepaid = package.payment_model == PaymentModel.PREPAID
    cost = money(package.price) if prepaid else Decimal("0.00")
    account = await wallet.wallet_for(session, user_id, lock=True)
    if account.balance < cost:
        raise InsufficientBalance(
            context={"required": str(cost), "balance": str(account.balance), "currency": account.currency}
        )
    lines = await _lines(session, rental.id)
    line = await _add_line(
        session,
        rental,
        lines,
        ChargeKind.EXTENSION,
        cost,
        f"Extension: {package.name} (+{package.duration_minutes} min)",
        package_id=package.id,
        minutes=package.duration_minutes,
    )
    if cost > 0:
        await wallet.debit(
            session,
            user_id=user_id,
            amount=cost,
            type=line.entry_type,
            reference=_reference(rental, line, "charge"),
        )
        line.paid = cost
    assert rental.due_at is not None
    rental.due_at = rental.due_at + timedelta(minutes=package.duration_minutes)
    rental.extension_count += 1
    _totals(rental, lines)
    log.info(
        "event=rental_extended rental_id=%s package_id=%s minutes=%s cost=%s",
        rental.id,
        package.id,
        package.duration_minutes,
        cost,
    )
    return rental, Extension(
        id=line.id,
        package_name=package.name,
        extended_minutes=package.duration_minutes,
        extension_cost=cost,
        extended_at=line.created_at or datetime.now(UTC),
        extensions_used=rental.extension_count,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DuePaid:
    rental: Rental
    amount: Decimal
    balance: Decimal
    transfer_ids: list[uuid.UUID]


async def pay_due(session: AsyncSession, *, rental_id: uuid.UUID, user_id: uuid.UUID) -> DuePaid:
    """Settle everything the rental owes from the wallet at once (402 if the balance is short)."""
    rental = await owned(session, rental_id, user_id, lock=True)
    if rental.overdue_amount <= 0 or rental.status == RentalStatus.PENDING_POPUP:
        raise InvalidState(
            "Nothing is due on this rental.",
            context={"rental_id": str(rental.id), "payment_status": rental.payment_status.value},
        )
    account = await wallet.wallet_for(session, user_id, lock=True)
    if account.balance < rental.overdue_amount:
        raise InsufficientBalance(
            context={
                "required": str(rental.overdue_amount),
                "balance": str(account.balance),
                "currency": account.currency,
            }
        )
    lines = await _lines(session, rental.id)
    amount, transfers = Decimal("0.00"), []
    for line in lines:
        if line.unpaid > 0:
            movement = await wallet.debit(
                session,
                user_id=user_id,
                amount=line.unpaid,
                type=line.entry_type,
                reference=_reference(rental, line, "due"),
            )
            amount += line.unpaid
            line.paid = line.amount
            transfers.append(movement.transfer_id)
    _totals(rental, lines)
    log.info("event=rental_due_paid rental_id=%s amount=%s", rental.id, amount)
    return DuePaid(rental=rental, amount=money(amount), balance=account.balance, transfer_ids=transfers)


async def report_issue(
    session: AsyncSession,
    *,
    rental_id: uuid.UUID,
    user_id: uuid.UUID,
    issue_type: RentalIssueType,
    description: str,
) -> tuple[Rental, RentalIssue]:
    rental = await owned(session, rental_id, user_id)
    issue = RentalIssue(
        rental_id=rental.id,
        user_id=user_id,
        issue_type=issue_type,
        description=description,
        reported_at=datetime.now(UTC),
    )
    session.add(issue)
    await session.flush()
    log.info("event=rental_issue_reported rental_id=%s issue_type=%s", rental.id, issue_type.value)
    return rental, issue


async def record_refund(session: AsyncSession, rental: Rental, *, amount: Decimal, description: str) -> None:
    """Money given back for a rental (the ledger transfer is the caller's): a negative line on its bill."""
    lines = await _lines(session, rental.id)
    await _add_line(session, rental, lines, ChargeKind.REFUND, -amount, description)
    _totals(rental, lines)


async def held_deposits(session: AsyncSession, user_id: uuid.UUID) -> Decimal:
    """Deposits held for the user's running rentals (the wallet balance's `held`)."""
    total = await session.scalar(
        select(func.coalesce(func.sum(Rental.deposit_amount - Rental.deposit_captured), 0)).where(
            Rental.user_id == user_id, Rental.status.in_((RentalStatus.ACTIVE, RentalStatus.OVERDUE))
        )
    )
    return money(Decimal(total or 0))


# --- statistics and receipts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    total_rentals: int
    completed_rentals: int
    active_rentals: int
    cancelled_rentals: int
    total_spent: Decimal
    total_time_used: int  # minutes
    average_rental_duration: float  # minutes per completed rental
    timely_returns: int
    late_returns: int
    timely_return_rate: float  # percent
    favorite_station: str | None
    favorite_package: str | None
    first_rental_date: datetime | None
    last_rental_date: datetime | None


async def stats(session: AsyncSession, user_id: uuid.UUID, *, now: datetime) -> Stats:
    mine = Rental.user_id == user_id
    completed = Rental.status == RentalStatus.COMPLETED
    used = Rental.status.in_((RentalStatus.COMPLETED, RentalStatus.ACTIVE, RentalStatus.OVERDUE))
    seconds = func.extract("epoch", func.coalesce(Rental.ended_at, now) - Rental.started_at)
    late = completed & ((Rental.lost_at.is_not(None)) | (Rental.ended_at > Rental.due_at))
    row = (
        await session.execute(
            select(
                func.count(),
                func.count().filter(completed),
                func.count().filter(Rental.status.in_(OPEN_RENTAL_STATUSES)),
                func.count().filter(Rental.status == RentalStatus.CANCELLED),
                func.coalesce(func.sum(Rental.amount_paid), 0),
                func.coalesce(func.sum(case((used, func.floor(seconds / 60)), else_=0)), 0),
                func.coalesce(func.sum(case((completed, func.floor(seconds / 60)), else_=0)), 0),
                func.count().filter(late),
                func.min(Rental.started_at),
                func.max(Rental.started_at),
            ).where(mine)
        )
    ).one()
    total, n_completed, n_open, n_cancelled, spent, minutes, completed_minutes, n_late, first, last = row
    timely = n_completed - n_late
    favorite_station = await session.scalar(
        select(Station.name)
        .join(Rental, Rental.station_id == Station.id)
        .where(mine, Rental.started_at.is_not(None))
        .group_by(Station.id, Station.name)
        .order_by(func.count().desc(), Station.name)
        .limit(1)
    )
    favorite_package = await session.scalar(
        select(RentalPackage.name)
        .join(Rental, Rental.package_id == RentalPackage.id)
        .where(mine, Rental.started_at.is_not(None))
        .group_by(RentalPackage.id, RentalPackage.name)
        .order_by(func.count().desc(), RentalPackage.name)
        .limit(1)
    )
    return Stats(
        total_rentals=total,
        completed_rentals=n_completed,
        active_rentals=n_open,
        cancelled_rentals=n_cancelled,
        total_spent=money(Decimal(spent)),
        total_time_used=int(minutes),
        average_rental_duration=round(float(completed_minutes) / n_completed, 1) if n_completed else 0.0,
        timely_returns=timely,
        late_returns=n_late,
        timely_return_rate=round(100.0 * timely / n_completed, 1) if n_completed else 0.0,
        favorite_station=favorite_station,
        favorite_package=favorite_package,
        first_rental_date=first,
        last_rental_date=last,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptLine:
    kind: str
    description: str
    amount: Decimal
    paid: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    rental: Rental
    lines: list[ReceiptLine]
    tax: TaxBreakdown
    vat_rate: Decimal
    service_charge_rate: Decimal
    amount_paid: Decimal
    amount_due: Decimal
    deposit_held: Decimal
    deposit_captured: Decimal
    deposit_released: Decimal


async def receipt(
    session: AsyncSession, *, rental_id: uuid.UUID, user_id: uuid.UUID, settings: Settings
) -> Receipt:
    """The rental's bill: its lines (prices include service charge and VAT), the total broken down."""
    rental = await owned(session, rental_id, user_id)
    lines = [line for line in await _lines(session, rental.id) if line.amount != 0]
    total = money(sum((line.amount for line in lines), Decimal("0.00")))
    running = rental.status in (RentalStatus.ACTIVE, RentalStatus.OVERDUE)
    held = money(rental.deposit_amount - rental.deposit_captured) if running else Decimal("0.00")
    released = Decimal("0.00") if running else money(rental.deposit_amount - rental.deposit_captured)
    return Receipt(
        rental=rental,
        lines=[
            ReceiptLine(
                kind=line.kind.value, description=line.description, amount=line.amount, paid=line.paid
            )
            for line in lines
        ],
        tax=tax_breakdown(
            total, vat_rate=settings.vat_rate, service_charge_rate=settings.service_charge_rate
        ),
        vat_rate=settings.vat_rate,
        service_charge_rate=settings.service_charge_rate,
        amount_paid=rental.amount_paid,
        amount_due=rental.overdue_amount,
        deposit_held=held,
        deposit_captured=rental.deposit_captured,
        deposit_released=released,
    )


# --- operators: packages and late-fee configurations ---------------------------------------------------


async def all_packages(session: AsyncSession) -> list[RentalPackage]:
    return list((await session.scalars(select(RentalPackage).order_by(RentalPackage.id))).all())


async def create_package(session: AsyncSession, **fields: object) -> RentalPackage:
    package = RentalPackage(**fields)
    session.add(package)
    await session.flush()
    return package


async def update_package(session: AsyncSession, package_id: int, **fields: object) -> RentalPackage:
    """Change a package; running rentals keep the terms they started with except what is read at return
    (a POSTPAID per-minute rate, the hourly rate a MULTIPLIER late fee uses)."""
    package = await session.get(RentalPackage, package_id, with_for_update=True)
    if package is None:
        raise NotFound("Package not found.", context={"package_id": package_id})
    for name, value in fields.items():
        setattr(package, name, value)
    await session.flush()
    return package


async def active_late_fee(session: AsyncSession) -> LateFeeConfiguration | None:
    return await session.scalar(select(LateFeeConfiguration).where(LateFeeConfiguration.is_active))


async def active_late_fee_rule(session: AsyncSession) -> LateFeeRule | None:
    row = await active_late_fee(session)
    return LateFeeRule.of(row) if row is not None else None


async def late_fee_configurations(session: AsyncSession) -> list[LateFeeConfiguration]:
    rows = await session.scalars(select(LateFeeConfiguration).order_by(LateFeeConfiguration.id))
    return list(rows.all())


def _check_late_fee(fee_type: LateFeeType, multiplier: Decimal, flat_rate_per_hour: Decimal) -> None:
    needs_multiplier = fee_type in (LateFeeType.MULTIPLIER, LateFeeType.COMPOUND)
    needs_flat = fee_type in (LateFeeType.FLAT_RATE, LateFeeType.COMPOUND)
    if (needs_multiplier and multiplier <= 0 and not needs_flat) or (
        needs_flat and flat_rate_per_hour <= 0 and not needs_multiplier
    ):
        raise ValidationFailed(
            f"A {fee_type.value} late fee needs a positive "
            + ("multiplier." if needs_multiplier else "flat_rate_per_hour."),
            context={"fee_type": fee_type.value},
        )
    if fee_type == LateFeeType.COMPOUND and multiplier <= 0 and flat_rate_per_hour <= 0:
        raise ValidationFailed(
            "A COMPOUND late fee needs a positive multiplier or flat_rate_per_hour.",
            context={"fee_type": fee_type.value},
        )


async def create_late_fee_configuration(
    session: AsyncSession,
    *,
    name: str,
    fee_type: LateFeeType,
    multiplier: Decimal,
    flat_rate_per_hour: Decimal,
    grace_period_minutes: int,
    max_daily_rate: Decimal | None,
    activate: bool,
) -> LateFeeConfiguration:
    _check_late_fee(fee_type, multiplier, flat_rate_per_hour)
    row = LateFeeConfiguration(
        name=name,
        fee_type=fee_type,
        multiplier=multiplier,
        flat_rate_per_hour=money(flat_rate_per_hour),
        grace_period_minutes=grace_period_minutes,
        max_daily_rate=money(max_daily_rate) if max_daily_rate is not None else None,
        is_active=False,
    )
    session.add(row)
    await session.flush()
    if activate:
        row = await activate_late_fee_configuration(session, row.id)
    return row


async def activate_late_fee_configuration(session: AsyncSession, config_id: int) -> LateFeeConfiguration:
    """Make this configuration the active one (the previous one stops, in the same transaction)."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("late_fee_active", 0))))
    row = await session.get(LateFeeConfiguration, config_id, with_for_update=True)
    if row is None:
        raise NotFound("Late-fee configuration not found.", context={"id": config_id})
    if not row.is_active:
        await session.execute(
            update(LateFeeConfiguration)
            .where(LateFeeConfiguration.is_active)
            .values(is_active=False)
            .execution_options(synchronize_session=False)
        )
        await session.flush()
        row.is_active = True
        await session.flush()
    await session.refresh(row)
    log.info("event=late_fee_configuration_active id=%s fee_type=%s", row.id, row.fee_type.value)
    return row


# --- operators ----------------------------------------------------------------------------------------


async def admin_page(
    session: AsyncSession,
    *,
    page: int,
    page_size: int,
    status: RentalStatus | None = None,
    user_id: uuid.UUID | None = None,
    station_sn: str | None = None,
) -> tuple[list[Rental], int]:
    """Every user's rentals for operators, newest first, optionally filtered."""
    where = []
    if status is not None:
        where.append(Rental.status == status)
    if user_id is not None:
        where.append(Rental.user_id == user_id)
    if station_sn is not None:
        station_id = select(Station.id).where(Station.serial_number == station_sn).scalar_subquery()
        where.append(Rental.station_id == station_id)
    count = await session.scalar(select(func.count()).select_from(Rental).where(*where)) or 0
    rows = await session.scalars(
        select(Rental)
        .where(*where)
        .order_by(Rental.created_at.desc(), Rental.id)
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.unique().all()), count


async def force_complete(
    session: AsyncSession,
    *,
    rental_id: uuid.UUID,
    at: datetime,
    return_station_sn: str | None,
    late_fee_per_hour: Decimal,
) -> Returned:
    """An operator ends an ACTIVE/OVERDUE rental (e.g. the bank was handed back): charged by the same
    rules and ledger references as a 0x40 return, so it moves money once, and a later 0x40 of that bank
    finds no open rental. Anything else (already ended, or its eject still unconfirmed) is InvalidState."""
    return_station = await stations.by_serial(session, return_station_sn) if return_station_sn else None
    probe = await get(session, rental_id)
    bank = (
        await session.get(PowerBank, probe.powerbank_sn, with_for_update=True) if probe.powerbank_sn else None
    )  # bank before rental, as a return takes them
    rental = await get(session, rental_id, lock=True)
    if rental.status not in (RentalStatus.ACTIVE, RentalStatus.OVERDUE):
        raise InvalidState(
            f"Only an ACTIVE or OVERDUE rental can be completed; this one is {rental.status.value}.",
            context={"rental_id": str(rental.id), "status": rental.status.value},
        )
    if bank is not None:
        bank.rented_by = None
        bank.station_id = return_station.id if return_station is not None else None
        bank.slot_number = None
    rule = await active_late_fee_rule(session) or LateFeeRule.flat(late_fee_per_hour)
    return await _complete(
        session, rental, station=return_station, soc=None, at=at, rule=rule, event="rental_force_completed"
    )
