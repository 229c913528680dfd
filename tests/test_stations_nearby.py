"""Stations around a rental over the real system: nearby (Redis GEO), favorites, issue reports."""

from __future__ import annotations

import math
import uuid
from typing import Any

import httpx
import pytest

from simulators.cabinet import SimulatedCabinet
from tests.conftest import Api, new_phone
from tests.support import eventually, provision, some_banks, wait_ready

pytestmark = pytest.mark.integration

# Around Bhaktapur, well away from the 27.7, 85.3 where the other tests' stations stand (≈ 13 km).
BHAKTAPUR = (27.6722, 85.4279)  # the user
SURYABINAYAK = (27.6605, 85.4339)  # ≈ 1.4 km
THIMI = (27.6810, 85.3870)  # ≈ 4.1 km
NAGARKOT = (27.7172, 85.5200)  # ≈ 10.4 km


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    (lat1, lng1), (lat2, lng2) = a, b
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lng2 - lng1) / 2) ** 2
    )
    return 2 * 6371.0088 * math.asin(math.sqrt(h))


async def nearby(
    client: httpx.AsyncClient, token: str, where: tuple[float, float] = BHAKTAPUR, **params: Any
) -> dict[str, Any]:
    r = await client.get(
        "/api/stations/nearby",
        params={"lat": where[0], "lng": where[1], "page_size": 100, **params},
        headers=Api.auth(token),
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] is True
    data: dict[str, Any] = body["data"]
    return data


def mine(page: dict[str, Any], sns: set[str]) -> list[dict[str, Any]]:
    return [item for item in page["results"] if item["serial_number"] in sns]


async def test_nearby_nearest_first_with_distances_and_radius(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    places = {"far": NAGARKOT, "near": SURYABINAYAK, "mid": THIMI}
    sn = {name: (await provision(client, operator_token, where=where)).sn for name, where in places.items()}
    token = (await api.login(new_phone()))["access"]

    page = await nearby(client, token, radius=12)
    assert set(page) == {"results", "count", "page", "page_size"}
    assert page["count"] == len(page["results"]) and page["page"] == 1
    distances = [item["distance_km"] for item in page["results"]]
    assert distances == sorted(distances) and all(d <= 12 for d in distances)
    items = mine(page, set(sn.values()))
    assert [i["serial_number"] for i in items] == [sn["near"], sn["mid"], sn["far"]]
    for item in items:
        name = next(k for k, v in sn.items() if v == item["serial_number"])
        assert item["distance_km"] == pytest.approx(haversine_km(BHAKTAPUR, places[name]), abs=0.05)
        assert (item["latitude"], item["longitude"]) == places[name]
        assert item["status"] == "OFFLINE" and item["available_power_banks"] == 0
        assert item["total_slots"] == 4 and item["name"] == item["serial_number"]

    within_5 = mine(await nearby(client, token, radius=5), set(sn.values()))
    assert [i["serial_number"] for i in within_5] == [sn["near"], sn["mid"]]
    default = mine(await nearby(client, token), set(sn.values()))  # radius defaults to 5 km
    assert [i["serial_number"] for i in default] == [sn["near"], sn["mid"]]

    first = await nearby(client, token, radius=12, page_size=1)
    assert len(first["results"]) == 1 and first["count"] == page["count"]
    assert first["results"][0]["distance_km"] == distances[0]


async def test_nearby_follows_live_availability_and_survives_a_lost_index(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    from domain import stations

    online_creds = await provision(client, operator_token, where=SURYABINAYAK)
    offline_sn = (await provision(client, operator_token, where=THIMI)).sn
    token = (await api.login(new_phone()))["access"]
    ours = {online_creds.sn, offline_sn}
    assert {i["serial_number"] for i in mine(await nearby(client, token), ours)} == ours
    assert mine(await nearby(client, token, available="true"), ours) == []

    cabinet = SimulatedCabinet(online_creds, holes_per_board=4, banks=some_banks(4, fill=1.0))
    await cabinet.start()
    try:
        await wait_ready(client, token, cabinet.sn)

        async def available() -> list[dict[str, Any]]:
            return mine(await nearby(client, token, available="true"), ours)

        items = await eventually(available)
        assert [i["serial_number"] for i in items] == [cabinet.sn]
        assert items[0]["status"] == "ONLINE" and items[0]["available_power_banks"] > 0
        both = {i["serial_number"]: i for i in mine(await nearby(client, token), ours)}
        assert both[cabinet.sn]["status"] == "ONLINE" and both[cabinet.sn]["available_power_banks"] > 0
        assert both[offline_sn]["status"] == "OFFLINE" and both[offline_sn]["available_power_banks"] == 0

        # Redis lost the index (or it predates these stations): the next query rebuilds it from the
        # database, and availability from the live summaries the hosts wrote.
        await system.services.redis.delete(
            stations.GEO_KEY, stations.GEO_AVAILABLE_KEY, stations.GEO_FINGERPRINT_KEY
        )
        assert [i["serial_number"] for i in await available()] == [cabinet.sn]
        assert {i["serial_number"] for i in mine(await nearby(client, token), ours)} == ours
    finally:
        await cabinet.stop()

    async def gone() -> bool:
        return not mine(await nearby(client, token, available="true"), ours)

    await eventually(gone)
    left = {i["serial_number"]: i for i in mine(await nearby(client, token), ours)}
    assert left[cabinet.sn]["status"] == "OFFLINE" and left[cabinet.sn]["available_power_banks"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"lat": 91, "lng": 85.3},
        {"lat": 89, "lng": 85.3},  # beyond what a GEO index holds
        {"lat": "north", "lng": 85.3},
        {"lat": "nan", "lng": 85.3},
        {"lat": 27.7, "lng": 181},
        {"lng": 85.3},
        {"lat": 27.7, "lng": 85.3, "radius": 0},
        {"lat": 27.7, "lng": 85.3, "radius": -1},
        {"lat": 27.7, "lng": 85.3, "radius": 51},
        {"lat": 27.7, "lng": 85.3, "radius": "inf"},
        {"lat": 27.7, "lng": 85.3, "page_size": 101},
    ],
)
async def test_nearby_refuses_bad_parameters(
    client: httpx.AsyncClient, api: Api, params: dict[str, Any]
) -> None:
    token = (await api.login(new_phone()))["access"]
    r = await client.get("/api/stations/nearby", params=params, headers=Api.auth(token))
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False and r.json()["error"]["code"] == "validation_error"


async def test_nearby_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/stations/nearby", params={"lat": 27.7, "lng": 85.3})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_favorites_idempotent_and_per_user(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    first = (await provision(client, operator_token, where=THIMI)).sn
    second = (await provision(client, operator_token, where=NAGARKOT)).sn
    alice = Api.auth((await api.login(new_phone()))["access"])
    bob = Api.auth((await api.login(new_phone()))["access"])

    async def favorites(headers: dict[str, str]) -> list[dict[str, Any]]:
        r = await client.get("/api/stations/favorites", headers=headers)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]  # a short plain list, not a page
        return data

    assert await favorites(alice) == []
    r = await client.post(f"/api/stations/{first}/favorite", headers=alice)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["is_favorite"] is True and r.json()["data"]["serial_number"] == first
    since = r.json()["data"]["favorited_at"]
    r = await client.post(f"/api/stations/{first}/favorite", headers=alice)
    assert r.status_code == 200 and r.json()["data"]["favorited_at"] == since
    assert (await client.post(f"/api/stations/{second}/favorite", headers=alice)).status_code == 201

    listed = await favorites(alice)
    assert [f["serial_number"] for f in listed] == [second, first]  # most recent first
    assert listed[1]["favorited_at"] == since and listed[1]["status"] == "OFFLINE"
    assert {"name", "latitude", "available_power_banks", "total_slots"} <= listed[0].keys()
    assert await favorites(bob) == []

    for _ in range(2):
        r = await client.delete(f"/api/stations/{first}/favorite", headers=alice)
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"serial_number": first, "is_favorite": False, "favorited_at": None}
    assert [f["serial_number"] for f in await favorites(alice)] == [second]

    for method in ("post", "delete"):
        r = await getattr(client, method)("/api/stations/NOSUCHSTATION/favorite", headers=alice)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (await client.post(f"/api/stations/{first}/favorite")).status_code == 401


async def test_report_issue(client: httpx.AsyncClient, api: Api, operator_token: str, system: Any) -> None:
    sn = (await provision(client, operator_token, where=THIMI)).sn
    headers = Api.auth((await api.login(new_phone()))["access"])
    url = f"/api/stations/{sn}/report-issue"

    r = await client.post(
        url, json={"issue_type": "DAMAGED", "description": "  Door hinge broken. "}, headers=headers
    )
    assert r.status_code == 201, r.text
    report = r.json()["data"]
    assert report["station_sn"] == sn and report["issue_type"] == "DAMAGED"
    assert report["description"] == "Door hinge broken." and report["status"] == "OPEN"
    uuid.UUID(report["id"])
    assert report["created_at"].endswith(("+00:00", "Z"))
    # a value the existing app sends, with no description
    r = await client.post(url, json={"issue_type": "SLOT_ERROR"}, headers=headers)
    assert r.status_code == 201 and r.json()["data"]["description"] == ""

    for body in (
        {"issue_type": "EXPLODED", "description": "?"},
        {"description": "no type"},
        {"issue_type": "DIRTY", "description": "x" * 1001},
        {"issue_type": "OTHER", "description": "   "},
    ):
        r = await client.post(url, json=body, headers=headers)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "validation_error"
    r = await client.post(
        "/api/stations/NOSUCHSTATION/report-issue", json={"issue_type": "OFFLINE"}, headers=headers
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    limit = system.settings.station_issue_reports_per_hour
    for _ in range(limit - 2):
        assert (await client.post(url, json={"issue_type": "DIRTY"}, headers=headers)).status_code == 201
    r = await client.post(url, json={"issue_type": "DIRTY"}, headers=headers)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) > 0
