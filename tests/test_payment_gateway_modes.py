"""Issue 10, item 1: every top-up gateway is off until configured, and sandbox endpoints or test
credentials are refused unless PAYMENTS_SANDBOX is on (eSewa's public test site used to be on by default:
anyone could "pay" there with the published test account and get real credit)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from config import Settings
from domain.payments import gateways
from storage.payment_models import Gateway
from tests.conftest import Api, new_phone

TOPUP = "/api/payments/wallet/topup-intent"
UAT_ESEWA = {
    "esewa_form_url": "https://rc-epay.esewa.com.np/api/epay/main/v2/form",
    "esewa_base_url": "https://rc.esewa.com.np",
    "esewa_product_code": "EPAYTEST",
    "esewa_secret_key": "8gBm/:&EnhH.1/q",
}


def _settings(**values: Any) -> Settings:
    return Settings().model_copy(update=values)


def test_every_gateway_is_off_on_defaults() -> None:
    assert [(g.gateway, g.live, g.why) for g in gateways.states(Settings())] == [
        (Gateway.KHALTI, False, "off: not configured"),
        (Gateway.ESEWA, False, "off: not configured"),
        (Gateway.STRIPE, False, "off: not configured"),
    ]


def test_esewa_test_environment_needs_the_sandbox_setting() -> None:
    off = gateways.state(_settings(**UAT_ESEWA), Gateway.ESEWA)
    assert not off.live
    assert "test endpoint rc.esewa.com.np" in off.why and "test merchant code EPAYTEST" in off.why
    assert "PAYMENTS_SANDBOX" in off.why
    # the test merchant code alone (production URLs) is refused too, and so is the published secret
    assert not gateways.state(
        _settings(esewa_product_code="EPAYTEST", esewa_secret_key="merchant-secret"), Gateway.ESEWA
    ).live
    assert not gateways.state(
        _settings(esewa_product_code="NP-ES-SHOP", esewa_secret_key="8gBm/:&EnhH.1/q"), Gateway.ESEWA
    ).live
    sandbox = gateways.state(_settings(**UAT_ESEWA, payments_sandbox=True), Gateway.ESEWA)
    assert (sandbox.live, sandbox.why) == (True, "sandbox")
    live = gateways.state(
        _settings(esewa_product_code="NP-ES-SHOP", esewa_secret_key="merchant-secret"), Gateway.ESEWA
    )
    assert (live.live, live.why) == (True, "live")


@pytest.mark.parametrize(
    ("values", "gateway"),
    [
        (
            {"khalti_secret_key": "live_secret_key_x", "khalti_base_url": "https://dev.khalti.com/api/v2"},
            Gateway.KHALTI,
        ),
        ({"khalti_secret_key": "test_secret_key_x"}, Gateway.KHALTI),
        ({"stripe_secret_key": "sk_test_x"}, Gateway.STRIPE),
    ],
)
def test_khalti_and_stripe_test_credentials_need_the_sandbox_setting(
    values: dict[str, str], gateway: Gateway
) -> None:
    assert not gateways.state(_settings(**values), gateway).live
    assert gateways.state(_settings(**values, payments_sandbox=True), gateway).why == "sandbox"


def test_production_khalti_and_stripe_keys_are_live() -> None:
    settings = _settings(khalti_secret_key="live_secret_key_x", stripe_secret_key="sk_live_x")
    assert gateways.state(settings, Gateway.KHALTI).why == "live"
    assert gateways.state(settings, Gateway.STRIPE).why == "live"


@pytest.mark.integration
@pytest.mark.parametrize("gateway", ["esewa", "khalti", "stripe"])
async def test_a_topup_through_a_gateway_that_is_off_is_refused_and_records_nothing(
    client: httpx.AsyncClient, api: Api, system: Any, gateway: str
) -> None:
    """The test system runs on defaults: no gateway configured. eSewa's form used to be handed out."""
    assert not gateways.state(system.services.settings, Gateway(gateway)).live
    token = (await api.login(new_phone()))["access"]
    r = await client.post(TOPUP, json={"amount": "100", "gateway": gateway}, headers=Api.auth(token))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "payment_gateway_unavailable"
    assert r.json()["error"]["context"] == {"gateway": gateway}
    history = await client.get("/api/payments/transactions", headers=Api.auth(token))
    assert history.status_code == 200 and history.json()["data"]["count"] == 0
