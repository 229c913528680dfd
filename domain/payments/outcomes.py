"""What a gateway says about a payment, independent of the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from storage.payment_models import IntentStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class Paid:
    amount: Decimal
    currency: str
    transaction_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unpaid:
    """No money (yet): `status` is PENDING while it may still come, else why it never will."""

    status: IntentStatus
    reason: str


Outcome = Paid | Unpaid
