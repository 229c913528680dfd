"""SQLAlchemy 2 models: the durable state of users, stations, rentals and money."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

Money = Numeric(12, 2)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def enum_type(cls: type[enum.Enum], name: str | None = None) -> Enum:
    """A PostgreSQL enum of `cls`'s values, named `name` (default: the class name, lower-cased)."""
    return Enum(cls, name=name or cls.__name__.lower(), values_callable=lambda e: [m.value for m in e])


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class Role(enum.StrEnum):
    USER = "user"
    OPERATOR = "operator"
    ADMIN = "admin"


class StationStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    MAINTENANCE = "MAINTENANCE"


class RentalStatus(enum.StrEnum):
    PENDING_POPUP = "PENDING_POPUP"
    ACTIVE = "ACTIVE"
    OVERDUE = "OVERDUE"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


OPEN_RENTAL_STATUSES = (RentalStatus.PENDING_POPUP, RentalStatus.ACTIVE, RentalStatus.OVERDUE)


class PaymentStatus(enum.StrEnum):
    PENDING = "PENDING"
    PAID = "PAID"
    DUE = "DUE"
    NOT_CHARGED = "NOT_CHARGED"
    REFUNDED = "REFUNDED"  # everything paid was given back (cancel window, approved refunds)


class PackageType(enum.StrEnum):
    HOURLY = "HOURLY"
    DAILY = "DAILY"


class PaymentModel(enum.StrEnum):
    PREPAID = "PREPAID"
    POSTPAID = "POSTPAID"


class AccountKind(enum.StrEnum):
    """Ledger accounts: every user wallet, plus the system's own accounts."""

    WALLET = "WALLET"
    REVENUE = "REVENUE"  # rental charges and late fees earned
    FUNDING = "FUNDING"  # money that came in from outside (gateways, operator credits)
    HOLD = "HOLD"  # deposits held while rentals run (one system account, created on first use)


class EntryType(enum.StrEnum):
    TOPUP = "TOPUP"
    RENTAL_CHARGE = "RENTAL_CHARGE"
    LATE_FEE = "LATE_FEE"
    PENALTY = "PENALTY"
    REFUND = "REFUND"
    DEPOSIT_HOLD = "DEPOSIT_HOLD"
    DEPOSIT_RELEASE = "DEPOSIT_RELEASE"
    ADJUSTMENT = "ADJUSTMENT"


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    phone: Mapped[str | None] = mapped_column(String(20), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    name: Mapped[str | None] = mapped_column(String(120))
    role: Mapped[Role] = mapped_column(enum_type(Role), default=Role.USER)
    kyc_status: Mapped[str] = mapped_column(String(16), default="NOT_SUBMITTED")
    avatar_url: Mapped[str | None] = mapped_column(String(500))
    # argon2 hash; only operators and admins have one (the /admin web login). App users log in by code.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # staff second factor (domain.second_factor): confirmed TOTP secret, and one being enrolled
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_pending_secret: Mapped[str | None] = mapped_column(String(64))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (CheckConstraint("phone IS NOT NULL OR email IS NOT NULL", name="has_identifier"),)


class OneTimeCode(Base):
    __tablename__ = "one_time_codes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    identifier: Mapped[str] = mapped_column(String(254), index=True)
    code_hash: Mapped[str] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Station(Base):
    __tablename__ = "stations"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    serial_number: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    address: Mapped[str] = mapped_column(String(255), default="")
    latitude: Mapped[float]
    longitude: Mapped[float]
    boards: Mapped[int] = mapped_column(Integer, default=1)
    holes_per_board: Mapped[int] = mapped_column(Integer, default=8)
    status: Mapped[StationStatus] = mapped_column(enum_type(StationStatus), default=StationStatus.ACTIVE)
    mqtt_secret_hash: Mapped[str] = mapped_column(String(128))
    # Who got MQTT credentials from the boot call, and when; whether the cabinet ever logged in; until when
    # an operator allows the boot call to issue new credentials to a cabinet that has (see domain.stations).
    credentials_issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    credentials_issued_ip: Mapped[str | None] = mapped_column(String(45))
    first_connected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reprovision_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opening_time: Mapped[str | None] = mapped_column(String(5))
    closing_time: Mapped[str | None] = mapped_column(String(5))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("boards BETWEEN 1 AND 10", name="boards_range"),
        CheckConstraint("holes_per_board BETWEEN 1 AND 8", name="holes_range"),
    )


class Slot(Base):
    """A hole as last reported by its cabinet."""

    __tablename__ = "slots"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    slot_number: Mapped[int] = mapped_column(Integer)
    state: Mapped[int] = mapped_column(Integer, default=0)
    powerbank_sn: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (UniqueConstraint("station_id", "slot_number"),)


class PowerBank(Base):
    __tablename__ = "power_banks"

    serial_number: Mapped[str] = mapped_column(String(16), primary_key=True)
    soc: Mapped[int | None] = mapped_column(Integer)
    station_id: Mapped[int | None] = mapped_column(ForeignKey("stations.id", ondelete="SET NULL"))
    slot_number: Mapped[int | None] = mapped_column(Integer)
    rented_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    lost_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RentalPackage(Base):
    __tablename__ = "rental_packages"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(Text, default="")
    duration_minutes: Mapped[int] = mapped_column(Integer)
    price: Mapped[Decimal] = mapped_column(Money)
    package_type: Mapped[PackageType] = mapped_column(enum_type(PackageType))
    payment_model: Mapped[PaymentModel] = mapped_column(enum_type(PaymentModel))
    is_active: Mapped[bool] = mapped_column(default=True)
    deposit_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"), server_default="0")

    __table_args__ = (
        CheckConstraint("price >= 0", name="price_nonnegative"),
        CheckConstraint("duration_minutes >= 1", name="duration_positive"),
        CheckConstraint("deposit_amount >= 0", name="deposit_nonnegative"),
    )


class Rental(Base):
    __tablename__ = "rentals"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    rental_code: Mapped[str] = mapped_column(String(12), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("rental_packages.id"))
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id"))
    return_station_id: Mapped[int | None] = mapped_column(ForeignKey("stations.id"))
    status: Mapped[RentalStatus] = mapped_column(enum_type(RentalStatus), default=RentalStatus.PENDING_POPUP)
    payment_status: Mapped[PaymentStatus] = mapped_column(
        enum_type(PaymentStatus), default=PaymentStatus.PENDING
    )
    slot_number: Mapped[int | None] = mapped_column(Integer)
    powerbank_sn: Mapped[str | None] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    amount_paid: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    overdue_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    start_battery_level: Mapped[int | None] = mapped_column(Integer)
    return_battery_level: Mapped[int | None] = mapped_column(Integer)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    overdue_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lost_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recovered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    extension_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    deposit_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"), server_default="0")
    deposit_captured: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"), server_default="0")

    package: Mapped[RentalPackage] = relationship(lazy="joined")
    station: Mapped[Station] = relationship(foreign_keys=[station_id], lazy="joined")
    return_station: Mapped[Station | None] = relationship(foreign_keys=[return_station_id], lazy="joined")

    __table_args__ = (
        # One open rental per user, and one open rental per power bank, enforced by the database.
        Index(
            "uq_rentals_open_per_user",
            "user_id",
            unique=True,
            postgresql_where=text("status IN ('PENDING_POPUP', 'ACTIVE', 'OVERDUE')"),
        ),
        Index(
            "uq_rentals_open_per_powerbank",
            "powerbank_sn",
            unique=True,
            postgresql_where=text("status IN ('ACTIVE', 'OVERDUE')"),
        ),
        # PENDING_POPUP rentals by station: looked up on every cabinet's first snapshot
        Index(
            "ix_rentals_pending_by_station", "station_id", postgresql_where=text("status = 'PENDING_POPUP'")
        ),
    )


class Account(Base):
    """A ledger account; a user's wallet is the account of kind WALLET with their user_id."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[AccountKind] = mapped_column(enum_type(AccountKind))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"), unique=True)
    balance: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    currency: Mapped[str] = mapped_column(String(3), default="NPR")

    __table_args__ = (
        CheckConstraint("kind <> 'WALLET' OR balance >= 0", name="wallet_nonnegative"),
        Index("uq_accounts_system_kind", "kind", unique=True, postgresql_where=text("user_id IS NULL")),
    )


class LedgerEntry(Base):
    """One leg of a double-entry transfer; the legs of one transfer share `transfer_id` and sum to zero."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    transfer_id: Mapped[uuid.UUID] = mapped_column(index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    type: Mapped[EntryType] = mapped_column(enum_type(EntryType))
    amount: Mapped[Decimal] = mapped_column(Money)
    balance_after: Mapped[Decimal] = mapped_column(Money)
    reference: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        # A reference (e.g. "rental:<id>:charge") moves money at most once per account.
        UniqueConstraint("account_id", "reference", "type", name="uq_ledger_entries_once"),
    )


class DeviceEvent(Base):
    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    station_sn: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
