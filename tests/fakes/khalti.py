"""Fake Khalti ePayment v2 (KPG-2), mounted like the real one under `/api/v2`.

POST /api/v2/epayment/initiate/  `Authorization: Key <secret>`, JSON {return_url, website_url, amount
    (paisa, >= 1000), purchase_order_id, purchase_order_name} → {pidx, payment_url, expires_at, expires_in}
POST /api/v2/epayment/lookup/    {pidx} → {pidx, total_amount, status, transaction_id, fee, refunded}
    status: Initiated, Pending, Completed, User canceled, Expired, Refunded
Errors as Khalti sends them: 401 {"detail": "Invalid token.", "status_code": 401}, 400 {<field>: [...],
"error_key": "validation_error"}, 404 {"detail": "Not found.", "error_key": "validation_error"}.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

NEPAL = timezone(timedelta(hours=5, minutes=45))
REQUIRED = ("return_url", "website_url", "amount", "purchase_order_id", "purchase_order_name")


@dataclass
class KhaltiPayment:
    pidx: str
    amount: int
    purchase_order_id: str
    purchase_order_name: str
    return_url: str
    status: str = "Initiated"
    total_amount: int = 0  # what the lookup reports; the initiated amount unless a test says otherwise
    transaction_id: str | None = None


@dataclass
class FakeKhalti:
    secret_key: str = field(default_factory=lambda: f"test_secret_key_{secrets.token_hex(8)}")
    base_url: str = ""  # set by the test once served; the client's KHALTI_BASE_URL is base_url + "/api/v2"
    payments: dict[str, KhaltiPayment] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v2"

    # --- what a user does on Khalti's payment page --------------------------------------------

    def pay(self, pidx: str, *, total_amount: int | None = None) -> dict[str, str]:
        """The user pays; the query string Khalti then appends to return_url."""
        payment = self.payments[pidx]
        payment.status = "Completed"
        payment.total_amount = payment.amount if total_amount is None else total_amount
        payment.transaction_id = secrets.token_urlsafe(16)
        return self.callback_params(pidx)

    def cancel(self, pidx: str) -> dict[str, str]:
        self.payments[pidx].status = "User canceled"
        return self.callback_params(pidx)

    def expire(self, pidx: str) -> None:
        self.payments[pidx].status = "Expired"

    def callback_params(self, pidx: str) -> dict[str, str]:
        payment = self.payments[pidx]
        return {
            "pidx": pidx,
            "transaction_id": payment.transaction_id or "",
            "tidx": payment.transaction_id or "",
            "txnId": payment.transaction_id or "",
            "amount": str(payment.total_amount),
            "total_amount": str(payment.total_amount),
            "mobile": "98XXXXX904",
            "status": payment.status,
            "purchase_order_id": payment.purchase_order_id,
            "purchase_order_name": payment.purchase_order_name,
        }

    # --- the API ---------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        def unauthorized(request: Request) -> JSONResponse | None:
            if request.headers.get("authorization") != f"Key {self.secret_key}":
                return JSONResponse({"detail": "Invalid token.", "status_code": 401}, status_code=401)
            return None

        @app.post("/api/v2/epayment/initiate/")
        async def initiate(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append(("initiate", dict(request.headers), body))
            if (refused := unauthorized(request)) is not None:
                return refused
            errors: dict[str, Any] = {
                name: ["This field is required."] for name in REQUIRED if body.get(name) in (None, "")
            }
            amount = body.get("amount")
            if "amount" not in errors and (not isinstance(amount, int) or amount < 1000):
                errors["amount"] = ["Amount should be greater than Rs. 10, that is 1000 paisa."]
            if errors:
                return JSONResponse({**errors, "error_key": "validation_error"}, status_code=400)
            pidx = secrets.token_urlsafe(16).replace("-", "x").replace("_", "y")
            self.payments[pidx] = KhaltiPayment(
                pidx=pidx,
                amount=amount,
                purchase_order_id=body["purchase_order_id"],
                purchase_order_name=body["purchase_order_name"],
                return_url=body["return_url"],
                total_amount=amount,
            )
            expires_at = datetime.now(NEPAL) + timedelta(minutes=60)
            return JSONResponse(
                {
                    "pidx": pidx,
                    "payment_url": f"{self.base_url}/?pidx={pidx}",
                    "expires_at": expires_at.isoformat(),
                    "expires_in": 3600,
                }
            )

        @app.post("/api/v2/epayment/lookup/")
        async def lookup(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append(("lookup", dict(request.headers), body))
            if (refused := unauthorized(request)) is not None:
                return refused
            payment = self.payments.get(str(body.get("pidx")))
            if payment is None:
                return JSONResponse(
                    {"detail": "Not found.", "error_key": "validation_error"}, status_code=404
                )
            return JSONResponse(
                {
                    "pidx": payment.pidx,
                    "total_amount": payment.total_amount,
                    "status": payment.status,
                    "transaction_id": payment.transaction_id,
                    "fee": 0,
                    "refunded": False,
                }
            )

        return app
