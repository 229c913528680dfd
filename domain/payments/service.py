"""Wallet top-ups: intents, gateway checks, and `settle`, the one place a payment becomes wallet money.

Redirects, callbacks and webhooks are hints: whatever arrives, the gateway's own record (Khalti lookup,
eSewa status check, Stripe's signed event or PaymentIntent) decides. No database transaction is open
while a gateway is called. `settle` locks the intent row, so callback, verify and webhook racing each
other credit the wallet once; the ledger's (account, reference, type) uniqueness backs that up.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from domain import notifications, wallet
from domain.errors import Forbidden, InvalidState, NotFound, ValidationFailed
from domain.payments import esewa, gateways, khalti, stripe
from domain.payments.errors import GatewayUnavailable, PaymentAmountMismatch, PaymentSignatureInvalid
from domain.payments.metrics import PAYMENTS, SIGNATURE_FAILURES
from domain.payments.outcomes import Outcome, Paid, Unpaid
from domain.pricing import CENT, money
from storage.db import Database
from storage.models import EntryType
from storage.payment_models import Gateway, IntentStatus, PaymentIntent

log = logging.getLogger(__name__)

CALLBACK_PATHS = {
    "khalti": "/api/payments/khalti/callback",
    "esewa_success": "/api/payments/esewa/success",
    "esewa_failure": "/api/payments/esewa/failure",
}
STRIPE_EVENTS = {"payment_intent.succeeded", "payment_intent.canceled"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """A snapshot of a payment intent row (ORM objects stay inside their session)."""

    id: uuid.UUID
    user_id: uuid.UUID
    gateway: Gateway
    amount: Decimal
    currency: str
    status: IntentStatus
    gateway_ref: str | None
    expires_at: datetime

    @classmethod
    def of(cls, row: PaymentIntent) -> Intent:
        return cls(
            id=row.id,
            user_id=row.user_id,
            gateway=row.gateway,
            amount=row.amount,
            currency=row.currency,
            status=row.status,
            gateway_ref=row.gateway_ref,
            expires_at=row.expires_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Created:
    intent: Intent
    redirect_url: str | None = None
    form: esewa.Form | None = None
    client_secret: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TopupState:
    intent_id: uuid.UUID
    gateway: Gateway
    status: IntentStatus
    balance: Decimal
    credited: bool  # this call moved the money


def reference(intent_id: uuid.UUID) -> str:
    """The ledger reference of a top-up: one credit per intent, whoever settles it."""
    return f"topup:{intent_id}"


def public_url(settings: Settings, path: str) -> str:
    base = settings.public_base_url or f"http://{settings.http_host}:{settings.http_port}"
    return base.rstrip("/") + path


def checked_amount(amount: Decimal, settings: Settings) -> Decimal:
    limits = {"min": f"{settings.topup_min_amount:.2f}", "max": f"{settings.topup_max_amount:.2f}"}
    if not amount.is_finite() or amount <= 0:
        raise ValidationFailed("The amount must be a positive number.", context=limits)
    if amount > settings.topup_max_amount:
        raise ValidationFailed("The amount is above the top-up maximum.", context=limits)
    if amount != amount.quantize(CENT):
        raise ValidationFailed("The amount has more than two decimals.", context=limits)
    if amount < settings.topup_min_amount:
        raise ValidationFailed("The amount is below the top-up minimum.", context=limits)
    return money(amount)


def khalti_client(settings: Settings) -> khalti.KhaltiClient:
    gateways.require(settings, Gateway.KHALTI)
    return khalti.KhaltiClient(
        base_url=settings.khalti_base_url,
        secret_key=settings.khalti_secret_key,
        timeout=settings.payment_gateway_timeout_s,
    )


def esewa_client(settings: Settings) -> esewa.EsewaClient:
    gateways.require(settings, Gateway.ESEWA)
    return esewa.EsewaClient(
        base_url=settings.esewa_base_url,
        product_code=settings.esewa_product_code,
        timeout=settings.payment_gateway_timeout_s,
    )


def stripe_client(settings: Settings) -> stripe.StripeClient:
    gateways.require(settings, Gateway.STRIPE)
    return stripe.StripeClient(
        base_url=settings.stripe_base_url,
        secret_key=settings.stripe_secret_key,
        timeout=settings.payment_gateway_timeout_s,
    )


def _rejected(gateway: Gateway, exc: PaymentSignatureInvalid, **context: object) -> PaymentSignatureInvalid:
    SIGNATURE_FAILURES.labels(gateway=gateway.value).inc()
    PAYMENTS.labels(gateway=gateway.value, result="rejected").inc()
    log.warning("event=payment_rejected gateway=%s reason=%r context=%s", gateway.value, exc.message, context)
    return exc


def _mismatch(intent: Intent, reported: Decimal, currency: str, source: str) -> PaymentAmountMismatch:
    PAYMENTS.labels(gateway=intent.gateway.value, result="amount_mismatch").inc()
    log.error(
        "event=payment_amount_mismatch intent_id=%s gateway=%s source=%s expected=%s currency=%s reported=%s "
        "reported_currency=%s",
        intent.id,
        intent.gateway.value,
        source,
        intent.amount,
        intent.currency,
        reported,
        currency,
    )
    return PaymentAmountMismatch(
        context={
            "intent_id": str(intent.id),
            "expected": f"{intent.amount:.2f}",
            "reported": f"{reported:.2f}",
        }
    )


async def _load(session: AsyncSession, intent_id: uuid.UUID) -> PaymentIntent:
    row = await session.get(PaymentIntent, intent_id)
    if row is None:
        raise NotFound("No such top-up.", context={"intent_id": str(intent_id)})
    return row


async def _owned(db: Database, intent_id: uuid.UUID, user_id: uuid.UUID) -> Intent:
    async with db.transaction() as session:
        intent = Intent.of(await _load(session, intent_id))
    if intent.user_id != user_id:
        raise Forbidden("This top-up is not yours.")
    return intent


async def _by_ref(db: Database, gateway: Gateway, ref: str) -> Intent | None:
    async with db.transaction() as session:
        row = await session.scalar(
            select(PaymentIntent).where(PaymentIntent.gateway == gateway, PaymentIntent.gateway_ref == ref)
        )
        return Intent.of(row) if row is not None else None


async def _by_ref_or_404(db: Database, gateway: Gateway, ref: str) -> Intent:
    intent = await _by_ref(db, gateway, ref)
    if intent is None:
        raise NotFound("No such top-up.", context={"gateway": gateway.value})
    return intent


async def create_topup(
    *, db: Database, settings: Settings, user_id: uuid.UUID, amount: Decimal, gateway: Gateway
) -> Created:
    """Record a PENDING intent, then open the payment at the gateway (outside any transaction)."""
    amount = checked_amount(amount, settings)
    gateways.require(settings, gateway)  # refuse early if off
    khalti_api = khalti_client(settings) if gateway == Gateway.KHALTI else None
    stripe_api = stripe_client(settings) if gateway == Gateway.STRIPE else None
    intent_id = uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(seconds=settings.topup_intent_ttl_s)
    async with db.transaction() as session:
        session.add(
            PaymentIntent(
                id=intent_id,
                user_id=user_id,
                gateway=gateway,
                amount=amount,
                currency=settings.currency,
                status=IntentStatus.PENDING,
                # eSewa's transaction_uuid is ours; the other gateways name the payment on initiation.
                gateway_ref=str(intent_id) if gateway == Gateway.ESEWA else None,
                expires_at=expires_at,
            )
        )
    redirect_url: str | None = None
    form: esewa.Form | None = None
    client_secret: str | None = None
    try:
        if khalti_api is not None:
            initiated = await khalti_api.initiate(
                amount=amount,
                purchase_order_id=str(intent_id),
                purchase_order_name="Wallet top-up",
                return_url=public_url(settings, CALLBACK_PATHS["khalti"]),
                website_url=public_url(settings, "/"),
            )
            ref = initiated.pidx
            expires_at = initiated.expires_at or expires_at
            redirect_url = initiated.payment_url
        elif stripe_api is not None:
            payment_intent = await stripe_api.create(
                amount=amount, currency=settings.currency, intent_id=str(intent_id)
            )
            ref = payment_intent.id
            client_secret = payment_intent.client_secret
        else:
            ref = str(intent_id)
            form = esewa.payment_form(
                form_url=settings.esewa_form_url,
                product_code=settings.esewa_product_code,
                secret=settings.esewa_secret_key,
                amount=amount,
                transaction_uuid=ref,
                success_url=public_url(settings, CALLBACK_PATHS["esewa_success"]),
                failure_url=public_url(settings, CALLBACK_PATHS["esewa_failure"]) + f"?intent_id={intent_id}",
            )
    except GatewayUnavailable:
        await settle(
            db, intent_id=intent_id, outcome=Unpaid(status=IntentStatus.FAILED, reason="gateway_error")
        )
        raise
    async with db.transaction() as session:
        row = await _load(session, intent_id)
        row.gateway_ref, row.expires_at = ref, expires_at
        await session.flush()
        intent = Intent.of(row)
    PAYMENTS.labels(gateway=gateway.value, result="initiated").inc()
    log.info(
        "event=topup_initiated intent_id=%s user_id=%s gateway=%s amount=%s gateway_ref=%s",
        intent_id,
        user_id,
        gateway.value,
        amount,
        ref,
    )
    return Created(intent=intent, redirect_url=redirect_url, form=form, client_secret=client_secret)


async def check_with_gateway(settings: Settings, intent: Intent) -> Outcome:
    """What the gateway's own record says about this intent's payment."""
    if intent.gateway_ref is None:
        return Unpaid(status=IntentStatus.PENDING, reason="not_initiated")
    if intent.gateway == Gateway.KHALTI:
        return (await khalti_client(settings).lookup(intent.gateway_ref)).outcome()
    if intent.gateway == Gateway.ESEWA:
        status = await esewa_client(settings).status(
            transaction_uuid=intent.gateway_ref, total_amount=intent.amount
        )
        return status.outcome()
    return (await stripe_client(settings).retrieve(intent.gateway_ref)).outcome()


async def settle(
    db: Database, *, intent_id: uuid.UUID, outcome: Outcome, source: str = "internal"
) -> TopupState:
    """Apply what a gateway said, under the intent's row lock: money paid → credited exactly once (even
    after a local cancel or expiry: the user paid); no money → PENDING becomes the gateway's final status,
    or EXPIRED past `expires_at`."""
    now = datetime.now(UTC)
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(PaymentIntent).where(PaymentIntent.id == intent_id).with_for_update()
            )
        ).scalar_one()
        gateway = row.gateway.value
        credited = False
        if isinstance(outcome, Paid):
            if outcome.amount != row.amount or outcome.currency.upper() != row.currency.upper():
                raise _mismatch(Intent.of(row), outcome.amount, outcome.currency, source)
            if row.status == IntentStatus.COMPLETED:
                result = "duplicate"
            else:
                if row.status != IntentStatus.PENDING:
                    log.warning(
                        "event=topup_paid_after_close intent_id=%s status=%s", row.id, row.status.value
                    )
                await wallet.credit(
                    session,
                    user_id=row.user_id,
                    amount=row.amount,
                    type=EntryType.TOPUP,
                    reference=reference(row.id),
                )
                row.status, row.completed_at = IntentStatus.COMPLETED, now
                row.gateway_transaction_id, row.failure_reason = outcome.transaction_id, None
                credited, result = True, "credited"
        else:
            if row.status == IntentStatus.PENDING and outcome.status != IntentStatus.PENDING:
                row.status, row.failure_reason = outcome.status, outcome.reason[:64]
            elif row.status == IntentStatus.PENDING and now >= row.expires_at:
                row.status, row.failure_reason = IntentStatus.EXPIRED, "expired"
            result = "duplicate" if row.status == IntentStatus.COMPLETED else row.status.value.lower()
        balance = (await wallet.wallet_for(session, row.user_id)).balance
        if credited:
            await notifications.topup_credited(
                session,
                user_id=row.user_id,
                intent_id=row.id,
                amount=row.amount,
                balance=balance,
                gateway=gateway,
            )
        state = TopupState(
            intent_id=row.id, gateway=row.gateway, status=row.status, balance=balance, credited=credited
        )
    PAYMENTS.labels(gateway=gateway, result=result).inc()
    log.info(
        "event=topup_settled intent_id=%s gateway=%s source=%s status=%s result=%s",
        intent_id,
        gateway,
        source,
        state.status.value,
        result,
    )
    return state


async def _current(db: Database, intent_id: uuid.UUID) -> TopupState:
    async with db.transaction() as session:
        row = await _load(session, intent_id)
        balance = (await wallet.wallet_for(session, row.user_id)).balance
        return TopupState(
            intent_id=row.id, gateway=row.gateway, status=row.status, balance=balance, credited=False
        )


def _esewa_response(settings: Settings, data: str) -> esewa.Response:
    gateways.require(settings, Gateway.ESEWA)
    try:
        response = esewa.decode_response(data, secret=settings.esewa_secret_key)
    except PaymentSignatureInvalid as exc:
        raise _rejected(Gateway.ESEWA, exc) from None
    if response.product_code != settings.esewa_product_code:
        raise _rejected(
            Gateway.ESEWA,
            PaymentSignatureInvalid("eSewa's data names another merchant."),
            product_code=response.product_code,
        )
    return response


async def verify(
    *,
    db: Database,
    settings: Settings,
    user_id: uuid.UUID,
    intent_id: uuid.UUID,
    pidx: str | None = None,
    esewa_data: str | None = None,
    payment_intent: str | None = None,
) -> TopupState:
    """The app asks after returning from the gateway: check with the gateway, credit once."""
    intent = await _owned(db, intent_id, user_id)
    claims = {Gateway.KHALTI: pidx, Gateway.STRIPE: payment_intent}
    for gateway, claimed in claims.items():
        if claimed is not None and (intent.gateway != gateway or claimed != intent.gateway_ref):
            raise ValidationFailed("The gateway payload belongs to another payment.")
    if esewa_data is not None:
        response = _esewa_response(settings, esewa_data)
        if intent.gateway != Gateway.ESEWA or response.transaction_uuid != intent.gateway_ref:
            raise ValidationFailed("The gateway payload belongs to another payment.")
        if response.total_amount != intent.amount:
            raise _mismatch(intent, response.total_amount, "NPR", "verify")
    outcome = await check_with_gateway(settings, intent)
    return await settle(db, intent_id=intent.id, outcome=outcome, source="verify")


async def khalti_callback(*, db: Database, settings: Settings, params: Mapping[str, str]) -> TopupState:
    """Khalti's redirect to `return_url`. Unsigned: its claims must agree with the lookup, or it is
    refused as forged (and changes nothing)."""
    pidx = params.get("pidx")
    if not pidx:
        raise ValidationFailed("pidx is missing.")
    intent = await _by_ref_or_404(db, Gateway.KHALTI, pidx)
    lookup = await khalti_client(settings).lookup(pidx)
    forged = []
    if params.get("status") == khalti.COMPLETED and lookup.status != khalti.COMPLETED:
        forged.append("status")
    if params.get("total_amount") not in (None, str(lookup.total_amount)):
        forged.append("total_amount")
    if params.get("purchase_order_id") not in (None, str(intent.id)):
        forged.append("purchase_order_id")
    if forged:
        raise _rejected(
            Gateway.KHALTI,
            PaymentSignatureInvalid("The callback does not match Khalti's record of the payment."),
            intent_id=str(intent.id),
            fields=forged,
        )
    return await settle(db, intent_id=intent.id, outcome=lookup.outcome(), source="khalti_callback")


async def esewa_success(*, db: Database, settings: Settings, data: str | None) -> TopupState:
    """eSewa's success redirect: `data` must verify, then the status check decides."""
    if not data:
        raise _rejected(Gateway.ESEWA, PaymentSignatureInvalid("eSewa's data is missing."))
    response = _esewa_response(settings, data)
    intent = await _by_ref_or_404(db, Gateway.ESEWA, response.transaction_uuid)
    if response.total_amount != intent.amount:
        raise _mismatch(intent, response.total_amount, "NPR", "esewa_success")
    outcome = await check_with_gateway(settings, intent)
    return await settle(db, intent_id=intent.id, outcome=outcome, source="esewa_success")


async def esewa_failure(*, db: Database, settings: Settings, intent_id: str | None) -> TopupState:
    """eSewa's failure redirect (the user cancelled or the payment failed): CANCELLED unless eSewa
    says it was paid after all."""
    try:
        # Some eSewa versions append "?data=..." to a failure_url that already has a query.
        parsed = uuid.UUID((intent_id or "").split("?", 1)[0])
    except ValueError:
        raise ValidationFailed("intent_id is missing or not valid.") from None
    async with db.transaction() as session:
        intent = Intent.of(await _load(session, parsed))
    if intent.gateway != Gateway.ESEWA:
        raise NotFound("No such top-up.")
    outcome = await check_with_gateway(settings, intent)
    if not isinstance(outcome, Paid):
        outcome = Unpaid(status=IntentStatus.CANCELLED, reason="esewa:failure_redirect")
    return await settle(db, intent_id=intent.id, outcome=outcome, source="esewa_failure")


async def stripe_webhook(
    *, db: Database, settings: Settings, payload: bytes, signature: str | None
) -> TopupState | None:
    """A Stripe event, its signature checked on the raw body. Events we do not handle, and payments
    that are not top-ups of ours, are acknowledged and ignored (None). Without STRIPE_WEBHOOK_SECRET every
    event is refused (400); no top-up can be waiting on a gateway that was never live."""
    try:
        event = stripe.verify_webhook(
            payload,
            signature,
            secret=settings.stripe_webhook_secret,
            tolerance_s=settings.stripe_webhook_tolerance_s,
            now=time.time(),
        )
    except PaymentSignatureInvalid as exc:
        raise _rejected(Gateway.STRIPE, exc) from None
    kind = event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if kind not in STRIPE_EVENTS or not isinstance(obj, dict):
        log.info("event=stripe_event_ignored id=%s type=%s", event.get("id"), kind)
        return None
    try:
        payment_intent = stripe.PaymentIntent.parse(obj)
    except (ValueError, TypeError):
        raise ValidationFailed("The event does not carry a PaymentIntent.") from None
    intent = await _by_ref(db, Gateway.STRIPE, payment_intent.id)
    if intent is None:
        log.warning("event=stripe_event_unknown_intent id=%s pi=%s", event.get("id"), payment_intent.id)
        return None
    return await settle(db, intent_id=intent.id, outcome=payment_intent.outcome(), source="stripe_webhook")


async def cancel(*, db: Database, settings: Settings, user_id: uuid.UUID, intent_id: uuid.UUID) -> TopupState:
    """The user gives up on a top-up. Stripe's PaymentIntent is cancelled at Stripe too; a payment that
    went through anyway is credited and the cancel refused (409)."""
    intent = await _owned(db, intent_id, user_id)
    if intent.status == IntentStatus.COMPLETED:
        raise InvalidState("This top-up was paid and credited already.", context={"status": "COMPLETED"})
    if intent.status != IntentStatus.PENDING:
        return await _current(db, intent.id)
    outcome: Outcome = Unpaid(status=IntentStatus.CANCELLED, reason="cancelled_by_user")
    if intent.gateway == Gateway.STRIPE and intent.gateway_ref is not None:
        outcome = (await stripe_client(settings).cancel(intent.gateway_ref)).outcome()
    if isinstance(outcome, Paid):
        await settle(db, intent_id=intent.id, outcome=outcome, source="cancel")
        raise InvalidState("This top-up was paid and credited already.", context={"status": "COMPLETED"})
    if outcome.status == IntentStatus.PENDING:
        raise InvalidState("The payment is being processed and can no longer be cancelled.")
    return await settle(db, intent_id=intent.id, outcome=outcome, source="cancel")
