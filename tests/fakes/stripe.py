"""Fake Stripe: PaymentIntents and signed webhook events.

POST /v1/payment_intents              form-encoded (amount, currency, metadata[k], ...), `Authorization:
    Bearer <secret>`, optional `Idempotency-Key` (same key and parameters → the same PaymentIntent)
GET  /v1/payment_intents/{id}
POST /v1/payment_intents/{id}/cancel  → 400 payment_intent_unexpected_state once succeeded or canceled
Errors: {"error": {"type", "code", "message", ...}}. Webhooks: `Stripe-Signature: t=<ts>,v1=<hex
HMAC-SHA256(webhook secret, "<ts>.<raw body>")>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

CANCELABLE = {"requires_payment_method", "requires_capture", "requires_confirmation", "requires_action"}


def _error(status: int, type_: str, message: str, code: str | None = None, **extra: Any) -> JSONResponse:
    error = {"type": type_, "message": message, **({"code": code} if code else {}), **extra}
    return JSONResponse({"error": error}, status_code=status)


@dataclass
class FakeStripe:
    secret_key: str = field(default_factory=lambda: f"sk_test_{secrets.token_hex(12)}")
    webhook_secret: str = field(default_factory=lambda: f"whsec_{secrets.token_hex(16)}")
    base_url: str = ""
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[str, tuple[dict[str, str], str]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    # --- what the app (Stripe SDK) and Stripe's webhook sender do ------------------------------

    def succeed(self, pi_id: str, *, amount_received: int | None = None) -> dict[str, Any]:
        """The customer's payment succeeds; the `payment_intent.succeeded` event Stripe then sends."""
        pi = self.intents[pi_id]
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"] if amount_received is None else amount_received
        pi["latest_charge"] = f"ch_{secrets.token_hex(12)}"
        return self.event("payment_intent.succeeded", pi_id)

    def event(self, type_: str, pi_id: str) -> dict[str, Any]:
        return {
            "id": f"evt_{secrets.token_hex(12)}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(time.time()),
            "data": {"object": dict(self.intents[pi_id])},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type_,
        }

    def sign(self, payload: bytes, *, timestamp: int | None = None, secret: str | None = None) -> str:
        t = int(time.time()) if timestamp is None else timestamp
        key = (secret or self.webhook_secret).encode()
        v1 = hmac.new(key, f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
        return f"t={t},v1={v1}"

    def webhook(self, event: dict[str, Any], **sign_kw: Any) -> tuple[bytes, dict[str, str]]:
        """A webhook request as Stripe sends it: the raw body and its headers."""
        payload = json.dumps(event, indent=2).encode()
        return payload, {
            "Content-Type": "application/json",
            "Stripe-Signature": self.sign(payload, **sign_kw),
        }

    # --- the API ---------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        def unauthorized(request: Request) -> JSONResponse | None:
            if request.headers.get("authorization") != f"Bearer {self.secret_key}":
                return _error(401, "invalid_request_error", "Invalid API Key provided.")
            return None

        def missing(pi_id: str) -> JSONResponse:
            return _error(
                404,
                "invalid_request_error",
                f"No such payment_intent: '{pi_id}'",
                "resource_missing",
                param="intent",
            )

        @app.post("/v1/payment_intents")
        async def create(request: Request) -> JSONResponse:
            params = dict(parse_qsl((await request.body()).decode()))
            self.requests.append(("create", dict(request.headers), params))
            if (refused := unauthorized(request)) is not None:
                return refused
            key = request.headers.get("idempotency-key")
            if key and key in self.idempotency:
                first, pi_id = self.idempotency[key]
                if first != params:
                    return _error(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters.",
                    )
                return JSONResponse(self.intents[pi_id])
            amount, currency = params.get("amount", ""), params.get("currency", "")
            if not amount.isdigit() or int(amount) < 1:
                return _error(400, "invalid_request_error", "Invalid integer", "parameter_invalid_integer")
            if not currency or currency != currency.lower():
                return _error(400, "invalid_request_error", "Invalid currency", "parameter_invalid_string")
            pi_id = f"pi_{secrets.token_hex(12)}"
            self.intents[pi_id] = {
                "id": pi_id,
                "object": "payment_intent",
                "amount": int(amount),
                "amount_received": 0,
                "currency": currency,
                "client_secret": f"{pi_id}_secret_{secrets.token_hex(12)}",
                "status": "requires_payment_method",
                "latest_charge": None,
                "livemode": False,
                "created": int(time.time()),
                "metadata": {
                    k[len("metadata[") : -1]: v for k, v in params.items() if k.startswith("metadata[")
                },
            }
            if key:
                self.idempotency[key] = (params, pi_id)
            return JSONResponse(self.intents[pi_id])

        @app.get("/v1/payment_intents/{pi_id}")
        async def retrieve(pi_id: str, request: Request) -> JSONResponse:
            if (refused := unauthorized(request)) is not None:
                return refused
            return JSONResponse(self.intents[pi_id]) if pi_id in self.intents else missing(pi_id)

        @app.post("/v1/payment_intents/{pi_id}/cancel")
        async def cancel(pi_id: str, request: Request) -> JSONResponse:
            if (refused := unauthorized(request)) is not None:
                return refused
            pi = self.intents.get(pi_id)
            if pi is None:
                return missing(pi_id)
            if pi["status"] not in CANCELABLE:
                return _error(
                    400,
                    "invalid_request_error",
                    f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}.",
                    "payment_intent_unexpected_state",
                    payment_intent=pi,
                )
            pi["status"] = "canceled"
            return JSONResponse(pi)

        return app
