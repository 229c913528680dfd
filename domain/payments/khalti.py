"""Khalti ePayment (KPG-2) client: initiate → the user pays at `payment_url` → callback → lookup.

Requests carry `Authorization: Key <secret key>`; amounts are integers in paisa. The callback to
`return_url` is not signed, so it is only a hint: the lookup is the record of the payment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from domain.payments.errors import GatewayUnavailable
from domain.payments.outcomes import Outcome, Paid, Unpaid
from domain.payments.transport import call, refused
from domain.pricing import money
from storage.payment_models import IntentStatus

GATEWAY = "khalti"
COMPLETED = "Completed"
_UNPAID = {
    "Pending": IntentStatus.PENDING,
    "Initiated": IntentStatus.PENDING,
    "User canceled": IntentStatus.CANCELLED,
    "Expired": IntentStatus.EXPIRED,
    "Refunded": IntentStatus.FAILED,
    "Partially Refunded": IntentStatus.FAILED,
}


def to_paisa(amount: Decimal) -> int:
    return int(money(amount) * 100)


def from_paisa(paisa: int) -> Decimal:
    return money(Decimal(paisa) / 100)


@dataclass(frozen=True, slots=True, kw_only=True)
class Initiated:
    pidx: str
    payment_url: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    pidx: str
    status: str
    total_amount: int  # paisa
    transaction_id: str | None

    def outcome(self) -> Outcome:
        if self.status == COMPLETED:
            return Paid(
                amount=from_paisa(self.total_amount), currency="NPR", transaction_id=self.transaction_id
            )
        return Unpaid(
            status=_UNPAID.get(self.status, IntentStatus.PENDING), reason=f"khalti:{self.status}".lower()
        )


class KhaltiClient:
    def __init__(self, *, base_url: str, secret_key: str, timeout: float) -> None:
        if not secret_key:
            raise GatewayUnavailable("Khalti is not available now.", context={"gateway": GATEWAY})
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Key {secret_key}"}
        self.timeout = timeout

    async def initiate(
        self,
        *,
        amount: Decimal,
        purchase_order_id: str,
        purchase_order_name: str,
        return_url: str,
        website_url: str,
    ) -> Initiated:
        body = {
            "return_url": return_url,
            "website_url": website_url,
            "amount": to_paisa(amount),
            "purchase_order_id": purchase_order_id,
            "purchase_order_name": purchase_order_name,
        }
        reply = await call(
            GATEWAY,
            "POST",
            f"{self.base_url}/epayment/initiate/",
            json=body,
            headers=self.headers,
            timeout_s=self.timeout,
        )
        if not reply.ok or "pidx" not in reply.body or "payment_url" not in reply.body:
            raise refused(GATEWAY, reply, "initiate")
        expires = reply.body.get("expires_at")
        return Initiated(
            pidx=str(reply.body["pidx"]),
            payment_url=str(reply.body["payment_url"]),
            expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
        )

    async def lookup(self, pidx: str) -> Lookup:
        reply = await call(
            GATEWAY,
            "POST",
            f"{self.base_url}/epayment/lookup/",
            json={"pidx": pidx},
            headers=self.headers,
            timeout_s=self.timeout,
        )
        if not reply.ok or not isinstance(reply.body.get("total_amount"), int):
            raise refused(GATEWAY, reply, "lookup")
        transaction_id = reply.body.get("transaction_id")
        return Lookup(
            pidx=str(reply.body.get("pidx", pidx)),
            status=str(reply.body.get("status", "")),
            total_amount=reply.body["total_amount"],
            transaction_id=str(transaction_id) if transaction_id else None,
        )
