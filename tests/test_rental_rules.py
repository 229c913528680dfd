"""Rental money rules: PREPAID at activation, POSTPAID per minute at return, the cancel window, the
extension limit, paying a due, deposits, and one wallet's operations serializing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from domain import rentals, wallet
from domain.errors import ActiveRentalExists, DomainError, InsufficientBalance
from domain.pricing import LateFeeRule
from storage.models import EntryType, PaymentModel, PaymentStatus, PowerBank, RentalStatus
from tests import rental_support as rs
from tests.conftest import Api
from tests.support import eventually, funded_user, rent, start_cabinet, wait_ready

pytestmark = pytest.mark.integration
D = Decimal
FLAT_50 = LateFeeRule.flat(D("50"))


async def _history_item(client: httpx.AsyncClient, token: str, rental_id: str) -> dict[str, Any]:
    results = (await client.get("/api/rentals/history", headers=Api.auth(token))).json()["data"]["results"]
    item: dict[str, Any] = next(r for r in results if r["id"] == rental_id)
    return item


async def _transactions(client: httpx.AsyncClient, token: str) -> list[tuple[str, Decimal]]:
    data = (await client.get("/api/payments/transactions", headers=Api.auth(token))).json()["data"]
    return [(e["type"], D(e["amount"])) for e in data["results"]]


# --- PREPAID / POSTPAID ----------------------------------------------------------------------------


async def test_prepaid_is_paid_at_activation_and_not_again_at_return(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    try:
        user = await funded_user(client, api, operator_token)
        token = user["access"]
        await wait_ready(client, token, cabinet.sn)
        await system.services.fleet.drained()  # the first snapshot has been reconciled
        r = await rent(client, token, cabinet.sn)
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        assert (rental["status"], rental["payment_status"], rental["amount_paid"]) == (
            "ACTIVE",
            "PAID",
            "50.00",
        )
        assert await _transactions(client, token) == [("RENTAL_CHARGE", D("-50.00")), ("TOPUP", D("500.00"))]

        await cabinet.return_powerbank(rental["powerbank_sn"])

        async def completed() -> dict[str, Any] | None:
            item = await _history_item(client, token, rental["id"])
            return item if item["status"] == "COMPLETED" else None

        done = await eventually(completed)
        assert (done["payment_status"], done["amount_paid"], done["overdue_amount"]) == (
            "PAID",
            "50.00",
            "0.00",
        )
        assert await _transactions(client, token) == [("RENTAL_CHARGE", D("-50.00")), ("TOPUP", D("500.00"))]
    finally:
        await cabinet.stop()
    assert await rs.sound_ledger(system) == 0


async def test_postpaid_start_needs_the_minimum_balance(system: Any) -> None:
    pkg = await rs.package(system, price="60.00", minutes=60, model=PaymentModel.POSTPAID)
    poor = await rs.customer(system, "49.99")
    station_sn = await rs.station(system)
    with pytest.raises(InsufficientBalance) as refused:
        async with system.services.db.transaction() as session:
            await rentals.begin(session, user_id=poor.id, station_sn=station_sn, package_id=pkg)
    assert refused.value.context["required"] == "50.00"
    enough = await rs.customer(system, 50)
    rental_id, *_ = await rs.started(system, enough, package_id=pkg, at=rs.now())
    row = await rs.rental(system, rental_id)
    assert (row.payment_status, row.amount_paid) == (PaymentStatus.PENDING, D("0.00"))  # nothing at start
    assert await rs.balance(system, enough) == D("50.00")


@pytest.mark.parametrize(
    ("used", "usage", "late"),
    [
        pytest.param(timedelta(minutes=10, seconds=30), "11.00", "0.00", id="eleven-started-minutes"),
        pytest.param(timedelta(minutes=59, seconds=30), "60.00", "0.00", id="the-whole-package"),
        pytest.param(timedelta(minutes=90), "60.00", "50.00", id="late-usage-stops-at-due"),
    ],
)
async def test_postpaid_is_billed_per_started_minute_at_return(
    system: Any, used: timedelta, usage: str, late: str
) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60, model=PaymentModel.POSTPAID)
    rental_id, bank, station_sn = await rs.started(system, user, package_id=pkg, at=rs.now() - used)
    returned = await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)
    assert returned is not None and returned.charged == D(usage) + D(late)
    expected = [("TOPUP", D("500")), ("RENTAL_CHARGE", -D(usage))] + (
        [("LATE_FEE", -D(late))] if D(late) else []
    )
    assert await rs.entries(system, user) == expected
    row = await rs.rental(system, rental_id)
    assert (row.payment_status, row.amount_paid) == (PaymentStatus.PAID, D(usage) + D(late))
    assert await rs.sound_ledger(system) == 0


# --- the cancel window ------------------------------------------------------------------------------


async def test_cancel_inside_the_window_after_putting_the_bank_back_refunds_everything(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    try:
        user = await funded_user(client, api, operator_token)
        token = user["access"]
        await wait_ready(client, token, cabinet.sn)
        await system.services.fleet.drained()  # the first snapshot has been reconciled
        r = await rent(client, token, cabinet.sn)
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        out = await client.post(f"/api/rentals/{rental['id']}/cancel", headers=Api.auth(token))
        assert out.status_code == 409 and out.json()["error"]["code"] == "invalid_state"  # the bank is out

        await cabinet.return_powerbank(rental["powerbank_sn"])

        async def completed() -> bool:
            return bool((await _history_item(client, token, rental["id"]))["status"] == "COMPLETED")

        await eventually(completed)
        r = await client.post(
            f"/api/rentals/{rental['id']}/cancel", json={"reason": "changed my mind"}, headers=Api.auth(token)
        )
        assert r.status_code == 200, r.text
        cancelled = r.json()["data"]
        assert (cancelled["status"], cancelled["payment_status"], cancelled["amount_paid"]) == (
            "CANCELLED",
            "REFUNDED",
            "0.00",
        )
        assert await _transactions(client, token) == [
            ("REFUND", D("50.00")),
            ("RENTAL_CHARGE", D("-50.00")),
            ("TOPUP", D("500.00")),
        ]
        again = await client.post(f"/api/rentals/{rental['id']}/cancel", headers=Api.auth(token))
        assert again.status_code == 409  # refunded once
        assert len(await _transactions(client, token)) == 3
    finally:
        await cabinet.stop()
    assert await rs.sound_ledger(system) == 0


async def test_cancel_of_a_running_rental_whose_bank_a_snapshot_shows_back(
    client: httpx.AsyncClient, system: Any
) -> None:
    """The 0x40 was lost but a snapshot put the bank in a hole: the rental is still ACTIVE and may be
    cancelled; its deposit is released and its charge refunded."""
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60, deposit="100.00")
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=2)
    )
    stranger = await rs.customer(system, 0)
    r = await client.post(f"/api/rentals/{rental_id}/cancel", headers=stranger.auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    async with system.services.db.transaction() as session:
        row = await session.get(PowerBank, bank, with_for_update=True)
        assert row is not None
        row.station_id = (await rentals.get(session, rental_id)).station_id
    r = await client.post(f"/api/rentals/{rental_id}/cancel", headers=user.auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["return_station_sn"] == station_sn and r.json()["data"]["ended_at"] is not None
    assert await rs.entries(system, user) == [
        ("TOPUP", D("500")),
        ("RENTAL_CHARGE", D("-60.00")),
        ("DEPOSIT_HOLD", D("-100.00")),
        ("REFUND", D("60.00")),
        ("DEPOSIT_RELEASE", D("100.00")),
    ]
    assert await rs.balance(system, user) == D("500.00")
    assert await rs.sound_ledger(system) == 0


async def test_cancel_after_the_window_is_refused(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system)
    window = system.settings.cancel_window_s
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(seconds=window + 5)
    )
    await rs.give_back(system, bank, station_sn, at=rs.now())
    r = await client.post(f"/api/rentals/{rental_id}/cancel", headers=user.auth)
    assert r.status_code == 409 and r.json()["error"]["context"]["cancel_window_s"] == window
    assert (await rs.rental(system, rental_id)).status == RentalStatus.COMPLETED


# --- extensions -------------------------------------------------------------------------------------


async def test_extend_at_most_three_times_each_paid_and_moving_due(
    client: httpx.AsyncClient, system: Any
) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60)
    longer = await rs.package(system, price="100.00", minutes=120)
    rental_id, *_ = await rs.started(system, user, package_id=pkg, at=rs.now())
    due = (await rs.rental(system, rental_id)).due_at
    assert due is not None
    for n, (package_id, minutes, cost) in enumerate(
        [(pkg, 60, "60.00"), (longer, 120, "100.00"), (pkg, 60, "60.00")]
    ):
        r = await client.post(
            f"/api/rentals/{rental_id}/extend", json={"package_id": package_id}, headers=user.auth
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert (data["extended_minutes"], data["extension_cost"], data["extensions_used"]) == (
            minutes,
            cost,
            n + 1,
        )
        due += timedelta(minutes=minutes)
        assert (await rs.rental(system, rental_id)).due_at == due
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=user.auth)
    assert r.status_code == 409 and r.json()["error"]["context"]["max_extensions"] == 3
    assert await rs.balance(system, user) == D("500") - D("60") - D("60") - D("100") - D("60")
    row = await rs.rental(system, rental_id)
    assert (row.amount_paid, row.extension_count) == (D("280.00"), 3)
    assert await rs.sound_ledger(system) == 0


async def test_extend_refusals(client: httpx.AsyncClient, system: Any) -> None:
    pkg = await rs.package(system, price="60.00", minutes=60)
    postpaid = await rs.package(system, price="60.00", minutes=60, model=PaymentModel.POSTPAID)
    user = await rs.customer(system, 60)  # exactly the package: nothing left for an extension
    rental_id, *_ = await rs.started(system, user, package_id=pkg, at=rs.now())
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=user.auth)
    assert r.status_code == 402 and r.json()["error"]["context"]["required"] == "60.00"
    r = await client.post(
        f"/api/rentals/{rental_id}/extend", json={"package_id": postpaid}, headers=user.auth
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation_error"
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": 999999}, headers=user.auth)
    assert r.status_code == 404
    await rs.ago(system, rental_id, minutes=61)
    async with system.services.db.transaction() as session:
        await rentals.mark_overdue(session, now=rs.now())
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=user.auth)
    assert r.status_code == 409 and r.json()["error"]["context"]["status"] == "OVERDUE"


async def test_postpaid_extension_is_billed_at_return_per_minute(
    client: httpx.AsyncClient, system: Any
) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60, model=PaymentModel.POSTPAID)
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=99, seconds=30)
    )
    r = await client.post(f"/api/rentals/{rental_id}/extend", json={"package_id": pkg}, headers=user.auth)
    assert r.status_code == 200 and r.json()["data"]["extension_cost"] == "0.00"
    returned = await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)
    assert returned is not None and returned.charged == D("100.00")  # 100 started minutes, no late fee


# --- dues -------------------------------------------------------------------------------------------


async def test_pay_due_settles_from_the_wallet_once(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 100)
    pkg = await rs.package(system, price="60.00", minutes=60)
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=60 + 150)
    )
    await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)  # 150 late fee, 40 of it paid
    assert (await rs.rental(system, rental_id)).overdue_amount == D("110.00")

    station_sn2 = await rs.station(system)
    with pytest.raises(InsufficientBalance) as blocked:  # no new rental while money is owed
        async with system.services.db.transaction() as session:
            await rentals.begin(session, user_id=user.id, station_sn=station_sn2, package_id=pkg)
    assert blocked.value.context == {"rental_id": str(rental_id), "due": "110.00", "currency": "NPR"}

    r = await client.post(f"/api/rentals/{rental_id}/pay-due", headers=user.auth)
    assert r.status_code == 402 and r.json()["error"]["context"]["required"] == "110.00"
    async with system.services.db.transaction() as session:
        await wallet.credit(
            session, user_id=user.id, amount=D("200"), type=EntryType.TOPUP, reference=f"t:{uuid.uuid4()}"
        )
    r = await client.post(f"/api/rentals/{rental_id}/pay-due", headers=user.auth)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["amount_paid"], data["balance"], data["payment_status"]) == ("110.00", "90.00", "PAID")
    assert data["rental"]["overdue_amount"] == "0.00" and data["rental"]["amount_paid"] == "210.00"
    r = await client.post(f"/api/rentals/{rental_id}/pay-due", headers=user.auth)
    assert r.status_code == 409
    assert [t for t, _ in await rs.entries(system, user)] == [
        "TOPUP",
        "RENTAL_CHARGE",
        "LATE_FEE",
        "TOPUP",
        "LATE_FEE",
    ]
    assert await rs.sound_ledger(system) == 0


# --- deposits ---------------------------------------------------------------------------------------


async def test_deposit_is_held_while_renting_and_released_at_return(system: Any) -> None:
    pkg = await rs.package(system, price="60.00", minutes=60, deposit="100.00")
    short = await rs.customer(system, "159.99")
    station_sn = await rs.station(system)
    with pytest.raises(InsufficientBalance) as refused:
        async with system.services.db.transaction() as session:
            await rentals.begin(session, user_id=short.id, station_sn=station_sn, package_id=pkg)
    assert refused.value.context["required"] == "160.00"

    user = await rs.customer(system, 200)
    rental_id, bank, station_sn = await rs.started(system, user, package_id=pkg, at=rs.now())
    assert await rs.balance(system, user) == D("40.00")
    async with system.services.db.transaction() as session:
        assert await rentals.held_deposits(session, user.id) == D("100.00")
    await rs.give_back(system, bank, station_sn, at=rs.now())
    assert await rs.entries(system, user) == [
        ("TOPUP", D("200")),
        ("RENTAL_CHARGE", D("-60.00")),
        ("DEPOSIT_HOLD", D("-100.00")),
        ("DEPOSIT_RELEASE", D("100.00")),
    ]
    async with system.services.db.transaction() as session:
        assert await rentals.held_deposits(session, user.id) == 0
    row = await rs.rental(system, rental_id)
    assert (row.deposit_amount, row.deposit_captured, row.amount_paid) == (D("100"), D("0"), D("60"))
    assert await rs.sound_ledger(system) == 0


async def test_deposit_is_captured_for_what_the_wallet_cannot_pay(system: Any) -> None:
    user = await rs.customer(system, 160)
    pkg = await rs.package(system, price="60.00", minutes=60, deposit="100.00")
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=60 + 150)
    )
    await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)  # 150 late, wallet 0, deposit 100
    row = await rs.rental(system, rental_id)
    assert (row.deposit_captured, row.overdue_amount, row.amount_paid) == (
        D("100.00"),
        D("50.00"),
        D("160.00"),
    )
    assert [t for t, _ in await rs.entries(system, user)] == ["TOPUP", "RENTAL_CHARGE", "DEPOSIT_HOLD"]
    assert await rs.balance(system, user) == 0
    assert await rs.sound_ledger(system) == 0


# --- one wallet, many operations at once -------------------------------------------------------------


async def test_operations_on_one_wallet_serialize(system: Any) -> None:
    user = await rs.customer(system, 100)

    async def charge(n: int) -> Decimal:
        async with system.services.db.transaction() as session:
            return await wallet.charge_up_to(
                session, user_id=user.id, amount=D("30"), type=EntryType.ADJUSTMENT, reference=f"race:{n}"
            )

    async def top_up(n: int) -> Decimal:
        async with system.services.db.transaction() as session:
            await wallet.credit(
                session, user_id=user.id, amount=D("5"), type=EntryType.TOPUP, reference=f"race-up:{n}"
            )
        return D("0")

    taken = await asyncio.gather(*(charge(n) for n in range(10)), *(top_up(n) for n in range(4)))
    assert sum(taken) + await rs.balance(system, user) == D("120")  # nothing lost, nothing created
    assert await rs.balance(system, user) >= 0
    assert await rs.sound_ledger(system) == 0


async def test_concurrent_extensions_respect_the_limit(system: Any) -> None:
    user = await rs.customer(system, 1000)
    pkg = await rs.package(system, price="10.00", minutes=30)
    rental_id, *_ = await rs.started(system, user, package_id=pkg, at=rs.now())

    async def extend() -> bool:
        try:
            async with system.services.db.transaction() as session:
                await rentals.extend(
                    session, rental_id=rental_id, user_id=user.id, package_id=pkg, max_extensions=3
                )
        except DomainError:
            return False
        return True

    results = await asyncio.gather(*(extend() for _ in range(8)))
    assert sum(results) == 3
    row = await rs.rental(system, rental_id)
    assert (row.extension_count, row.amount_paid) == (3, D("40.00"))
    assert await rs.balance(system, user) == D("960.00")
    assert await rs.sound_ledger(system) == 0


# --- statistics --------------------------------------------------------------------------------------


async def test_stats_count_spending_and_minutes(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system, 1000)
    pkg = await rs.package(system, price="60.00", minutes=60)
    station_sn = await rs.station(system)
    for used in (timedelta(minutes=30), timedelta(minutes=90)):  # on time, then late (flat 50)
        _, bank, _ = await rs.started(system, user, package_id=pkg, at=rs.now() - used, station_sn=station_sn)
        await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)
    await rs.started(system, user, package_id=pkg, at=rs.now() - timedelta(minutes=5), station_sn=station_sn)
    r = await client.get("/api/rentals/stats", headers=user.auth)
    assert r.status_code == 200, r.text
    stats = r.json()["data"]
    assert stats["total_rentals"] == 3 and stats["completed_rentals"] == 2 and stats["active_rentals"] == 1
    assert stats["cancelled_rentals"] == 0
    assert stats["total_spent"] == "230.00"  # 3 * 60 + 50 late fee
    assert 124 <= stats["total_time_used"] <= 126  # 30 + 90 + 5
    assert (stats["timely_returns"], stats["late_returns"], stats["timely_return_rate"]) == (1, 1, 50.0)
    assert stats["favorite_station"] == station_sn and stats["favorite_package"] == "60 min prepaid"


async def test_concurrent_starts_for_one_user_leave_one_rental(system: Any) -> None:
    """Five starts at once for one user: one PENDING_POPUP rental, four ActiveRentalExists (409)."""
    user = await rs.customer(system, 500)
    pkg = await rs.package(system)
    station_sn = await rs.station(system)

    async def start() -> str:
        try:
            async with system.services.db.transaction() as session:
                await rentals.begin(session, user_id=user.id, station_sn=station_sn, package_id=pkg)
        except ActiveRentalExists:
            return "exists"
        return "started"

    assert sorted(await asyncio.gather(*(start() for _ in range(5)))) == ["exists"] * 4 + ["started"]
