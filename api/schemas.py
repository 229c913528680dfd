"""HTTP schemas (pydantic, at the edge only) and the functions that build them from domain objects."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from actors.messages import KioskStatus, SlotView
from api.envelope import Money
from storage.models import (
    LedgerEntry,
    PackageType,
    PaymentModel,
    Rental,
    RentalPackage,
    Station,
    StationStatus,
    User,
)
from storage.rental_models import (
    REFUND_REASON_MAX,
    RENTAL_ISSUE_DESCRIPTION_MAX,
    LateFeeConfiguration,
    LateFeeType,
    Refund,
    RentalIssue,
    RentalIssueType,
)


class IdentifierIn(BaseModel):
    identifier: str = Field(min_length=3, max_length=254)


class VerifyIn(IdentifierIn):
    otp: str = Field(min_length=4, max_length=8)
    # operators and admins: their password, or a TOTP code once enrolled (riders send neither)
    password: str | None = Field(default=None, max_length=1024)
    totp: str | None = Field(default=None, min_length=6, max_length=8)


class RefreshIn(BaseModel):
    refresh: str = Field(min_length=10, max_length=4096)


class UserOut(BaseModel):
    id: uuid.UUID
    phone: str | None
    email: str | None
    name: str | None
    role: str
    kyc_status: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            phone=user.phone,
            email=user.email,
            name=user.name,
            role=user.role.value,
            kyc_status=user.kyc_status,
            created_at=user.created_at,
        )


class OtpRequested(BaseModel):
    expires_in: int


class TokensOut(BaseModel):
    access: str
    refresh: str


class LoginOut(TokensOut):
    user: UserOut
    is_new_user: bool


class StationOut(BaseModel):
    serial_number: str
    name: str
    address: str
    latitude: float
    longitude: float
    status: Literal["ONLINE", "OFFLINE", "MAINTENANCE"]
    total_slots: int
    available_power_banks: int
    empty_slots: int
    opening_time: str | None
    closing_time: str | None

    @classmethod
    def of(cls, station: Station, live: KioskStatus | None) -> StationOut:
        total = station.boards * station.holes_per_board
        if station.status == StationStatus.MAINTENANCE:
            status: Literal["ONLINE", "OFFLINE", "MAINTENANCE"] = "MAINTENANCE"
        else:
            status = "ONLINE" if live is not None and live.online else "OFFLINE"
        online = live is not None and live.online
        return cls(
            serial_number=station.serial_number,
            name=station.name,
            address=station.address,
            latitude=station.latitude,
            longitude=station.longitude,
            status=status,
            total_slots=total,
            available_power_banks=live.available_power_banks if online and live else 0,
            empty_slots=live.empty_slots if live else 0,
            opening_time=station.opening_time,
            closing_time=station.closing_time,
        )


class SlotOut(BaseModel):
    slot_number: int
    status: Literal["AVAILABLE", "OCCUPIED", "MAINTENANCE", "ERROR"]
    battery_level: int | None
    rentable: bool

    @classmethod
    def of(cls, view: SlotView, *, online: bool) -> SlotOut:
        return cls(
            slot_number=view.slot_number,
            status=view.status,  # type: ignore[arg-type]
            battery_level=view.battery_level,
            rentable=view.rentable and online,
        )


class StationDetailOut(StationOut):
    slots: list[SlotOut]


class PackageOut(BaseModel):
    id: int
    name: str
    description: str
    duration_minutes: int
    price: Money
    package_type: str
    payment_model: str
    deposit_amount: Money  # held at start and given back at return (0.00: no deposit)

    @classmethod
    def of(cls, package: RentalPackage) -> PackageOut:
        return cls(
            id=package.id,
            name=package.name,
            description=package.description,
            duration_minutes=package.duration_minutes,
            price=package.price,
            package_type=package.package_type.value,
            payment_model=package.payment_model.value,
            deposit_amount=package.deposit_amount,
        )


class RentIn(BaseModel):
    station_sn: str = Field(min_length=1, max_length=64)
    package_id: int = Field(ge=1)
    powerbank_sn: str | None = Field(default=None, max_length=16)


class RentalOut(BaseModel):
    id: uuid.UUID
    rental_code: str
    status: str
    payment_status: str
    station_sn: str
    return_station_sn: str | None
    slot_number: int | None
    powerbank_sn: str | None
    package: PackageOut
    started_at: datetime | None
    due_at: datetime | None
    ended_at: datetime | None
    amount_paid: Money
    overdue_amount: Money
    start_battery_level: int | None
    return_battery_level: int | None

    @classmethod
    def of(cls, rental: Rental) -> RentalOut:
        return cls(
            id=rental.id,
            rental_code=rental.rental_code,
            status=rental.status.value,
            payment_status=rental.payment_status.value,
            station_sn=rental.station.serial_number,
            return_station_sn=rental.return_station.serial_number if rental.return_station else None,
            slot_number=rental.slot_number,
            powerbank_sn=rental.powerbank_sn,
            package=PackageOut.of(rental.package),
            started_at=rental.started_at,
            due_at=rental.due_at,
            ended_at=rental.ended_at,
            amount_paid=rental.amount_paid,
            overdue_amount=rental.overdue_amount,
            start_battery_level=rental.start_battery_level,
            return_battery_level=rental.return_battery_level,
        )


class BalanceOut(BaseModel):
    balance: Money
    currency: str
    held: Money


class TransactionOut(BaseModel):
    id: int
    type: str
    amount: Money
    balance_after: Money
    reference: str
    created_at: datetime

    @classmethod
    def of(cls, entry: LedgerEntry) -> TransactionOut:
        return cls(
            id=entry.id,
            type=entry.type.value,
            amount=entry.amount,
            balance_after=entry.balance_after,
            reference=entry.reference,
            created_at=entry.created_at,
        )


class StationIn(BaseModel):
    serial_number: str = Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    name: str = Field(min_length=1, max_length=120)
    address: str = Field(default="", max_length=255)
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    boards: int = Field(default=1, ge=1, le=10)
    holes_per_board: int = Field(default=8, ge=1, le=8)


class MqttCredentialsOut(BaseModel):
    host: str
    port: int
    username: str
    password: str
    product_key: str


class ProvisionedOut(StationOut):
    mqtt: MqttCredentialsOut


class CreditIn(BaseModel):
    amount: Decimal = Field(gt=0, le=Decimal("1000000"), decimal_places=2)
    reason: str = Field(min_length=1, max_length=200)


class CreditOut(BaseModel):
    user_id: uuid.UUID
    amount: Money
    balance: Money
    transfer_id: uuid.UUID


# --- rental actions, receipts, refunds, operators' packages and late fees -----------------------------

MoneyIn = Annotated[Decimal, Field(ge=0, le=Decimal("1000000"), decimal_places=2)]


class CancelIn(BaseModel):
    reason: str = Field(default="", max_length=255)


class ExtendIn(BaseModel):
    package_id: int = Field(ge=1)


class ExtensionOut(BaseModel):
    id: int
    package_name: str
    extended_minutes: int
    extension_cost: Money
    extended_at: datetime
    due_at: datetime | None
    extensions_used: int
    extensions_left: int
    rental: RentalOut


class PayDueOut(BaseModel):
    rental_id: uuid.UUID
    amount_paid: Money  # settled now
    balance: Money  # the wallet after it
    transaction_ids: list[uuid.UUID]
    rental_status: str
    payment_status: str
    rental: RentalOut


class RentalIssueIn(BaseModel):
    issue_type: RentalIssueType
    description: str = Field(default="", max_length=RENTAL_ISSUE_DESCRIPTION_MAX)


class RentalIssueOut(BaseModel):
    id: uuid.UUID
    rental_id: uuid.UUID
    rental_code: str
    issue_type: RentalIssueType
    description: str
    status: str
    reported_at: datetime
    resolved_at: datetime | None

    @classmethod
    def of(cls, rental: Rental, issue: RentalIssue) -> RentalIssueOut:
        return cls(
            id=issue.id,
            rental_id=rental.id,
            rental_code=rental.rental_code,
            issue_type=issue.issue_type,
            description=issue.description,
            status=issue.status.value,
            reported_at=issue.reported_at,
            resolved_at=issue.resolved_at,
        )


class RentalStatsOut(BaseModel):
    total_rentals: int
    completed_rentals: int
    active_rentals: int
    cancelled_rentals: int
    total_spent: Money
    total_time_used: int  # minutes
    average_rental_duration: float  # minutes per completed rental
    timely_returns: int
    late_returns: int
    timely_return_rate: float  # percent of completed rentals
    favorite_station: str | None
    favorite_package: str | None
    first_rental_date: datetime | None
    last_rental_date: datetime | None


class ReceiptLineOut(BaseModel):
    kind: str  # PACKAGE, EXTENSION, USAGE, LATE_FEE, PENALTY, REFUND
    description: str
    amount: Money  # VAT and service charge included; refunds negative
    paid: Money


class DepositOut(BaseModel):
    held: Money  # still held (running rental)
    captured: Money  # kept to cover what the wallet could not
    released: Money  # given back


class ReceiptOut(BaseModel):
    rental_id: uuid.UUID
    rental_code: str
    status: str
    payment_status: str
    currency: str
    started_at: datetime | None
    ended_at: datetime | None
    lines: list[ReceiptLineOut]
    prices_include_tax: bool  # always true: the total is what is paid; the rest breaks it down
    subtotal: Money
    service_charge_rate: str
    service_charge: Money
    vat_rate: str
    vat: Money
    total: Money
    amount_paid: Money
    amount_due: Money
    deposit: DepositOut
    issued_at: datetime


class RefundIn(BaseModel):
    rental_id: uuid.UUID
    amount: Decimal = Field(gt=0, le=Decimal("1000000"), decimal_places=2)
    reason: str = Field(min_length=1, max_length=REFUND_REASON_MAX)


class RefundReviewIn(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


class RefundOut(BaseModel):
    id: uuid.UUID
    rental_id: uuid.UUID
    amount: Money
    reason: str
    status: str
    review_reason: str | None
    requested_at: datetime
    reviewed_at: datetime | None
    processed_at: datetime | None

    @classmethod
    def of(cls, refund: Refund) -> RefundOut:
        return cls(
            id=refund.id,
            rental_id=refund.rental_id,
            amount=refund.amount,
            reason=refund.reason,
            status=refund.status.value,
            review_reason=refund.review_reason,
            requested_at=refund.requested_at,
            reviewed_at=refund.reviewed_at,
            processed_at=refund.processed_at,
        )


class AdminRefundOut(RefundOut):
    user_id: uuid.UUID
    reviewed_by: uuid.UUID | None

    @classmethod
    def of(cls, refund: Refund) -> AdminRefundOut:
        return cls(
            **RefundOut.of(refund).model_dump(), user_id=refund.user_id, reviewed_by=refund.reviewed_by
        )


class PackageIn(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    description: str = Field(default="", max_length=2000)
    duration_minutes: int = Field(ge=1, le=60 * 24 * 30)
    price: MoneyIn
    package_type: PackageType
    payment_model: PaymentModel
    is_active: bool = True
    deposit_amount: MoneyIn = Decimal("0.00")


class PackagePatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=80)
    description: str | None = Field(default=None, max_length=2000)
    duration_minutes: int | None = Field(default=None, ge=1, le=60 * 24 * 30)
    price: MoneyIn | None = None
    package_type: PackageType | None = None
    payment_model: PaymentModel | None = None
    is_active: bool | None = None
    deposit_amount: MoneyIn | None = None


class AdminPackageOut(PackageOut):
    is_active: bool

    @classmethod
    def of(cls, package: RentalPackage) -> AdminPackageOut:
        return cls(**PackageOut.of(package).model_dump(), is_active=package.is_active)


class LateFeeConfigIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    fee_type: LateFeeType
    multiplier: Decimal = Field(default=Decimal("1.00"), ge=0, le=100, decimal_places=2)
    flat_rate_per_hour: MoneyIn = Decimal("0.00")
    grace_period_minutes: int = Field(default=0, ge=0, le=60 * 24 * 7)
    max_daily_rate: Decimal | None = Field(default=None, gt=0, le=Decimal("1000000"), decimal_places=2)
    is_active: bool = False


class LateFeeConfigOut(BaseModel):
    id: int
    name: str
    fee_type: LateFeeType
    multiplier: str
    flat_rate_per_hour: Money
    grace_period_minutes: int
    max_daily_rate: Money | None
    is_active: bool
    created_at: datetime

    @classmethod
    def of(cls, row: LateFeeConfiguration) -> LateFeeConfigOut:
        return cls(
            id=row.id,
            name=row.name,
            fee_type=row.fee_type,
            multiplier=f"{row.multiplier:.2f}",
            flat_rate_per_hour=row.flat_rate_per_hour,
            grace_period_minutes=row.grace_period_minutes,
            max_daily_rate=row.max_daily_rate,
            is_active=row.is_active,
            created_at=row.created_at,
        )
