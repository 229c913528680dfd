"""eSewa ePay v2 client: a signed HTML form the app posts to eSewa, a signed `?data=` on the success
redirect, and the status-check API as the record of the payment.

Signatures are base64(HMAC-SHA256(secret, "name=value,name=value,...")) over the fields listed, in
order, in `signed_field_names`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from domain.payments.errors import PaymentSignatureInvalid
from domain.payments.outcomes import Outcome, Paid, Unpaid
from domain.payments.transport import call, refused
from domain.pricing import money
from storage.payment_models import IntentStatus

GATEWAY = "esewa"
STATUS_PATH = "/api/epay/transaction/status/"
REQUEST_SIGNED_FIELDS = ("total_amount", "transaction_uuid", "product_code")
COMPLETE = "COMPLETE"
_UNPAID = {
    "PENDING": IntentStatus.PENDING,
    "AMBIGUOUS": IntentStatus.PENDING,
    "NOT_FOUND": IntentStatus.PENDING,  # not submitted yet, or eSewa's session expired: our TTL decides
    "CANCELED": IntentStatus.CANCELLED,
    "FULL_REFUND": IntentStatus.FAILED,
    "PARTIAL_REFUND": IntentStatus.FAILED,
}


def sign(secret: str, fields: Mapping[str, str], names: Sequence[str]) -> str:
    message = ",".join(f"{name}={fields[name]}" for name in names)
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def amount_text(amount: Decimal) -> str:
    return f"{money(amount):.2f}"


def parse_amount(text: str) -> Decimal:
    """eSewa writes amounts as numbers or strings, sometimes with thousands separators ("1,000.0")."""
    try:
        return money(Decimal(text.replace(",", "")))
    except (InvalidOperation, ValueError) as exc:
        raise PaymentSignatureInvalid("eSewa sent an amount that is not a number.") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Form:
    action: str
    fields: dict[str, str]


def payment_form(
    *,
    form_url: str,
    product_code: str,
    secret: str,
    amount: Decimal,
    transaction_uuid: str,
    success_url: str,
    failure_url: str,
) -> Form:
    fields = {
        "amount": amount_text(amount),
        "tax_amount": "0",
        "total_amount": amount_text(amount),
        "transaction_uuid": transaction_uuid,
        "product_code": product_code,
        "product_service_charge": "0",
        "product_delivery_charge": "0",
        "success_url": success_url,
        "failure_url": failure_url,
        "signed_field_names": ",".join(REQUEST_SIGNED_FIELDS),
    }
    fields["signature"] = sign(secret, fields, REQUEST_SIGNED_FIELDS)
    return Form(action=form_url, fields=fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """The success redirect's `data`, its signature verified."""

    transaction_code: str | None
    status: str
    total_amount: Decimal
    transaction_uuid: str
    product_code: str


def decode_response(data: str, *, secret: str) -> Response:
    """Decode and authenticate `?data=`; `PaymentSignatureInvalid` for anything malformed or forged."""
    try:
        # A "+" that reached us unescaped in a query string arrives as a space.
        raw = base64.b64decode(data.replace(" ", "+"), validate=True)
        # Numbers stay text: the signature covers them exactly as eSewa wrote them.
        fields = json.loads(raw, parse_float=str, parse_int=str)
    except (binascii.Error, ValueError) as exc:
        raise PaymentSignatureInvalid("eSewa's data could not be decoded.") from exc
    if not isinstance(fields, dict):
        raise PaymentSignatureInvalid("eSewa's data is not an object.")
    values = {k: v for k, v in fields.items() if isinstance(v, str)}
    names = values.get("signed_field_names", "").split(",")
    required = {"status", "total_amount", "transaction_uuid", "product_code", "signed_field_names"}
    if not required <= set(names) or any(name not in values for name in names):
        raise PaymentSignatureInvalid("eSewa's data does not sign the fields it must.")
    if not hmac.compare_digest(sign(secret, values, names), values.get("signature", "")):
        raise PaymentSignatureInvalid("eSewa's signature does not verify.")
    return Response(
        transaction_code=values.get("transaction_code"),
        status=values["status"],
        total_amount=parse_amount(values["total_amount"]),
        transaction_uuid=values["transaction_uuid"],
        product_code=values["product_code"],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    status: str
    total_amount: Decimal
    ref_id: str | None

    def outcome(self) -> Outcome:
        if self.status == COMPLETE:
            return Paid(amount=self.total_amount, currency="NPR", transaction_id=self.ref_id)
        return Unpaid(
            status=_UNPAID.get(self.status, IntentStatus.PENDING), reason=f"esewa:{self.status}".lower()
        )


class EsewaClient:
    def __init__(self, *, base_url: str, product_code: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.product_code = product_code
        self.timeout = timeout

    async def status(self, *, transaction_uuid: str, total_amount: Decimal) -> Status:
        params = {
            "product_code": self.product_code,
            "total_amount": amount_text(total_amount),
            "transaction_uuid": transaction_uuid,
        }
        reply = await call(
            GATEWAY, "GET", f"{self.base_url}{STATUS_PATH}", params=params, timeout_s=self.timeout
        )
        if not reply.ok or "status" not in reply.body:
            raise refused(GATEWAY, reply, "status")
        reported = reply.body.get("total_amount")
        ref_id = reply.body.get("ref_id")
        return Status(
            status=str(reply.body["status"]),
            total_amount=parse_amount(str(reported)) if reported is not None else money(total_amount),
            ref_id=str(ref_id) if ref_id else None,
        )
