"""Pricing rules: pure functions over Decimal money."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

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
