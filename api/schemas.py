"""HTTP schemas (pydantic, at the edge only) and the functions that build them from domain objects."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from actors.messages import KioskStatus, SlotView
from api.envelope import Money
from storage.models import LedgerEntry, Rental, RentalPackage, Station, StationStatus, User


class IdentifierIn(BaseModel):
    identifier: str = Field(min_length=3, max_length=254)


class VerifyIn(IdentifierIn):
    otp: str = Field(min_length=4, max_length=8)


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
