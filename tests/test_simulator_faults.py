"""Fault injection of the cabinet simulator, proven on the wire (frames decoded with rentbox)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import rentbox
from rentbox import (
    EjectByHoleResult,
    EjectBySnResult,
    EjectState,
    FrameError,
    Heartbeat,
    HoleState,
    ReturnEvent,
    Snapshot,
)
from simulators import Faults, SimulatedCabinet, SimulatedFleet, load_scenario, parse_scenario, run_scenario
from simulators.cli import _table, simulate
from simulators.fleet import save_credentials
from tests.simulator_support import (
    DISCONNECT,
    PINGREQ,
    MqttProxy,
    Peer,
    cabinet_credentials,
    eventually,
    start_broker,
)

SN = "864601068412899"
BANKS = {1: "85019121", 3: "85018284", 6: "80146582"}  # a 2 x 4 cabinet

CabinetFactory = Callable[..., Awaitable[SimulatedCabinet]]


@pytest.fixture
async def broker_port() -> AsyncIterator[int]:
    broker, port = await start_broker()
    yield port
    await broker.shutdown()


@pytest.fixture
async def peer(broker_port: int) -> AsyncIterator[Peer]:
    peer = await Peer.connect(broker_port, SN)
    yield peer
    await peer.close()


@pytest.fixture
async def proxy(broker_port: int) -> AsyncIterator[MqttProxy]:
    proxy = MqttProxy(broker_port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def start_cabinet(broker_port: int) -> AsyncIterator[CabinetFactory]:
    """Start a cabinet (default: 2 x 4 with BANKS, no periodic traffic); stopped after the test."""
    started: list[SimulatedCabinet] = []

    async def start(*, port: int | None = None, **options: Any) -> SimulatedCabinet:
        defaults: dict[str, Any] = {
            "boards": 2,
            "holes_per_board": 4,
            "banks": BANKS,
            "heartbeat_s": 3600,
            "seed": 1,
        }
        cabinet = SimulatedCabinet(cabinet_credentials(port or broker_port, SN), **(defaults | options))
        await cabinet.start()
        started.append(cabinet)
        return cabinet

    yield start
    for cabinet in started:
        await cabinet.stop()


def key(payload: bytes) -> str:
    return payload.decode()


async def snapshot_of(peer: Peer) -> Snapshot:
    await peer.command(rentbox.check())
    frame = await peer.next_frame()
    assert isinstance(frame, Snapshot)
    return frame


# ------------------------------------------------------------------------------------------ faults


async def test_lose_eject_reply(peer: Peer, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(faults=Faults(lose_eject_reply=1.0))
    by_sn = rentbox.popup_sn("85018284", timestamp=1759941810, ttl=30)
    await peer.command(by_sn)
    await peer.command(rentbox.popup(6))
    await peer.command(rentbox.popup(2))  # empty hole: nothing came out, so its reply is not lost
    # Commands are answered in order: the first frame is hole 2's, so neither 0x31 nor 0x21 was sent.
    assert await peer.next_frame() == EjectByHoleResult(board=1, hole=2, state=EjectState.FAILED)
    snapshot = await snapshot_of(peer)
    assert {h.sn for h in snapshot.holes if h.sn} == {"85019121"}
    assert cabinet.eject_counts == {"85018284": 1, "80146582": 1}
    assert cabinet.ejects_per_command == {key(by_sn): 1, key(rentbox.popup(6)): 1}

    cabinet.faults = Faults()  # switched off on the running cabinet
    await peer.command(rentbox.popup_sn("85019121"))
    assert await peer.next_frame() == EjectBySnResult(hole=1, sn="85019121", state=EjectState.SUCCESS)


async def test_reply_delay(peer: Peer, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(faults=Faults(reply_delay_s=0.4))
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await peer.command(rentbox.popup_sn("85018284"))
    # The bank comes out at once; only the reply waits.
    await eventually(lambda: cabinet.eject_counts["85018284"] == 1, "physical eject")
    assert loop.time() - sent < 0.4
    assert peer.pending() == 0
    assert await peer.next_frame() == EjectBySnResult(hole=3, sn="85018284", state=EjectState.SUCCESS)
    assert loop.time() - sent >= 0.4
    sent = loop.time()
    assert isinstance(await snapshot_of(peer), Snapshot)
    assert loop.time() - sent >= 0.4


@pytest.mark.parametrize("code", [0x00, 0x11, 0x12, 0xFE])
async def test_eject_failure_code(peer: Peer, start_cabinet: CabinetFactory, code: int) -> None:
    cabinet = await start_cabinet(faults=Faults(eject_failure_code=code))
    await peer.command(rentbox.popup_sn("85018284"))
    assert await peer.next_frame() == EjectBySnResult(hole=3, sn="85018284", state=code)
    await peer.command(rentbox.popup(6))
    assert await peer.next_frame() == EjectByHoleResult(board=2, hole=6, state=code)
    assert cabinet.banks() == BANKS
    assert not cabinet.ejects_per_command and not cabinet.physical_ejects and not cabinet.eject_counts
    snapshot = await snapshot_of(peer)
    assert {h.hole: h.sn for h in snapshot.holes if h.sn} == BANKS


async def test_stuck_holes(peer: Peer, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(faults=Faults(stuck_holes=frozenset({1, 2})))
    snapshot = await snapshot_of(peer)
    states = {h.hole: (h.state, h.sn) for h in snapshot.holes}
    assert states[1] == (HoleState.STUCK, "85019121")  # a stuck hole still reports its bank
    assert states[2] == (HoleState.STUCK, None)
    assert states[3] == (HoleState.NORMAL, "85018284")
    assert states[4] == (HoleState.EMPTY, None)
    await peer.command(rentbox.popup_sn("85019121"))
    assert await peer.next_frame() == EjectBySnResult(
        hole=1, sn="85019121", state=EjectState.NOT_POPPED_SN_READABLE
    )
    await peer.command(rentbox.popup(1))
    assert await peer.next_frame() == EjectByHoleResult(
        board=1, hole=1, state=EjectState.NOT_POPPED_SN_READABLE
    )
    assert cabinet.banks() == BANKS

    cabinet.faults = Faults(stuck_holes=frozenset({3}), stuck_state=HoleState.COMMUNICATION_FAULT)
    now = {h.hole: h.state for h in (await snapshot_of(peer)).holes}
    assert (now[1], now[3]) == (HoleState.NORMAL, HoleState.COMMUNICATION_FAULT)


async def test_hot_holes(peer: Peer, start_cabinet: CabinetFactory) -> None:
    await start_cabinet(faults=Faults(hot_holes=frozenset({3, 4})))
    temperatures = {h.hole: h.temperature for h in (await snapshot_of(peer)).holes}
    assert temperatures[3] == 65
    assert temperatures[4] == 0  # empty
    assert all(25 <= temperatures[hole] <= 34 for hole in (1, 6))


async def test_bad_checksum(peer: Peer, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(faults=Faults(bad_checksum=True))

    async def assert_bad(kind: str) -> rentbox.Frame:
        payload = await peer.next_message(kind)
        assert payload[-1] == (rentbox.checksum(payload) + 1) & 0xFF
        with pytest.raises(FrameError) as excinfo:
            rentbox.decode(payload, strict_checksum=True)
        assert excinfo.value.reason == "bad_checksum"
        decoded = rentbox.decode(payload)  # structure and length stay valid
        assert not decoded.checksum_ok
        return decoded.frame

    assert isinstance(await assert_bad("heart"), Heartbeat)
    await peer.command(rentbox.check())
    assert isinstance(await assert_bad("update"), Snapshot)
    await peer.command(rentbox.popup_sn("85018284"))
    assert await assert_bad("update") == EjectBySnResult(hole=3, sn="85018284", state=EjectState.SUCCESS)
    await peer.command(rentbox.popup(1))
    assert await assert_bad("update") == EjectByHoleResult(board=1, hole=1, state=EjectState.SUCCESS)
    await cabinet.return_powerbank("12345678", hole=2)
    assert isinstance(await assert_bad("update"), ReturnEvent)

    cabinet.faults = Faults()
    await peer.command(rentbox.check())
    assert rentbox.decode(await peer.next_message(), strict_checksum=True).checksum_ok


async def test_duplicate_returns(peer: Peer, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(faults=Faults(duplicate_returns=True))
    assert await cabinet.return_powerbank("12345678", soc=64) == 2
    expected = ReturnEvent(board=1, hole=2, area=0, sn="12345678", state=1, software_version=13, soc=64)
    first, second = await peer.next_message(), await peer.next_message()
    assert first == second
    assert rentbox.decode(first, strict_checksum=True).frame == expected
    assert isinstance(await snapshot_of(peer), Snapshot)  # exactly two: the snapshot comes next
    assert cabinet.banks()[2] == "12345678"


async def test_disconnect_mid_eject(peer: Peer, proxy: MqttProxy, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(port=proxy.port, faults=Faults(disconnect_mid_eject=0.5))
    assert isinstance((await peer.next_decoded("heart")).frame, Heartbeat)
    loop = asyncio.get_running_loop()
    command = rentbox.popup_sn("85018284", timestamp=1759941810)
    sent = loop.time()
    await peer.command(command)
    await eventually(lambda: proxy.open == 0, "the cabinet drops its TCP connection")
    assert cabinet.eject_counts["85018284"] == 1
    assert not cabinet.connected
    assert DISCONNECT not in proxy.packets  # dropped, not disconnected
    assert isinstance((await peer.next_decoded("heart")).frame, Heartbeat)  # first heartbeat after reconnect
    assert loop.time() - sent >= 0.5
    assert (proxy.connections, proxy.open) == (2, 1)
    assert cabinet.connected

    cabinet.faults = Faults()
    snapshot = await snapshot_of(peer)  # the next frame: no 0x31 was ever sent
    assert "85018284" not in {h.sn for h in snapshot.holes}
    assert cabinet.ejects_per_command == {key(command): 1}


async def test_disconnect_probability(peer: Peer, proxy: MqttProxy, start_cabinet: CabinetFactory) -> None:
    cabinet = await start_cabinet(port=proxy.port, faults=Faults(disconnect_probability=1.0), seed=5)
    await peer.next_message("heart")
    for number, command in enumerate([rentbox.check(), rentbox.popup_sn("85018284")], start=2):
        await peer.command(command)
        # dropped (before or after executing it) and back about 1 s later, heartbeat first
        await peer.next_message("heart")
        assert proxy.connections == number
        assert DISCONNECT not in proxy.packets
    assert peer.pending() == 0  # neither the snapshot nor the 0x31 was sent
    assert sum(cabinet.ejects_per_command.values()) <= 1
    cabinet.faults = Faults()
    assert isinstance(await snapshot_of(peer), Snapshot)


async def test_silent_sends_nothing_and_resumes(
    peer: Peer, proxy: MqttProxy, start_cabinet: CabinetFactory
) -> None:
    cabinet = await start_cabinet(port=proxy.port, keepalive_s=1)
    await peer.next_message("heart")
    # Loud and idle, amqtt pings after keepalive_s: that is what silence must stop too.
    await eventually(lambda: PINGREQ in proxy.packets, "a keepalive PINGREQ while idle")

    cabinet.faults = Faults(silent=True)
    seen = (proxy.bytes_up, len(proxy.packets))
    await peer.command(rentbox.check())
    await peer.command(rentbox.popup_sn("85018284"))
    await cabinet.return_powerbank("12345678", hole=2)
    await asyncio.sleep(2.5)  # the measured window: 2.5 keepalive periods
    assert (proxy.bytes_up, len(proxy.packets)) == seen  # not one byte, PINGREQ included
    assert all(peer.pending(kind) == 0 for kind in rentbox.UP_KINDS)
    assert proxy.open == 1 and cabinet.connected  # TCP stays open
    assert "85018284" in cabinet.banks().values()  # commands sent meanwhile are lost
    assert len(cabinet.commands) == 0

    cabinet.faults = Faults()
    assert isinstance((await peer.next_decoded("heart", strict=True)).frame, Heartbeat)  # right away
    snapshot = await snapshot_of(peer)
    assert {h.hole: h.sn for h in snapshot.holes if h.sn} == BANKS | {2: "12345678"}
    await eventually(lambda: proxy.packets.count(PINGREQ) >= 2, "keepalive pings again")


async def test_silent_cabinet_reconnects_only_when_loud_again(
    peer: Peer, proxy: MqttProxy, start_cabinet: CabinetFactory
) -> None:
    cabinet = await start_cabinet(port=proxy.port)
    await peer.next_message("heart")
    cabinet.faults = Faults(silent=True)
    proxy.drop()  # the broker drops the silent cabinet
    await eventually(lambda: not cabinet.connected, "the cabinet notices the drop")
    await asyncio.sleep(1.5)  # longer than the first reconnect delay (1 s)
    assert proxy.connections == 1  # no CONNECT while silent

    cabinet.faults = Faults()
    await peer.next_message("heart")
    assert proxy.connections == 2
    assert isinstance(await snapshot_of(peer), Snapshot)


async def test_duplicate_command_ejects_again(peer: Peer, start_cabinet: CabinetFactory) -> None:
    banks = {1: "85019121", 2: "85018284", 3: "80146582", 4: "80146583", 5: "80146584"}
    cabinet = await start_cabinet(boards=1, holes_per_board=8, banks=banks)
    # An eject whose timestamp is hours old with a 30 s ttl: the firmware ignores both.
    command = rentbox.popup_sn("85019121", timestamp=1_000_000_000, ttl=30)
    await peer.command(command)
    assert await peer.next_frame() == EjectBySnResult(hole=1, sn="85019121", state=EjectState.SUCCESS)

    # The same payload again (a broker redelivery): the firmware ejects the next-best bank.
    socs = {hole.hole: hole.soc for hole in cabinet.snapshot().holes if hole.sn}
    best = max(socs, key=lambda hole: (socs[hole], -hole))
    await peer.command(command)
    assert await peer.next_frame() == EjectBySnResult(hole=best, sn=banks[best], state=EjectState.SUCCESS)
    assert cabinet.ejects_per_command[key(command)] == 2
    assert cabinet.physical_ejects == [(key(command), "85019121"), (key(command), banks[best])]
    assert cabinet.eject_counts["85019121"] == cabinet.eject_counts[banks[best]] == 1

    # Stuck and hot holes are never the next-best; nothing eligible left: 0xFB.
    left = sorted(set(banks) - {1, best})
    cabinet.faults = Faults(stuck_holes=frozenset({left[0]}), hot_holes=frozenset({left[1]}))
    await peer.command(command)
    assert await peer.next_frame() == EjectBySnResult(hole=left[2], sn=banks[left[2]], state=1)
    await peer.command(command)
    assert await peer.next_frame() == EjectBySnResult(hole=0, sn="85019121", state=0xFB)
    assert cabinet.ejects_per_command[key(command)] == 3

    # A retry with a fresh timestamp is another command: the bank is gone, 0xFC, nothing ejected.
    retry = rentbox.popup_sn("85019121", timestamp=1_000_000_060, ttl=30)
    await peer.command(retry)
    assert await peer.next_frame() == EjectBySnResult(hole=0, sn="85019121", state=0xFC)
    assert cabinet.ejects_per_command[key(retry)] == 0
    assert len(cabinet.physical_ejects) == 3

    # Duplicates of other commands run twice too.
    await peer.command(rentbox.check())
    await peer.command(rentbox.check())
    assert isinstance(await peer.next_frame(), Snapshot)
    assert isinstance(await peer.next_frame(), Snapshot)
    hot = left[1]  # an explicit popup by hole still ejects a hot bank
    await peer.command(rentbox.popup(hot))
    await peer.command(rentbox.popup(hot))
    assert [await peer.next_frame(), await peer.next_frame()] == [
        EjectByHoleResult(board=1, hole=hot, state=EjectState.SUCCESS),
        EjectByHoleResult(board=1, hole=hot, state=EjectState.FAILED),
    ]
    assert cabinet.ejects_per_command[key(rentbox.popup(hot))] == 1


# ------------------------------------------------------------------------------- models, intervals


@pytest.mark.parametrize(("boards", "holes"), [(1, 4), (2, 4), (1, 8), (6, 8)])
async def test_cabinet_models(peer: Peer, start_cabinet: CabinetFactory, boards: int, holes: int) -> None:
    cabinet = await start_cabinet(boards=boards, holes_per_board=holes, banks=None, fill=1.0)
    await peer.command(rentbox.check())
    payload = await peer.next_message()
    assert len(payload) == 5 + boards * (6 + 15 * holes)
    snapshot = rentbox.decode(payload, strict_checksum=True).frame  # layout inferred from the length
    assert isinstance(snapshot, Snapshot)
    assert [board.index for board in snapshot.boards] == list(range(1, boards + 1))
    assert [hole.hole for hole in snapshot.holes] == list(range(1, boards * holes + 1))
    assert [hole.board for hole in snapshot.holes] == [n // holes + 1 for n in range(boards * holes)]
    assert {hole.hole: hole.sn for hole in snapshot.holes} == cabinet.banks()
    last = boards * holes
    await peer.command(rentbox.popup(last))
    assert await peer.next_frame() == EjectByHoleResult(board=boards, hole=last, state=EjectState.SUCCESS)


async def test_heartbeat_and_upload_intervals(peer: Peer, start_cabinet: CabinetFactory) -> None:
    await start_cabinet(heartbeat_s=0.1, upload_s=0.1, boards=6, holes_per_board=8, banks=None)
    for _ in range(3):
        assert isinstance((await peer.next_decoded("heart")).frame, Heartbeat)
        upload = await peer.next_decoded("upload", holes_per_board=8)
        assert isinstance(upload.frame, Snapshot) and len(upload.frame.holes) == 48


# ----------------------------------------------------------------------------- faults as data


def test_faults_validate_and_describe() -> None:
    assert not Faults().active and Faults().describe() == ""
    faults = Faults(
        lose_eject_reply=0.1,
        reply_delay_s=2,
        eject_failure_code=0x11,
        stuck_holes=frozenset({3, 1}),
        hot_holes=frozenset({2}),
        bad_checksum=True,
        duplicate_returns=True,
        disconnect_mid_eject=5,
        silent=True,
        disconnect_probability=0.05,
    )
    assert faults.active
    assert faults.describe() == (
        "SILENT, lose-reply 10%, reply-delay 2s, fail-ejects 0x11, stuck 1,3 (0x04), hot 2, bad-checksum, "
        "duplicate-returns, disconnect-mid-eject 5s, disconnect 5%"
    )
    for bad in (
        {"lose_eject_reply": 1.5},
        {"disconnect_probability": -0.1},
        {"reply_delay_s": -1},
        {"eject_failure_code": 256},
        {"stuck_holes": frozenset({0})},
        {"disconnect_mid_eject": float("inf")},
    ):
        with pytest.raises(ValueError):
            Faults(**bad)


def test_faults_from_mapping() -> None:
    base = Faults(bad_checksum=True)
    faults = Faults.from_mapping(
        {"eject_failure_code": "0x12", "stuck_holes": [1, 3], "hot_holes": "2,4", "silent": True}, base=base
    )
    assert faults == Faults(
        bad_checksum=True,
        eject_failure_code=0x12,
        stuck_holes=frozenset({1, 3}),
        hot_holes=frozenset({2, 4}),
        silent=True,
    )
    assert Faults.from_mapping({}, base=base) == base and base == Faults(bad_checksum=True)
    assert Faults.from_mapping({"eject_failure_code": None}, base=faults).eject_failure_code is None
    every_field = {field.name: getattr(faults, field.name) for field in dataclasses.fields(Faults)}
    assert Faults.from_mapping(every_field) == faults  # every field is settable from a scenario
    for bad, message in (
        ({"lost_reply": 1}, "unknown fault 'lost_reply'"),
        ({"silent": "yes"}, "silent must be true or false"),
        ({"stuck_holes": ["x"]}, "not a hole number"),
        ({"lose_eject_reply": 2}, "probability"),
        ({"eject_failure_code": "0xZZ"}, "eject_failure_code"),
    ):
        with pytest.raises(ValueError, match=message):
            Faults.from_mapping(bad)


# --------------------------------------------------------------------------------------- scenario


SCENARIO = [
    {"at": 0.2, "cabinet": "SIM000000000002", "faults": {}},
    {"at": 0, "cabinet": "*", "faults": {"lose_eject_reply": 1.0, "eject_failure_code": "0x11"}},
    {"at": 0.1, "cabinet": "SIM000000000002", "faults": {"silent": True}},
]

SCENARIO_YAML = """
steps:
  - at: 0
    faults: {lose_eject_reply: 1.0, eject_failure_code: 0x11}
  - at: 0.1
    cabinet: SIM000000000002
    faults:
      silent: true
  - {at: 0.2, cabinet: SIM000000000002, faults: {}}
"""


@pytest.mark.parametrize(("name", "text"), [("s.json", json.dumps(SCENARIO)), ("s.yaml", SCENARIO_YAML)])
def test_scenario_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    steps = load_scenario(path)
    assert [(step.at, step.cabinet) for step in steps] == [
        (0.0, "*"),
        (0.1, "SIM000000000002"),
        (0.2, "SIM000000000002"),
    ]
    base = Faults(duplicate_returns=True)
    assert steps[0].faults(base) == Faults(
        duplicate_returns=True, lose_eject_reply=1.0, eject_failure_code=0x11
    )
    assert steps[1].faults() == Faults(silent=True)
    assert steps[2].faults(base) == base


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"at": 0}, "expected a list of steps"),
        ([{"at": -1, "faults": {}}], "'at' must be seconds"),
        ([{"at": "soon", "faults": {}}], "'at' must be seconds"),
        ([{"at": 0}], "has no 'faults'"),
        ([{"at": 0, "faults": {"silent": 1}}], "step 0: silent must be true or false"),
        ([{"at": 0, "faults": {}, "when": 3}], "unknown keys"),
        ([{"at": 0, "cabinet": "", "faults": {}}], "'cabinet' must be"),
        (["x"], "must be an object"),
    ],
)
def test_scenario_errors(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scenario(data, source="s.json")


def test_scenario_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_scenario(path)
    path = tmp_path / "bad.yml"
    path.write_text("- at: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yml: not valid YAML"):
        load_scenario(path)


async def test_run_scenario_switches_faults_over_time() -> None:
    cabinets = [
        SimulatedCabinet(cabinet_credentials(1883, f"SIM00000000000{n}"), heartbeat_s=3600) for n in (1, 2)
    ]
    seen: list[tuple[float, list[str], list[Faults]]] = []
    base = Faults(hot_holes=frozenset({1}))
    await run_scenario(
        parse_scenario(SCENARIO),
        cabinets,
        base=base,
        on_step=lambda step, hit: seen.append((step.at, [c.sn for c in hit], [c.faults for c in cabinets])),
    )
    failing = Faults(hot_holes=frozenset({1}), lose_eject_reply=1.0, eject_failure_code=0x11)
    assert seen == [
        (0.0, ["SIM000000000001", "SIM000000000002"], [failing, failing]),
        (0.1, ["SIM000000000002"], [failing, Faults(hot_holes=frozenset({1}), silent=True)]),
        (0.2, ["SIM000000000002"], [failing, base]),
    ]
    assert cabinets[0].faults is not cabinets[1].faults
    with pytest.raises(ValueError, match="SIM000000000009"):
        await run_scenario(parse_scenario([{"at": 0, "cabinet": "SIM000000000009", "faults": {}}]), cabinets)


# -------------------------------------------------------------------------------------------- cli


def _cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)
    return app


def test_cli_help_lists_fault_options() -> None:
    result = CliRunner().invoke(_cli_app(), ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--lose-reply",
        "--reply-delay",
        "--fail-ejects",
        "--stuck-holes",
        "--stuck-state",
        "--hot-holes",
        "--bad-checksum",
        "--duplicate-returns",
        "--disconnect-mid-eject",
        "--silent",
        "--disconnect-probability",
        "--upload",
        "--scenario",
    ):
        assert option in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-ejects", "0xZZ"], "--fail-ejects"),
        (["--fail-ejects", "300"], "0..255"),
        (["--stuck-holes", "1,x"], "not a hole number"),
        (["--hot-holes", "9"], "do not exist"),
        (["--lose-reply", "2"], "--lose-reply"),
        (["--scenario", "SCENARIO"], "unknown fault"),
    ],
)
def test_cli_fault_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    credentials = tmp_path / "creds.json"
    save_credentials(credentials, [cabinet_credentials(1883, "SIM000000000001")])
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps([{"at": 0, "faults": {"lost": 1}}]))
    args = [str(scenario) if arg == "SCENARIO" else arg for arg in args]
    result = CliRunner().invoke(
        _cli_app(), ["simulate", "--credentials", str(credentials), *args], env={"COLUMNS": "200"}
    )
    assert result.exit_code != 0
    assert message in result.output


def test_live_table_shows_faults() -> None:
    fleet = SimulatedFleet(
        [cabinet_credentials(1883, f"SIM00000000000{n}") for n in (1, 2)],
        faults=Faults(lose_eject_reply=0.1),
        upload_s=30,
    )
    assert fleet.cabinets[0].faults == fleet.cabinets[1].faults == Faults(lose_eject_reply=0.1)
    assert fleet.cabinets[0].faults is not fleet.cabinets[1].faults
    assert fleet.cabinets[0].upload_s == 30
    fleet["SIM000000000002"].faults = Faults(silent=True, stuck_holes=frozenset({2}))
    console = Console(record=True, width=200, height=30)
    console.print(_table(fleet, console, "until Ctrl-C"))
    text = console.export_text()
    assert "Faults" in text
    assert "lose-reply 10%" in text
    assert "SILENT, stuck 2 (0x04)" in text
