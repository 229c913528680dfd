"""The gateway protocols' pure parts: signatures, amounts, status mapping (no servers, no database)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from decimal import Decimal
from typing import Any

import pytest

from config import Settings
from domain.errors import ValidationFailed
from domain.payments import esewa, khalti, stripe
from domain.payments.errors import PaymentSignatureInvalid
from domain.payments.outcomes import Paid, Unpaid
from domain.payments.service import checked_amount
from storage.payment_models import IntentStatus

UAT_SECRET = "8gBm/:&EnhH.1/q"


def test_esewa_request_signature_matches_the_documented_example() -> None:
    fields = {"total_amount": "110", "transaction_uuid": "241028", "product_code": "EPAYTEST"}
    assert esewa.sign(UAT_SECRET, fields, esewa.REQUEST_SIGNED_FIELDS) == (
        "i94zsd3oXF6ZsSr/kGqT4sSzYQzjj1W/waxjWyRwaME="
    )


def test_esewa_form_is_signed_over_its_own_fields() -> None:
    form = esewa.payment_form(
        form_url="https://rc-epay.esewa.com.np/api/epay/main/v2/form",
        product_code="EPAYTEST",
        secret=UAT_SECRET,
        amount=Decimal("100"),
        transaction_uuid="a1b2-c3",
        success_url="https://x/success",
        failure_url="https://x/failure?intent_id=a1b2-c3",
    )
    f = form.fields
    assert (f["amount"], f["total_amount"], f["tax_amount"]) == ("100.00", "100.00", "0")
    message = f"total_amount={f['total_amount']},transaction_uuid=a1b2-c3,product_code=EPAYTEST"
    expected = hmac.new(UAT_SECRET.encode(), message.encode(), hashlib.sha256).digest()
    assert f["signature"] == base64.b64encode(expected).decode()


def esewa_data(fields: dict[str, Any], raw_total: str, secret: str = UAT_SECRET) -> str:
    """A success `data` whose total_amount is written exactly as `raw_total` (JSON text)."""
    names = fields["signed_field_names"].split(",")
    text = {**{k: str(v) for k, v in fields.items()}, "total_amount": raw_total.strip('"')}
    message = ",".join(f"{n}={text.get(n, '')}" for n in names)
    signature = base64.b64encode(
        hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    ).decode()
    body = json.dumps({**fields, "total_amount": "@@", "signature": signature}).replace('"@@"', raw_total)
    return base64.b64encode(body.encode()).decode()


SUCCESS = {
    "transaction_code": "000AWEO",
    "status": "COMPLETE",
    "transaction_uuid": "250610-162413",
    "product_code": "EPAYTEST",
    "signed_field_names": ",".join(
        [
            "transaction_code",
            "status",
            "total_amount",
            "transaction_uuid",
            "product_code",
            "signed_field_names",
        ]
    ),
}


@pytest.mark.parametrize(
    ("raw", "amount"), [("1000.0", "1000.00"), ('"1,000.0"', "1000.00"), ("110", "110.00")]
)
def test_esewa_response_amounts_verify_as_written(raw: str, amount: str) -> None:
    response = esewa.decode_response(esewa_data(SUCCESS, raw), secret=UAT_SECRET)
    assert response.total_amount == Decimal(amount) and response.status == "COMPLETE"
    assert response.transaction_uuid == "250610-162413"


def test_esewa_response_survives_a_plus_decoded_as_space() -> None:
    for n in range(3):  # ">>>" encodes to "Pj4+" at one of three alignments
        data = esewa_data({**SUCCESS, "transaction_code": "T" * n + ">>>>"}, "10.0")
        if "+" in data:
            break
    assert "+" in data
    assert esewa.decode_response(data.replace("+", " "), secret=UAT_SECRET).status == "COMPLETE"


@pytest.mark.parametrize(
    "data",
    [
        esewa_data(SUCCESS, "1000.0", secret="another secret"),
        esewa_data({**SUCCESS, "signed_field_names": "transaction_code,signed_field_names"}, "1000.0"),
        esewa_data({**SUCCESS, "signed_field_names": SUCCESS["signed_field_names"] + ",extra"}, "1000.0"),
        base64.b64encode(b"[1, 2]").decode(),
        "%%%",
    ],
)
def test_esewa_response_forgeries_are_refused(data: str) -> None:
    with pytest.raises(PaymentSignatureInvalid):
        esewa.decode_response(data, secret=UAT_SECRET)


def test_esewa_response_with_a_changed_amount_is_refused() -> None:
    genuine = json.loads(base64.b64decode(esewa_data(SUCCESS, "1000.0")))
    genuine["total_amount"] = 10.0
    with pytest.raises(PaymentSignatureInvalid):
        esewa.decode_response(base64.b64encode(json.dumps(genuine).encode()).decode(), secret=UAT_SECRET)


def stripe_header(payload: bytes, secret: str, t: int) -> str:
    return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + payload, hashlib.sha256).hexdigest()}"


def test_stripe_webhook_signatures() -> None:
    payload, secret, now = b'{"id": "evt_1", "type": "payment_intent.succeeded"}', "whsec_x", time.time()
    good = stripe_header(payload, secret, int(now))
    assert stripe.verify_webhook(payload, good, secret=secret, tolerance_s=300, now=now)["id"] == "evt_1"
    rotated = f"{good},v1={'0' * 64},v0=ignored"  # several v1 during secret rotation: one must match
    assert stripe.verify_webhook(payload, rotated, secret=secret, tolerance_s=300, now=now)["id"] == "evt_1"
    refused = [
        (payload + b" ", good),
        (payload, stripe_header(payload, "whsec_other", int(now))),
        (payload, stripe_header(payload, secret, int(now) - 301)),
        (payload, stripe_header(payload, secret, int(now) + 301)),
        (payload, good.replace("v1=", "v0=")),
        (payload, None),
        (payload, "garbage"),
    ]
    for body, header in refused:
        with pytest.raises(PaymentSignatureInvalid):
            stripe.verify_webhook(body, header, secret=secret, tolerance_s=300, now=now)
    with pytest.raises(PaymentSignatureInvalid):
        stripe.verify_webhook(payload, good, secret="", tolerance_s=300, now=now)


def test_gateway_statuses_map_to_outcomes() -> None:
    lookup = khalti.Lookup(pidx="p", status="Completed", total_amount=25050, transaction_id="t")
    assert lookup.outcome() == Paid(amount=Decimal("250.50"), currency="NPR", transaction_id="t")
    for status, expected in [
        ("Pending", IntentStatus.PENDING),
        ("Initiated", IntentStatus.PENDING),
        ("User canceled", IntentStatus.CANCELLED),
        ("Expired", IntentStatus.EXPIRED),
        ("Refunded", IntentStatus.FAILED),
    ]:
        outcome = khalti.Lookup(pidx="p", status=status, total_amount=1000, transaction_id=None).outcome()
        assert isinstance(outcome, Unpaid) and outcome.status == expected
    assert esewa.Status(status="COMPLETE", total_amount=Decimal("5"), ref_id="R").outcome() == Paid(
        amount=Decimal("5"), currency="NPR", transaction_id="R"
    )
    canceled = esewa.Status(status="CANCELED", total_amount=Decimal("5"), ref_id=None).outcome()
    assert isinstance(canceled, Unpaid) and canceled.status == IntentStatus.CANCELLED
    pi = {"object": "payment_intent", "id": "pi_1", "amount": 1000, "currency": "npr", "status": "succeeded"}
    paid = stripe.PaymentIntent.parse({**pi, "amount_received": 1000, "latest_charge": "ch_1"}).outcome()
    assert paid == Paid(amount=Decimal("10.00"), currency="NPR", transaction_id="ch_1")
    pending = stripe.PaymentIntent.parse({**pi, "status": "requires_payment_method"}).outcome()
    assert isinstance(pending, Unpaid) and pending.status == IntentStatus.PENDING


@pytest.mark.parametrize(
    ("amount", "ok"),
    [
        ("10", True),
        ("10.5", True),
        ("10.500", True),
        ("50000.00", True),
        ("1E+2", True),
        ("9.99", False),
        ("0", False),
        ("-1", False),
        ("10.001", False),
        ("50000.01", False),
        ("1E+400", False),
        ("Infinity", False),
    ],
)
def test_topup_amounts(amount: str, ok: bool) -> None:
    settings = Settings()
    if ok:
        assert checked_amount(Decimal(amount), settings) == Decimal(amount).quantize(Decimal("0.01"))
    else:
        with pytest.raises(ValidationFailed):
            checked_amount(Decimal(amount), settings)
