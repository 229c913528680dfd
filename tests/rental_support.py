"""Helpers for the rental-money tests: users, stations, packages and rentals written straight through
the domain against the real database (time travel = choosing the timestamps), and ledger read-outs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from domain import auth, rentals, wallet
from domain.pricing import LateFeeRule
from storage.models import (
    EntryType,
    LedgerEntry,
    PackageType,
    PaymentModel,
    PowerBank,
    Rental,
    RentalPackage,
    Station,
    User,
)
from tests.conftest import new_phone


@dataclass
class Customer:
    id: uuid.UUID
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def now() -> datetime:
    return datetime.now(UTC)


def bank_sn() -> str:
    return f"RB{uuid.uuid4().hex[:12].upper()}"


async def customer(system: Any, balance: Decimal | str | int = 0) -> Customer:
    """A user with a wallet credited `balance` (a TOPUP) and an access token."""
    async with system.services.db.transaction() as session:
        user = User(phone=new_phone())
        session.add(user)
        await session.flush()
        if Decimal(balance) > 0:
            await wallet.credit(
                session,
                user_id=user.id,
                amount=Decimal(balance),
                type=EntryType.TOPUP,
                reference=f"test-credit:{uuid.uuid4()}",
            )
        token = auth.issue_tokens(user, system.settings).access
    return Customer(id=user.id, token=token)


async def station(system: Any) -> str:
    sn = f"R{uuid.uuid4().hex[:12].upper()}"
    async with system.services.db.transaction() as session:
        session.add(Station(serial_number=sn, name=sn, latitude=27.7, longitude=85.3, mqtt_secret_hash="-"))
    return sn


async def package(
    system: Any,
    *,
    price: str = "60.00",
    minutes: int = 60,
    model: PaymentModel = PaymentModel.PREPAID,
    deposit: str = "0.00",
    package_type: PackageType = PackageType.HOURLY,
) -> int:
    async with system.services.db.transaction() as session:
        row = await rentals.create_package(
            session,
            name=f"{minutes} min {model.value.lower()}",
            description="test",
            duration_minutes=minutes,
            price=Decimal(price),
            package_type=package_type,
            payment_model=model,
            deposit_amount=Decimal(deposit),
        )
        return row.id


async def started(
    system: Any, user: Customer, *, package_id: int, at: datetime, station_sn: str | None = None
) -> tuple[uuid.UUID, str, str]:
    """A rental that went ACTIVE at `at`: (rental id, power-bank SN, station SN)."""
    sn = station_sn or await station(system)
    bank = bank_sn()
    async with system.services.db.transaction() as session:
        rental = await rentals.begin(session, user_id=user.id, station_sn=sn, package_id=package_id)
        await session.flush()
        await rentals.activate(session, rental_id=rental.id, powerbank_sn=bank, slot_number=1, soc=90, at=at)
        return rental.id, bank, sn


async def give_back(
    system: Any, bank: str, station_sn: str, *, at: datetime, rule: LateFeeRule | None = None
) -> rentals.Returned | None:
    async with system.services.db.transaction() as session:
        return await rentals.complete_by_return(
            session,
            powerbank_sn=bank,
            station_sn=station_sn,
            slot_number=1,
            soc=70,
            at=at,
            late_fee_per_hour=system.settings.late_fee_per_hour,
            late_fee_rule=rule,
        )


async def rental(system: Any, rental_id: uuid.UUID) -> Rental:
    async with system.services.db.transaction() as session:
        return await rentals.get(session, rental_id)


async def bank(system: Any, sn: str) -> PowerBank | None:
    async with system.services.db.transaction() as session:
        return await session.get(PowerBank, sn)


async def balance(system: Any, user: Customer) -> Decimal:
    async with system.services.db.transaction() as session:
        return (await wallet.wallet_for(session, user.id)).balance


async def entries(system: Any, user: Customer) -> list[tuple[str, Decimal]]:
    """The wallet's ledger entries, oldest first: (type, signed amount)."""
    async with system.services.db.transaction() as session:
        account = await wallet.wallet_for(session, user.id)
        rows = await session.scalars(
            select(LedgerEntry).where(LedgerEntry.account_id == account.id).order_by(LedgerEntry.id)
        )
        return [(e.type.value, e.amount) for e in rows]


async def sound_ledger(system: Any) -> Decimal:
    async with system.services.db.transaction() as session:
        return await wallet.ledger_imbalance(session)


async def ago(system: Any, rental_id: uuid.UUID, **shift: float) -> None:
    """Move a rental's clock back: started_at, due_at and overdue_at all earlier by `shift`."""
    delta = timedelta(**shift)
    async with system.services.db.transaction() as session:
        row = await rentals.get(session, rental_id, lock=True)
        row.started_at = row.started_at - delta if row.started_at else None
        row.due_at = row.due_at - delta if row.due_at else None
        row.overdue_at = row.overdue_at - delta if row.overdue_at else None


async def package_row(system: Any, package_id: int) -> RentalPackage:
    async with system.services.db.transaction() as session:
        row = await session.get(RentalPackage, package_id)
        assert row is not None
        return row
