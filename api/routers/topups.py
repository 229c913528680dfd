"""Wallet top-ups: the app's intent/verify/cancel, and the gateways' redirects, callbacks and webhooks."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from api.deps import CurrentUser, Services, ServicesDep
from api.envelope import Envelope, Money, ok
from api.idempotency import IdempotencyDep
from config import Settings
from domain.payments import service
from storage.models import User
from storage.payment_models import Gateway

router = APIRouter(prefix="/api/payments", tags=["payments"])


class TopupIn(BaseModel):
    amount: Decimal = Field(description='NPR, at most two decimals: "500.00" or 500')
    gateway: Gateway


class FormOut(BaseModel):
    """eSewa: the app posts these fields (application/x-www-form-urlencoded) to `action`."""

    action: str
    method: Literal["POST"] = "POST"
    fields: dict[str, str]


class TopupIntentOut(BaseModel):
    intent_id: uuid.UUID
    gateway: str
    amount: Money
    currency: str
    status: str
    redirect_url: str | None  # Khalti: open this page
    form: FormOut | None  # eSewa
    client_secret: str | None  # Stripe: confirm the PaymentIntent with the Stripe SDK
    expires_at: datetime

    @classmethod
    def of(cls, created: service.Created) -> TopupIntentOut:
        intent = created.intent
        form = created.form
        return cls(
            intent_id=intent.id,
            gateway=intent.gateway.value,
            amount=intent.amount,
            currency=intent.currency,
            status=intent.status.value,
            redirect_url=created.redirect_url,
            form=FormOut(action=form.action, fields=form.fields) if form else None,
            client_secret=created.client_secret,
            expires_at=intent.expires_at,
        )


class VerifyIn(BaseModel):
    intent_id: uuid.UUID
    pidx: str | None = Field(default=None, max_length=255, description="Khalti: the callback's pidx")
    data: str | None = Field(default=None, max_length=8192, description="eSewa: the success redirect's data")
    payment_intent: str | None = Field(
        default=None, max_length=255, description="Stripe: the PaymentIntent id"
    )


class TopupStatusOut(BaseModel):
    intent_id: uuid.UUID
    gateway: str
    status: str
    balance: Money

    @classmethod
    def of(cls, state: service.TopupState) -> TopupStatusOut:
        return cls(
            intent_id=state.intent_id,
            gateway=state.gateway.value,
            status=state.status.value,
            balance=state.balance,
        )


class CallbackOut(BaseModel):
    intent_id: uuid.UUID
    gateway: str
    status: str


class WebhookOut(BaseModel):
    received: bool = True
    intent_id: uuid.UUID | None = None
    status: str | None = None


async def _params(request: Request) -> dict[str, str]:
    """Query parameters, plus a form or JSON body when a gateway POSTs."""
    params = dict(request.query_params)
    if request.method != "POST":
        return params
    body = (await request.body()).decode("utf-8", errors="replace")
    content_type = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in content_type:
        params.update(parse_qsl(body))
    elif "application/json" in content_type:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            params.update({k: str(v) for k, v in parsed.items() if v is not None})
    return params


def _finish(settings: Settings, state: service.TopupState) -> Response:
    """Where a browser coming back from a gateway lands: the app (APP_RETURN_URL) or a small JSON answer."""
    result = CallbackOut(intent_id=state.intent_id, gateway=state.gateway.value, status=state.status.value)
    if settings.app_return_url:
        separator = "&" if "?" in settings.app_return_url else "?"
        query = urlencode(result.model_dump(mode="json"))
        return RedirectResponse(f"{settings.app_return_url}{separator}{query}", status_code=303)
    return JSONResponse(ok(result).model_dump(mode="json"))


@router.post(
    "/wallet/topup-intent", status_code=status.HTTP_201_CREATED, response_model=Envelope[TopupIntentOut]
)
async def topup_intent(
    body: TopupIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[TopupIntentOut] | Response:
    """With `Idempotency-Key`, a retry replays the first answer (the same intent, not a second one)."""
    return await idempotency.run(lambda: _topup_intent(body, user, svc))


async def _topup_intent(body: TopupIn, user: User, svc: Services) -> Envelope[TopupIntentOut]:
    created = await service.create_topup(
        db=svc.db, settings=svc.settings, user_id=user.id, amount=body.amount, gateway=body.gateway
    )
    return ok(TopupIntentOut.of(created), "Top-up started: complete the payment with the gateway.")


@router.post("/verify", response_model=Envelope[TopupStatusOut])
async def verify(
    body: VerifyIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[TopupStatusOut] | Response:
    """With `Idempotency-Key`, a retry replays the first answer; without one it is safe to repeat anyway."""
    return await idempotency.run(lambda: _verify(body, user, svc))


async def _verify(body: VerifyIn, user: User, svc: Services) -> Envelope[TopupStatusOut]:
    state = await service.verify(
        db=svc.db,
        settings=svc.settings,
        user_id=user.id,
        intent_id=body.intent_id,
        pidx=body.pidx,
        esewa_data=body.data,
        payment_intent=body.payment_intent,
    )
    return ok(TopupStatusOut.of(state))


@router.post("/cancel/{intent_id}")
async def cancel(intent_id: uuid.UUID, user: CurrentUser, svc: ServicesDep) -> Envelope[TopupStatusOut]:
    state = await service.cancel(db=svc.db, settings=svc.settings, user_id=user.id, intent_id=intent_id)
    return ok(TopupStatusOut.of(state))


@router.get("/khalti/callback", response_model=None, operation_id="khalti_callback_get")
@router.post("/khalti/callback", response_model=None, operation_id="khalti_callback_post")
async def khalti_callback(request: Request, svc: ServicesDep) -> Response:
    state = await service.khalti_callback(db=svc.db, settings=svc.settings, params=await _params(request))
    return _finish(svc.settings, state)


@router.get("/esewa/success", response_model=None, operation_id="esewa_success_get")
@router.post("/esewa/success", response_model=None, operation_id="esewa_success_post")
async def esewa_success(request: Request, svc: ServicesDep) -> Response:
    params = await _params(request)
    state = await service.esewa_success(db=svc.db, settings=svc.settings, data=params.get("data"))
    return _finish(svc.settings, state)


@router.get("/esewa/failure", response_model=None, operation_id="esewa_failure_get")
@router.post("/esewa/failure", response_model=None, operation_id="esewa_failure_post")
async def esewa_failure(request: Request, svc: ServicesDep) -> Response:
    params = await _params(request)
    state = await service.esewa_failure(db=svc.db, settings=svc.settings, intent_id=params.get("intent_id"))
    return _finish(svc.settings, state)


@router.post("/stripe/webhook")
async def stripe_webhook(request: Request, svc: ServicesDep) -> Envelope[WebhookOut]:
    state = await service.stripe_webhook(
        db=svc.db,
        settings=svc.settings,
        payload=await request.body(),
        signature=request.headers.get("stripe-signature"),
    )
    if state is None:
        return ok(WebhookOut())
    return ok(WebhookOut(intent_id=state.intent_id, status=state.status.value))
