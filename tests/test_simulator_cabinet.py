"""The cabinet simulator against a real amqtt broker on 127.0.0.1, seen from a test peer."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from amqtt.client import MQTTClient
from typer.testing import CliRunner

import rentbox
from rentbox import (
    EjectByHoleResult,
    EjectBySnResult,
    EjectState,
    Frame,
    Heartbeat,
    ReturnEvent,
    Snapshot,
)
from simulators.cabinet import (
    CabinetNotConnected,
    CabinetRefused,
    CabinetUnreachable,
    SimulatedCabinet,
    send_return,
)
from simulators.cli import simulate
from simulators.fleet import (
    ProvisioningError,
    SimulatedFleet,
    load_credentials,
    provision,
    save_credentials,
)
from tests.simulator_support import cabinet_credentials, free_port, start_broker

TIMEOUT_S = 5.0
PK = "powerbank"


@pytest.fixture
async def broker_port() -> AsyncIterator[int]:
    broker, port = await start_broker(allow_anonymous=True)
    yield port
    await broker.shutdown()


class Peer:
    """The server's seat: subscribes to a cabinet's up topics and sends it commands."""

    def __init__(self, client: MQTTClient, sn: str) -> None:
        self.client = client
        self.sn = sn

    async def command(self, payload: bytes) -> None:
        await self.client.publish(rentbox.command_topic(PK, self.sn), payload, qos=0)

    async def next_message(self, *, kind: str | None = None) -> tuple[str, bytes]:
        """Next message from the cabinet (optionally only on /user/{kind}), or fail after TIMEOUT_S."""
        try:
            async with asyncio.timeout(TIMEOUT_S):
                while True:
                    message = await self.client.deliver_message()
                    assert message is not None, "peer lost its connection"
                    parsed = rentbox.parse_topic(message.topic)
                    assert parsed is not None and parsed[1] == self.sn, message.topic
                    if kind is None or parsed[2] == kind:
                        return parsed[2], bytes(message.data)
        except TimeoutError:
            pytest.fail(f"no {kind or 'up'} message from cabinet {self.sn} within {TIMEOUT_S}s")

    async def next_frame(self, *, holes_per_board: int | None = None) -> Frame:
        """Next frame on /user/update, decoded (heartbeats on /user/heart are skipped)."""
        _, payload = await self.next_message(kind="update")
        decoded = rentbox.decode(payload, holes_per_board=holes_per_board, strict_checksum=True)
        return decoded.frame


PeerFactory = Callable[[str], Awaitable[Peer]]


@pytest.fixture
async def peer_for(broker_port: int) -> AsyncIterator[PeerFactory]:
    clients: list[MQTTClient] = []

    async def make(sn: str) -> Peer:
        client = MQTTClient(client_id=f"peer-{sn}", config={"auto_reconnect": False, "plugins": {}})
        await client.connect(f"mqtt://127.0.0.1:{broker_port}")
        await client.subscribe([(rentbox.up_topic(PK, sn, kind), 0) for kind in rentbox.UP_KINDS])
        clients.append(client)
        return Peer(client, sn)

    yield make
    for client in clients:
        await client.disconnect()


@pytest.fixture
async def cabinet(broker_port: int) -> AsyncIterator[SimulatedCabinet]:
    cab = SimulatedCabinet(
        cabinet_credentials(broker_port),
        boards=2,
        holes_per_board=4,
        banks={1: "85019121", 3: "85018284", 6: "80146582"},
        heartbeat_s=3600,
        seed=1,
    )
    await cab.start()
    yield cab
    await cab.stop()


async def test_check_answers_with_snapshot(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    for cmd in ("check", "check_all", "upload_all"):
        await peer.command(rentbox.encode_command(cmd))
        snapshot = await peer.next_frame(holes_per_board=4)
        assert isinstance(snapshot, Snapshot)
        assert [b.index for b in snapshot.boards] == [1, 2]
        assert [h.hole for h in snapshot.holes] == list(range(1, 9))
        assert [h.board for h in snapshot.holes] == [1, 1, 1, 1, 2, 2, 2, 2]
        assert {h.hole: h.sn for h in snapshot.holes if h.sn} == {1: "85019121", 3: "85018284", 6: "80146582"}
        for hole in snapshot.holes:
            if hole.sn is None:
                assert (hole.state, hole.sensor) == (0, 0x80)
            else:
                assert hole.state == 1
                assert 20 <= hole.soc <= 100
    assert [c["cmd"] for c in cabinet.commands] == ["check", "check_all", "upload_all"]


async def test_snapshot_layout_is_inferable(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    await peer.command(rentbox.check())
    snapshot = await peer.next_frame()
    assert isinstance(snapshot, Snapshot)
    assert len(snapshot.holes) == 8


async def test_popup_sn_ejects_exactly_once(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    await peer.command(rentbox.popup_sn("85018284", timestamp=1759941810, ttl=30))
    result = await peer.next_frame()
    assert result == EjectBySnResult(hole=3, sn="85018284", state=EjectState.SUCCESS)
    assert result.success
    assert cabinet.eject_counts["85018284"] == 1
    assert 3 not in cabinet.banks()

    await peer.command(rentbox.popup_sn("85018284"))
    again = await peer.next_frame()
    assert isinstance(again, EjectBySnResult)
    assert again.state == EjectState.SN_NOT_FOUND
    assert cabinet.eject_counts["85018284"] == 1

    await peer.command(rentbox.check())
    snapshot = await peer.next_frame(holes_per_board=4)
    assert isinstance(snapshot, Snapshot)
    assert "85018284" not in {h.sn for h in snapshot.holes}


async def test_popup_by_hole(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    await peer.command(rentbox.popup(6))
    assert await peer.next_frame() == EjectByHoleResult(board=2, hole=6, state=EjectState.SUCCESS)
    assert cabinet.eject_counts["80146582"] == 1
    await peer.command(rentbox.popup(2))
    assert await peer.next_frame() == EjectByHoleResult(board=1, hole=2, state=EjectState.FAILED)
    await peer.command(rentbox.encode_command("popup", data="x", io="0"))
    assert await peer.next_frame() == EjectByHoleResult(board=0, hole=0, state=EjectState.PARSE_FAILED)


async def test_return_event(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    hole = await cabinet.return_powerbank("12345678", soc=64)
    assert hole == 2
    event = await peer.next_frame()
    assert event == ReturnEvent(board=1, hole=2, area=0, sn="12345678", state=1, software_version=13, soc=64)
    assert event.success
    assert await cabinet.return_powerbank("12345679", hole=8) == 8
    event = await peer.next_frame()
    assert isinstance(event, ReturnEvent)
    assert (event.board, event.hole) == (2, 8)
    assert cabinet.banks()[2] == "12345678"
    with pytest.raises(ValueError):
        await cabinet.return_powerbank("12345670", hole=99)


async def test_unknown_and_garbage_commands_are_ignored(
    cabinet: SimulatedCabinet, peer_for: PeerFactory
) -> None:
    peer = await peer_for(cabinet.sn)
    await peer.command(b"\x00not json")
    await peer.command(rentbox.encode_command("load_ad"))
    await peer.command(rentbox.check())
    assert isinstance(await peer.next_frame(), Snapshot)
    assert [c["cmd"] for c in cabinet.commands] == ["load_ad", "check"]
    assert cabinet.last_command == {"cmd": "check"}


async def test_heartbeats(broker_port: int, peer_for: PeerFactory) -> None:
    creds = cabinet_credentials(broker_port, sn="864601068400001")
    peer = await peer_for(creds.sn)
    cab = SimulatedCabinet(creds, heartbeat_s=0.1, seed=2)
    await cab.start()
    try:
        for _ in range(2):
            _, payload = await peer.next_message(kind="heart")
            decoded = rentbox.decode(payload, strict_checksum=True)
            assert isinstance(decoded.frame, Heartbeat)
            assert (decoded.frame.csq, decoded.frame.backup_power) == (27, 0)
    finally:
        await cab.stop()


async def test_reboot_reconnects(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    await peer.command(rentbox.reboot())
    # The first heartbeat after a (re)connect is sent once the command topic is subscribed again.
    await peer.next_message(kind="heart")
    assert cabinet.connected
    await peer.command(rentbox.check())
    assert isinstance(await peer.next_frame(), Snapshot)
    assert [c["cmd"] for c in cabinet.commands] == ["reboot", "check"]


async def test_publish_raw_and_publish_to(cabinet: SimulatedCabinet, peer_for: PeerFactory) -> None:
    peer = await peer_for(cabinet.sn)
    await cabinet.publish_raw("upload", b"\xa8\x00")
    assert await peer.next_message(kind="upload") == ("upload", b"\xa8\x00")
    await cabinet.publish_to(rentbox.up_topic(PK, cabinet.sn, "heart"), b"x")
    assert await peer.next_message(kind="heart") == ("heart", b"x")


async def test_random_fill_is_seeded(broker_port: int) -> None:
    first = SimulatedCabinet(cabinet_credentials(broker_port), boards=2, holes_per_board=6, fill=0.5, seed=7)
    second = SimulatedCabinet(cabinet_credentials(broker_port), boards=2, holes_per_board=6, fill=0.5, seed=7)
    assert first.banks() == second.banks()
    assert len(first.banks()) == 6
    assert all(len(sn) == 8 for sn in first.banks().values())
    with pytest.raises(CabinetNotConnected):
        await first.return_powerbank("12345678")


async def test_refused_credentials() -> None:
    broker, port = await start_broker(allow_anonymous=False)
    try:
        cab = SimulatedCabinet(cabinet_credentials(port, username="", password=""))
        with pytest.raises(CabinetRefused) as excinfo:
            await cab.start()
        assert excinfo.value.return_code == 5
        assert "username and password" in str(excinfo.value)
        ok = SimulatedCabinet(cabinet_credentials(port))
        await ok.start()
        await ok.stop()
    finally:
        await broker.shutdown()


async def test_unreachable_broker() -> None:
    cab = SimulatedCabinet(cabinet_credentials(free_port()))
    with pytest.raises(CabinetUnreachable):
        await cab.start()


async def test_send_return(broker_port: int, peer_for: PeerFactory) -> None:
    creds = cabinet_credentials(broker_port, sn="864601068400002")
    peer = await peer_for(creds.sn)
    await send_return(creds, "85019121", hole=7, holes_per_board=4, soc=90)
    event = await peer.next_frame()
    assert event == ReturnEvent(board=2, hole=7, area=0, sn="85019121", state=1, software_version=13, soc=90)


# ----------------------------------------------------------------------------------------- fleet


async def test_fleet_starts_cabinets_with_unique_banks(broker_port: int, peer_for: PeerFactory) -> None:
    credentials = [cabinet_credentials(broker_port, sn=f"SIM{n:012d}") for n in range(12)]
    fleet = SimulatedFleet(credentials, boards=1, holes_per_board=8, fill=1.0, seed=3, heartbeat_s=3600)
    failures = await fleet.start(progress=False)
    try:
        assert failures == {}
        assert all(cab.connected for cab in fleet.cabinets)
        all_sns = [sn for cab in fleet.cabinets for sn in cab.banks().values()]
        assert len(all_sns) == len(set(all_sns)) == 12 * 8
        peer = await peer_for(credentials[4].sn)
        await peer.command(rentbox.check())
        snapshot = await peer.next_frame(holes_per_board=8)
        assert isinstance(snapshot, Snapshot)
        assert {h.sn for h in snapshot.holes} == set(fleet[credentials[4].sn].banks().values())
    finally:
        await fleet.stop()
    assert not any(cab.connected for cab in fleet.cabinets)


async def test_fleet_reports_refused_cabinets() -> None:
    broker, port = await start_broker(allow_anonymous=False)
    try:
        fleet = SimulatedFleet(
            [cabinet_credentials(port, sn="A1"), cabinet_credentials(port, sn="B2", username="")],
            heartbeat_s=3600,
        )
        failures = await fleet.start(progress=False)
        assert set(failures) == {"B2"}
        assert isinstance(failures["B2"], CabinetRefused)
        assert fleet["A1"].connected
        await fleet.stop()
    finally:
        await broker.shutdown()


def test_credentials_file_roundtrip(tmp_path: Path) -> None:
    creds = [
        cabinet_credentials(1883, sn="SIM000000000001"),
        cabinet_credentials(8883, sn="SIM000000000002", product_key="other"),
    ]
    path = tmp_path / "creds.json"
    save_credentials(path, creds)
    assert load_credentials(path) == creds
    assert path.stat().st_mode & 0o077 == 0
    assert "s3cret" not in repr(creds[0])


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        '[{"sn": "x"}]',
        '[{"sn": "x", "host": "h", "port": "p", "username": "u", "password": "p"}]',
        '[{"sn": 1, "host": "h", "port": 1, "username": "u", "password": "p"}]',
    ],
)
def test_bad_credentials_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_credentials(path)


async def test_provision_posts_stations() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/admin/stations"
        assert request.headers["authorization"] == "Bearer tok"
        body = json.loads(request.content)
        seen.append(body)
        mqtt = {"host": "mqtt.local", "port": 1883, "username": body["serial_number"], "password": "pw"}
        data = {"serial_number": body["serial_number"], "mqtt": {**mqtt, "product_key": "powerbank"}}
        return httpx.Response(201, json={"success": True, "data": data})

    creds = await provision(
        "http://api.test/", "tok", 3, boards=2, holes_per_board=6, transport=httpx.MockTransport(handler)
    )
    assert len(creds) == 3
    assert len({c.sn for c in creds}) == 3
    for cred, body in zip(creds, seen, strict=True):
        assert cred.sn == body["serial_number"] == cred.username
        assert cred.sn.startswith("SIM") and len(cred.sn) == 15 and cred.sn[3:].isdigit()
        assert (body["boards"], body["holes_per_board"]) == (2, 6)
        assert body["name"].startswith("Sim")
        assert {"address", "latitude", "longitude"} <= body.keys()
        assert (cred.host, cred.port, cred.password) == ("mqtt.local", 1883, "pw")


async def test_provision_explains_errors() -> None:
    def unauthorized(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401, json={"success": False, "error": {"code": "unauthorized", "message": "no"}}
        )

    with pytest.raises(ProvisioningError, match="token"):
        await provision(
            "http://api.test",
            "bad",
            1,
            boards=1,
            holes_per_board=4,
            transport=httpx.MockTransport(unauthorized),
        )

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ProvisioningError, match="reach"):
        await provision(
            "http://api.test", "tok", 1, boards=1, holes_per_board=4, transport=httpx.MockTransport(down)
        )


# ------------------------------------------------------------------------------------------- cli


def _cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)  # keep "simulate" a subcommand, as under `powerbank`
    return app


def test_cli_help() -> None:
    result = CliRunner().invoke(_cli_app(), ["simulate", "--help"])
    assert result.exit_code == 0
    for option in (
        "--credentials",
        "--api",
        "--token",
        "--count",
        "--duration",
        "--return-sn",
        "--return-to",
    ):
        assert option in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--credentials"),
        (["--api", "http://x"], "--token"),
        (["--return-sn", "12345678"], "--return-to"),
    ],
)
def test_cli_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(_cli_app(), ["simulate", *args], env={"POWERBANK_TOKEN": ""})
    assert result.exit_code != 0
    assert message in result.output


def test_simulator_imports_nothing_from_the_server() -> None:
    code = (
        "import sys, simulators, simulators.cli\n"
        "server = {'config', 'storage', 'domain', 'actors', 'broker', 'api', 'powerbank'}\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & server))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
