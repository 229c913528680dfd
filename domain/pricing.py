"""Pricing rules: pure functions over Decimal money."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from storage.rental_models import LateFeeConfiguration, LateFeeType

CENT = Decimal("0.01")


def money(value: Decimal | int | str) -> Decimal:
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True, kw_only=True)
class Charges:
    package_price: Decimal
    late_fee: Decimal
    late_hours: int

    @property
    def total(self) -> Decimal:
        return money(self.package_price + self.late_fee)


def late_hours(*, due_at: datetime, ended_at: datetime) -> int:
    """Hours past `due_at`, every started hour counting as one."""
    seconds = (ended_at - due_at).total_seconds()
    return max(0, math.ceil(seconds / 3600))


def rental_charges(
    *, price: Decimal, due_at: datetime, ended_at: datetime, late_fee_per_hour: Decimal
) -> Charges:
    hours = late_hours(due_at=due_at, ended_at=ended_at)
    return Charges(package_price=money(price), late_fee=money(late_fee_per_hour * hours), late_hours=hours)


# --- late fees, POSTPAID usage, receipts -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LateFeeRule:
    """A late-fee configuration as a value (the active row of late_fee_configurations, or a test's).

    Late time is what passes `due_at` beyond the grace period (the grace minutes themselves are free);
    every started hour of it is charged `per_hour`:
    MULTIPLIER → multiplier * the package's hourly rate; FLAT_RATE → flat_rate_per_hour;
    COMPOUND → both added. With a daily cap, no 24 h of late time costs more than `max_daily_rate`.
    """

    fee_type: LateFeeType
    multiplier: Decimal = Decimal("1")
    flat_rate_per_hour: Decimal = Decimal("0")
    grace_period_minutes: int = 0
    max_daily_rate: Decimal | None = None

    @classmethod
    def flat(cls, per_hour: Decimal) -> LateFeeRule:
        return cls(fee_type=LateFeeType.FLAT_RATE, flat_rate_per_hour=per_hour)

    @classmethod
    def of(cls, row: LateFeeConfiguration) -> LateFeeRule:
        return cls(
            fee_type=row.fee_type,
            multiplier=row.multiplier,
            flat_rate_per_hour=row.flat_rate_per_hour,
            grace_period_minutes=row.grace_period_minutes,
            max_daily_rate=row.max_daily_rate,
        )

    def per_hour(self, hourly_rate: Decimal) -> Decimal:
        match self.fee_type:
            case LateFeeType.MULTIPLIER:
                return hourly_rate * self.multiplier
            case LateFeeType.FLAT_RATE:
                return self.flat_rate_per_hour
            case LateFeeType.COMPOUND:
                return hourly_rate * self.multiplier + self.flat_rate_per_hour


@dataclass(frozen=True, slots=True, kw_only=True)
class LateFee:
    amount: Decimal
    hours: int  # started hours charged (after the grace period)


def hourly_rate(*, price: Decimal, duration_minutes: int) -> Decimal:
    """A package's price per hour (unrounded: money is rounded once, on the final amount)."""
    return Decimal(price) * 60 / duration_minutes


def late_fee(rule: LateFeeRule, *, hourly_rate: Decimal, due_at: datetime, ended_at: datetime) -> LateFee:
    late_s = (ended_at - due_at).total_seconds() - rule.grace_period_minutes * 60
    hours = max(0, math.ceil(late_s / 3600))
    per_hour = rule.per_hour(hourly_rate)
    if rule.max_daily_rate is None:
        return LateFee(amount=money(per_hour * hours), hours=hours)
    days, rest = divmod(hours, 24)
    fee = days * min(per_hour * 24, rule.max_daily_rate) + min(per_hour * rest, rule.max_daily_rate)
    return LateFee(amount=money(fee), hours=hours)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    minutes: int
    amount: Decimal


def postpaid_usage(*, price: Decimal, duration_minutes: int, started_at: datetime, until: datetime) -> Usage:
    """POSTPAID: price / duration_minutes for every started minute from `started_at` to `until`."""
    minutes = max(0, math.ceil((until - started_at).total_seconds() / 60))
    return Usage(minutes=minutes, amount=money(Decimal(price) * minutes / duration_minutes))


@dataclass(frozen=True, slots=True, kw_only=True)
class TaxBreakdown:
    subtotal: Decimal
    service_charge: Decimal
    vat: Decimal
    total: Decimal


def tax_breakdown(total: Decimal, *, vat_rate: Decimal, service_charge_rate: Decimal) -> TaxBreakdown:
    """Prices are what the user pays: they include the service charge and VAT. Nepalese billing puts
    VAT on the subtotal plus the service charge, so total = subtotal * (1 + service) * (1 + VAT).
    Service charge and VAT are each rounded to the paisa; the subtotal takes the rounding, so the three
    add up to the total exactly."""
    total = money(total)
    base = total / ((1 + service_charge_rate) * (1 + vat_rate))
    service = money(base * service_charge_rate)
    vat = money(base * (1 + service_charge_rate) * vat_rate)
    return TaxBreakdown(subtotal=total - service - vat, service_charge=service, vat=vat, total=total)
