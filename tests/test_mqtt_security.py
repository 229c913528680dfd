"""MQTT isolation from outside: the session's embedded broker (a Ray actor), cabinets provisioned through the
operator API, real kiosks behind it.

tests/test_broker_hardening.py proves the broker's rules against an in-test router; this file proves them
end to end, where a breach would matter: what a cabinet that logged in as SN A sends on B's topics, or
sends malformed on its own, never reaches B's (or its own) kiosk; A never receives B's commands whatever
filter it asks for; a client id that is not the username is refused; and each refusal is counted in the
fleet-wide `powerbank_mqtt_dropped_total{reason}` scrape under the right reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import rentbox
from rentbox.codec import ReturnEvent, encode
from simulators.cabinet import CabinetCredentials, SimulatedCabinet
from tests.conftest import Api
from tests.support import eventually, metric, provision, return_events, start_cabinet, wait_ready
from tests.test_broker_hardening import Msg, Raw

pytestmark = pytest.mark.integration
DROPPED = "powerbank_mqtt_dropped_total"


@dataclass
class Pair:
    a: CabinetCredentials  # the attacker: a Raw MQTT client with A's real credentials
    b: SimulatedCabinet  # the victim: a simulated cabinet with a live kiosk


@pytest.fixture
async def pair(client: httpx.AsyncClient, operator_token: str) -> AsyncIterator[Pair]:
    victim = await start_cabinet(client, operator_token, holes=4, banks={1: "90000001", 2: "90000002"})
    await wait_ready(client, operator_token, victim.sn)
    attacker = await provision(client, operator_token, holes=4)
    yield Pair(attacker, victim)
    await victim.stop()


async def connect(creds: CabinetCredentials, *, client_id: str | None = None, expect: int | None = 0) -> Raw:
    return await Raw.connect(
        creds.port,
        client_id or creds.username,
        username=creds.username,
        password=creds.password,
        expect=expect,
    )


async def drops(client: httpx.AsyncClient, reason: str) -> float:
    return await metric(client, DROPPED, reason=reason)


async def until_counted(client: httpx.AsyncClient, reason: str, expected: float) -> None:
    async def reached() -> bool:
        return await drops(client, reason) >= expected

    await eventually(reached, within=5)
    assert await drops(client, reason) == expected


async def station_state(client: httpx.AsyncClient, token: str, sn: str) -> Any:
    data = (await client.get(f"/api/stations/{sn}", headers=Api.auth(token))).json()["data"]
    return data["status"], data["available_power_banks"], data["slots"]


async def test_a_cabinet_never_receives_another_cabinets_commands(
    client: httpx.AsyncClient, system: Any, pair: Pair
) -> None:
    a, b, pk = pair.a, pair.b, pair.a.product_key
    spy = await connect(a)
    before = await drops(client, "acl")
    wide = [
        rentbox.command_topic(pk, b.sn),
        f"/{pk}/+/user/get",
        f"/{pk}/{b.sn}/#",
        f"/{pk}/{b.sn}/user/+",
        f"/{pk}/#",
        "#",
        "+/+/+/+/+",
        f"/{pk}/{a.username}/#",  # a wildcard over its own topics is refused too: exact topics only
    ]
    codes = await spy.subscribe(*((f, 0) for f in wide), (rentbox.command_topic(pk, a.username), 0))
    assert codes == [0x80] * len(wide) + [0]
    await until_counted(client, "acl", before + len(wide))

    # B's commands go to B only; A's next message is the marker sent to A after them
    for _ in range(3):
        await system.broker.publish_commands.remote([(b.sn, rentbox.check())])
    marker = b'{"cmd":"check","marker":"spy"}'
    await system.broker.publish_commands.remote([(a.username, marker)])
    received: list[Msg] = []
    while not received or received[-1].payload != marker:
        received.append(await spy.next(within=5))
    assert {m.topic for m in received} == {rentbox.command_topic(pk, a.username)}, received
    await spy.disconnect()


async def test_a_cabinet_cannot_publish_as_another(
    client: httpx.AsyncClient, system: Any, operator_token: str, pair: Pair
) -> None:
    a, b, pk = pair.a, pair.b, pair.a.product_key
    state = await station_state(client, operator_token, b.sn)
    returns = await return_events(system, b.sn)
    forged_return = encode(
        ReturnEvent(board=1, hole=4, area=0, sn="90000099", state=1, software_version=1, soc=90)
    )
    spy = await connect(a)
    before = await drops(client, "acl")
    for kind in ("update", "heart", "upload"):
        await spy.publish(rentbox.up_topic(pk, b.sn, kind), forged_return, qos=1)
    await spy.publish(rentbox.command_topic(pk, b.sn), b'{"cmd":"popup","io":"1","hole":"1"}', qos=1)
    await spy.publish(f"/{pk}/{b.sn}/user/update/extra", forged_return, qos=1)
    await until_counted(client, "acl", before + 5)
    assert not b.physical_ejects
    assert await return_events(system, b.sn) == returns
    assert await station_state(client, operator_token, b.sn) == state
    await spy.disconnect()


async def test_client_id_must_be_the_username(
    client: httpx.AsyncClient, operator_token: str, pair: Pair
) -> None:
    a, b = pair.a, pair.b
    before = await drops(client, "auth")
    # A's valid credentials under B's client id would take B's session over: refused
    assert await (await connect(a, client_id=b.sn, expect=None)).connack == 5
    # B's id with A's username, and A's id with a wrong password, likewise
    imposter = await Raw.connect(
        a.port, b.sn, username=a.username, password=b.credentials.password, expect=None
    )
    assert await imposter.connack == 5
    assert (
        await (
            await Raw.connect(a.port, a.username, username=a.username, password="guess", expect=None)
        ).connack
        == 5
    )
    await until_counted(client, "auth", before + 3)
    # B was never cut off
    assert b.connected
    assert (await station_state(client, operator_token, b.sn))[0] == "ONLINE"


async def test_oversized_and_malformed_frames_are_dropped_counted_and_change_nothing(
    client: httpx.AsyncClient, system: Any, operator_token: str, pair: Pair
) -> None:
    b = pair.b
    cap = system.settings.mqtt_max_payload_bytes
    state = await station_state(client, operator_token, b.sn)
    returns = await return_events(system, b.sn)
    good = encode(ReturnEvent(board=1, hole=4, area=0, sn="90000077", state=1, software_version=1, soc=90))

    size_before = await drops(client, "size")
    await b.publish_raw("update", good + b"\x00" * (cap + 1 - len(good)))  # over the cap: never routed
    await until_counted(client, "size", size_before + 1)

    invalid_before = await drops(client, "invalid_frame")
    malformed = {
        "bad_head": b"\xaa" + good[1:],
        "length_mismatch": good[:1] + (len(good) + 3).to_bytes(2, "big") + good[3:],
        "too_short": good[:3],
        "unknown_cmd": good[:3] + b"\xee" + good[4:],
        "garbage": b"GET / HTTP/1.1\r\n\r\n",
        "truncated": good[:-4],
    }
    for kind in ("update", "upload"):
        for payload in malformed.values():
            await b.publish_raw(kind, payload)
    await until_counted(client, "invalid_frame", invalid_before + 2 * len(malformed))

    # a bad checksum: dropped under STRICT_CHECKSUM, otherwise accepted and counted (the session runs lax)
    mismatches = await metric(client, "powerbank_checksum_mismatches_total")
    heartbeat = encode(rentbox.Heartbeat(board=1, text="CSQ:20"))
    await b.publish_raw("heart", heartbeat[:-1] + bytes([(heartbeat[-1] + 1) & 0xFF]))
    if system.settings.strict_checksum:
        await until_counted(client, "invalid_frame", invalid_before + 2 * len(malformed) + 1)
    else:

        async def counted() -> bool:
            return await metric(client, "powerbank_checksum_mismatches_total") >= mismatches + 1

        await eventually(counted, within=5)

    assert await return_events(system, b.sn) == returns
    assert await station_state(client, operator_token, b.sn) == state
    assert b.connected
