"""The swarm load generator: its MQTT framing, and 200 cabinets through a real Mosquitto."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
from collections.abc import AsyncIterator, Callable

import pytest

import rentbox
from rentbox import EjectByHoleResult, EjectBySnResult, EjectState, Heartbeat, ReturnEvent, Snapshot
from simulators.cabinet import CabinetCredentials, SimulatedCabinet
from simulators.swarm import (
    Mosquitto,
    MqttProtocolError,
    Subscriber,
    Swarm,
    SwarmCabinetSpec,
    connect_packet,
    make_specs,
    publish_packet,
    split_packets,
    subscribe_packet,
)
from tests.simulator_support import free_port

TIMEOUT_S = 5.0
PK = rentbox.DEFAULT_PRODUCT_KEY
CABINETS = 200


def _needs_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")


# ------------------------------------------------------------------------------------------- framing


def test_several_packets_in_one_chunk_and_one_packet_over_many() -> None:
    big = publish_packet("/powerbank/CAB/user/get", b"x" * 300)  # remaining length 325: 2-byte varint
    huge = publish_packet("t", b"y" * 20_000)  # 3-byte varint
    stream = b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x00" + big + huge + b"\xd0\x00"
    assert big[1:3] == bytes([325 % 128 | 0x80, 325 // 128])

    packets, used = split_packets(stream)
    assert used == len(stream)
    assert [first for first, _ in packets] == [0x20, 0x90, 0x30, 0x30, 0xD0]
    assert packets[2][1].endswith(b"x" * 300) and len(packets[2][1]) == 325
    assert len(packets[3][1]) == 2 + 1 + 20_000

    # Byte by byte, as the worst TCP segmentation would deliver it.
    pending = b""
    seen: list[tuple[int, bytes]] = []
    for index in range(len(stream)):
        pending += stream[index : index + 1]
        more, used = split_packets(pending)
        seen += more
        pending = pending[used:]
    assert seen == packets and pending == b""

    # A partial packet at the end stays for the next read.
    packets, used = split_packets(stream[:-1])
    assert used == len(stream) - 2 and len(packets) == 4


def test_remaining_length_longer_than_four_bytes_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError):
        split_packets(b"\x30\xff\xff\xff\xff\x01")


def test_packet_encodings() -> None:
    assert connect_packet("SN1", username="SN1", password="pw", keepalive_s=60) == (
        b"\x10\x18\x00\x04MQTT\x04\xc2\x00\x3c\x00\x03SN1\x00\x03SN1\x00\x02pw"
    )
    assert connect_packet("SN1", keepalive_s=0)[9] == 0x02  # clean session only
    assert subscribe_packet(1, [("a/b", 0)]) == b"\x82\x08\x00\x01\x00\x03a/b\x00"
    assert publish_packet("a", b"p") == b"\x30\x04\x00\x01ap"
    assert publish_packet("a", b"p", qos=1, packet_id=7) == b"\x32\x06\x00\x01a\x00\x07p"
    with pytest.raises(ValueError):
        connect_packet("SN1", password="pw")


class _Wire(asyncio.Transport):
    """A transport that records what the protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def test_a_cabinet_reassembles_packets_split_and_coalesced() -> None:
    spec = SwarmCabinetSpec(sn="CAB1", password="secret", banks={1: "12345678", 2: "23456789"})
    swarm = Swarm(host="127.0.0.1", port=1, specs=[spec])
    cabinet = swarm._cabinets["CAB1"]
    wire = _Wire()
    cabinet.connection_made(wire)
    assert wire.written == connect_packet("CAB1", username="CAB1", password="secret", keepalive_s=60)

    wire.written = b""
    cabinet.data_received(b"\x20\x02\x00\x00\x90\x03\x00\x01\x00")  # CONNACK + SUBACK in one read
    assert swarm.connected == 1 and swarm.stats.heartbeats == 1
    packets, _ = split_packets(wire.written)
    assert [first for first, _ in packets] == [0x82, 0x30]

    # A command padded past 128 bytes of remaining length, delivered one byte per read, then two more
    # commands in one read.
    command = rentbox.encode_command("check", pad="z" * 200)
    stream = publish_packet(rentbox.command_topic(PK, "CAB1"), command)
    assert stream[1] & 0x80
    wire.written = b""
    for index in range(len(stream)):
        cabinet.data_received(stream[index : index + 1])
    cabinet.data_received(stream + publish_packet(rentbox.command_topic(PK, "CAB1"), rentbox.check_all()))
    packets, used = split_packets(wire.written)
    assert used == len(wire.written) and len(packets) == 3
    assert swarm.stats.commands == {"check": 2, "check_all": 1}
    for _, body in packets:
        topic_length = int.from_bytes(body[:2], "big")
        assert body[2 : 2 + topic_length].decode() == rentbox.up_topic(PK, "CAB1", "update")
        frame = rentbox.decode(body[2 + topic_length :]).frame
        assert isinstance(frame, Snapshot)
        assert {hole.hole: hole.sn for hole in frame.holes if hole.sn} == {1: "12345678", 2: "23456789"}


# ------------------------------------------------------------------------------ against a real broker


@pytest.fixture(scope="module")
async def broker() -> AsyncIterator[Mosquitto]:
    _needs_mosquitto()
    async with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture(scope="module")
async def fleet(broker: Mosquitto) -> AsyncIterator[tuple[Swarm, Subscriber]]:
    """200 cabinets connected through Mosquitto, and a subscriber on ``#`` that was there first."""
    subscriber = await Subscriber.connect(broker.host, broker.port, filters=("#",), keep_messages=True)
    swarm = Swarm(host=broker.host, port=broker.port, specs=make_specs(CABINETS, seed=7), seed=7)
    async with asyncio.timeout(TIMEOUT_S):
        await swarm.connect_all(rate_per_s=1000)
    yield swarm, subscriber
    await swarm.close()
    await subscriber.close()


def _on(sn: str, kind: str) -> Callable[[str, bytes], bool]:
    topic = rentbox.up_topic(PK, sn, kind)
    return lambda received, _payload: received == topic


async def _command(subscriber: Subscriber, sn: str, payload: bytes) -> rentbox.Frame:
    """Send a command to cabinet ``sn`` and return its reply on /user/update."""
    mark = len(subscriber.messages)
    subscriber.publish(rentbox.command_topic(PK, sn), payload)
    async with asyncio.timeout(TIMEOUT_S):
        _, reply = await subscriber.wait_message(_on(sn, "update"), since=mark)
    return rentbox.decode(reply, strict_checksum=True).frame


async def test_every_cabinet_connects_and_sends_exactly_one_heartbeat(
    fleet: tuple[Swarm, Subscriber],
) -> None:
    swarm, subscriber = fleet
    assert swarm.connected == CABINETS
    async with asyncio.timeout(TIMEOUT_S):
        await subscriber.wait_count(CABINETS)
    heartbeats = subscriber.messages[:CABINETS]
    assert swarm.stats.heartbeats == CABINETS  # sent: so nothing more is on its way
    assert sorted(rentbox.parse_topic(topic) for topic, _ in heartbeats) == sorted(
        (PK, sn, "heart") for sn in swarm.cabinet_sns
    )
    expected = rentbox.encode(Heartbeat(board=0x10, text="CSQ:27;BP:0"))  # the simulator's bytes
    assert {payload for _, payload in heartbeats} == {expected}
    stats = swarm.stats
    assert len(stats.connack_s) == CABINETS and stats.connects == CABINETS
    assert stats.connect_timeouts == stats.connect_errors == stats.retries == stats.peer_disconnects == 0


async def test_check_answers_the_simulators_snapshot(fleet: tuple[Swarm, Subscriber]) -> None:
    swarm, subscriber = fleet
    sn = swarm.cabinet_sns[7]
    banks = swarm.banks(sn)
    checked = swarm.checked
    frame = await _command(subscriber, sn, rentbox.check())
    assert isinstance(frame, Snapshot)
    assert {hole.hole: hole.sn for hole in frame.holes if hole.sn is not None} == banks
    async with asyncio.timeout(TIMEOUT_S):
        await swarm.wait_checked(checked + 1)
    assert len(swarm.stats.first_command_s) >= 1

    # The full simulator with the same banks sends the same record, but for its random SoC/temperature.
    simulated = SimulatedCabinet(
        CabinetCredentials(sn=sn, host="127.0.0.1", port=1, username=sn, password=""),
        holes_per_board=8,
        banks=banks,
    ).snapshot()
    assert simulated.boards == frame.boards
    for ours, theirs in zip(frame.holes, simulated.holes, strict=True):
        assert 20 <= ours.soc <= 100 or ours.sn is None
        same_charge = dataclasses.replace(
            theirs,
            soc=ours.soc,
            temperature=ours.temperature,
            current=ours.current,
            charge_current=ours.charge_current,
        )
        assert ours == same_charge


async def test_popup_sn_ejects_once_per_delivery_and_counts_the_duplicate(
    fleet: tuple[Swarm, Subscriber],
) -> None:
    swarm, subscriber = fleet
    sn = swarm.cabinet_sns[11]
    banks = swarm.banks(sn)
    hole, bank = min(banks.items())
    command = rentbox.popup_sn(bank, timestamp=1_700_000_000, ttl=30)
    duplicates = swarm.stats.duplicate_ejects

    frame = await _command(subscriber, sn, command)
    assert frame == EjectBySnResult(hole=hole, sn=bank, state=EjectState.SUCCESS)
    assert hole not in swarm.banks(sn)
    assert swarm.stats.duplicate_ejects == duplicates

    again = await _command(subscriber, sn, command)  # a redelivery: the firmware ejects the next best
    assert isinstance(again, EjectBySnResult) and again.state == EjectState.SUCCESS
    assert again.sn != bank and again.hole not in swarm.banks(sn)
    assert swarm.stats.duplicate_ejects == duplicates + 1
    assert swarm.ejects_per_command()[sn, command.decode()] == 2

    missing = await _command(subscriber, sn, rentbox.popup_sn("99999999"))
    assert missing == EjectBySnResult(hole=0, sn="99999999", state=EjectState.SN_NOT_FOUND)

    empty_hole = next(h for h in range(1, 9) if h not in swarm.banks(sn))
    by_hole = await _command(subscriber, sn, rentbox.popup(empty_hole))
    assert by_hole == EjectByHoleResult(board=1, hole=empty_hole, state=EjectState.FAILED)


async def test_return_bank_publishes_0x40(fleet: tuple[Swarm, Subscriber]) -> None:
    swarm, subscriber = fleet
    sn = swarm.cabinet_sns[12]
    mark = len(subscriber.messages)
    hole = swarm.return_bank(sn, "12345678", soc=55)
    async with asyncio.timeout(TIMEOUT_S):
        _, payload = await subscriber.wait_message(_on(sn, "update"), since=mark)
    assert rentbox.decode(payload).frame == ReturnEvent(
        board=1, hole=hole, area=0, sn="12345678", state=1, software_version=13, soc=55
    )
    assert swarm.banks(sn)[hole] == "12345678"
    snapshot = await _command(subscriber, sn, rentbox.check())
    assert isinstance(snapshot, Snapshot) and snapshot.holes[hole - 1].soc == 55


async def test_publish_snapshots_reach_the_broker(fleet: tuple[Swarm, Subscriber]) -> None:
    swarm, subscriber = fleet
    before = subscriber.received
    sent = await swarm.publish_snapshots(rate_per_s=2000, duration_s=0.2)
    assert 300 <= sent <= 401
    async with asyncio.timeout(TIMEOUT_S):
        await subscriber.wait_count(before + sent)
    uploads = [topic for topic, _ in subscriber.messages[before:] if topic.endswith("/user/upload")]
    assert len(uploads) == sent == swarm.stats.uploads


async def test_a_dropped_cabinet_reconnects(broker: Mosquitto, fleet: tuple[Swarm, Subscriber]) -> None:
    swarm, _ = fleet
    sn = swarm.cabinet_sns[20]
    connects = swarm.stats.connects
    # Same client id: Mosquitto drops the cabinet, which comes back (after ~1 s) and takes its id back.
    thief = await Subscriber.connect(broker.host, broker.port, filters=("nothing",), client_id=sn)
    async with asyncio.timeout(TIMEOUT_S):
        await thief.wait_closed()
        await swarm.wait_connected(CABINETS)
    assert swarm.stats.peer_disconnects == 1 and swarm.stats.connects == connects + 1
    assert swarm.is_connected(sn)


async def test_refusals_and_unreachable_brokers_are_counted() -> None:
    _needs_mosquitto()
    specs = make_specs(5, seed=1)
    async with Mosquitto(allow_anonymous=False) as closed:
        swarm = Swarm(host=closed.host, port=closed.port, specs=specs)
        async with asyncio.timeout(TIMEOUT_S):
            await swarm.connect_all(rate_per_s=1000, retry=False)
        await swarm.close()
    assert swarm.connected == 0 and swarm.stats.refused == {5: 5}

    swarm = Swarm(host="127.0.0.1", port=free_port(), specs=specs)
    async with asyncio.timeout(TIMEOUT_S):
        await swarm.connect_all(rate_per_s=1000, retry=False)
    await swarm.close()
    assert swarm.stats.connect_errors == 5 and swarm.stats.retries == 0

    with socket.socket() as silent:  # accepts TCP (backlog) but never answers CONNECT
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        swarm = Swarm(host="127.0.0.1", port=silent.getsockname()[1], specs=specs, connect_timeout_s=0.2)
        async with asyncio.timeout(TIMEOUT_S):
            await swarm.connect_all(rate_per_s=1000, retry=False)
        await swarm.close()
    assert swarm.stats.connect_timeouts == 5


async def test_an_idle_cabinet_pings() -> None:
    pinged = asyncio.Event()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""
        while data := await reader.read(4096):
            packets, used = split_packets(pending + data)
            pending = (pending + data)[used:]
            for first, _ in packets:
                if first == 0x10:
                    writer.write(b"\x20\x02\x00\x00")
                elif first == 0x82:
                    writer.write(b"\x90\x03\x00\x01\x00")
                elif first == 0xC0:
                    writer.write(b"\xd0\x00")
                    pinged.set()
        writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    swarm = Swarm(host="127.0.0.1", port=port, specs=make_specs(1, seed=2), keepalive_s=1)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await swarm.connect_all(rate_per_s=10)
            await pinged.wait()
        assert swarm.stats.pings == 1 and swarm.stats.heartbeats == 1
    finally:
        await swarm.close()
        server.close()
        await server.wait_closed()
