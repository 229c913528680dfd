"""One end-to-end test per cabinet fault (issue 3): real broker, Ray hosts, PostgreSQL, and the simulator.

Every test checks the rule that matters most: no power bank comes out twice for one rental command
(the simulator counts physical ejects per command), the rental ends in the right state, money is right.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from simulators import Faults
from tests.conftest import Api
from tests.support import (
    at_most_once,
    eventually,
    funded_user,
    metric,
    rent,
    rental_status,
    return_events,
    some_banks,
    wait_ready,
)
from tests.support import start_cabinet as cabinet

pytestmark = pytest.mark.integration


@pytest.fixture
async def user(client: httpx.AsyncClient, api: Api, operator_token: str) -> dict[str, Any]:
    return await funded_user(client, api, operator_token)


async def test_lost_reply_after_the_bank_came_out(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    cab = await cabinet(client, operator_token, faults=Faults(lose_eject_reply=1.0))
    try:
        await wait_ready(client, user["access"], cab.sn)
        before = await metric(client, "powerbank_eject_seconds_count", result="lost_reply")
        r = await rent(client, user["access"], cab.sn)
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        assert rental["status"] == "ACTIVE"
        assert [sn for _, sn in cab.physical_ejects] == [rental["powerbank_sn"]]
        at_most_once(cab)
        assert await metric(client, "powerbank_eject_seconds_count", result="lost_reply") == before + 1
    finally:
        await cab.stop()


@pytest.mark.parametrize("delay", [0.5, 2.5])  # within the eject timeout (2 s), and past it
async def test_delayed_replies(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any], delay: float
) -> None:
    cab = await cabinet(client, operator_token)
    try:
        await wait_ready(client, user["access"], cab.sn)
        cab.faults = Faults(reply_delay_s=delay)
        r = await rent(client, user["access"], cab.sn)
        assert r.status_code == 201, r.text
        assert [sn for _, sn in cab.physical_ejects] == [r.json()["data"]["powerbank_sn"]]
        at_most_once(cab)
    finally:
        await cab.stop()


@pytest.mark.parametrize(("code", "banks_tried"), [(0x00, 2), (0x11, 2), (0x12, 2), (0xFE, 1)])
async def test_failed_ejects_cancel_with_nothing_charged(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any], code: int, banks_tried: int
) -> None:
    cab = await cabinet(client, operator_token, faults=Faults(eject_failure_code=code))
    try:
        await wait_ready(client, user["access"], cab.sn)
        r = await rent(client, user["access"], cab.sn)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "eject_failed" and error["context"]["code"] == f"0x{code:02X}"
        assert await rental_status(client, user["access"], error["context"]["rental_id"]) == "CANCELLED"
        assert cab.physical_ejects == []
        assert len([c for c in cab.commands if c["cmd"] == "popup_sn"]) == banks_tried
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(user["access"]))).json()
        assert balance["data"]["balance"] == "500.00"
        if banks_tried == 2:  # hole-level failures quarantine the hole
            detail = (await client.get(f"/api/stations/{cab.sn}", headers=Api.auth(user["access"]))).json()
            assert sum(s["status"] == "ERROR" for s in detail["data"]["slots"]) == 2
    finally:
        await cab.stop()


@pytest.mark.parametrize("fault", ["stuck", "hot"])
async def test_faulty_and_hot_holes_are_never_chosen(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any], fault: str
) -> None:
    banks = some_banks(fill=1.0)
    bad = frozenset({1, 2, 3})
    faults = Faults(stuck_holes=bad) if fault == "stuck" else Faults(hot_holes=bad)
    cab = await cabinet(client, operator_token, faults=faults, banks=banks)
    try:
        detail = await wait_ready(client, user["access"], cab.sn)
        assert [s["rentable"] for s in detail["slots"]] == [False, False, False, True]
        if fault == "stuck":
            assert [s["status"] for s in detail["slots"]][:3] == ["ERROR"] * 3
        r = await rent(client, user["access"], cab.sn)
        assert r.status_code == 201, r.text
        assert r.json()["data"]["powerbank_sn"] == banks[4]
        at_most_once(cab)
    finally:
        await cab.stop()


async def test_bad_checksums_are_accepted_and_counted(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    before = await metric(client, "powerbank_checksum_mismatches_total")
    cab = await cabinet(client, operator_token, faults=Faults(bad_checksum=True))
    try:
        await wait_ready(client, user["access"], cab.sn)
        r = await rent(client, user["access"], cab.sn)
        assert r.status_code == 201, r.text
        assert await metric(client, "powerbank_checksum_mismatches_total") >= before + 2  # snapshot + 0x31
    finally:
        await cab.stop()


async def test_every_return_sent_twice_closes_and_charges_once(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any], system: Any
) -> None:
    station_a = await cabinet(client, operator_token)
    station_b = await cabinet(client, operator_token, faults=Faults(duplicate_returns=True))
    try:
        token = user["access"]
        await wait_ready(client, token, station_a.sn)
        await wait_ready(client, token, station_b.sn)
        rental = (await rent(client, token, station_a.sn)).json()["data"]
        await station_b.return_powerbank(rental["powerbank_sn"])

        async def both_recorded() -> bool:
            return await return_events(system, station_b.sn) == 2

        await eventually(both_recorded)
        assert await rental_status(client, token, rental["id"]) == "COMPLETED"
        entries = (await client.get("/api/payments/transactions", headers=Api.auth(token))).json()["data"]
        assert [e["type"] for e in entries["results"]] == ["RENTAL_CHARGE", "TOPUP"]
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - Decimal(rental["package"]["price"])
    finally:
        await station_a.stop()
        await station_b.stop()


async def test_disconnect_mid_eject_is_settled_when_the_cabinet_comes_back(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    cab = await cabinet(client, operator_token)
    try:
        token = user["access"]
        await wait_ready(client, token, cab.sn)
        cab.faults = Faults(disconnect_mid_eject=5.0)
        r = await rent(client, token, cab.sn)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "eject_failed" and error["context"]["status"] == "PENDING_POPUP"
        cab.faults = Faults()
        [(_, ejected_sn)] = cab.physical_ejects

        async def active() -> dict[str, Any] | None:
            data: dict[str, Any] | None = (
                await client.get("/api/rentals/active", headers=Api.auth(token))
            ).json()["data"]
            return data if data and data["status"] == "ACTIVE" else None

        rental = await eventually(active, within=15)
        assert rental["id"] == error["context"]["rental_id"]
        assert rental["powerbank_sn"] == ejected_sn
        at_most_once(cab)
    finally:
        await cab.stop()


async def test_a_silent_cabinet_goes_offline_and_rents_nothing(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    cab = await cabinet(client, operator_token, keepalive_s=1)
    try:
        token = user["access"]
        await wait_ready(client, token, cab.sn)
        cab.faults = Faults(silent=True)

        async def offline() -> bool:
            data = (await client.get(f"/api/stations/{cab.sn}", headers=Api.auth(token))).json()["data"]
            return bool(data["status"] == "OFFLINE")

        await eventually(offline, within=10)
        r = await rent(client, token, cab.sn)
        assert r.status_code == 503 and r.json()["error"]["code"] == "station_offline"
        assert (await client.get("/api/rentals/active", headers=Api.auth(token))).json()["data"] is None
        cab.faults = Faults()
        await wait_ready(client, token, cab.sn)
        r = await rent(client, token, cab.sn)
        assert r.status_code == 201, r.text
        at_most_once(cab)
    finally:
        await cab.stop()
