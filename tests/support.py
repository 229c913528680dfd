"""Helpers for end-to-end tests over the running system (see conftest.py for the fixtures)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from simulators import Faults
from simulators.cabinet import CabinetCredentials, SimulatedCabinet, random_banks
from storage.models import DeviceEvent
from tests.conftest import Api, new_phone

RNG, TAKEN = random.Random(), set[str]()  # power-bank SNs unique across every cabinet of the session


async def eventually(check: Any, *, within: float = 5.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy (bounded by `within` seconds)."""
    async with asyncio.timeout(within):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(interval)


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """A sample's value from the fleet-wide /metrics scrape (0 when absent)."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def provision(
    client: httpx.AsyncClient, token: str, *, holes: int = 4, where: tuple[float, float] = (27.7, 85.3)
) -> CabinetCredentials:
    """A new station through the operator API; its MQTT credentials as a cabinet gets them."""
    sn = f"T{uuid.uuid4().hex[:12].upper()}"
    body = {
        "serial_number": sn,
        "name": sn,
        "latitude": where[0],
        "longitude": where[1],
        "holes_per_board": holes,
    }
    r = await client.post("/api/admin/stations", json=body, headers=Api.auth(token))
    assert r.status_code == 201, r.text
    mqtt = r.json()["data"]["mqtt"]
    return CabinetCredentials(
        sn=sn,
        host=mqtt["host"],
        port=mqtt["port"],
        username=mqtt["username"],
        password=mqtt["password"],
        product_key=mqtt["product_key"],
    )


def some_banks(holes: int = 4, fill: float = 0.75) -> dict[int, str]:
    return random_banks(RNG, hole_count=holes, fill=fill, taken=TAKEN)


async def start_cabinet(
    client: httpx.AsyncClient,
    token: str,
    *,
    holes: int = 4,
    banks: dict[int, str] | None = None,
    faults: Faults | None = None,
    **kw: Any,
) -> SimulatedCabinet:
    """Provision a station and connect its simulated cabinet."""
    creds = await provision(client, token, holes=holes)
    banks = banks if banks is not None else some_banks(holes)
    cabinet = SimulatedCabinet(creds, boards=1, holes_per_board=holes, banks=banks, faults=faults, **kw)
    await cabinet.start()
    return cabinet


async def start_cabinets(client: httpx.AsyncClient, token: str, count: int) -> list[SimulatedCabinet]:
    return [await start_cabinet(client, token) for _ in range(count)]


async def wait_ready(client: httpx.AsyncClient, token: str, sn: str, within: float = 5.0) -> dict[str, Any]:
    """Wait until the station is ONLINE with a rentable bank; its detail."""

    async def ready() -> dict[str, Any] | None:
        r = await client.get(f"/api/stations/{sn}", headers=Api.auth(token))
        data: dict[str, Any] = r.json()["data"]
        return data if data["status"] == "ONLINE" and any(s["rentable"] for s in data["slots"]) else None

    result: dict[str, Any] = await eventually(ready, within=within)
    return result


async def funded_user(
    client: httpx.AsyncClient, api: Api, operator_token: str, amount: str = "500"
) -> dict[str, Any]:
    """A new user, logged in, whose wallet an operator credited."""
    user = await api.login(new_phone())
    r = await client.post(
        f"/api/admin/users/{user['user']['id']}/wallet/credit",
        json={"amount": amount, "reason": "test"},
        headers={**Api.auth(operator_token), "Idempotency-Key": f"fund-{uuid.uuid4()}"},
    )
    assert r.status_code == 201, r.text
    return user


async def rent(client: httpx.AsyncClient, token: str, station_sn: str) -> httpx.Response:
    return await client.post(
        "/api/rentals/start", json={"station_sn": station_sn, "package_id": 1}, headers=Api.auth(token)
    )


async def active(client: httpx.AsyncClient, token: str) -> dict[str, Any] | None:
    data: dict[str, Any] | None = (await client.get("/api/rentals/active", headers=Api.auth(token))).json()[
        "data"
    ]
    return data


async def rental_status(client: httpx.AsyncClient, token: str, rental_id: str) -> str:
    history = (await client.get("/api/rentals/history", headers=Api.auth(token))).json()["data"]["results"]
    status: str = next(r["status"] for r in history if r["id"] == rental_id)
    return status


def at_most_once(*cabinets: SimulatedCabinet) -> None:
    """No eject command made more than one power bank come out (the simulator counts physical ejects)."""
    for cabinet in cabinets:
        doubles = {key: n for key, n in cabinet.ejects_per_command.items() if n > 1}
        assert not doubles, (cabinet.sn, [e for e in cabinet.physical_ejects if e[0] in doubles])


async def return_events(system: Any, station_sn: str) -> int:
    """How many power-bank returns (0x40) the station's kiosk recorded."""
    async with system.services.db.transaction() as session:
        count: int = (
            await session.scalar(
                select(func.count())
                .select_from(DeviceEvent)
                .where(DeviceEvent.station_sn == station_sn, DeviceEvent.kind == "return")
            )
            or 0
        )
    return count


async def every_result(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Every row of a paged listing (`?page=`), whatever other tests left in the shared database."""
    rows: list[dict[str, Any]] = []
    page = 1
    while True:
        r = await client.get(url, params={"page": page, "page_size": 100}, headers=headers)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        rows += data["results"]
        if page * data["page_size"] >= data["count"]:
            return rows
        page += 1


@contextmanager
def overridden(settings: Any, **values: Any) -> Iterator[None]:
    """Set settings fields of the running app for a while, then put the old values back."""
    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
