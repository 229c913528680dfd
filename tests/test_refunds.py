"""Refunds: REQUESTED → APPROVED/REJECTED by an operator → PROCESSED, money moving exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from domain import refunds
from domain.errors import DomainError
from storage.models import PaymentStatus
from storage.rental_models import RefundStatus
from tests import rental_support as rs
from tests.support import every_result

pytestmark = pytest.mark.integration
D = Decimal


def _op(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _completed(
    system: Any, user: rs.Customer, *, started_ago: timedelta = timedelta(minutes=30)
) -> uuid.UUID:
    """A PREPAID 60.00 rental, returned on time."""
    pkg = await rs.package(system, price="60.00", minutes=60)
    rental_id, bank, station_sn = await rs.started(system, user, package_id=pkg, at=rs.now() - started_ago)
    await rs.give_back(system, bank, station_sn, at=rs.now())
    return rental_id


async def _request(
    client: httpx.AsyncClient, user: rs.Customer, rental_id: uuid.UUID, amount: str
) -> httpx.Response:
    body = {"rental_id": str(rental_id), "amount": amount, "reason": "the bank did not charge my phone"}
    return await client.post("/api/payments/refunds", json=body, headers=user.auth)


async def test_requested_approved_processed_moves_money_once(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    r = await _request(client, user, rental_id, "20.00")
    assert r.status_code == 201, r.text
    refund = r.json()["data"]
    assert (refund["status"], refund["amount"], refund["processed_at"]) == ("REQUESTED", "20.00", None)
    mine = (await client.get("/api/payments/refunds", headers=user.auth)).json()["data"]
    assert [x["id"] for x in mine["results"]] == [refund["id"]]

    queue = await every_result(client, "/api/admin/refunds?status=REQUESTED", _op(operator_token))
    assert refund["id"] in {x["id"] for x in queue}
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve",
        json={"reason": "faulty bank"},
        headers=_op(operator_token),
    )
    assert r.status_code == 200, r.text
    done = r.json()["data"]
    assert (done["status"], done["review_reason"]) == ("PROCESSED", "faulty bank")
    assert done["reviewed_at"] and done["processed_at"]
    assert await rs.balance(system, user) == D("460.00")
    assert await rs.entries(system, user) == [
        ("TOPUP", D("500")),
        ("RENTAL_CHARGE", D("-60.00")),
        ("REFUND", D("20.00")),
    ]
    row = await rs.rental(system, rental_id)
    assert (row.amount_paid, row.payment_status) == (D("40.00"), PaymentStatus.PAID)

    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve", json={"reason": "again"}, headers=_op(operator_token)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
    async with system.services.db.transaction() as session:  # processing again is a no-op
        again = await refunds.process(session, refund_id=uuid.UUID(refund["id"]))
        assert again.status == RefundStatus.PROCESSED
    assert len(await rs.entries(system, user)) == 3
    receipt = (await client.get(f"/api/rentals/{rental_id}/receipt", headers=user.auth)).json()["data"]
    assert [(x["kind"], x["amount"]) for x in receipt["lines"]] == [
        ("PACKAGE", "60.00"),
        ("REFUND", "-20.00"),
    ]
    assert receipt["total"] == "40.00"
    assert await rs.sound_ledger(system) == 0


async def test_refunding_everything_paid_marks_the_rental_refunded(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    refund = (await _request(client, user, rental_id, "60")).json()["data"]
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve", json={"reason": "ok"}, headers=_op(operator_token)
    )
    assert r.status_code == 200, r.text
    row = await rs.rental(system, rental_id)
    assert (row.amount_paid, row.payment_status) == (D("0.00"), PaymentStatus.REFUNDED)
    r = await _request(client, user, rental_id, "0.01")
    assert r.status_code == 400 and r.json()["error"]["context"]["refundable"] == "0.00"


async def test_rejected_with_a_reason_moves_nothing(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    refund = (await _request(client, user, rental_id, "60.00")).json()["data"]
    r = await client.post(f"/api/admin/refunds/{refund['id']}/reject", json={}, headers=_op(operator_token))
    assert r.status_code == 422  # a rejection needs its reason
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/reject",
        json={"reason": "used for 30 minutes"},
        headers=_op(operator_token),
    )
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["status"], r.json()["data"]["review_reason"]) == (
        "REJECTED",
        "used for 30 minutes",
    )
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve", json={"reason": "x"}, headers=_op(operator_token)
    )
    assert r.status_code == 409
    assert await rs.balance(system, user) == D("440.00")
    assert (await _request(client, user, rental_id, "60.00")).status_code == 201  # asking again is allowed


async def test_refund_requests_that_are_refused(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    r = await _request(client, user, rental_id, "60.01")
    assert r.status_code == 400 and r.json()["error"]["context"] == {"amount": "60.01", "refundable": "60.00"}
    assert (await _request(client, user, rental_id, "10.00")).status_code == 201
    r = await _request(client, user, rental_id, "10.00")  # one under review at a time
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
    stranger = await rs.customer(system, 0)
    r = await _request(client, stranger, rental_id, "1.00")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await _request(client, user, rental_id, "0")
    assert r.status_code == 422
    running = await rs.customer(system, 500)
    running_id, *_ = await rs.started(system, running, package_id=await rs.package(system), at=rs.now())
    r = await _request(client, running, running_id, "10.00")
    assert r.status_code == 409 and r.json()["error"]["context"]["status"] == "ACTIVE"
    r = await client.post(
        f"/api/admin/refunds/{uuid.uuid4()}/approve", json={"reason": "x"}, headers=_op(operator_token)
    )
    assert r.status_code == 404
    listed = (await client.get("/api/payments/refunds", headers=user.auth)).json()["data"]
    assert listed["count"] == 1


async def test_only_operators_review(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    refund = (await _request(client, user, rental_id, "5.00")).json()["data"]
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve", json={"reason": "me"}, headers=user.auth
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (await client.get("/api/admin/refunds", headers=user.auth)).status_code == 403


async def test_concurrent_approvals_refund_once(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    refund = (await _request(client, user, rental_id, "30.00")).json()["data"]
    answers = await asyncio.gather(
        *(
            client.post(
                f"/api/admin/refunds/{refund['id']}/approve",
                json={"reason": "ok"},
                headers=_op(operator_token),
            )
            for _ in range(5)
        )
    )
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409, 409]
    assert [t for t, _ in await rs.entries(system, user)].count("REFUND") == 1
    assert await rs.balance(system, user) == D("470.00")
    assert await rs.sound_ledger(system) == 0


async def test_a_refund_asked_before_a_cancel_cannot_pay_twice(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    """A cancel in the window refunds by itself; a request made before it then has nothing to refund."""
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user, started_ago=timedelta(minutes=2))
    refund = (await _request(client, user, rental_id, "60.00")).json()["data"]
    r = await client.post(f"/api/rentals/{rental_id}/cancel", headers=user.auth)
    assert r.status_code == 200 and r.json()["data"]["status"] == "CANCELLED"
    r = await client.post(
        f"/api/admin/refunds/{refund['id']}/approve", json={"reason": "ok"}, headers=_op(operator_token)
    )
    assert r.status_code == 409
    assert await rs.balance(system, user) == D("500.00")
    assert [t for t, _ in await rs.entries(system, user)] == ["TOPUP", "RENTAL_CHARGE", "REFUND"]
    assert await rs.sound_ledger(system) == 0


async def test_refund_request_with_idempotency_key_is_made_once(
    client: httpx.AsyncClient, system: Any
) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    body = {"rental_id": str(rental_id), "amount": "15.00", "reason": "retry me"}
    headers = {**user.auth, "Idempotency-Key": f"refund-{uuid.uuid4()}"}
    first = await client.post("/api/payments/refunds", json=body, headers=headers)
    second = await client.post("/api/payments/refunds", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() and second.headers.get("Idempotent-Replayed") == "true"
    async with system.services.db.transaction() as session:
        _, count = await refunds.mine(session, user.id, page=1, page_size=10)
    assert count == 1


async def test_domain_refuses_a_second_open_request(system: Any) -> None:
    user = await rs.customer(system, 500)
    rental_id = await _completed(system, user)
    async with system.services.db.transaction() as session:
        await refunds.request(session, user_id=user.id, rental_id=rental_id, amount=D("5"), reason="a")
    with pytest.raises(DomainError):
        async with system.services.db.transaction() as session:
            await refunds.request(session, user_id=user.id, rental_id=rental_id, amount=D("5"), reason="b")
