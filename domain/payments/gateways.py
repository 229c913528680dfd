"""Which top-up gateways are live, decided from the settings alone.

A gateway is off until it is configured (its secret key, and for eSewa its merchant code). Sandbox
endpoints and test credentials (Khalti's dev server and `test_` keys, eSewa's UAT site, `EPAYTEST` and
its published secret, Stripe's `sk_test_` keys) let anyone "pay" with a public test account, so they are
refused unless `PAYMENTS_SANDBOX` is on: a gateway configured that way stays off, and `powerbank up`
says so. Every use of a gateway (opening a top-up, a callback, a status check) asks `require` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from config.settings import Settings
from domain.payments.errors import GatewayUnavailable
from storage.payment_models import Gateway

SANDBOX_HOSTS = frozenset(
    {"dev.khalti.com", "a.khalti.com", "rc-epay.esewa.com.np", "rc.esewa.com.np", "uat.esewa.com.np"}
)
ESEWA_TEST_PRODUCT_CODES = frozenset({"EPAYTEST"})
ESEWA_UAT_SECRET = "8gBm/:&EnhH.1/q"  # published in eSewa's developer guide
TEST_KEY_PREFIXES = {Gateway.KHALTI: ("test_",), Gateway.STRIPE: ("sk_test_", "rk_test_")}


@dataclass(frozen=True)
class GatewayState:
    gateway: Gateway
    live: bool
    why: str  # "live", "sandbox", or why it is off


def _sandbox_marks(settings: Settings, gateway: Gateway) -> list[str]:
    """What in this gateway's settings belongs to a test environment."""
    match gateway:
        case Gateway.KHALTI:
            urls, key = [settings.khalti_base_url], settings.khalti_secret_key
        case Gateway.ESEWA:
            urls, key = [settings.esewa_base_url, settings.esewa_form_url], settings.esewa_secret_key
        case Gateway.STRIPE:
            urls, key = [settings.stripe_base_url], settings.stripe_secret_key
    hosts = [urlsplit(url).hostname for url in urls]
    marks = [f"test endpoint {host}" for host in hosts if host in SANDBOX_HOSTS]
    if key.startswith(TEST_KEY_PREFIXES.get(gateway, ())):
        marks.append("a test secret key")
    if gateway == Gateway.ESEWA:
        if settings.esewa_product_code in ESEWA_TEST_PRODUCT_CODES:
            marks.append(f"test merchant code {settings.esewa_product_code}")
        if key == ESEWA_UAT_SECRET:
            marks.append("eSewa's published UAT secret")
    return marks


def _configured(settings: Settings, gateway: Gateway) -> bool:
    match gateway:
        case Gateway.KHALTI:
            return bool(settings.khalti_secret_key)
        case Gateway.ESEWA:
            return bool(settings.esewa_secret_key and settings.esewa_product_code)
        case Gateway.STRIPE:
            return bool(settings.stripe_secret_key)


def state(settings: Settings, gateway: Gateway) -> GatewayState:
    if not _configured(settings, gateway):
        return GatewayState(gateway, False, "off: not configured")
    marks = _sandbox_marks(settings, gateway)
    if not marks:
        return GatewayState(gateway, True, "live")
    if settings.payments_sandbox:
        return GatewayState(gateway, True, "sandbox")
    return GatewayState(gateway, False, f"off: {', '.join(marks)} without PAYMENTS_SANDBOX")


def states(settings: Settings) -> list[GatewayState]:
    return [state(settings, gateway) for gateway in Gateway]


def require(settings: Settings, gateway: Gateway) -> None:
    """Refuse (503 `payment_gateway_unavailable`) any use of a gateway that is off."""
    current = state(settings, gateway)
    if not current.live:
        raise GatewayUnavailable(
            f"{gateway.value.capitalize()} top-ups are not available.",
            context={"gateway": gateway.value},
        )
