"""Contract tests, one per path this work added (mobile-api.md): status codes, the envelope, field names."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from domain import wallet
from domain.pricing import LateFeeRule
from storage.models import EntryType, PaymentModel
from tests import rental_support as rs
from tests.support import every_result

pytestmark = pytest.mark.integration

RENTAL = {
    "id",
    "rental_code",
    "status",
    "payment_status",
    "station_sn",
    "return_station_sn",
    "slot_number",
    "powerbank_sn",
    "package",
    "started_at",
    "due_at",
    "ended_at",
    "amount_paid",
    "overdue_amount",
    "start_battery_level",
    "return_battery_level",
}
PACKAGE = {"id", "name", "description", "duration_minutes", "price", "package_type", "payment_model"}
REFUND = {
    "id",
    "rental_id",
    "amount",
    "reason",
    "status",
    "review_reason",
    "requested_at",
    "reviewed_at",
    "processed_at",
}
PAGE = {"results", "count", "page", "page_size"}


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"success", "message", "data"} and body["success"] is True
    return body["data"]


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"success", "error"} and body["success"] is False
    error: dict[str, Any] = body["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "details", "context"}
    return error


def _money(value: str) -> None:
    assert isinstance(value, str) and Decimal(value) == Decimal(value).quantize(Decimal("0.01"))
    assert value.count(".") == 1 and len(value.split(".")[1]) == 2


def _rental(data: dict[str, Any]) -> None:
    assert set(data) == RENTAL
    assert PACKAGE <= set(data["package"])
    _money(data["amount_paid"])
    _money(data["overdue_amount"])


def _op(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _active(system: Any, balance: int = 500, **package: Any) -> tuple[rs.Customer, uuid.UUID, str, str]:
    user = await rs.customer(system, balance)
    pkg = await rs.package(system, **package)
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=1)
    )
    return user, rental_id, bank, station_sn


async def test_unauthenticated_and_malformed_requests(client: httpx.AsyncClient) -> None:
    some = uuid.uuid4()
    for method, path in [
        ("POST", f"/api/rentals/{some}/cancel"),
        ("POST", f"/api/rentals/{some}/extend"),
        ("POST", f"/api/rentals/{some}/pay-due"),
        ("GET", "/api/rentals/stats"),
        ("POST", f"/api/rentals/{some}/issues"),
        ("GET", f"/api/rentals/{some}/receipt"),
        ("GET", "/api/payments/refunds"),
        ("POST", "/api/payments/refunds"),
        ("GET", "/api/admin/packages"),
        ("GET", "/api/admin/refunds"),
        ("GET", "/api/admin/late-fee-configs"),
    ]:
        _error(await client.request(method, path), 401, "unauthorized")


async def test_post_rentals_id_cancel(client: httpx.AsyncClient, system: Any) -> None:
    user, rental_id, bank, station_sn = await _active(system)
    await rs.give_back(system, bank, station_sn, at=rs.now())
    data = _ok(
        await client.post(f"/api/rentals/{rental_id}/cancel", json={"reason": "mistake"}, headers=user.auth)
    )
    _rental(data)
    assert (data["status"], data["payment_status"]) == ("CANCELLED", "REFUNDED")
    _error(await client.post(f"/api/rentals/{rental_id}/cancel", headers=user.auth), 409, "invalid_state")
    _error(await client.post(f"/api/rentals/{uuid.uuid4()}/cancel", headers=user.auth), 404, "not_found")
    _error(await client.post("/api/rentals/not-a-uuid/cancel", headers=user.auth), 422, "validation_error")


async def test_post_rentals_id_extend(client: httpx.AsyncClient, system: Any) -> None:
    user, rental_id, _, _ = await _active(system)
    pkg = await rs.package(system, price="30.00", minutes=30)
    data = _ok(
        await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=user.auth)
    )
    assert set(data) == {
        "id",
        "package_name",
        "extended_minutes",
        "extension_cost",
        "extended_at",
        "due_at",
        "extensions_used",
        "extensions_left",
        "rental",
    }
    assert (data["extended_minutes"], data["extension_cost"], data["extensions_left"]) == (30, "30.00", 2)
    _rental(data["rental"])
    assert data["rental"]["due_at"] == data["due_at"]
    _error(
        await client.post(f"/api/rentals/{rental_id}/extend", json={}, headers=user.auth),
        422,
        "validation_error",
    )
    other = await rs.customer(system, 500)
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=other.auth)
    _error(r, 404, "not_found")


async def test_post_rentals_id_pay_due(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 60)
    pkg = await rs.package(system, price="60.00", minutes=60)
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=90)
    )
    await rs.give_back(system, bank, station_sn, at=rs.now(), rule=LateFeeRule.flat(Decimal("50")))
    error = _error(
        await client.post(f"/api/rentals/{rental_id}/pay-due", headers=user.auth), 402, "insufficient_balance"
    )
    assert error["context"] == {"required": "50.00", "balance": "0.00", "currency": "NPR"}
    async with system.services.db.transaction() as session:
        await wallet.credit(
            session,
            user_id=user.id,
            amount=Decimal("100"),
            type=EntryType.TOPUP,
            reference=f"c:{uuid.uuid4()}",
        )
    headers = {**user.auth, "Idempotency-Key": f"due-{uuid.uuid4()}"}
    first = await client.post(f"/api/rentals/{rental_id}/pay-due", headers=headers)
    data = _ok(first)
    assert set(data) == {
        "rental_id",
        "amount_paid",
        "balance",
        "transaction_ids",
        "rental_status",
        "payment_status",
        "rental",
    }
    assert (data["amount_paid"], data["balance"], data["payment_status"]) == ("50.00", "50.00", "PAID")
    _rental(data["rental"])
    replay = await client.post(f"/api/rentals/{rental_id}/pay-due", headers=headers)
    assert replay.json() == first.json() and replay.headers["Idempotent-Replayed"] == "true"
    _error(await client.post(f"/api/rentals/{rental_id}/pay-due", headers=user.auth), 409, "invalid_state")


async def test_get_rentals_stats(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 0)
    data = _ok(await client.get("/api/rentals/stats", headers=user.auth))
    assert data == {
        "total_rentals": 0,
        "completed_rentals": 0,
        "active_rentals": 0,
        "cancelled_rentals": 0,
        "total_spent": "0.00",
        "total_time_used": 0,
        "average_rental_duration": 0.0,
        "timely_returns": 0,
        "late_returns": 0,
        "timely_return_rate": 0.0,
        "favorite_station": None,
        "favorite_package": None,
        "first_rental_date": None,
        "last_rental_date": None,
    }


async def test_post_rentals_id_issues(client: httpx.AsyncClient, system: Any) -> None:
    user, rental_id, _, _ = await _active(system)
    body = {"issue_type": "CHARGING_ISSUE", "description": "  does not charge my phone  "}
    data = _ok(await client.post(f"/api/rentals/{rental_id}/issues", json=body, headers=user.auth), 201)
    assert set(data) == {
        "id",
        "rental_id",
        "rental_code",
        "issue_type",
        "description",
        "status",
        "reported_at",
        "resolved_at",
    }
    assert (data["issue_type"], data["description"], data["status"]) == (
        "CHARGING_ISSUE",
        "does not charge my phone",
        "REPORTED",
    )
    for issue_type in ("POWER_BANK_DAMAGED", "POWER_BANK_LOST", "RETURN_ISSUE"):
        r = await client.post(
            f"/api/rentals/{rental_id}/issues", json={"issue_type": issue_type}, headers=user.auth
        )
        _ok(r, 201)
    bad = {"issue_type": "ON_FIRE", "description": "x"}
    _error(
        await client.post(f"/api/rentals/{rental_id}/issues", json=bad, headers=user.auth),
        422,
        "validation_error",
    )
    too_long = {"issue_type": "CHARGING_ISSUE", "description": "x" * 1001}
    r = await client.post(f"/api/rentals/{rental_id}/issues", json=too_long, headers=user.auth)
    _error(r, 422, "validation_error")
    other = await rs.customer(system)
    _error(
        await client.post(f"/api/rentals/{rental_id}/issues", json=body, headers=other.auth), 404, "not_found"
    )


async def test_get_rentals_id_receipt(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60, deposit="100.00")
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=90)
    )
    running = _ok(await client.get(f"/api/rentals/{rental_id}/receipt", headers=user.auth))
    assert running["deposit"] == {"held": "100.00", "captured": "0.00", "released": "0.00"}
    await rs.give_back(system, bank, station_sn, at=rs.now(), rule=LateFeeRule.flat(Decimal("50")))
    data = _ok(await client.get(f"/api/rentals/{rental_id}/receipt", headers=user.auth))
    assert set(data) == {
        "rental_id",
        "rental_code",
        "status",
        "payment_status",
        "currency",
        "started_at",
        "ended_at",
        "lines",
        "prices_include_tax",
        "subtotal",
        "service_charge_rate",
        "service_charge",
        "vat_rate",
        "vat",
        "total",
        "amount_paid",
        "amount_due",
        "deposit",
        "issued_at",
    }
    assert [(x["kind"], x["amount"], x["paid"]) for x in data["lines"]] == [
        ("PACKAGE", "60.00", "60.00"),
        ("LATE_FEE", "50.00", "50.00"),
    ]
    assert all(set(x) == {"kind", "description", "amount", "paid"} for x in data["lines"])
    assert (data["vat_rate"], data["service_charge_rate"], data["prices_include_tax"]) == (
        "0.13",
        "0.025",
        True,
    )
    assert (data["total"], data["amount_paid"], data["amount_due"], data["currency"]) == (
        "110.00",
        "110.00",
        "0.00",
        "NPR",
    )
    total = Decimal(data["subtotal"]) + Decimal(data["service_charge"]) + Decimal(data["vat"])
    assert total == Decimal(data["total"])
    assert data["deposit"] == {"held": "0.00", "captured": "0.00", "released": "100.00"}
    other = await rs.customer(system)
    _error(await client.get(f"/api/rentals/{rental_id}/receipt", headers=other.auth), 404, "not_found")


async def test_get_rentals_packages_shows_the_deposit(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system)
    data = _ok(await client.get("/api/rentals/packages", headers=user.auth))
    assert isinstance(data, list) and data
    assert all(set(p) == PACKAGE | {"deposit_amount"} for p in data)


async def test_post_and_get_payments_refunds(client: httpx.AsyncClient, system: Any) -> None:
    user, rental_id, bank, station_sn = await _active(system)
    await rs.give_back(system, bank, station_sn, at=rs.now())
    body = {"rental_id": str(rental_id), "amount": 12.5, "reason": "slow charging"}
    data = _ok(await client.post("/api/payments/refunds", json=body, headers=user.auth), 201)
    assert set(data) == REFUND and data["amount"] == "12.50" and data["status"] == "REQUESTED"
    page = _ok(await client.get("/api/payments/refunds?page=1&page_size=5", headers=user.auth))
    assert set(page) == PAGE and (page["count"], page["page"], page["page_size"]) == (1, 1, 5)
    assert set(page["results"][0]) == REFUND
    _error(
        await client.post("/api/payments/refunds", json={"amount": "1"}, headers=user.auth),
        422,
        "validation_error",
    )
    r = await client.get("/api/payments/refunds?page_size=101", headers=user.auth)
    _error(r, 422, "validation_error")


async def test_admin_refunds_list_approve_reject(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    ids = []
    for _ in range(2):
        user, rental_id, bank, station_sn = await _active(system)
        await rs.give_back(system, bank, station_sn, at=rs.now())
        body = {"rental_id": str(rental_id), "amount": "10.00", "reason": "r"}
        ids.append(_ok(await client.post("/api/payments/refunds", json=body, headers=user.auth), 201)["id"])
    page = _ok(
        await client.get("/api/admin/refunds?status=REQUESTED&page_size=100", headers=_op(operator_token))
    )
    assert set(page) == PAGE
    queue = await every_result(client, "/api/admin/refunds?status=REQUESTED", _op(operator_token))
    assert set(ids) <= {x["id"] for x in queue}
    assert all(set(x) == REFUND | {"user_id", "reviewed_by"} for x in page["results"])
    _error(
        await client.get("/api/admin/refunds?status=NOPE", headers=_op(operator_token)),
        422,
        "validation_error",
    )
    approved = _ok(
        await client.post(
            f"/api/admin/refunds/{ids[0]}/approve", json={"reason": "ok"}, headers=_op(operator_token)
        )
    )
    assert approved["status"] == "PROCESSED" and approved["reviewed_by"]
    rejected = _ok(
        await client.post(
            f"/api/admin/refunds/{ids[1]}/reject", json={"reason": "no"}, headers=_op(operator_token)
        )
    )
    assert (rejected["status"], rejected["review_reason"]) == ("REJECTED", "no")
    r = await client.post(
        f"/api/admin/refunds/{ids[1]}/approve", json={"reason": "ok"}, headers=_op(operator_token)
    )
    _error(r, 409, "invalid_state")
    r = await client.post(
        f"/api/admin/refunds/{uuid.uuid4()}/reject", json={"reason": "x"}, headers=_op(operator_token)
    )
    _error(r, 404, "not_found")


async def test_admin_packages_get_post_patch(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    body = {
        "name": "Trial",
        "description": "one minute",
        "duration_minutes": 1,
        "price": "5",
        "package_type": "HOURLY",
        "payment_model": "POSTPAID",
        "deposit_amount": "20.00",
    }
    created = _ok(await client.post("/api/admin/packages", json=body, headers=_op(operator_token)), 201)
    assert set(created) == PACKAGE | {"deposit_amount", "is_active"}
    assert (created["price"], created["deposit_amount"], created["is_active"]) == ("5.00", "20.00", True)
    listed = _ok(await client.get("/api/admin/packages", headers=_op(operator_token)))
    assert created["id"] in {p["id"] for p in listed}
    patch = {"price": 7.5, "is_active": False}
    patched = _ok(
        await client.patch(f"/api/admin/packages/{created['id']}", json=patch, headers=_op(operator_token))
    )
    assert (patched["price"], patched["is_active"], patched["name"]) == ("7.50", False, "Trial")
    user = await rs.customer(system)
    app_list = _ok(await client.get("/api/rentals/packages", headers=user.auth))
    assert created["id"] not in {p["id"] for p in app_list}  # inactive: not offered
    r = await client.post(
        "/api/admin/packages", json={**body, "duration_minutes": 0}, headers=_op(operator_token)
    )
    _error(r, 422, "validation_error")
    r = await client.post("/api/admin/packages", json={**body, "price": "-1"}, headers=_op(operator_token))
    _error(r, 422, "validation_error")
    _error(
        await client.patch("/api/admin/packages/999999", json=patch, headers=_op(operator_token)),
        404,
        "not_found",
    )
    _error(await client.get("/api/admin/packages", headers=user.auth), 403, "forbidden")
    _error(await client.post("/api/admin/packages", json=body, headers=user.auth), 403, "forbidden")


async def test_admin_late_fee_configs(client: httpx.AsyncClient, operator_token: str) -> None:
    headers = _op(operator_token)
    listed = _ok(await client.get("/api/admin/late-fee-configs", headers=headers))
    fields = {
        "id",
        "name",
        "fee_type",
        "multiplier",
        "flat_rate_per_hour",
        "grace_period_minutes",
        "max_daily_rate",
        "is_active",
        "created_at",
    }
    assert all(set(c) == fields for c in listed) and sum(c["is_active"] for c in listed) == 1
    active = next(c for c in listed if c["is_active"])
    body = {
        "name": "Weekend",
        "fee_type": "COMPOUND",
        "multiplier": "1.5",
        "flat_rate_per_hour": "10",
        "max_daily_rate": "400",
    }
    created = _ok(await client.post("/api/admin/late-fee-configs", json=body, headers=headers), 201)
    assert (created["is_active"], created["multiplier"], created["max_daily_rate"]) == (
        False,
        "1.50",
        "400.00",
    )
    bad = {"name": "Nothing", "fee_type": "FLAT_RATE", "flat_rate_per_hour": "0"}
    _error(
        await client.post("/api/admin/late-fee-configs", json=bad, headers=headers), 400, "validation_error"
    )
    on = _ok(await client.post(f"/api/admin/late-fee-configs/{created['id']}/activate", headers=headers))
    assert on["is_active"] is True
    back = _ok(await client.post(f"/api/admin/late-fee-configs/{active['id']}/activate", headers=headers))
    assert back["is_active"] is True
    listed = _ok(await client.get("/api/admin/late-fee-configs", headers=headers))
    assert [c["id"] for c in listed if c["is_active"]] == [active["id"]]
    _error(
        await client.post("/api/admin/late-fee-configs/999999/activate", headers=headers), 404, "not_found"
    )


async def test_postpaid_package_over_the_contract(client: httpx.AsyncClient, system: Any) -> None:
    """POSTPAID rentals show PENDING until their return bills them."""
    user, rental_id, _, _ = await _active(system, model=PaymentModel.POSTPAID)
    active = _ok(await client.get("/api/rentals/active", headers=user.auth))
    _rental(active)
    assert (active["id"], active["payment_status"], active["amount_paid"]) == (
        str(rental_id),
        "PENDING",
        "0.00",
    )


async def test_start_active_history_balance_and_transactions_over_the_contract(
    client: httpx.AsyncClient, api: Any, operator_token: str
) -> None:
    """The paths the walking skeleton built, checked field by field against mobile-api.md."""
    from tests.support import funded_user, rent, start_cabinet, wait_ready

    cabinet = await start_cabinet(client, operator_token)
    try:
        user = await funded_user(client, api, operator_token)
        auth = _op(user["access"])
        await wait_ready(client, user["access"], cabinet.sn)
        packages = _ok(await client.get("/api/rentals/packages", headers=auth))
        assert isinstance(packages, list) and all(PACKAGE <= set(p) for p in packages)
        started = _ok(await rent(client, user["access"], cabinet.sn), 201)
        _rental(started)
        assert started["status"] == "ACTIVE" and started["station_sn"] == cabinet.sn
        active = _ok(await client.get("/api/rentals/active", headers=auth))
        _rental(active)
        assert active["id"] == started["id"]
        _error(await rent(client, user["access"], cabinet.sn), 409, "active_rental_exists")
        history = _ok(await client.get("/api/rentals/history?page=1&page_size=5", headers=auth))
        assert set(history) == PAGE and history["page_size"] == 5 and history["count"] == 1
        _rental(history["results"][0])
        _error(await client.get("/api/rentals/history?page_size=101", headers=auth), 422, "validation_error")
        balance = _ok(await client.get("/api/payments/wallet/balance", headers=auth))
        assert set(balance) == {"balance", "currency", "held"} and balance["currency"] == "NPR"
        _money(balance["balance"])
        _money(balance["held"])
        entries = _ok(await client.get("/api/payments/transactions", headers=auth))
        assert set(entries) == PAGE
        for entry in entries["results"]:
            assert set(entry) == {"id", "type", "amount", "balance_after", "reference", "created_at"}
            _money(entry["amount"])
            _money(entry["balance_after"])
        assert [e["type"] for e in entries["results"]] == ["RENTAL_CHARGE", "TOPUP"]
        assert entries["results"][0]["amount"].startswith("-")
    finally:
        await cabinet.stop()
