"""The HTTP calls cabinet firmware makes (rentbox-v1.md section 5), against the running system."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import rentbox
from simulators.cabinet import CabinetCredentials, SimulatedCabinet
from tests.conftest import Api
from tests.support import eventually, provision

pytestmark = pytest.mark.integration


def signed(**params: str) -> dict[str, str]:
    return {**params, "sign": rentbox.sign(params)}


async def test_boot_call_issues_working_credentials_to_provisioned_cabinets_only(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    creds = await provision(client, operator_token)
    r = await client.get("/api/iot/client/con", params=signed(uuid=creds.sn, version="1.0.3"))
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["msg"] == "ok" and isinstance(body["time"], int)
    sn, product_key, host, port, username, password, timestamp_ms = body["data"].split(",")
    assert (sn, product_key, username) == (creds.sn, "powerbank", creds.sn)
    assert (host, int(port)) == (creds.host, creds.port) and timestamp_ms.isdigit()
    cabinet = SimulatedCabinet(
        CabinetCredentials(sn=sn, host=host, port=int(port), username=username, password=password),
        boards=1,
        holes_per_board=4,
    )
    await cabinet.start()
    await cabinet.stop()

    unknown = await client.get("/api/iot/client/con", params=signed(uuid="NOPE123", version="1"))
    assert unknown.status_code == 404 and unknown.json()["code"] == 404
    forged = await client.get(
        "/api/iot/client/con", params={"uuid": creds.sn, "version": "1", "sign": "0" * 32}
    )
    assert forged.status_code == 403 and forged.json()["code"] == 403


async def test_snapshot_over_http_updates_the_cabinet_like_mqtt(
    client: httpx.AsyncClient, operator_token: str
) -> None:
    creds = await provision(client, operator_token)
    holes = tuple(
        rentbox.HoleInfo(
            hole=h,
            board=1,
            state=1 if h == 2 else 0,
            current=0.0,
            voltage=0.0,
            area=0,
            sn="85019121" if h == 2 else None,
            soc=90 if h == 2 else 0,
            temperature=30,
            charge_voltage=0.0,
            charge_current=0.0,
            software_version=1,
            sensor=0 if h == 2 else 0x80,
        )
        for h in range(1, 5)
    )
    frame = rentbox.encode(
        rentbox.Snapshot(
            boards=(rentbox.BoardInfo(index=1, temperature=25, software_version=1, hardware_version=1),),
            holes=holes,
        )
    )
    params = signed(rentboxSN=creds.sn, signal="27", ssid="", io="0")
    r = await client.post("/api/rentbox/upload/data", params=params, content=frame)
    assert r.status_code == 200 and r.json()["code"] == 200

    async def slots() -> list[dict[str, Any]] | None:
        data = (await client.get(f"/api/stations/{creds.sn}", headers=Api.auth(operator_token))).json()[
            "data"
        ]
        occupied = [s for s in data["slots"] if s["status"] == "OCCUPIED"]
        return data if occupied else None

    station = await eventually(slots)
    assert [s["slot_number"] for s in station["slots"] if s["status"] == "OCCUPIED"] == [2]
    assert station["status"] == "OFFLINE"  # an HTTP upload is state, not an MQTT session: not rentable
    assert not any(s["rentable"] for s in station["slots"])

    bad = await client.post("/api/rentbox/upload/data", params={**params, "sign": "x"}, content=frame)
    assert bad.status_code == 403
