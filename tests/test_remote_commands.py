"""Operators' remote commands against simulated cabinets over the real broker, hosts and API."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from simulators import Faults
from simulators.cabinet import SimulatedCabinet
from tests.conftest import Api
from tests.support import at_most_once, eventually, provision, start_cabinet

pytestmark = pytest.mark.integration


async def command(client: httpx.AsyncClient, token: str, sn: str, **body: Any) -> httpx.Response:
    return await client.post(f"/api/admin/stations/{sn}/commands", json=body, headers=Api.auth(token))


async def admin_ready(client: httpx.AsyncClient, token: str, sn: str) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        data: dict[str, Any] = (
            await client.get(f"/api/admin/stations/{sn}", headers=Api.auth(token))
        ).json()["data"]
        return data if data["online"] and data["ready"] else None

    result: dict[str, Any] = await eventually(ready, within=10.0)
    return result


async def audit_entries(client: httpx.AsyncClient, token: str, sn: str) -> list[dict[str, Any]]:
    r = await client.get(
        "/api/admin/audit",
        params={"target_type": "station", "target_id": sn, "page_size": 100},
        headers=Api.auth(token),
    )
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["data"]["results"]
    return results


async def test_check_answers_with_the_cabinets_holes(client: httpx.AsyncClient, operator_token: str) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "31000001", 3: "31000003"})
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        r = await command(client, operator_token, cabinet.sn, command="check")
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["status"] == "answered"
        held = {s["slot_number"]: s["powerbank_sn"] for s in data["slots"]}
        assert held == {1: "31000001", 2: None, 3: "31000003", 4: None}
        assert [c["cmd"] for c in cabinet.commands].count("check") >= 2  # on connect, and ours
        entry = (await audit_entries(client, operator_token, cabinet.sn))[0]
        assert entry["action"] == "station.command.check"
        assert entry["after"]["result"]["status"] == "answered"
    finally:
        await cabinet.stop()


async def test_eject_hole_ejects_exactly_once_and_empties_the_slot(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={2: "32000002", 4: "32000004"})
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=2)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data | {"request_id": None} == {
            "request_id": None,
            "command": "eject_hole",
            "status": "answered",
            "slots": None,
            "hole": 2,
            "success": True,
            "state": "0x01",
            "powerbank_sn": "32000002",
            "reply_lost": False,
        }
        assert cabinet.eject_counts["32000002"] == 1 and len(cabinet.physical_ejects) == 1
        assert cabinet.banks() == {4: "32000004"}
        detail = (
            await client.get(f"/api/admin/stations/{cabinet.sn}", headers=Api.auth(operator_token))
        ).json()["data"]
        slot = next(s for s in detail["slots"] if s["slot_number"] == 2)
        assert slot["status"] == "AVAILABLE" and slot["powerbank_sn"] is None

        # The hole is empty now: the cabinet says so (0x00) and nothing else comes out.
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=2)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["success"] is False and r.json()["data"]["state"] == "0x00"
        assert len(cabinet.physical_ejects) == 1
        at_most_once(cabinet)
        entry = (await audit_entries(client, operator_token, cabinet.sn))[1]
        assert entry["action"] == "station.command.eject_hole"
        assert entry["after"]["args"] == {"hole": 2}
        assert entry["after"]["result"]["powerbank_sn"] == "32000002"
    finally:
        await cabinet.stop()


async def test_a_lost_eject_reply_is_settled_by_a_check_not_by_resending(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "33000001"})
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        cabinet.faults = Faults(lose_eject_reply=1.0)
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=1)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["success"] is True and data["reply_lost"] is True and data["powerbank_sn"] == "33000001"
        assert [c["cmd"] for c in cabinet.commands].count("popup") == 1
        assert len(cabinet.physical_ejects) == 1
    finally:
        await cabinet.stop()


async def test_commands_without_a_reply_are_sent_and_arrive(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        for body in (
            {"command": "volume", "level": 30},
            {"command": "mode", "mode": "4g"},
            {"command": "firmware_push"},
            {"command": "wifi", "ssid": "cafe-net", "password": "s3cret-pass"},
        ):
            r = await command(client, operator_token, cabinet.sn, **body)
            assert r.status_code == 200, r.text
            assert r.json()["data"]["status"] == "sent"

        async def arrived() -> bool:
            return cabinet.firmware_updates == 1 and cabinet.settings == {
                "volume": "30",
                "mode": "4g",
                "wifi_ssid": "cafe-net",
                "wifi_password": "s3cret-pass",
            }

        await eventually(arrived)
        entries = await audit_entries(client, operator_token, cabinet.sn)
        wifi = next(e for e in entries if e["action"] == "station.command.wifi")
        assert wifi["after"]["args"] == {"ssid": "cafe-net", "password": "***"}
        assert "s3cret-pass" not in json.dumps(entries)
        volume = next(e for e in entries if e["action"] == "station.command.volume")
        assert volume["after"]["args"] == {"level": 30} and volume["after"]["result"]["status"] == "sent"
    finally:
        await cabinet.stop()


async def test_reboot_is_sent_and_the_cabinet_comes_back(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    cabinet = await start_cabinet(client, operator_token)
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        checks = [c["cmd"] for c in cabinet.commands].count("check")
        r = await command(client, operator_token, cabinet.sn, command="reboot")
        assert r.status_code == 200, r.text
        assert r.json()["data"]["status"] == "sent"

        async def reconnected() -> bool:  # a reconnect is followed by the server's check
            return [c["cmd"] for c in cabinet.commands].count("check") > checks

        await eventually(reconnected, within=10.0)
        await admin_ready(client, operator_token, cabinet.sn)
    finally:
        await cabinet.stop()


async def test_an_offline_cabinet_is_503(client: httpx.AsyncClient, operator_token: str) -> None:
    creds = await provision(client, operator_token)  # never connects
    for body in (
        {"command": "check"},
        {"command": "volume", "level": 5},
        {"command": "eject_hole", "hole": 1},
    ):
        r = await command(client, operator_token, creds.sn, **body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "station_offline"
    entries = await audit_entries(client, operator_token, creds.sn)
    assert entries[0]["after"]["result"]["error"] == "station_offline"


async def test_a_silent_cabinet_times_out(client: httpx.AsyncClient, operator_token: str) -> None:
    cabinet = await start_cabinet(client, operator_token, banks={1: "34000001"})
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        cabinet.faults = Faults(silent=True)
        r = await command(client, operator_token, cabinet.sn, command="check")
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "command_timeout"
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=1)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["context"]["detail"] == "no_reply_no_snapshot"
        assert cabinet.physical_ejects == [] and cabinet.banks() == {1: "34000001"}
    finally:
        await cabinet.stop()


async def test_bad_commands_are_refused_with_an_envelope(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    creds = await provision(client, operator_token, holes=4)
    cases = [
        ({"command": "volume"}, 422),
        ({"command": "volume", "level": 101}, 422),
        ({"command": "wifi", "ssid": "x"}, 422),
        ({"command": "mode", "mode": "5g"}, 422),
        ({"command": "self_destruct"}, 422),
        ({"command": "eject_hole"}, 422),
        ({"command": "eject_hole", "hole": 5}, 400),  # the station has 4 holes
    ]
    for body, status in cases:
        r = await command(client, operator_token, creds.sn, **body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == "validation_error"
    r = await command(client, operator_token, "NO-SUCH-STATION", command="check")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_an_eject_by_hole_waits_behind_no_other_and_keeps_the_rental_flow(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    """An operator eject and a cabinet that still rents afterwards: the kiosk's eject lock is released."""
    cabinet: SimulatedCabinet = await start_cabinet(
        client, operator_token, banks={1: "35000001", 2: "35000002"}
    )
    try:
        await admin_ready(client, operator_token, cabinet.sn)
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=1)
        assert r.json()["data"]["success"] is True
        r = await command(client, operator_token, cabinet.sn, command="eject_hole", hole=2)
        assert r.json()["data"]["success"] is True
        assert sorted(sn for _, sn in cabinet.physical_ejects) == ["35000001", "35000002"]
        at_most_once(cabinet)
    finally:
        await cabinet.stop()
