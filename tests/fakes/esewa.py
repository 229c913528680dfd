"""Fake eSewa ePay v2.

POST /api/epay/main/v2/form  (form-encoded) amount, tax_amount, total_amount, transaction_uuid,
    product_code, product_service_charge, product_delivery_charge, success_url, failure_url,
    signed_field_names, signature = base64(HMAC-SHA256(secret, "total_amount=..,transaction_uuid=..,
    product_code=..")) → eSewa's login page (200), or 400 when the form is not valid or not signed right.
GET  /api/epay/transaction/status/?product_code=&total_amount=&transaction_uuid=
    → {product_code, transaction_uuid, total_amount, status, ref_id}; status PENDING, COMPLETE,
    FULL_REFUND, PARTIAL_REFUND, AMBIGUOUS, NOT_FOUND, CANCELED.
After paying, the browser goes to success_url?data=<base64 JSON {transaction_code, status, total_amount,
transaction_uuid, product_code, signed_field_names, signature}>; on failure to failure_url.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

UAT_SECRET = "8gBm/:&EnhH.1/q"
FORM_FIELDS = (
    "amount",
    "tax_amount",
    "total_amount",
    "transaction_uuid",
    "product_code",
    "product_service_charge",
    "product_delivery_charge",
    "success_url",
    "failure_url",
    "signed_field_names",
    "signature",
)
RESPONSE_SIGNED = "transaction_code,status,total_amount,transaction_uuid,product_code,signed_field_names"


def sign(secret: str, message: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()).decode()


def _text(value: Any) -> str:
    """A value as it appears in the JSON eSewa sends (the text its signature covers)."""
    return value if isinstance(value, str) else json.dumps(value)


def encode_data(fields: dict[str, Any], *, secret: str = UAT_SECRET, signature: str | None = None) -> str:
    """The `data` parameter: base64 JSON, signed over its signed_field_names unless a signature is given."""
    names = str(fields["signed_field_names"]).split(",")
    message = ",".join(f"{name}={_text(fields[name])}" for name in names)
    body = {**fields, "signature": signature if signature is not None else sign(secret, message)}
    return base64.b64encode(json.dumps(body).encode()).decode()


def decode_data(data: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.b64decode(data))
    return decoded


@dataclass
class EsewaTransaction:
    transaction_uuid: str
    product_code: str
    total_amount: Decimal
    success_url: str
    failure_url: str
    status: str = "PENDING"
    ref_id: str | None = None


@dataclass
class FakeEsewa:
    secret_key: str = UAT_SECRET
    product_code: str = "EPAYTEST"
    base_url: str = ""
    transactions: dict[str, EsewaTransaction] = field(default_factory=dict)
    status_checks: list[dict[str, str]] = field(default_factory=list)

    @property
    def form_url(self) -> str:
        return f"{self.base_url}/api/epay/main/v2/form"

    # --- what a user does on eSewa's pages --------------------------------------------------

    def pay(
        self, transaction_uuid: str, *, total_amount: Decimal | None = None, as_text: bool = False
    ) -> str:
        """The user pays; the success redirect (success_url?data=...). `total_amount` pays another amount;
        `as_text` writes it as eSewa sometimes does, a string with thousands separators ("1,000.0")."""
        txn = self.transactions[transaction_uuid]
        if total_amount is not None:
            txn.total_amount = total_amount
        txn.status, txn.ref_id = "COMPLETE", secrets.token_hex(4).upper()
        return f"{txn.success_url}?data={self.success_data(transaction_uuid, as_text=as_text)}"

    def success_data(self, transaction_uuid: str, *, as_text: bool = False) -> str:
        txn = self.transactions[transaction_uuid]
        amount: Any = f"{txn.total_amount:,.1f}" if as_text else float(txn.total_amount)
        fields = {
            "transaction_code": txn.ref_id,
            "status": txn.status,
            "total_amount": amount,
            "transaction_uuid": txn.transaction_uuid,
            "product_code": txn.product_code,
            "signed_field_names": RESPONSE_SIGNED,
        }
        return encode_data(fields, secret=self.secret_key)

    def fail(self, transaction_uuid: str) -> str:
        """The user cancels at eSewa; the failure redirect."""
        txn = self.transactions[transaction_uuid]
        txn.status = "CANCELED"
        return txn.failure_url

    # --- the API ---------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/api/epay/main/v2/form")
        async def form(request: Request) -> Response:
            fields = dict(parse_qsl((await request.body()).decode()))
            missing = [name for name in FORM_FIELDS if not fields.get(name)]
            if missing:
                return PlainTextResponse(f"missing: {','.join(missing)}", status_code=400)
            names = fields["signed_field_names"].split(",")
            if not {"total_amount", "transaction_uuid", "product_code"} <= set(names) or any(
                name not in fields for name in names
            ):
                return PlainTextResponse("signed_field_names not valid", status_code=400)
            message = ",".join(f"{name}={fields[name]}" for name in names)
            if not hmac.compare_digest(sign(self.secret_key, message), fields["signature"]):
                return PlainTextResponse("Invalid payload signature.", status_code=400)
            if fields["product_code"] != self.product_code:
                return PlainTextResponse("Invalid merchant.", status_code=400)
            try:
                parts = [
                    Decimal(fields[k])
                    for k in ("amount", "tax_amount", "product_service_charge", "product_delivery_charge")
                ]
                total = Decimal(fields["total_amount"])
            except InvalidOperation:
                return PlainTextResponse("amounts must be numbers", status_code=400)
            if sum(parts) != total:
                return PlainTextResponse("total_amount is not the sum of its parts", status_code=400)
            uuid = fields["transaction_uuid"]
            if uuid in self.transactions and self.transactions[uuid].status != "PENDING":
                return PlainTextResponse("Duplicate transaction_uuid.", status_code=400)
            self.transactions[uuid] = EsewaTransaction(
                transaction_uuid=uuid,
                product_code=fields["product_code"],
                total_amount=total,
                success_url=fields["success_url"],
                failure_url=fields["failure_url"],
            )
            return HTMLResponse("<html><body>eSewa login</body></html>")

        @app.get("/api/epay/transaction/status/")
        async def status(product_code: str, total_amount: str, transaction_uuid: str) -> JSONResponse:
            self.status_checks.append(
                {
                    "product_code": product_code,
                    "total_amount": total_amount,
                    "transaction_uuid": transaction_uuid,
                }
            )
            txn = self.transactions.get(transaction_uuid)
            try:
                asked = Decimal(total_amount)
            except InvalidOperation:
                asked = Decimal(-1)
            found = txn is not None and txn.product_code == product_code and txn.total_amount == asked
            return JSONResponse(
                {
                    "product_code": product_code,
                    "transaction_uuid": transaction_uuid,
                    "total_amount": float(txn.total_amount) if txn and found else float(asked),
                    "status": txn.status if txn and found else "NOT_FOUND",
                    "ref_id": txn.ref_id if txn and found else None,
                }
            )

        return app
