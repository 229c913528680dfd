"""The HTTP calls cabinet firmware makes (rentbox-v1.md section 5), against the running system.

`sign` has no secret, so anyone who knows a cabinet's SN can make these calls: an upload is a hint that at
most makes the connected cabinet answer `check` over MQTT, and the boot call never takes the secret of a
cabinet whose MQTT session still answers.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import rentbox
from domain import stations
from simulators.cabinet import CabinetCredentials, CabinetRefused, SimulatedCabinet
from storage.models import DeviceEvent, Station
from tests.conftest import Api
from tests.support import (
    active,
    eventually,
    funded_user,
    metric,
    provision,
    rent,
    start_cabinet,
    wait_ready,
)

pytestmark = pytest.mark.integration
CON, UPLOAD = "/api/iot/client/con", "/api/rentbox/upload/data"


def signed(**params: str) -> dict[str, str]:
    return {**params, "sign": rentbox.sign(params)}


def credentials(answer: dict[str, Any]) -> CabinetCredentials:
    sn, product_key, host, port, username, password, _ = answer["data"].split(",")
    return CabinetCredentials(
        sn=sn, host=host, port=int(port), username=username, password=password, product_key=product_key
    )


async def logs_in(creds: CabinetCredentials, banks: dict[int, str] | None = None) -> bool:
    """Whether the broker takes these credentials (connects a simulated cabinet holding `banks`, and
    disconnects)."""
    cabinet = SimulatedCabinet(creds, boards=1, holes_per_board=4, banks=banks or {})
    try:
        await cabinet.start()
    except CabinetRefused:
        return False
    await cabinet.stop()
    return True


def upload_params(sn: str) -> dict[str, str]:
    return signed(rentboxSN=sn, signal="27", ssid="", io="0")


def forged_snapshot(cabinet: SimulatedCabinet, extra: dict[int, str]) -> bytes:
    """The cabinet's 0x10 as it is, with `extra` banks ({hole: SN}) shown in their holes."""
    now = cabinet.snapshot()
    holes = tuple(
        replace(h, state=1, sn=extra[h.hole], soc=90, temperature=30, sensor=0) if h.hole in extra else h
        for h in now.holes
    )
    return rentbox.encode(replace(now, holes=holes))


async def slot_view(client: httpx.AsyncClient, token: str, sn: str) -> list[tuple[int, str, str | None]]:
    """The live holes as operators see them (with each bank's SN)."""
    data = (await client.get(f"/api/admin/stations/{sn}", headers=Api.auth(token))).json()["data"]
    return [(s["slot_number"], s["status"], s["powerbank_sn"]) for s in data["slots"]]


async def returns_recorded(system: Any, station_sn: str) -> int:
    """Returns the station's kiosk recorded: 0x40s and banks a snapshot showed back."""
    async with system.services.db.transaction() as session:
        count: int = (
            await session.scalar(
                select(func.count())
                .select_from(DeviceEvent)
                .where(
                    DeviceEvent.station_sn == station_sn,
                    DeviceEvent.kind.in_(("return", "return_reconciled")),
                )
            )
            or 0
        )
    return count


def checks(cabinet: SimulatedCabinet) -> int:
    return sum(c["cmd"] == "check" for c in cabinet.commands)


async def rented(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> tuple[SimulatedCabinet, str, dict[str, Any]]:
    """A connected cabinet, a user and that user's ACTIVE rental of one of its banks."""
    cabinet = await start_cabinet(client, operator_token)
    await wait_ready(client, operator_token, cabinet.sn)
    user = await funded_user(client, api, operator_token)
    r = await rent(client, user["access"], cabinet.sn)
    assert r.status_code == 201, r.text
    rental: dict[str, Any] = r.json()["data"]
    assert rental["status"] == "ACTIVE"
    return cabinet, user["access"], rental


async def still_active(client: httpx.AsyncClient, token: str, rental: dict[str, Any]) -> bool:
    now = await active(client, token)
    return now is not None and now["id"] == rental["id"] and now["status"] == "ACTIVE"


# --- POST /api/rentbox/upload/data --------------------------------------------------------------------------
async def test_a_forged_snapshot_does_not_return_a_rented_bank(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    """A renter keeps the bank and posts a 0x10 showing it back: the rental stays ACTIVE. The cabinet is asked
    `check` over MQTT instead, and its truthful answer (the hole is empty) changes nothing either."""
    cabinet, token, rental = await rented(client, api, operator_token)
    try:
        before = await slot_view(client, operator_token, cabinet.sn)
        asked = checks(cabinet)
        sent = await metric(client, "powerbank_firmware_uploads_ignored_total", reason="check_sent")
        forged = forged_snapshot(cabinet, {rental["slot_number"]: rental["powerbank_sn"]})

        r = await client.post(UPLOAD, params=upload_params(cabinet.sn), content=forged)
        assert r.status_code == 200 and r.json()["code"] == 200 and r.json()["msg"] == "ok"

        async def asked_over_mqtt() -> bool:
            return checks(cabinet) > asked

        await eventually(asked_over_mqtt)
        # The cabinet answers commands in order: once this operator check is answered, so was the probe.
        r = await client.post(
            f"/api/admin/stations/{cabinet.sn}/commands",
            json={"command": "check"},
            headers=Api.auth(operator_token),
        )
        assert r.status_code == 200, r.text
        await system.services.fleet.drained()

        assert await still_active(client, token, rental)
        assert await returns_recorded(system, cabinet.sn) == 0
        assert await slot_view(client, operator_token, cabinet.sn) == before
        assert rental["powerbank_sn"] not in cabinet.banks().values()
        after = await metric(client, "powerbank_firmware_uploads_ignored_total", reason="check_sent")
        assert after == sent + 1
    finally:
        await cabinet.stop()


async def test_replies_and_returns_posted_over_http_are_refused(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    """A 0x40 (a return), a 0x31 (an eject's answer) or garbage over HTTP → the firmware's 400; nothing
    changes and the cabinet is not even asked."""
    cabinet, token, rental = await rented(client, api, operator_token)
    try:
        before = await slot_view(client, operator_token, cabinet.sn)
        asked = checks(cabinet)
        refused = await metric(client, "powerbank_firmware_requests_total", endpoint="upload", result="400")
        not_snapshot = await metric(client, "powerbank_firmware_uploads_ignored_total", reason="not_snapshot")
        invalid = await metric(client, "powerbank_firmware_uploads_ignored_total", reason="invalid_frame")
        hole, bank = rental["slot_number"], rental["powerbank_sn"]
        frames = [
            rentbox.ReturnEvent(board=1, hole=hole, area=0, sn=bank, state=1, software_version=1, soc=80),
            rentbox.EjectBySnResult(hole=hole, sn=bank, state=0),
        ]
        for body in [rentbox.encode(f) for f in frames] + [b"\xa8\x00\x05\x99\x00"]:
            r = await client.post(UPLOAD, params=upload_params(cabinet.sn), content=body)
            assert r.status_code == 400 and r.json()["code"] == 400, body.hex()
        await system.services.fleet.drained()

        assert await still_active(client, token, rental)
        assert await returns_recorded(system, cabinet.sn) == 0
        assert await slot_view(client, operator_token, cabinet.sn) == before
        assert checks(cabinet) == asked
        assert (
            await metric(client, "powerbank_firmware_requests_total", endpoint="upload", result="400")
            == refused + 3
        )
        assert (
            await metric(client, "powerbank_firmware_uploads_ignored_total", reason="not_snapshot")
            == not_snapshot + 2
        )
        assert (
            await metric(client, "powerbank_firmware_uploads_ignored_total", reason="invalid_frame")
            == invalid + 1
        )
    finally:
        await cabinet.stop()


async def test_an_upload_from_a_cabinet_not_connected_changes_nothing(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    """The cabinet is off MQTT: a 0x10 showing the rented bank back is logged and counted, nothing else."""
    cabinet, token, rental = await rented(client, api, operator_token)
    await cabinet.stop()

    async def offline() -> bool:
        r = await client.get(f"/api/stations/{cabinet.sn}", headers=Api.auth(operator_token))
        return bool(r.json()["data"]["status"] == "OFFLINE")

    await eventually(offline)
    before = await slot_view(client, operator_token, cabinet.sn)
    ignored = await metric(client, "powerbank_firmware_uploads_ignored_total", reason="cabinet_offline")
    genuine = forged_snapshot(cabinet, {rental["slot_number"]: rental["powerbank_sn"]})

    r = await client.post(UPLOAD, params=upload_params(cabinet.sn), content=genuine)
    assert r.status_code == 200 and r.json()["code"] == 200  # real firmware must not retry for ever

    async def counted() -> bool:
        return (
            await metric(client, "powerbank_firmware_uploads_ignored_total", reason="cabinet_offline")
            == ignored + 1
        )

    await eventually(counted)
    await system.services.fleet.drained()
    assert await still_active(client, token, rental)
    assert await returns_recorded(system, cabinet.sn) == 0
    assert await slot_view(client, operator_token, cabinet.sn) == before

    bad = await client.post(UPLOAD, params={**upload_params(cabinet.sn), "sign": "x"}, content=genuine)
    assert bad.status_code == 403
    unknown = await client.post(UPLOAD, params=upload_params("NOPE123"), content=genuine)
    assert unknown.status_code == 404


# --- GET /api/iot/client/con ------------------------------------------------------------------------------
async def test_boot_call_issues_working_credentials_to_provisioned_cabinets_only(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    creds = await provision(client, operator_token)
    r = await client.get(CON, params=signed(uuid=creds.sn, version="1.0.3"))
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["msg"] == "ok" and isinstance(body["time"], int)
    sn, product_key, host, port, username, _, timestamp_ms = body["data"].split(",")
    assert (sn, product_key, username) == (creds.sn, "powerbank", creds.sn)
    assert (host, int(port)) == (creds.host, creds.port) and timestamp_ms.isdigit()
    assert await logs_in(credentials(body))
    assert not await logs_in(creds)  # the secret given at provisioning was replaced

    unknown = await client.get(CON, params=signed(uuid="NOPE123", version="1"))
    assert unknown.status_code == 404 and unknown.json()["code"] == 404
    forged = await client.get(CON, params={"uuid": creds.sn, "version": "1", "sign": "0" * 32})
    assert forged.status_code == 403 and forged.json()["code"] == 403


async def stations_row(system: Any, sn: str) -> Station:
    async with system.services.db.transaction() as session:
        return await stations.by_serial(session, sn)


async def test_a_cabinet_that_logged_in_gets_no_new_credentials_without_an_operator(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    """Issue 10, item 3: anyone who knows the SN of an offline cabinet got fresh credentials and locked the
    real one out. Once a cabinet has logged in, the boot call is refused (409) and its password kept, online
    or not; refused calls do not use up its hourly budget."""
    cabinet = await start_cabinet(client, operator_token)
    try:
        await wait_ready(client, operator_token, cabinet.sn)

        async def recorded() -> bool:
            return (await stations_row(system, cabinet.sn)).first_connected_at is not None

        await eventually(recorded)
    finally:
        await cabinet.stop()  # offline now, as after a power cut
    refused = await metric(client, "powerbank_firmware_requests_total", endpoint="con", result="409")
    budget = system.services.settings.con_per_cabinet_per_hour
    for _ in range(budget + 2):
        r = await client.get(CON, params=signed(uuid=cabinet.sn, version="1.0.3"))
        assert r.status_code == 409, r.text
        assert (
            r.json()["code"] == 409
            and "re-provisioning window" in r.json()["msg"]
            and r.json()["data"] is None
        )
    assert await metric(client, "powerbank_firmware_requests_total", endpoint="con", result="409") == (
        refused + budget + 2
    )
    assert await logs_in(cabinet.credentials, cabinet.banks())  # it reconnects with the password it had

    # An operator opens a window (audited): one boot call gets credentials (not 429: nothing was used up)
    op = {"Authorization": f"Bearer {operator_token}"}
    r = await client.post(f"/api/admin/stations/{cabinet.sn}/reprovision", headers=op)
    assert r.status_code == 200, r.text
    ip = str(ipaddress.ip_address(f"2001:db8::{uuid.uuid4().hex[:4]}"))  # as the server writes it
    r = await client.get(
        CON, params=signed(uuid=cabinet.sn, version="1.0.3"), headers={"X-Forwarded-For": ip}
    )
    assert r.status_code == 200, r.text
    assert await logs_in(credentials(r.json()), cabinet.banks())
    assert not await logs_in(cabinet.credentials, cabinet.banks())
    again = await client.get(CON, params=signed(uuid=cabinet.sn, version="1.0.3"))
    assert again.status_code == 409  # the window is used up by that one issue
    detail = (await client.get(f"/api/admin/stations/{cabinet.sn}", headers=op)).json()["data"]
    assert detail["credentials_issued_ip"] in (ip, "127.0.0.1") and detail["credentials_issued_at"]
    assert detail["first_connected_at"] and detail["reprovision_until"] is None
    entries = await client.get(
        "/api/admin/audit", params={"target_type": "station", "target_id": cabinet.sn}, headers=op
    )
    assert "station.reprovision_opened" in [e["action"] for e in entries.json()["data"]["results"]]


async def test_opening_a_window_closes_a_live_session_at_once(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    """Whoever holds the cabinet's session (the cabinet, or an impostor) is cut off, so it cannot answer
    for the cabinet while the real one re-provisions."""
    cabinet = await start_cabinet(client, operator_token)
    try:
        await wait_ready(client, operator_token, cabinet.sn)
        op = {"Authorization": f"Bearer {operator_token}"}
        r = await client.post(f"/api/admin/stations/{cabinet.sn}/reprovision", headers=op)
        assert r.status_code == 200 and r.json()["data"]["disconnected"] is True, r.text

        async def cut_off() -> bool:
            return not cabinet.connected

        await eventually(cut_off)
        r = await client.get(CON, params=signed(uuid=cabinet.sn, version="1.0.3"))
        assert r.status_code == 200, r.text
    finally:
        await cabinet.stop()
    assert await logs_in(credentials(r.json()), cabinet.banks())


async def test_boot_call_is_rate_limited_per_cabinet_and_per_client_ip(
    client: httpx.AsyncClient, operator_token: str, system: Any
) -> None:
    creds = await provision(client, operator_token)  # never logged in: every call issues credentials
    limit = system.services.settings.con_per_cabinet_per_hour
    for _ in range(limit):
        r = await client.get(CON, params=signed(uuid=creds.sn, version="1"))
        assert r.status_code == 200, r.text
    r = await client.get(CON, params=signed(uuid=creds.sn, version="1"))
    assert r.status_code == 429 and r.json()["code"] == 429 and int(r.headers["Retry-After"]) >= 1

    # Per client IP (the suite's own limit is generous: lowered here, for addresses of this test only).
    first, second = await provision(client, operator_token), await provision(client, operator_token)
    ip, other_ip = (f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}" for _ in range(2))
    settings = system.services.settings
    saved, settings.con_per_ip_per_hour = settings.con_per_ip_per_hour, 2
    try:
        for _ in range(2):
            r = await client.get(
                CON, params=signed(uuid=first.sn, version="1"), headers={"X-Forwarded-For": ip}
            )
            assert r.status_code == 200, r.text
        r = await client.get(CON, params=signed(uuid=second.sn, version="1"), headers={"X-Forwarded-For": ip})
        assert r.status_code == 429 and r.json()["code"] == 429
        r = await client.get(
            CON, params=signed(uuid=second.sn, version="1"), headers={"X-Forwarded-For": other_ip}
        )
        assert r.status_code == 200, r.text
    finally:
        settings.con_per_ip_per_hour = saved
