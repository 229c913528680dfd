"""Wallet top-ups end to end: the real gateway clients against local fakes of Khalti, eSewa and Stripe,
through the running API. Every path credits a wallet once, whatever arrives first and however often."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import func, update

from tests.conftest import Api, free_port, new_phone
from tests.fakes import FakeEsewa, FakeKhalti, FakeStripe, serve
from tests.fakes.esewa import decode_data, encode_data
from tests.support import metric, overridden

pytestmark = pytest.mark.integration

TOPUP = "/api/payments/wallet/topup-intent"
VERIFY = "/api/payments/verify"
KHALTI_CALLBACK = "/api/payments/khalti/callback"
STRIPE_WEBHOOK = "/api/payments/stripe/webhook"


@dataclass
class Gateways:
    khalti: FakeKhalti
    esewa: FakeEsewa
    stripe: FakeStripe


@pytest.fixture(scope="module")
async def gateways(system: Any, base_url: str) -> AsyncIterator[Gateways]:
    """The three fakes, served; the running app's settings point at them for this module."""
    fakes = Gateways(khalti=FakeKhalti(), esewa=FakeEsewa(), stripe=FakeStripe())
    async with (
        serve(fakes.khalti.app()) as khalti_url,
        serve(fakes.esewa.app()) as esewa_url,
        serve(fakes.stripe.app()) as stripe_url,
    ):
        fakes.khalti.base_url, fakes.esewa.base_url, fakes.stripe.base_url = khalti_url, esewa_url, stripe_url
        overrides = {
            "public_base_url": base_url,
            "payments_sandbox": True,  # the fakes use the gateways' published test credentials
            "app_return_url": None,
            "khalti_base_url": fakes.khalti.api_url,
            "khalti_secret_key": fakes.khalti.secret_key,
            "esewa_base_url": esewa_url,
            "esewa_form_url": fakes.esewa.form_url,
            "esewa_product_code": fakes.esewa.product_code,
            "esewa_secret_key": fakes.esewa.secret_key,
            "stripe_base_url": stripe_url,
            "stripe_secret_key": fakes.stripe.secret_key,
            "stripe_webhook_secret": fakes.stripe.webhook_secret,
        }
        with overridden(system.services.settings, **overrides):
            yield fakes


# --- helpers -------------------------------------------------------------------------------------


async def new_user(api: Api) -> str:
    token: str = (await api.login(new_phone()))["access"]
    return token


async def start_topup(client: httpx.AsyncClient, token: str, gateway: str, amount: Any) -> dict[str, Any]:
    r = await client.post(TOPUP, json={"amount": amount, "gateway": gateway}, headers=Api.auth(token))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["success"] is True
    data: dict[str, Any] = body["data"]
    assert data["gateway"] == gateway and data["status"] == "PENDING" and data["currency"] == "NPR"
    return data


async def verify(client: httpx.AsyncClient, token: str, intent_id: str, **payload: str) -> httpx.Response:
    return await client.post(VERIFY, json={"intent_id": intent_id, **payload}, headers=Api.auth(token))


async def topup_entries(client: httpx.AsyncClient, token: str) -> list[tuple[str, str]]:
    r = await client.get("/api/payments/transactions", params={"page_size": 100}, headers=Api.auth(token))
    assert r.status_code == 200, r.text
    return [(e["reference"], e["amount"]) for e in r.json()["data"]["results"] if e["type"] == "TOPUP"]


async def balance(client: httpx.AsyncClient, token: str) -> str:
    r = await client.get("/api/payments/wallet/balance", headers=Api.auth(token))
    value: str = r.json()["data"]["balance"]
    return value


async def credited_once(client: httpx.AsyncClient, token: str, intent_id: str, amount: str) -> None:
    assert await topup_entries(client, token) == [(f"topup:{intent_id}", amount)]
    assert await balance(client, token) == amount


async def not_credited(client: httpx.AsyncClient, token: str) -> None:
    assert await topup_entries(client, token) == []
    assert await balance(client, token) == "0.00"


def status_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    value: str = r.json()["data"]["status"]
    return value


def refused(r: httpx.Response, status: int = 400, code: str = "validation_error") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body


async def signature_failures(client: httpx.AsyncClient, gateway: str) -> float:
    return await metric(client, "powerbank_payment_signature_failures_total", gateway=gateway)


async def credits(client: httpx.AsyncClient, gateway: str) -> float:
    return await metric(client, "powerbank_payments_total", gateway=gateway, result="credited")


def khalti_pidx(intent: dict[str, Any]) -> str:
    return str(intent["redirect_url"].split("pidx=", 1)[1])


async def submit_esewa_form(intent: dict[str, Any]) -> httpx.Response:
    """What the app's web view does: post the signed form to eSewa."""
    form = intent["form"]
    async with httpx.AsyncClient() as browser:
        return await browser.post(form["action"], data=form["fields"])


def stripe_pi(intent: dict[str, Any]) -> str:
    return str(intent["client_secret"].split("_secret_", 1)[0])


# --- Khalti ---------------------------------------------------------------------------------------


async def test_khalti_topup_credits_once(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, base_url: str
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "khalti", 250)
    intent_id, pidx = intent["intent_id"], khalti_pidx(intent)
    assert intent["amount"] == "250.00" and intent["redirect_url"].startswith(gateways.khalti.base_url)
    assert intent["form"] is None and intent["client_secret"] is None
    _, headers, body = next(
        r for r in gateways.khalti.requests if r[0] == "initiate" and r[2]["purchase_order_id"] == intent_id
    )
    assert headers["authorization"] == f"Key {gateways.khalti.secret_key}"
    assert body["amount"] == 25000 and body["return_url"] == f"{base_url}{KHALTI_CALLBACK}"

    assert status_of(await verify(client, token, intent_id, pidx=pidx)) == "PENDING"
    before = await credits(client, "khalti")
    params = gateways.khalti.pay(pidx)
    for _ in range(3):  # the browser retries the redirect
        assert status_of(await client.get(KHALTI_CALLBACK, params=params)) == "COMPLETED"
    assert status_of(await client.post(KHALTI_CALLBACK, data=params)) == "COMPLETED"
    r = await verify(client, token, intent_id, pidx=pidx)
    assert status_of(r) == "COMPLETED" and r.json()["data"]["balance"] == "250.00"
    await credited_once(client, token, intent_id, "250.00")
    assert await credits(client, "khalti") == before + 1


async def test_khalti_forged_callbacks_are_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "khalti", "300.00")
    intent_id, pidx = intent["intent_id"], khalti_pidx(intent)
    failures = await signature_failures(client, "khalti")

    # Not paid, but the callback says it was.
    forged = {**gateways.khalti.callback_params(pidx), "status": "Completed"}
    refused(await client.get(KHALTI_CALLBACK, params=forged))
    # Paid, but the callback claims another amount or another order.
    params = gateways.khalti.pay(pidx)
    refused(await client.get(KHALTI_CALLBACK, params={**params, "total_amount": "3000000"}))
    refused(await client.get(KHALTI_CALLBACK, params={**params, "purchase_order_id": str(uuid.uuid4())}))
    refused(await client.get(KHALTI_CALLBACK, params={**params, "pidx": "no-such-pidx"}), 404, "not_found")
    await not_credited(client, token)
    assert await signature_failures(client, "khalti") == failures + 3

    # The genuine callback still goes through.
    assert status_of(await client.get(KHALTI_CALLBACK, params=params)) == "COMPLETED"
    await credited_once(client, token, intent_id, "300.00")


async def test_khalti_amount_mismatch_is_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "khalti", "400.00")
    pidx = khalti_pidx(intent)
    params = gateways.khalti.pay(pidx, total_amount=1000)  # Khalti's record: 10 NPR paid
    refused(await client.get(KHALTI_CALLBACK, params=params))
    refused(await verify(client, token, intent["intent_id"]))
    await not_credited(client, token)


async def test_khalti_cancelled_at_the_gateway(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "khalti", "100.00")
    params = gateways.khalti.cancel(khalti_pidx(intent))
    assert status_of(await client.get(KHALTI_CALLBACK, params=params)) == "CANCELLED"
    assert status_of(await verify(client, token, intent["intent_id"])) == "CANCELLED"
    await not_credited(client, token)


async def test_app_return_url_gets_the_browser_back(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, system: Any
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "khalti", "100.00")
    params = gateways.khalti.pay(khalti_pidx(intent))
    with overridden(system.services.settings, app_return_url="chargeghar://wallet/topup"):
        r = await client.get(KHALTI_CALLBACK, params=params)
    assert r.status_code == 303
    assert r.headers["location"] == (
        f"chargeghar://wallet/topup?intent_id={intent['intent_id']}&gateway=khalti&status=COMPLETED"
    )
    await credited_once(client, token, intent["intent_id"], "100.00")


async def test_unreachable_or_refusing_gateway_is_503(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, system: Any
) -> None:
    token = await new_user(api)
    settings = system.services.settings
    for override in (
        {"khalti_base_url": f"http://127.0.0.1:{free_port()}/api/v2"},
        {"khalti_secret_key": "wrong"},
    ):
        with overridden(settings, **override):
            r = await client.post(TOPUP, json={"amount": "100", "gateway": "khalti"}, headers=Api.auth(token))
        refused(r, 503, "payment_gateway_unavailable")
    with overridden(settings, stripe_secret_key=""):
        r = await client.post(TOPUP, json={"amount": "100", "gateway": "stripe"}, headers=Api.auth(token))
    refused(r, 503, "payment_gateway_unavailable")


# --- eSewa ----------------------------------------------------------------------------------------


async def test_esewa_topup_credits_once(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, base_url: str
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "esewa", "1500.00")
    intent_id, form = intent["intent_id"], intent["form"]
    assert form["action"] == gateways.esewa.form_url and form["method"] == "POST"
    fields = form["fields"]
    assert fields["transaction_uuid"] == intent_id and fields["total_amount"] == "1500.00"
    assert fields["signed_field_names"] == "total_amount,transaction_uuid,product_code"
    assert fields["success_url"] == f"{base_url}/api/payments/esewa/success"
    assert (await submit_esewa_form(intent)).status_code == 200  # eSewa accepted our signature

    assert status_of(await verify(client, token, intent_id)) == "PENDING"
    before = await credits(client, "esewa")
    success = gateways.esewa.pay(intent_id, as_text=True)  # "1,500.0", as eSewa sometimes writes it
    for _ in range(3):
        assert status_of(await client.get(success)) == "COMPLETED"
    data = success.split("data=", 1)[1]
    assert status_of(await client.post("/api/payments/esewa/success", data={"data": data})) == "COMPLETED"
    r = await verify(client, token, intent_id, data=data)
    assert status_of(r) == "COMPLETED" and r.json()["data"]["balance"] == "1500.00"
    await credited_once(client, token, intent_id, "1500.00")
    assert await credits(client, "esewa") == before + 1
    assert {"product_code": "EPAYTEST", "total_amount": "1500.00", "transaction_uuid": intent_id} in (
        gateways.esewa.status_checks
    )


async def test_esewa_tampered_data_is_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "esewa", "200.00")
    intent_id = intent["intent_id"]
    # A form whose amount was changed after signing is refused by eSewa itself.
    tampered_form = {
        **intent,
        "form": {**intent["form"], "fields": {**intent["form"]["fields"], "total_amount": "2"}},
    }
    assert (await submit_esewa_form(tampered_form)).status_code == 400
    assert (await submit_esewa_form(intent)).status_code == 200
    success = gateways.esewa.pay(intent_id)
    genuine = decode_data(success.split("data=", 1)[1])
    unsigned = {k: v for k, v in genuine.items() if k != "signature"}
    failures = await signature_failures(client, "esewa")

    forgeries = [
        encode_data({**unsigned, "total_amount": 20000.0}, signature=genuine["signature"]),
        encode_data({**unsigned, "transaction_code": "FORGED"}, signature=genuine["signature"]),
        encode_data(unsigned, secret="not-the-merchant-secret"),
        encode_data({**unsigned, "signed_field_names": "transaction_code,signed_field_names"}),
        "not base64 at all!",
    ]
    for data in forgeries:
        refused(await client.get("/api/payments/esewa/success", params={"data": data}))
    refused(await client.get("/api/payments/esewa/success"))
    refused(await verify(client, token, intent_id, data=forgeries[0]))
    await not_credited(client, token)
    assert await signature_failures(client, "esewa") == failures + len(forgeries) + 2

    assert status_of(await client.get(success)) == "COMPLETED"
    await credited_once(client, token, intent_id, "200.00")


async def test_esewa_amount_mismatch_is_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "esewa", "500.00")
    assert (await submit_esewa_form(intent)).status_code == 200
    success = gateways.esewa.pay(intent["intent_id"], total_amount=Decimal("50.00"))
    refused(await client.get(success))
    assert status_of(await verify(client, token, intent["intent_id"])) == "PENDING"  # eSewa: NOT_FOUND at 500
    await not_credited(client, token)


async def test_esewa_failure_redirect_cancels(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "esewa", "120.00")
    assert (await submit_esewa_form(intent)).status_code == 200
    failure = gateways.esewa.fail(intent["intent_id"])
    assert f"intent_id={intent['intent_id']}" in failure
    assert status_of(await client.get(failure)) == "CANCELLED"
    assert status_of(await verify(client, token, intent["intent_id"])) == "CANCELLED"
    refused(await client.get("/api/payments/esewa/failure", params={"intent_id": "nope"}))
    await not_credited(client, token)


async def test_expired_intent_paid_later_is_still_credited(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, system: Any
) -> None:
    token = await new_user(api)
    with overridden(system.services.settings, topup_intent_ttl_s=0):
        intent = await start_topup(client, token, "esewa", "210.00")
    assert status_of(await verify(client, token, intent["intent_id"])) == "EXPIRED"
    # The user paid anyway (eSewa's page was still open): the money is theirs.
    assert (await submit_esewa_form(intent)).status_code == 200
    assert status_of(await client.get(gateways.esewa.pay(intent["intent_id"]))) == "COMPLETED"
    await credited_once(client, token, intent["intent_id"], "210.00")


# --- Stripe ---------------------------------------------------------------------------------------


async def test_stripe_topup_credits_once(client: httpx.AsyncClient, api: Api, gateways: Gateways) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "stripe", "750.50")
    intent_id, pi = intent["intent_id"], stripe_pi(intent)
    assert intent["redirect_url"] is None and intent["form"] is None
    _, headers, params = next(
        r for r in gateways.stripe.requests if r[2].get("metadata[intent_id]") == intent_id
    )
    assert headers["authorization"] == f"Bearer {gateways.stripe.secret_key}"
    assert headers["idempotency-key"] == f"topup:{intent_id}"
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert (params["amount"], params["currency"]) == ("75050", "npr")

    assert status_of(await verify(client, token, intent_id, payment_intent=pi)) == "PENDING"
    before = await credits(client, "stripe")
    payload, webhook_headers = gateways.stripe.webhook(gateways.stripe.succeed(pi))
    for _ in range(3):  # Stripe redelivers
        assert (
            status_of(await client.post(STRIPE_WEBHOOK, content=payload, headers=webhook_headers))
            == "COMPLETED"
        )
    r = await verify(client, token, intent_id, payment_intent=pi)
    assert status_of(r) == "COMPLETED" and r.json()["data"]["balance"] == "750.50"
    await credited_once(client, token, intent_id, "750.50")
    assert await credits(client, "stripe") == before + 1

    # Events that are not ours, or not about payments, are acknowledged and ignored.
    other = gateways.stripe.event("customer.created", pi)
    payload, webhook_headers = gateways.stripe.webhook(other)
    r = await client.post(STRIPE_WEBHOOK, content=payload, headers=webhook_headers)
    assert r.status_code == 200 and r.json()["data"] == {"received": True, "intent_id": None, "status": None}


async def test_stripe_bad_signatures_are_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "stripe", "600.00")
    event = gateways.stripe.succeed(stripe_pi(intent))
    payload, headers = gateways.stripe.webhook(event)
    failures = await signature_failures(client, "stripe")

    attempts = [
        (payload.replace(b'"amount_received": 60000', b'"amount_received": 6000000'), headers),
        gateways.stripe.webhook(event, secret="whsec_not_ours"),
        gateways.stripe.webhook(event, timestamp=int(time.time()) - 301),
        (payload, {"Content-Type": "application/json"}),
        (payload, {"Stripe-Signature": "t=abc,v1=00"}),
    ]
    for body, hdrs in attempts:
        refused(await client.post(STRIPE_WEBHOOK, content=body, headers=hdrs))
    await not_credited(client, token)
    assert await signature_failures(client, "stripe") == failures + len(attempts)

    assert status_of(await client.post(STRIPE_WEBHOOK, content=payload, headers=headers)) == "COMPLETED"
    await credited_once(client, token, intent["intent_id"], "600.00")


async def test_stripe_amount_mismatch_is_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "stripe", "800.00")
    event = gateways.stripe.succeed(stripe_pi(intent), amount_received=800)  # 8 NPR, not 800
    payload, headers = gateways.stripe.webhook(event)
    refused(await client.post(STRIPE_WEBHOOK, content=payload, headers=headers))
    refused(await verify(client, token, intent["intent_id"]))
    await not_credited(client, token)


async def test_stripe_cancel(client: httpx.AsyncClient, api: Api, gateways: Gateways) -> None:
    token = await new_user(api)
    intent = await start_topup(client, token, "stripe", "90.00")
    cancel = f"/api/payments/cancel/{intent['intent_id']}"
    assert status_of(await client.post(cancel, headers=Api.auth(token))) == "CANCELLED"
    assert gateways.stripe.intents[stripe_pi(intent)]["status"] == "canceled"
    assert status_of(await client.post(cancel, headers=Api.auth(token))) == "CANCELLED"  # idempotent
    await not_credited(client, token)

    # Paid before the cancel reached Stripe: the money is the user's, the cancel is refused.
    paid = await start_topup(client, token, "stripe", "95.00")
    gateways.stripe.succeed(stripe_pi(paid))
    refused(
        await client.post(f"/api/payments/cancel/{paid['intent_id']}", headers=Api.auth(token)),
        409,
        "invalid_state",
    )
    await credited_once(client, token, paid["intent_id"], "95.00")


# --- every gateway --------------------------------------------------------------------------------


@pytest.mark.parametrize("gateway", ["khalti", "esewa", "stripe"])
async def test_concurrent_confirmations_credit_once(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, gateway: str
) -> None:
    """Callbacks, verify and webhooks racing each other (and themselves): one credit."""
    token = await new_user(api)
    intent = await start_topup(client, token, gateway, "333.33")
    intent_id = intent["intent_id"]
    calls: list[Awaitable[httpx.Response]] = []
    if gateway == "khalti":
        params = gateways.khalti.pay(khalti_pidx(intent))
        calls += [client.get(KHALTI_CALLBACK, params=params) for _ in range(4)]
        calls += [verify(client, token, intent_id, pidx=khalti_pidx(intent)) for _ in range(4)]
    elif gateway == "esewa":
        assert (await submit_esewa_form(intent)).status_code == 200
        success = gateways.esewa.pay(intent_id)
        calls += [client.get(success) for _ in range(4)]
        calls += [verify(client, token, intent_id, data=success.split("data=", 1)[1]) for _ in range(4)]
    else:
        payload, headers = gateways.stripe.webhook(gateways.stripe.succeed(stripe_pi(intent)))
        calls += [client.post(STRIPE_WEBHOOK, content=payload, headers=headers) for _ in range(4)]
        calls += [verify(client, token, intent_id, payment_intent=stripe_pi(intent)) for _ in range(4)]
    before = await credits(client, gateway)
    responses = await asyncio.gather(*calls)
    assert [status_of(r) for r in responses] == ["COMPLETED"] * len(calls)
    await credited_once(client, token, intent_id, "333.33")
    assert await credits(client, gateway) == before + 1


@pytest.mark.parametrize("gateway", ["khalti", "esewa", "stripe"])
async def test_only_the_owner_may_verify_or_cancel(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, gateway: str
) -> None:
    owner, other = await new_user(api), await new_user(api)
    intent = await start_topup(client, owner, gateway, "150.00")
    refused(await verify(client, other, intent["intent_id"]), 403, "forbidden")
    refused(
        await client.post(f"/api/payments/cancel/{intent['intent_id']}", headers=Api.auth(other)),
        403,
        "forbidden",
    )
    refused(await verify(client, other, str(uuid.uuid4())), 404, "not_found")
    r = await client.post(VERIFY, json={"intent_id": intent["intent_id"]})
    refused(r, 401, "unauthorized")
    assert status_of(
        await client.post(f"/api/payments/cancel/{intent['intent_id']}", headers=Api.auth(owner))
    ) == ("CANCELLED")


@pytest.mark.parametrize(
    ("amount", "status"),
    [
        ("0", 400),
        ("-5.00", 400),
        (0, 400),
        ("10.005", 400),
        (10.999, 400),
        ("9.99", 400),  # below the minimum
        ("50000.01", 400),  # above the maximum
        ("1e100", 400),
        ("abc", 422),
        ("NaN", 422),
        (None, 422),
    ],
)
async def test_bad_amounts_are_refused(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, amount: Any, status: int
) -> None:
    token = await new_user(api)
    r = await client.post(TOPUP, json={"amount": amount, "gateway": "esewa"}, headers=Api.auth(token))
    refused(r, status)


async def test_unknown_gateway_is_refused(client: httpx.AsyncClient, api: Api, gateways: Gateways) -> None:
    token = await new_user(api)
    r = await client.post(TOPUP, json={"amount": "100", "gateway": "paypal"}, headers=Api.auth(token))
    refused(r, 422)


async def test_ledger_balances_and_every_completed_topup_has_one_credit(
    system: Any, gateways: Gateways
) -> None:
    from sqlalchemy import and_, exists, func, not_, or_, select

    from domain import wallet
    from storage.models import EntryType, LedgerEntry
    from storage.payment_models import IntentStatus, PaymentIntent

    async with system.services.db.transaction() as session:
        assert await wallet.ledger_imbalance(session) == 0
        credited = exists().where(
            and_(
                LedgerEntry.reference == func.concat("topup:", PaymentIntent.id),
                LedgerEntry.type == EntryType.TOPUP,
                LedgerEntry.amount > 0,
            )
        )
        completed = PaymentIntent.status == IntentStatus.COMPLETED
        inconsistent = await session.scalar(
            select(func.count())
            .select_from(PaymentIntent)
            .where(or_(and_(completed, not_(credited)), and_(not_(completed), credited)))
        )
        assert inconsistent == 0
        assert await session.scalar(select(func.count()).select_from(PaymentIntent).where(completed)) >= 10


async def test_idempotency_key_on_topup_intent_and_verify(
    client: httpx.AsyncClient, api: Api, gateways: Gateways
) -> None:
    """A retried top-up-intent with the same key gets the same intent back, never a second one."""
    token = await new_user(api)
    headers = {**Api.auth(token), "Idempotency-Key": "topup-retry-1"}
    body = {"amount": 100, "gateway": "khalti"}
    first = await client.post(TOPUP, json=body, headers=headers)
    again = await client.post(TOPUP, json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers.get("Idempotent-Replayed") == "true"
    other = await client.post(TOPUP, json={**body, "amount": 200}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    intent = first.json()["data"]
    gateways.khalti.pay(khalti_pidx(intent))
    verify_headers = {**Api.auth(token), "Idempotency-Key": "verify-retry-1"}
    payload = {"intent_id": intent["intent_id"], "pidx": khalti_pidx(intent)}
    answers = [await client.post(VERIFY, json=payload, headers=verify_headers) for _ in range(2)]
    assert [status_of(r) for r in answers] == ["COMPLETED", "COMPLETED"]
    assert answers[1].headers.get("Idempotent-Replayed") == "true"
    await credited_once(client, token, intent["intent_id"], "100.00")


async def test_paid_topups_nobody_verified_are_credited_once_by_the_reconcile_job(
    client: httpx.AsyncClient, api: Api, gateways: Gateways, system: Any
) -> None:
    """Issue 10, item 7: Khalti and eSewa have no webhook; a user who paid and never came back to the app
    was never credited, and PENDING intents never expired."""
    from actors.jobs import JOBS, reconcile_topups
    from domain.payments import reconcile
    from storage.payment_models import PaymentIntent

    assert JOBS["reconcile_topups"].run is reconcile_topups
    khalti_user, esewa_user, unpaid_user = await new_user(api), await new_user(api), await new_user(api)
    khalti_intent = await start_topup(client, khalti_user, "khalti", 250)
    esewa_intent = await start_topup(client, esewa_user, "esewa", "1500.00")
    unpaid = await start_topup(client, unpaid_user, "khalti", 100)
    gateways.khalti.pay(khalti_pidx(khalti_intent))  # paid at the gateway; the app never calls back
    assert (await submit_esewa_form(esewa_intent)).status_code == 200  # the browser posts eSewa's form
    gateways.esewa.pay(esewa_intent["intent_id"])
    ids = [uuid.UUID(i["intent_id"]) for i in (khalti_intent, esewa_intent, unpaid)]
    db, settings = system.services.db, system.services.settings

    async def age(intent_ids: list[uuid.UUID], seconds: float) -> None:
        async with db.transaction() as session:
            await session.execute(
                update(PaymentIntent)
                .where(PaymentIntent.id.in_(intent_ids))
                .values(created_at=func.now() - timedelta(seconds=seconds), next_check_at=None)
            )

    credited_before = await metric(
        client, "powerbank_topups_reconciled_total", gateway="khalti", result="credited"
    )
    assert (await reconcile.reconcile(db, settings, now=datetime.now(UTC))).results.get("credited", 0) == 0
    await age(ids, settings.topup_reconcile_first_s + 5)  # the first check is due
    first = await reconcile.reconcile(db, settings, now=datetime.now(UTC))
    assert first.results.get("credited") == 2 and first.results.get("pending", 0) >= 1, first.results
    await credited_once(client, khalti_user, str(ids[0]), "250.00")
    await credited_once(client, esewa_user, str(ids[1]), "1500.00")
    await not_credited(client, unpaid_user)
    again = await reconcile.reconcile(db, settings, now=datetime.now(UTC))  # the next check is not due yet
    assert again.results.get("credited", 0) == 0
    await credited_once(client, khalti_user, str(ids[0]), "250.00")
    credited_now = await metric(
        client, "powerbank_topups_reconciled_total", gateway="khalti", result="credited"
    )
    assert credited_now == credited_before + 1

    await age([ids[2]], settings.topup_reconcile_for_s + 60)  # a day later, still unpaid
    last = await reconcile.reconcile(db, settings, now=datetime.now(UTC))
    assert last.results.get("expired", 0) >= 1, last.results
    async with db.transaction() as session:
        row = await session.get(PaymentIntent, ids[2])
        assert row is not None and (row.status.value, row.failure_reason) == ("EXPIRED", "unpaid_after_24h")
    await not_credited(client, unpaid_user)
