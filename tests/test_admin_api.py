"""The operator API under /api/admin over the running system: stations, users, rentals, the audit log."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from simulators.cabinet import CabinetCredentials, CabinetRefused, SimulatedCabinet
from tests.conftest import Api, new_phone
from tests.support import eventually, funded_user, provision, rent, start_cabinet, wait_ready

pytestmark = pytest.mark.integration


def auth(token: str) -> dict[str, str]:
    return Api.auth(token)


async def audit(client: httpx.AsyncClient, token: str, **filters: str) -> list[dict[str, Any]]:
    r = await client.get("/api/admin/audit", params={**filters, "page_size": 100}, headers=auth(token))
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["data"]["results"]
    return results


async def staff_token(system: Any, api: Api, role: str) -> tuple[str, str]:
    from domain import users
    from storage.models import Role

    phone = new_phone()
    async with system.services.db.transaction() as session:
        await users.ensure_staff(session, phone=phone, role=Role(role))
    data = await api.login(phone)
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
        assert cabinet.connected  # the session it has goes on until it reconnects
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
    assert r.status_code == 200 and r.json()["data"]["is_active"] is False
    entries = await audit(client, operator, target_type="user", target_id=user_id)
    assert [(e["action"], e["before"], e["after"]) for e in entries[:2]] == [
        ("user.updated", {"role": "operator", "is_active": True}, {"role": "operator", "is_active": False}),
        ("user.updated", {"role": "user", "is_active": True}, {"role": "operator", "is_active": True}),
    ]
    assert entries[1]["actor_role"] == "admin"
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
            headers=auth(operator_token),
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
            headers=auth(operator_token),
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "validation_error"
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": str(paid), "reason": "goodwill"},
            headers=auth(operator_token),
        )
        assert r.status_code == 201, r.text
        assert r.json()["data"]["status"] == "PROCESSED"
        r = await client.post(
            f"/api/admin/rentals/{rental['id']}/refund",
            json={"amount": "0.01", "reason": "again"},
            headers=auth(operator_token),
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
