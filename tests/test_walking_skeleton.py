"""End to end over real parts: rent at A, the simulator ejects, return into B, money moves once."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

import rentbox

from simulators.cabinet import CabinetCredentials, CabinetRefused, SimulatedCabinet
from tests.conftest import Api, new_phone

pytestmark = pytest.mark.integration


async def eventually(check: Any, *, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy (bounded; fails with the last value)."""
    last = None
    async with asyncio.timeout(timeout):
        while True:
            last = await check()
            if last:
                return last
            await asyncio.sleep(interval)


async def provision(client: httpx.AsyncClient, token: str, *, holes: int = 4) -> CabinetCredentials:
    sn = f"T{uuid.uuid4().hex[:12].upper()}"
    body = {"serial_number": sn, "name": sn, "latitude": 27.7, "longitude": 85.3, "boards": 1, "holes_per_board": holes}
    r = await client.post("/api/admin/stations", json=body, headers=Api.auth(token))
    assert r.status_code == 201, r.text
    mqtt = r.json()["data"]["mqtt"]
    return CabinetCredentials(
        sn=sn, host=mqtt["host"], port=mqtt["port"], username=mqtt["username"], password=mqtt["password"],
        product_key=mqtt["product_key"],
    )


async def start_cabinets(client: httpx.AsyncClient, token: str, count: int) -> list[SimulatedCabinet]:
    creds = [await provision(client, token) for _ in range(count)]
    cabinets = [SimulatedCabinet(c, boards=1, holes_per_board=4, fill=0.75, seed=i) for i, c in enumerate(creds)]
    for cabinet in cabinets:
        await cabinet.start()
    return cabinets


async def return_events(system: Any, station_sn: str, powerbank_sn: str, count: int) -> bool:
    from sqlalchemy import func, select

    from storage.models import DeviceEvent

    async with system.services.db.transaction() as session:
        n = await session.scalar(
            select(func.count())
            .select_from(DeviceEvent)
            .where(DeviceEvent.station_sn == station_sn, DeviceEvent.kind == "return")
        )
    return n == count


async def wait_ready(client: httpx.AsyncClient, token: str, sn: str) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        r = await client.get(f"/api/stations/{sn}", headers=Api.auth(token))
        data: dict[str, Any] = r.json()["data"]
        return data if data["status"] == "ONLINE" and any(s["rentable"] for s in data["slots"]) else None

    result: dict[str, Any] = await eventually(ready)
    return result


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
            headers=Api.auth(operator_token),
        )
        assert r.status_code == 201, r.text
        await wait_ready(client, token, station_a.sn)
        packages = (await client.get("/api/rentals/packages", headers=Api.auth(token))).json()["data"]
        package = next(p for p in packages if p["package_type"] == "HOURLY" and p["payment_model"] == "PREPAID")

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
        detail = (await client.get(f"/api/stations/{station_a.sn}", headers=Api.auth(token))).json()["data"]
        hole = next(s for s in detail["slots"] if s["slot_number"] == rental["slot_number"])
        assert hole["status"] == "AVAILABLE" and hole["battery_level"] is None

        await station_b.return_powerbank(rental["powerbank_sn"])

        async def completed() -> dict[str, Any] | None:
            r = await client.get("/api/rentals/history", headers=Api.auth(token))
            item: dict[str, Any] = r.json()["data"]["results"][0]
            return item if item["status"] == "COMPLETED" else None

        done = await eventually(completed, timeout=2.0)
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
        frame = rentbox.ReturnEvent(board=1, hole=hole_b, area=0, sn=rental["powerbank_sn"], state=1, software_version=1, soc=80)
        await station_b.publish_raw("update", rentbox.encode(frame))
        await eventually(lambda: return_events(system, station_b.sn, rental["powerbank_sn"], 2))
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - price
        assert len((await client.get("/api/payments/transactions", headers=Api.auth(token))).json()["data"]["results"]) == 2
    finally:
        for cabinet in (station_a, station_b):
            await cabinet.stop()
