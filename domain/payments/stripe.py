"""Stripe client: a PaymentIntent (form-encoded, `Authorization: Bearer <secret>`) the app confirms with
its `client_secret`, and signed webhooks (`Stripe-Signature: t=<ts>,v1=<hex HMAC-SHA256(secret,
"<ts>.<raw body>")>`). Amounts are integers in the currency's smallest unit (NPR: paisa).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from domain.errors import ValidationFailed
from domain.payments.errors import GatewayUnavailable, PaymentSignatureInvalid
from domain.payments.outcomes import Outcome, Paid, Unpaid
from domain.payments.transport import Reply, call, refused
from domain.pricing import money
from storage.payment_models import IntentStatus

GATEWAY = "stripe"
SUCCEEDED = "succeeded"


def to_minor(amount: Decimal) -> int:
    return int(money(amount) * 100)


def from_minor(amount: int) -> Decimal:
    return money(Decimal(amount) / 100)


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    amount_received: int
    currency: str
    client_secret: str | None
    latest_charge: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> PaymentIntent:
        if obj.get("object") != "payment_intent" or not isinstance(obj.get("id"), str):
            raise ValueError("not a PaymentIntent")
        metadata = obj.get("metadata") or {}
        charge = obj.get("latest_charge")
        return cls(
            id=obj["id"],
            status=str(obj.get("status", "")),
            amount=int(obj.get("amount") or 0),
            amount_received=int(obj.get("amount_received") or 0),
            currency=str(obj.get("currency", "")),
            client_secret=obj.get("client_secret"),
            latest_charge=charge if isinstance(charge, str) else None,
            metadata={str(k): str(v) for k, v in metadata.items()},
        )

    def outcome(self) -> Outcome:
        if self.status == SUCCEEDED:
            return Paid(
                amount=from_minor(self.amount_received),
                currency=self.currency.upper(),
                transaction_id=self.latest_charge or self.id,
            )
        if self.status == "canceled":
            return Unpaid(status=IntentStatus.CANCELLED, reason="stripe:canceled")
        return Unpaid(status=IntentStatus.PENDING, reason=f"stripe:{self.status}")


class StripeClient:
    def __init__(self, *, base_url: str, secret_key: str, timeout: float) -> None:
        if not secret_key:
            raise GatewayUnavailable("Stripe is not available now.", context={"gateway": GATEWAY})
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {secret_key}"}
        self.timeout = timeout

    async def _call(self, method: str, path: str, **kwargs: Any) -> Reply:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await call(
            GATEWAY, method, f"{self.base_url}{path}", headers=headers, timeout_s=self.timeout, **kwargs
        )

    async def create(self, *, amount: Decimal, currency: str, intent_id: str) -> PaymentIntent:
        """A PaymentIntent for our intent; retried requests with the same key return the same one."""
        reply = await self._call(
            "POST",
            "/v1/payment_intents",
            data={
                "amount": str(to_minor(amount)),
                "currency": currency.lower(),
                "metadata[intent_id]": intent_id,
                "automatic_payment_methods[enabled]": "true",
            },
            headers={"Idempotency-Key": f"topup:{intent_id}"},
        )
        return self._intent(reply, "create")

    async def retrieve(self, payment_intent_id: str) -> PaymentIntent:
        return self._intent(await self._call("GET", f"/v1/payment_intents/{payment_intent_id}"), "retrieve")

    async def cancel(self, payment_intent_id: str) -> PaymentIntent:
        """Cancel at Stripe; one that can no longer be cancelled (e.g. succeeded) is returned as it is."""
        reply = await self._call("POST", f"/v1/payment_intents/{payment_intent_id}/cancel")
        error = reply.body.get("error")
        if (
            not reply.ok
            and isinstance(error, dict)
            and error.get("code") == "payment_intent_unexpected_state"
        ):
            return await self.retrieve(payment_intent_id)
        return self._intent(reply, "cancel")

    @staticmethod
    def _intent(reply: Reply, action: str) -> PaymentIntent:
        if not reply.ok:
            raise refused(GATEWAY, reply, action)
        try:
            return PaymentIntent.parse(reply.body)
        except (ValueError, TypeError) as exc:
            raise refused(GATEWAY, reply, action) from exc


def verify_webhook(
    payload: bytes, header: str | None, *, secret: str, tolerance_s: int, now: float
) -> dict[str, Any]:
    """The event in a webhook body whose `Stripe-Signature` verifies; `PaymentSignatureInvalid` otherwise."""
    if not secret or not header:
        raise PaymentSignatureInvalid("Missing Stripe-Signature.")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise PaymentSignatureInvalid("Stripe-Signature lacks a timestamp or a v1 signature.")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise PaymentSignatureInvalid("The Stripe signature does not verify.")
    if abs(now - timestamp) > tolerance_s:
        raise PaymentSignatureInvalid("The Stripe signature is too old (or from the future).")
    try:
        event = json.loads(payload)
    except ValueError as exc:
        raise ValidationFailed("The webhook body is not JSON.") from exc
    if not isinstance(event, dict):
        raise ValidationFailed("The webhook body is not an event.")
    return event
