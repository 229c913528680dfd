"""The operator API under /api/admin over the running system: stations, users, rentals, the audit log."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from simulators.cabinet import CabinetCredentials, CabinetRefused, SimulatedCabinet
from storage.models import RentalStatus
from tests import rental_support as money
from tests.conftest import Api, new_phone, staff_login
from tests.support import (
    eventually,
    funded_user,
    metric,
    overridden,
    provision,
    rent,
    start_cabinet,
    wait_ready,
)

pytestmark = pytest.mark.integration


def auth(token: str) -> dict[str, str]:
    return Api.auth(token)


def keyed(token: str, key: str | None = None) -> dict[str, str]:
    """Headers of an operator money call: the bearer token and an `Idempotency-Key` (fresh unless given)."""
    return {**Api.auth(token), "Idempotency-Key": key or f"op-{uuid.uuid4()}"}


async def audit(client: httpx.AsyncClient, token: str, **filters: str) -> list[dict[str, Any]]:
    r = await client.get("/api/admin/audit", params={**filters, "page_size": 100}, headers=auth(token))
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["data"]["results"]
    return results


async def staff_token(system: Any, api: Api, role: str) -> tuple[str, str]:

    data = await staff_login(system, api, role)
    return data["access"], data["user"]["id"]


async def test_every_admin_route_refuses_a_plain_user(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    user = await api.login(new_phone())
    # The OpenAPI schema lists every route the app serves (this FastAPI nests included routers).
    paths = {p: ops for p, ops in system.app.openapi()["paths"].items() if p.startswith("/api/admin")}
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    assert len(routes) >= 25
    for method, template in routes:
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
        body = {} if method in ("POST", "PATCH", "PUT") else None
        r = await client.request(method, path, json=body, headers=auth(user["access"]))
        assert r.status_code == 403, (method, template, r.text)
        assert r.json()["error"]["code"] == "forbidden"
        r = await client.request(method, path, json=body)
        assert r.status_code == 401, (method, template, r.text)


async def test_station_list_detail_edit_and_geo(client: httpx.AsyncClient, operator_token: str) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "41000001"})
    sn = cabinet.sn
    try:

        async def listed() -> dict[str, Any] | None:
            r = await client.get(
                "/api/admin/stations", params={"page_size": 100}, headers=auth(operator_token)
            )
            assert r.status_code == 200, r.text
            page = r.json()["data"]
            rows = {s["serial_number"]: s for s in page["results"]}
            item = rows.get(sn)
            return item if item and item["online"] and item["ready"] else None

        item = await eventually(listed, within=10.0)
        assert item["status"] == "ONLINE" and item["total_slots"] == 4 and item["empty_slots"] == 3
        assert item["available_power_banks"] in (0, 1)  # SOC is random, 20..100
        detail = (await client.get(f"/api/admin/stations/{sn}", headers=auth(operator_token))).json()["data"]
        assert {s["slot_number"]: s["powerbank_sn"] for s in detail["slots"]} == {
            1: "41000001",
            2: None,
            3: None,
            4: None,
        }

        # Move it far away: the geo index follows.
        patch = {"name": "Moved", "latitude": 28.2, "longitude": 83.98, "opening_time": "07:30"}
        r = await client.patch(f"/api/admin/stations/{sn}", json=patch, headers=auth(operator_token))
        assert r.status_code == 200, r.text
        assert r.json()["data"]["name"] == "Moved" and r.json()["data"]["opening_time"] == "07:30"
        near = await client.get(
            "/api/stations/nearby",
            params={"lat": 28.2, "lng": 83.98, "radius": 1, "page_size": 100},
            headers=auth(operator_token),
        )
        assert sn in [s["serial_number"] for s in near.json()["data"]["results"]]
        old = await client.get(
            "/api/stations/nearby",
            params={"lat": 27.7, "lng": 85.3, "radius": 1, "page_size": 100},
            headers=auth(operator_token),
        )
        assert sn not in [s["serial_number"] for s in old.json()["data"]["results"]]
        entry = (await audit(client, operator_token, target_type="station", target_id=sn))[0]
        assert entry["action"] == "station.updated"
        assert entry["before"]["latitude"] == 27.7 and entry["after"]["latitude"] == 28.2
        assert entry["ip"] == "127.0.0.1" and entry["actor_role"] == "operator"

        for bad in ({"latitude": 91}, {"opening_time": "25:00"}, {"name": None}):
            r = await client.patch(f"/api/admin/stations/{sn}", json=bad, headers=auth(operator_token))
            assert r.status_code in (400, 422), (bad, r.text)
            assert r.json()["error"]["code"] == "validation_error"
        r = await client.patch("/api/admin/stations/NOPE", json={"name": "x"}, headers=auth(operator_token))
        assert r.status_code == 404
    finally:
        await cabinet.stop()


async def test_maintenance_reaches_the_kiosk_and_refuses_rentals(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "42000001", 2: "42000002"})
    try:
        user = await funded_user(client, api, operator_token)
        await wait_ready(client, user["access"], cabinet.sn)
        r = await client.post(
            f"/api/admin/stations/{cabinet.sn}/maintenance", json={"on": True}, headers=auth(operator_token)
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["status"] == "MAINTENANCE"
        detail = (await client.get(f"/api/stations/{cabinet.sn}", headers=auth(user["access"]))).json()[
            "data"
        ]
        assert detail["status"] == "MAINTENANCE"
        assert {s["status"] for s in detail["slots"]} == {"MAINTENANCE"}
        assert not any(s["rentable"] for s in detail["slots"])
        r = await rent(client, user["access"], cabinet.sn)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "station_maintenance"
        assert cabinet.physical_ejects == []
        entry = (await audit(client, operator_token, target_type="station", target_id=cabinet.sn))[0]
        assert entry["action"] == "station.maintenance_on"
        assert entry["before"]["status"] == "ACTIVE" and entry["after"]["status"] == "MAINTENANCE"

        r = await client.post(
            f"/api/admin/stations/{cabinet.sn}/maintenance", json={"on": False}, headers=auth(operator_token)
        )
        assert r.status_code == 200, r.text
        await wait_ready(client, user["access"], cabinet.sn)
        r = await rent(client, user["access"], cabinet.sn)
        assert r.status_code == 201, r.text
    finally:
        await cabinet.stop()


async def test_delete_refuses_open_rentals_and_removes_a_fresh_station(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    creds = await provision(client, operator_token)
    r = await client.delete(f"/api/admin/stations/{creds.sn}", headers=auth(operator_token))
    assert r.status_code == 200, r.text
    assert (
        await client.get(f"/api/admin/stations/{creds.sn}", headers=auth(operator_token))
    ).status_code == 404
    entry = (await audit(client, operator_token, target_type="station", target_id=creds.sn))[0]
    assert entry["action"] == "station.deleted" and entry["before"]["serial_number"] == creds.sn
    with pytest.raises(CabinetRefused):  # its credentials died with it
        await SimulatedCabinet(creds, holes_per_board=4).start()

    cabinet = await start_cabinet(client, operator_token)
    try:
        user = await funded_user(client, api, operator_token)
        await wait_ready(client, user["access"], cabinet.sn)
        assert (await rent(client, user["access"], cabinet.sn)).status_code == 201
        r = await client.delete(f"/api/admin/stations/{cabinet.sn}", headers=auth(operator_token))
        assert r.status_code == 409, r.text
        assert r.json()["error"]["context"]["open_rentals"] == 1
        assert (
            await client.get(f"/api/admin/stations/{cabinet.sn}", headers=auth(operator_token))
        ).status_code == 200
    finally:
        await cabinet.stop()


async def test_deleting_a_station_disconnects_its_cabinet_and_refuses_its_reconnects(
    client: httpx.AsyncClient, system: Any, operator_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "44000001"})
    sn = cabinet.sn
    try:

        async def online() -> bool:
            r = await client.get(f"/api/admin/stations/{sn}", headers=auth(operator_token))
            return bool(r.json()["data"]["online"])

        await eventually(online)
        assert sn in await system.broker.connected_cabinets.remote()
        refused_before = await metric(client, "powerbank_mqtt_dropped_total", reason="auth")
        caplog.set_level(logging.WARNING, logger="simulators.cabinet")

        r = await client.delete(f"/api/admin/stations/{sn}", headers=auth(operator_token))
        assert r.status_code == 200, r.text
        # At once: by the time DELETE answers, the broker has closed the session.
        assert sn not in await system.broker.connected_cabinets.remote()

        async def refused_again() -> bool:
            refused = await metric(client, "powerbank_mqtt_dropped_total", reason="auth")
            retried = [
                m
                for m in caplog.messages
                if "event=cabinet_reconnect_failed" in m and f"station_sn={sn}" in m and "CONNACK 5" in m
            ]
            return refused > refused_before and bool(retried)

        # The cabinet notices, reconnects as firmware does, and is refused: its credentials died with it.
        await eventually(refused_again, within=10.0)
        assert not cabinet.connected
        assert sn not in await system.broker.connected_cabinets.remote()
    finally:
        await cabinet.stop()


async def test_rotated_secret_refuses_the_old_password_at_next_connect(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    old = cabinet.credentials
    try:
        r = await client.post(f"/api/admin/stations/{old.sn}/rotate-secret", headers=auth(operator_token))
        assert r.status_code == 200, r.text
        mqtt = r.json()["data"]["mqtt"]
        assert mqtt["password"] != old.password and mqtt["username"] == old.sn

        async def cut_off() -> bool:  # the session it had is closed at once
            return not cabinet.connected

        await eventually(cut_off)
    finally:
        await cabinet.stop()
    with pytest.raises(CabinetRefused):
        await SimulatedCabinet(old, holes_per_board=4).start()
    new = CabinetCredentials(
        sn=old.sn,
        host=old.host,
        port=old.port,
        username=old.sn,
        password=mqtt["password"],
        product_key=old.product_key,
    )
    fresh = SimulatedCabinet(new, holes_per_board=4, banks={1: "43000001"})
    await fresh.start()
    try:
        assert fresh.connected
    finally:
        await fresh.stop()
    entry = (await audit(client, operator_token, target_type="station", target_id=old.sn))[0]
    assert entry["action"] == "station.secret_rotated" and mqtt["password"] not in str(entry)


async def test_only_an_admin_acts_on_admins_and_activates_staff(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    """Issue 10, item 4: operators deactivated admins and each other, and nothing but SQL undid it."""
    from domain import users
    from storage.models import Role, User

    operator, _ = await staff_token(system, api, "operator")
    _, other_operator_id = await staff_token(system, api, "operator")
    admin, admin_id = await staff_token(system, api, "admin")
    rider = (await api.login(new_phone()))["user"]["id"]

    def patch(target: str, body: dict[str, Any], token: str) -> Any:
        return client.patch(f"/api/admin/users/{target}", json=body, headers=auth(token))

    for body in ({"is_active": False}, {"is_active": True}, {}):
        r = await patch(admin_id, body, operator)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (body, r.text)
    assert (await patch(other_operator_id, {"is_active": False}, operator)).status_code == 403
    assert (await patch(rider, {"is_active": False}, operator)).status_code == 200  # riders: operators may
    async with system.services.db.transaction() as session:
        assert (await session.get(User, uuid.UUID(admin_id))).is_active  # type: ignore[union-attr]
        assert (await session.get(User, uuid.UUID(other_operator_id))).is_active  # type: ignore[union-attr]

    r = await patch(other_operator_id, {"is_active": False}, admin)
    assert r.status_code == 200 and r.json()["data"]["is_active"] is False
    r = await patch(other_operator_id, {"is_active": True}, admin)
    assert r.status_code == 200 and r.json()["data"]["is_active"] is True

    # a deactivated admin comes back with `powerbank admin create` (ensure_staff), not SQL
    async with system.services.db.transaction() as session:
        row = await session.get(User, uuid.UUID(admin_id))
        assert row is not None
        row.is_active = False
        phone = row.phone
    async with system.services.db.transaction() as session:
        again = await users.ensure_staff(session, phone=phone, role=Role.ADMIN)
        assert again.id == uuid.UUID(admin_id) and again.is_active


async def test_users_list_detail_and_role_rules(client: httpx.AsyncClient, api: Api, system: Any) -> None:
    operator, operator_id = await staff_token(system, api, "operator")
    admin, _ = await staff_token(system, api, "admin")
    phone = new_phone()
    user = await funded_user(client, api, operator, amount="120")
    user_id = user["user"]["id"]
    other = await api.login(phone)

    r = await client.get("/api/admin/users", params={"search": phone[-8:]}, headers=auth(operator))
    assert r.status_code == 200, r.text
    assert [u["id"] for u in r.json()["data"]["results"]] == [other["user"]["id"]]
    r = await client.get(f"/api/admin/users/{user_id}", headers=auth(operator))
    detail = r.json()["data"]
    assert detail["wallet"]["balance"] == "120.00" and detail["open_rental"] is None
    assert detail["kyc_status"] and detail["is_active"] is True
    assert (await client.get(f"/api/admin/users/{uuid.uuid4()}", headers=auth(operator))).status_code == 404

    r = await client.patch(f"/api/admin/users/{user_id}", json={"role": "operator"}, headers=auth(operator))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await client.patch(
        f"/api/admin/users/{operator_id}", json={"is_active": False}, headers=auth(operator)
    )
    assert r.status_code == 403
    r = await client.patch(f"/api/admin/users/{user_id}", json={"role": "root"}, headers=auth(admin))
    assert r.status_code == 422

    r = await client.patch(f"/api/admin/users/{user_id}", json={"role": "operator"}, headers=auth(admin))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["role"] == "operator"
    r = await client.patch(f"/api/admin/users/{user_id}", json={"is_active": False}, headers=auth(operator))
    assert r.status_code == 403  # staff now: only an admin (de)activates them
    r = await client.patch(f"/api/admin/users/{user_id}", json={"is_active": False}, headers=auth(admin))
    assert r.status_code == 200 and r.json()["data"]["is_active"] is False
    entries = await audit(client, operator, target_type="user", target_id=user_id)
    assert [(e["action"], e["before"], e["after"]) for e in entries[:2]] == [
        ("user.updated", {"role": "operator", "is_active": True}, {"role": "operator", "is_active": False}),
        ("user.updated", {"role": "user", "is_active": True}, {"role": "operator", "is_active": True}),
    ]
    assert entries[0]["actor_role"] == entries[1]["actor_role"] == "admin"
    credit = next(e for e in entries if e["action"] == "wallet.credited")
    assert credit["after"]["amount"] == "120.00" and credit["actor_id"] == operator_id


async def test_rentals_force_complete_and_refund_move_money_once(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    try:
        user = await funded_user(client, api, operator_token)
        token, user_id = user["access"], user["user"]["id"]
        await wait_ready(client, token, cabinet.sn)
        r = await rent(client, token, cabinet.sn)
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        paid = Decimal(rental["amount_paid"])
        assert paid > 0

        r = await client.get(
            "/api/admin/rentals",
            params={"user_id": user_id, "station_sn": cabinet.sn, "status": "ACTIVE"},
            headers=auth(operator_token),
        )
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["data"]["results"]] == [rental["id"]]
        r = await client.get("/api/admin/rentals", params={"status": "BOGUS"}, headers=auth(operator_token))
        assert r.status_code == 422
        r = await client.get(f"/api/admin/rentals/{rental['id']}", headers=auth(operator_token))
        assert r.json()["data"]["user_id"] == user_id

        # Refunds are for completed rentals.
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": "1", "reason": "early"},
            headers=keyed(operator_token),
        )
        assert r.status_code == 409, r.text

        body = {"reason": "handed back at the office", "return_station_sn": cabinet.sn}
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/force-complete", json=body, headers=auth(operator_token)
        )
        assert r.status_code == 200, r.text
        done = r.json()["data"]
        assert done["rental"]["status"] == "COMPLETED" and done["rental"]["return_station_sn"] == cabinet.sn
        assert Decimal(done["rental"]["amount_paid"]) == paid and done["due"] == "0.00"
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/force-complete", json=body, headers=auth(operator_token)
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
        # The bank comes back physically later: its rental is already over, nothing more is charged.
        await cabinet.return_powerbank(rental["powerbank_sn"])
        balance = (await client.get("/api/payments/wallet/balance", headers=auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - paid

        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": str(paid + 1), "reason": "too much"},
            headers=keyed(operator_token),
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "validation_error"
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": str(paid), "reason": "goodwill"},
            headers=keyed(operator_token),
        )
        assert r.status_code == 201, r.text
        assert r.json()["data"]["status"] == "PROCESSED"
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": "0.01", "reason": "again"},
            headers=keyed(operator_token),
        )
        assert r.status_code == 400, r.text
        entries = (await client.get("/api/payments/transactions", headers=auth(token))).json()["data"][
            "results"
        ]
        assert sorted(e["type"] for e in entries) == ["REFUND", "RENTAL_CHARGE", "TOPUP"]
        balance = (await client.get("/api/payments/wallet/balance", headers=auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500")

        actions = [
            e["action"]
            for e in await audit(client, operator_token, target_type="rental", target_id=rental["id"])
        ]
        assert actions == ["rental.refunded", "rental.force_completed"]
        forced = (await audit(client, operator_token, target_type="rental", target_id=rental["id"]))[1]
        assert forced["before"]["status"] == "ACTIVE" and forced["after"]["status"] == "COMPLETED"
        assert forced["after"]["reason"] == "handed back at the office"
    finally:
        await cabinet.stop()


async def test_package_and_late_fee_changes_are_audited(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    body = {
        "name": "Audit trial",
        "duration_minutes": 5,
        "price": "10.00",
        "package_type": "HOURLY",
        "payment_model": "PREPAID",
        "is_active": False,
    }
    r = await client.post("/api/admin/packages", json=body, headers=auth(operator_token))
    assert r.status_code == 201, r.text
    package_id = str(r.json()["data"]["id"])
    r = await client.patch(
        f"/api/admin/packages/{package_id}", json={"price": "12"}, headers=auth(operator_token)
    )
    assert r.status_code == 200, r.text
    entries = await audit(client, operator_token, target_type="package", target_id=package_id)
    assert [e["action"] for e in entries] == ["package.updated", "package.created"]
    assert entries[0]["before"]["price"] == "10.00" and entries[0]["after"]["price"] == "12.00"

    r = await client.get("/api/admin/audit", params={"page_size": 101}, headers=auth(operator_token))
    assert r.status_code == 422


# --- Idempotency-Key on the operators' money routes ---------------------------------------------------


async def refund_entries(system: Any, user: money.Customer) -> list[Decimal]:
    return [amount for kind, amount in await money.entries(system, user) if kind == "REFUND"]


async def same_key_at_once(
    client: httpx.AsyncClient, path: str, body: dict[str, str], headers: dict[str, str], n: int = 8
) -> list[httpx.Response]:
    """`n` identical requests in flight together; each either ran the work, replayed it, or found it
    still running (409 `idempotency_request_in_progress`), never a second run."""
    responses = await asyncio.gather(*(client.post(path, json=body, headers=headers) for _ in range(n)))
    for r in responses:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_request_in_progress", r.text
    assert any(r.status_code == 201 for r in responses)
    assert len({r.content for r in responses if r.status_code == 201}) == 1  # one answer, replayed
    return responses


@pytest.fixture
def small_cap(system: Any) -> Iterator[Decimal]:
    with overridden(system.services.settings, staff_daily_credit_cap=Decimal("100.00")):
        yield system.services.settings.staff_daily_credit_cap


async def test_credits_over_an_operators_daily_cap_wait_for_a_second_operator(
    client: httpx.AsyncClient, api: Api, system: Any, small_cap: Decimal
) -> None:
    """Issue 10, item 5: one operator could credit up to 1,000,000 a call, without limit."""
    first_op, _ = await staff_token(system, api, "operator")
    second_op, _ = await staff_token(system, api, "operator")
    user = await money.customer(system)
    path = f"/api/admin/users/{user.id}/wallet/credit"
    ok_credit = await client.post(path, json={"amount": "60", "reason": "cash"}, headers=keyed(first_op))
    assert ok_credit.status_code == 201, ok_credit.text
    headers = keyed(first_op)
    held = await client.post(path, json={"amount": "50", "reason": "refund by hand"}, headers=headers)
    assert held.status_code == 202, held.text
    data = held.json()["data"]
    assert (data["status"], data["amount"], data["credited_today"], data["daily_cap"]) == (
        "PENDING_APPROVAL",
        "50.00",
        "60.00",
        "100.00",
    )
    replay = await client.post(path, json={"amount": "50", "reason": "refund by hand"}, headers=headers)
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert await money.balance(system, user) == Decimal("60.00")
    queue = (await client.get("/api/admin/credit-approvals", headers=auth(second_op))).json()["data"]
    assert [q["id"] for q in queue if q["id"] == data["approval_id"]] == [data["approval_id"]]

    approve = f"/api/admin/credit-approvals/{data['approval_id']}/approve"
    own = await client.post(approve, headers=auth(first_op))
    assert own.status_code == 403, own.text
    done = await client.post(approve, headers=auth(second_op))
    assert done.status_code == 200 and done.json()["data"]["status"] == "APPROVED", done.text
    assert (await client.post(approve, headers=auth(second_op))).status_code == 409
    assert await money.balance(system, user) == Decimal("110.00")

    held = await client.post(path, json={"amount": "45", "reason": "again"}, headers=keyed(first_op))
    assert held.status_code == 202  # the cap counts this operator's own credits (60 + 45 > 100)
    reject = f"/api/admin/credit-approvals/{held.json()['data']['approval_id']}/reject"
    r = await client.post(reject, json={"reason": "no receipt"}, headers=auth(second_op))
    assert r.status_code == 200 and r.json()["data"]["status"] == "REJECTED"
    assert await money.balance(system, user) == Decimal("110.00")
    assert await money.sound_ledger(system) == 0
    actions = {
        e["action"]
        for e in await audit(client, second_op, target_type="credit_approval", target_id=data["approval_id"])
    }
    assert actions == {"wallet.credit_requested", "wallet.credit_approved"}


async def test_two_credits_at_once_cannot_both_slip_under_the_cap(
    client: httpx.AsyncClient, api: Api, system: Any, small_cap: Decimal
) -> None:
    op, _ = await staff_token(system, api, "operator")
    user = await money.customer(system)
    path = f"/api/admin/users/{user.id}/wallet/credit"
    answers = await asyncio.gather(
        *(client.post(path, json={"amount": "60", "reason": "cash"}, headers=keyed(op)) for _ in range(2))
    )
    assert sorted(r.status_code for r in answers) == [201, 202], [r.text for r in answers]
    assert await money.balance(system, user) == Decimal("60.00")


async def test_operator_credit_needs_a_key_and_credits_once_per_key(
    client: httpx.AsyncClient, api: Api, system: Any, operator_token: str
) -> None:
    user = await money.customer(system)
    path = f"/api/admin/users/{user.id}/wallet/credit"
    body = {"amount": "100", "reason": "cash at the counter"}

    r = await client.post(path, json=body, headers=auth(operator_token))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_error"
    assert "Idempotency-Key" in str(r.json()["error"]["context"])
    r = await client.post(path, json=body, headers=keyed(operator_token, "x" * 256))
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation_error", r.text
    assert await money.entries(system, user) == []

    headers = keyed(operator_token)
    first = await client.post(path, json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["data"]["balance"] == "100.00"
    again = await client.post(path, json=body, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    other = await client.post(path, json={**body, "amount": "101"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert await money.entries(system, user) == [("TOPUP", Decimal("100.00"))]

    # Retries racing each other: one credit.
    responses = await same_key_at_once(client, path, {**body, "amount": "50"}, keyed(operator_token))
    answer = next(r for r in responses if r.status_code == 201).json()["data"]
    assert answer["balance"] == "150.00"
    assert await money.entries(system, user) == [("TOPUP", Decimal("100.00")), ("TOPUP", Decimal("50.00"))]
    assert await money.balance(system, user) == Decimal("150.00")
    credits = [
        e
        for e in await audit(client, operator_token, target_type="user", target_id=str(user.id))
        if e["action"] == "wallet.credited"
    ]
    assert len(credits) == 2
    assert await money.sound_ledger(system) == 0

    # A key is the operator's own: another operator's same key is another credit.
    someone_else, _ = await staff_token(system, api, "operator")
    r = await client.post(path, json=body, headers=keyed(someone_else, headers["Idempotency-Key"]))
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers, r.text
    assert await money.balance(system, user) == Decimal("250.00")


async def test_operator_refund_needs_a_key_and_refunds_once_per_key(
    client: httpx.AsyncClient, system: Any, operator_token: str
) -> None:
    user = await money.customer(system, 500)
    package_id = await money.package(system, price="60.00")
    rental_id, bank, sn = await money.started(
        system, user, package_id=package_id, at=money.now() - timedelta(minutes=10)
    )
    assert await money.give_back(system, bank, sn, at=money.now()) is not None
    assert (await money.rental(system, rental_id)).status == RentalStatus.COMPLETED
    path = f"/api/admin/rentals/{rental_id}/refund"
    body = {"amount": "20", "reason": "goodwill"}

    r = await client.post(path, json=body, headers=auth(operator_token))
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text

    headers = keyed(operator_token)
    first = await client.post(path, json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["data"]["status"] == "PROCESSED"
    again = await client.post(path, json=body, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    other = await client.post(path, json={**body, "amount": "21"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert await refund_entries(system, user) == [Decimal("20.00")]

    # Retries racing each other: one refund.
    await same_key_at_once(client, path, {**body, "amount": "30"}, keyed(operator_token))
    assert await refund_entries(system, user) == [Decimal("20.00"), Decimal("30.00")]
    assert await money.balance(system, user) == Decimal("490.00")  # 500 - 60 + 20 + 30

    # An error is the key's answer too: replayed, not run again (10.00 is left to refund).
    headers = keyed(operator_token)
    too_much = await client.post(path, json={**body, "amount": "11"}, headers=headers)
    assert too_much.status_code == 400, too_much.text
    replayed = await client.post(path, json={**body, "amount": "11"}, headers=headers)
    assert replayed.status_code == 400 and replayed.content == too_much.content
    assert replayed.headers["Idempotent-Replayed"] == "true"

    actions = [
        e["action"]
        for e in await audit(client, operator_token, target_type="rental", target_id=str(rental_id))
    ]
    assert actions == ["rental.refunded", "rental.refunded"]
    assert await refund_entries(system, user) == [Decimal("20.00"), Decimal("30.00")]
    assert await money.sound_ledger(system) == 0
