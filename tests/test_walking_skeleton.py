"""End to end over real parts: rent at A, the simulator ejects, return into B, money moves once."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

import rentbox
from simulators.cabinet import CabinetCredentials, CabinetRefused, SimulatedCabinet
from tests.conftest import Api, new_phone
from tests.support import eventually, metric, provision, return_events, start_cabinets, wait_ready

pytestmark = pytest.mark.integration


async def test_rent_at_a_return_at_b(
    client: httpx.AsyncClient, api: Api, operator_token: str, base_url: str, system: Any
) -> None:
    station_a, station_b = await start_cabinets(client, operator_token, 2)
    try:
        user = await api.login(new_phone())
        token, user_id = user["access"], user["user"]["id"]
        r = await client.post(
            f"/api/admin/users/{user_id}/wallet/credit",
            json={"amount": "500", "reason": "test"},
            headers={**Api.auth(operator_token), "Idempotency-Key": f"credit-{uuid.uuid4()}"},
        )
        assert r.status_code == 201, r.text
        await wait_ready(client, token, station_a.sn)
        packages = (await client.get("/api/rentals/packages", headers=Api.auth(token))).json()["data"]
        package = next(
            p for p in packages if p["package_type"] == "HOURLY" and p["payment_model"] == "PREPAID"
        )

        r = await client.post(
            "/api/rentals/start",
            json={"station_sn": station_a.sn, "package_id": package["id"]},
            headers=Api.auth(token),
        )
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        assert rental["status"] == "ACTIVE"
        ejected = [sn for sn, count in station_a.eject_counts.items() if count]
        assert ejected == [rental["powerbank_sn"]]
        assert station_a.eject_counts[rental["powerbank_sn"]] == 1
        assert await metric(client, "powerbank_rentals_active", status="active") >= 1
        detail = (await client.get(f"/api/stations/{station_a.sn}", headers=Api.auth(token))).json()["data"]
        hole = next(s for s in detail["slots"] if s["slot_number"] == rental["slot_number"])
        assert hole["status"] == "AVAILABLE" and hole["battery_level"] is None

        await station_b.return_powerbank(rental["powerbank_sn"])

        async def completed() -> dict[str, Any] | None:
            r = await client.get("/api/rentals/history", headers=Api.auth(token))
            item: dict[str, Any] = r.json()["data"]["results"][0]
            return item if item["status"] == "COMPLETED" else None

        done = await eventually(completed, within=2.0)
        assert done["return_station_sn"] == station_b.sn
        assert done["id"] == rental["id"]
        price = Decimal(package["price"])
        assert Decimal(done["amount_paid"]) == price
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - price
        entries = (await client.get("/api/payments/transactions", headers=Api.auth(token))).json()["data"]
        assert [(e["type"], Decimal(e["amount"])) for e in entries["results"]] == [
            ("RENTAL_CHARGE", -price),
            ("TOPUP", Decimal("500")),
        ]
        assert Decimal(entries["results"][0]["balance_after"]) == Decimal("500") - price
        assert (await client.get("/api/rentals/active", headers=Api.auth(token))).json()["data"] is None

        # The same 0x40 again is recorded as a device event and moves no money.
        hole_b = next(h for h, sn in station_b.banks().items() if sn == rental["powerbank_sn"])
        frame = rentbox.ReturnEvent(
            board=1, hole=hole_b, area=0, sn=rental["powerbank_sn"], state=1, software_version=1, soc=80
        )
        await station_b.publish_raw("update", rentbox.encode(frame))

        async def recorded_twice() -> bool:
            return await return_events(system, station_b.sn) == 2

        await eventually(recorded_twice)
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - price
        assert (
            len(
                (await client.get("/api/payments/transactions", headers=Api.auth(token))).json()["data"][
                    "results"
                ]
            )
            == 2
        )

        # The user was told, in the app, at each step (written in the same transactions as the rental).
        inbox = (await client.get("/api/notifications", headers=Api.auth(token))).json()["data"]
        kinds = [n["kind"] for n in inbox["results"]]
        assert "RENTAL_STARTED" in kinds and "RENTAL_RETURNED" in kinds

        # Ejects, rental transitions and frames are recorded inside kiosk-host actor processes;
        # the API's /metrics shows them in the same scrape.
        assert await metric(client, "powerbank_eject_seconds_count", result="success") >= 1
        assert await metric(client, "powerbank_rentals_total", outcome="completed") >= 1
        assert await metric(client, "powerbank_frames_total", cmd="0x40") >= 2
        assert await metric(client, "powerbank_cabinets_online") >= 2
    finally:
        for cabinet in (station_a, station_b):
            await cabinet.stop()


async def test_offline_station_refuses_and_charges_nothing(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    creds = await provision(client, operator_token)  # provisioned, never connected
    user = await api.login(new_phone())
    token = user["access"]
    await client.post(
        f"/api/admin/users/{user['user']['id']}/wallet/credit",
        json={"amount": 200, "reason": "test"},
        headers={**Api.auth(operator_token), "Idempotency-Key": f"credit-{uuid.uuid4()}"},
    )
    station = (await client.get(f"/api/stations/{creds.sn}", headers=Api.auth(token))).json()["data"]
    assert station["status"] == "OFFLINE"
    r = await client.post(
        "/api/rentals/start", json={"station_sn": creds.sn, "package_id": 1}, headers=Api.auth(token)
    )
    assert r.status_code == 503
    assert r.json() == {
        "success": False,
        "error": {
            "code": "station_offline",
            "message": r.json()["error"]["message"],
            "context": {"station_sn": creds.sn},
        },
    }
    assert (await client.get("/api/rentals/active", headers=Api.auth(token))).json()["data"] is None
    assert (await client.get("/api/rentals/history", headers=Api.auth(token))).json()["data"]["count"] == 0
    balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
    assert balance["balance"] == "200.00"


async def test_cabinet_that_disconnected_is_offline(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    (cabinet,) = await start_cabinets(client, operator_token, 1)
    user = await api.login(new_phone())
    await wait_ready(client, user["access"], cabinet.sn)
    await cabinet.stop()

    async def offline() -> bool:
        r = await client.get(f"/api/stations/{cabinet.sn}", headers=Api.auth(user["access"]))
        return bool(r.json()["data"]["status"] == "OFFLINE")

    await eventually(offline)
    r = await client.post(
        "/api/rentals/start",
        json={"station_sn": cabinet.sn, "package_id": 1},
        headers=Api.auth(user["access"]),
    )
    assert r.status_code == 503  # liveness is checked before the (empty) wallet
    assert r.json()["error"]["code"] == "station_offline"


async def test_wrong_password_is_refused_and_counted(client: httpx.AsyncClient, operator_token: str) -> None:
    creds = await provision(client, operator_token)
    before = await metric(client, "powerbank_mqtt_dropped_total", reason="auth")
    forged = CabinetCredentials(
        sn=creds.sn, host=creds.host, port=creds.port, username=creds.username, password="not-the-secret"
    )
    cabinet = SimulatedCabinet(forged, boards=1, holes_per_board=4)
    with pytest.raises(CabinetRefused):
        await cabinet.start()
    assert await metric(client, "powerbank_mqtt_dropped_total", reason="auth") == before + 1
    r = await client.get(f"/api/stations/{creds.sn}", headers=Api.auth(operator_token))
    assert r.json()["data"]["status"] == "OFFLINE"


async def test_publishing_to_another_cabinets_topic_is_dropped_and_counted(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    victim, attacker = await start_cabinets(client, operator_token, 2)
    try:
        user = await api.login(new_phone())
        before_detail = await wait_ready(client, user["access"], victim.sn)
        before = await metric(client, "powerbank_mqtt_dropped_total", reason="acl")
        # A forged snapshot claiming the victim is empty, sent on the victim's topic by the attacker.
        empty = rentbox.Snapshot(
            boards=(rentbox.BoardInfo(index=1, temperature=25, software_version=1, hardware_version=1),),
            holes=tuple(
                rentbox.HoleInfo(
                    hole=h,
                    board=1,
                    state=0,
                    current=0.0,
                    voltage=0.0,
                    area=0,
                    sn=None,
                    soc=0,
                    temperature=0,
                    charge_voltage=0.0,
                    charge_current=0.0,
                    software_version=1,
                    sensor=0x80,
                )
                for h in range(1, 5)
            ),
        )
        await attacker.publish_to(rentbox.up_topic("powerbank", victim.sn, "update"), rentbox.encode(empty))
        await eventually(lambda: _greater(client, "powerbank_mqtt_dropped_total", before, reason="acl"))
        after_detail = (
            await client.get(f"/api/stations/{victim.sn}", headers=Api.auth(user["access"]))
        ).json()
        assert after_detail["data"]["slots"] == before_detail["slots"]
    finally:
        await victim.stop()
        await attacker.stop()


async def _greater(client: httpx.AsyncClient, name: str, than: float, **labels: str) -> bool:
    return await metric(client, name, **labels) > than
