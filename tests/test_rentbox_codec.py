"""The rentbox codec against the shared protocol vectors, plus property tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rentbox
from rentbox import (
    UP_KINDS,
    BoardInfo,
    CommandError,
    EjectByHoleResult,
    EjectBySnResult,
    Frame,
    FrameError,
    Heartbeat,
    HoleInfo,
    ReturnEvent,
    ReturnFix,
    Snapshot,
    check,
    checksum,
    command_topic,
    decode,
    encode,
    encode_command,
    parse_command,
    parse_topic,
    popup,
    popup_sn,
    reboot,
    sign,
    up_topic,
)
from rentbox.codec import SNAPSHOT_HOLE_COUNTS


def _vectors_path() -> Path:
    """The protocol's test vectors (kept in the repository, tests/data); RENTBOX_VECTORS overrides."""
    override = os.environ.get("RENTBOX_VECTORS")
    return Path(override) if override else Path(__file__).parent / "data" / "rentbox_vectors.json"


VECTORS: dict[str, Any] = json.loads(_vectors_path().read_text())

INVALID_REASONS = {
    "too_short": {"too_short"},
    "bad_head": {"bad_head"},
    "length_mismatch": {"length_mismatch"},
    "unknown_cmd": {"unknown_cmd"},
    "truncated_snapshot": {"bad_structure", "length_mismatch"},
}


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def _assert_fields(obj: object, expect: dict[str, Any], where: str) -> None:
    for key, value in expect.items():
        assert getattr(obj, key) == value, f"{where}.{key}: {getattr(obj, key)!r} != {value!r}"


# ------------------------------------------------------------------------------------------- vectors


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=[v["name"] for v in VECTORS["frames"]])
def test_vector_decodes_to_expect(vector: dict[str, Any]) -> None:
    decoded = decode(_hex(vector["hex"]))
    expect = dict(vector["expect"])
    assert f"0x{decoded.cmd:02X}" == expect.pop("cmd")
    assert decoded.frame.CMD == decoded.cmd
    assert decoded.checksum_ok is vector["checksum_ok"]
    for key in ("boards", "holes"):
        if key in expect:
            items = getattr(decoded.frame, key)
            assert len(items) == len(expect[key])
            for index, (item, item_expect) in enumerate(zip(items, expect.pop(key), strict=True)):
                _assert_fields(item, item_expect, f"{key}[{index}]")
    _assert_fields(decoded.frame, expect, vector["name"])


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=[v["name"] for v in VECTORS["frames"]])
def test_vector_reencodes(vector: dict[str, Any]) -> None:
    """encode() rebuilds the vendor bytes exactly, except a wrong checksum, which it corrects."""
    raw = _hex(vector["hex"])
    decoded = decode(raw)
    rebuilt = encode(decoded.frame)
    assert rebuilt[:-1] == raw[:-1]
    assert rebuilt[-1] == checksum(raw)
    assert decode(rebuilt).checksum_ok


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=[v["name"] for v in VECTORS["frames"]])
def test_strict_checksum(vector: dict[str, Any]) -> None:
    raw = _hex(vector["hex"])
    if vector["checksum_ok"]:
        assert decode(raw, strict_checksum=True).checksum_ok
    else:
        with pytest.raises(FrameError) as excinfo:
            decode(raw, strict_checksum=True)
        assert excinfo.value.reason == "bad_checksum"


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=[v["name"] for v in VECTORS["invalid"]])
def test_invalid_vector_raises(vector: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as excinfo:
        decode(_hex(vector["hex"]))
    assert excinfo.value.reason in INVALID_REASONS[vector["name"]]
    assert str(excinfo.value)


def test_vendor_snapshot_with_explicit_layout() -> None:
    raw = _hex(VECTORS["frames"][0]["hex"])
    frame = decode(raw, holes_per_board=4).frame
    assert isinstance(frame, Snapshot)
    assert [h.board for h in frame.holes] == [1, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(FrameError) as excinfo:
        decode(raw, holes_per_board=5)
    assert excinfo.value.reason == "bad_structure"


def test_snapshot_hole_values() -> None:
    frame = decode(_hex(VECTORS["frames"][0]["hex"])).frame
    assert isinstance(frame, Snapshot)
    first = frame.holes[0]
    assert (first.current, first.voltage, first.charge_voltage, first.charge_current) == (0.0, 23.6, 5.0, 0.1)
    assert first.software_version == 13
    assert frame.boards[0].reserved == b"\xff\xff"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "too_short"),
        (bytes.fromhex("A8 00 05 10 00"), "bad_structure"),  # snapshot without a board
        (bytes.fromhex("A8 00 05 7A 00"), "bad_structure"),  # heartbeat without its byte
        (bytes.fromhex("A8 00 0D 31 60 00 9B D2 10 01 00 00 00"), "bad_structure"),  # 0x31 is 12 bytes
        (bytes.fromhex("A8 00 08 21 01 03 01 00"), "bad_structure"),  # 0x21 is 9 bytes
    ],
)
def test_structure_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as excinfo:
        decode(raw)
    assert excinfo.value.reason == reason


def test_heartbeat_without_fields() -> None:
    hb = Heartbeat(board=16, text="hello")
    assert hb.csq is None
    assert hb.backup_power is None
    assert Heartbeat(board=0, text="BP:1;CSQ:99").csq == 99


def test_encode_rejects_unrepresentable_frames() -> None:
    with pytest.raises(ValueError):
        encode(EjectByHoleResult(board=256, hole=1, state=1))
    with pytest.raises(ValueError):
        encode(EjectBySnResult(hole=1, sn="0", state=1))
    with pytest.raises(ValueError):
        encode(EjectBySnResult(hole=1, sn="4294967296", state=1))
    with pytest.raises(ValueError):
        encode(Snapshot(boards=(), holes=()))
    with pytest.raises(ValueError):
        encode(Heartbeat(board=1, text="CSQ:€"))


# ----------------------------------------------------------------------------------- commands, topics


@pytest.mark.parametrize("vector", VECTORS["commands"], ids=[v["name"] for v in VECTORS["commands"]])
def test_command_vectors(vector: dict[str, Any]) -> None:
    expected = vector["json"]
    builders = {
        "check": check,
        "eject_by_sn": lambda: popup_sn(expected["data"]),
        "eject_by_sn_ttl": lambda: popup_sn(
            expected["data"], timestamp=int(expected["timestamp"]), ttl=int(expected["ttl"])
        ),
        "eject_by_hole": lambda: popup(int(expected["data"]), io=int(expected["io"])),
        "reboot": reboot,
    }
    payload = builders[vector["name"]]()
    assert json.loads(payload) == expected
    assert b" " not in payload
    assert parse_command(payload) == expected
    assert json.loads(encode_command(**expected)) == expected


@pytest.mark.parametrize(
    "payload", [b"", b"not json", b"[1]", b'{"data":"1"}', b'{"cmd":3}', b'{"cmd":"popup","data":1}', b"\xff"]
)
def test_parse_command_rejects(payload: bytes) -> None:
    with pytest.raises(CommandError):
        parse_command(payload)


def test_popup_rejects_bad_hole() -> None:
    with pytest.raises(CommandError):
        popup(0)
    with pytest.raises(CommandError):
        popup(81)


def test_sign_vector() -> None:
    vector = VECTORS["sign"]
    assert sign(vector["params"]) == vector["sign"]
    assert sign({**vector["params"], "sign": "whatever"}) == vector["sign"]


def test_topics() -> None:
    assert command_topic("powerbank", "864601068412899") == "/powerbank/864601068412899/user/get"
    for kind in UP_KINDS:
        topic = up_topic("powerbank", "864601068412899", kind)
        assert topic == f"/powerbank/864601068412899/user/{kind}"
        assert parse_topic(topic) == ("powerbank", "864601068412899", kind)
    assert parse_topic("/powerbank/864601068412899/user/get") == ("powerbank", "864601068412899", "get")
    for bad in (
        "powerbank/1/user/update",
        "/powerbank/1/user/other",
        "/powerbank//user/update",
        "/a/b/c/d/e",
        "",
    ):
        assert parse_topic(bad) is None
    with pytest.raises(ValueError):
        up_topic("powerbank", "1", "get")
    with pytest.raises(ValueError):
        command_topic("powerbank", "a/b")


# --------------------------------------------------------------------------------------- properties

u8 = st.integers(min_value=0, max_value=255)
tenth = u8.map(lambda raw: round(raw / 10, 1))
sns = st.one_of(st.none(), st.integers(min_value=1, max_value=0xFFFFFFFF).map(str))


@st.composite
def snapshots(draw: st.DrawFn, holes_per_board: int | None = None) -> tuple[Snapshot, int]:
    per_board = holes_per_board or draw(st.integers(min_value=1, max_value=10))
    board_count = draw(st.integers(min_value=1, max_value=10))
    boards: list[BoardInfo] = []
    holes: list[HoleInfo] = []
    for _ in range(board_count):
        board = BoardInfo(
            index=draw(u8),
            temperature=draw(u8),
            software_version=draw(u8),
            hardware_version=draw(u8),
            reserved=draw(st.binary(min_size=2, max_size=2)),
        )
        boards.append(board)
        for _ in range(per_board):
            holes.append(
                HoleInfo(
                    hole=draw(u8),
                    board=board.index,
                    state=draw(u8),
                    current=draw(tenth),
                    voltage=draw(tenth),
                    area=draw(u8),
                    sn=draw(sns),
                    soc=draw(u8),
                    temperature=draw(u8),
                    charge_voltage=draw(tenth),
                    charge_current=draw(tenth),
                    software_version=draw(u8),
                    sensor=draw(u8),
                )
            )
    return Snapshot(boards=tuple(boards), holes=tuple(holes)), per_board


eject_by_sn = st.builds(EjectBySnResult, hole=u8, sn=sns, state=u8, reserved=u8)
eject_by_hole = st.builds(EjectByHoleResult, board=u8, hole=u8, state=u8, reserved=u8)
return_events = st.builds(
    ReturnEvent, board=u8, hole=u8, area=u8, sn=sns, state=u8, software_version=u8, soc=u8
)
return_fixes = st.builds(
    ReturnFix,
    board=u8,
    hole=u8,
    state=u8,
    area=u8,
    sn=sns,
    soc=u8,
    temperature=u8,
    charge_voltage=tenth,
    charge_current=tenth,
    software_version=u8,
    hardware_version=u8,
    reserved=st.binary(min_size=2, max_size=2),
)
heartbeats = st.builds(
    Heartbeat, board=u8, text=st.text(alphabet=st.characters(max_codepoint=255), max_size=64)
)
fixed_frames: st.SearchStrategy[Frame] = st.one_of(
    eject_by_sn, eject_by_hole, return_events, return_fixes, heartbeats
)
any_frames: st.SearchStrategy[Frame] = st.one_of(fixed_frames, snapshots().map(lambda pair: pair[0]))


@given(fixed_frames)
def test_roundtrip_fixed_frames(frame: Frame) -> None:
    decoded = decode(encode(frame), strict_checksum=True)
    assert decoded.frame == frame
    assert decoded.cmd == frame.CMD
    assert decoded.checksum_ok


@given(snapshots())
def test_roundtrip_snapshot_with_layout(pair: tuple[Snapshot, int]) -> None:
    frame, per_board = pair
    assert decode(encode(frame), holes_per_board=per_board, strict_checksum=True).frame == frame


def _first_fitting_layout(board_count: int, per_board: int) -> int | None:
    body = board_count * (6 + 15 * per_board)
    return next((h for h in SNAPSHOT_HOLE_COUNTS if body % (6 + 15 * h) == 0), None)


@given(st.sampled_from(SNAPSHOT_HOLE_COUNTS).flatmap(snapshots))
def test_roundtrip_snapshot_inferred(pair: tuple[Snapshot, int]) -> None:
    frame, per_board = pair
    decoded = decode(encode(frame))
    if _first_fitting_layout(len(frame.boards), per_board) == per_board:
        assert decoded.frame == frame
    else:  # e.g. 7 boards of 2 holes have the size of 2 boards of 8: the spec's order decides
        assert isinstance(decoded.frame, Snapshot)
        assert encode(decoded.frame) == encode(frame)


def test_common_layouts_are_inferred_unambiguously() -> None:
    for per_board in (4, 5, 6, 8):
        for board_count in range(1, 11):
            assert _first_fitting_layout(board_count, per_board) == per_board, (board_count, per_board)


def _decode_or_frame_error(data: bytes) -> None:
    for holes_per_board in (None, 4):
        for strict in (False, True):
            try:
                decoded = decode(data, holes_per_board=holes_per_board, strict_checksum=strict)
            except FrameError as exc:
                assert exc.reason in {
                    "too_short",
                    "bad_head",
                    "length_mismatch",
                    "unknown_cmd",
                    "bad_structure",
                    "bad_checksum",
                }
            else:
                assert decoded.cmd == data[3]


@given(st.binary(max_size=400))
def test_random_bytes_only_raise_frame_error(data: bytes) -> None:
    _decode_or_frame_error(data)


@given(st.sampled_from((0x10, 0x21, 0x28, 0x31, 0x40, 0x7A, 0x00, 0xFF)), st.binary(max_size=300))
def test_random_bodies_with_valid_header_only_raise_frame_error(cmd: int, body: bytes) -> None:
    length = len(body) + 5
    data = bytes([0xA8, *length.to_bytes(2, "big"), cmd]) + body
    _decode_or_frame_error(data + bytes([-sum(data) & 0xFF]))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(any_frames)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        action = draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        position = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif action == "insert":
            data.insert(position, draw(u8))
        elif action == "delete" and data:
            del data[position]
        elif action == "truncate":
            del data[position:]
    return bytes(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_frames_only_raise_frame_error(data: bytes) -> None:
    _decode_or_frame_error(data)


@given(
    st.text(alphabet="0123456789", min_size=1, max_size=10),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    st.one_of(st.none(), st.integers(min_value=0, max_value=3600)),
)
def test_popup_sn_roundtrip(sn: str, timestamp: int | None, ttl: int | None) -> None:
    parsed = parse_command(popup_sn(sn, timestamp=timestamp, ttl=ttl))
    assert parsed["cmd"] == "popup_sn"
    assert parsed["data"] == sn
    assert parsed.get("timestamp") == (None if timestamp is None else str(timestamp))
    assert parsed.get("ttl") == (None if ttl is None else str(ttl))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (rentbox.check_all(), {"cmd": "check_all"}),
        (rentbox.upload_all(), {"cmd": "upload_all"}),
        (rentbox.volume(70), {"cmd": "volume", "data": "70"}),
        (rentbox.set_wifi("cafe", "secret"), {"cmd": "setWifi", "username": "cafe", "password": "secret"}),
        (rentbox.get_wifi(), {"cmd": "getWifi"}),
        (rentbox.set_mode("4g"), {"cmd": "setMode", "data": "4g"}),
        (rentbox.load_ad(), {"cmd": "load_ad"}),
        (rentbox.push_version_publish(), {"cmd": "push_version_publish"}),
        (rentbox.check_log(), {"cmd": "check_log"}),
        (rentbox.popup(3, io=1), {"cmd": "popup", "data": "3", "io": "1"}),
    ],
)
def test_operator_commands_encode_as_the_spec_says(payload: bytes, expected: dict[str, str]) -> None:
    assert json.loads(payload) == expected


@pytest.mark.parametrize(
    "bad", [lambda: rentbox.volume(101), lambda: rentbox.set_mode("lte"), lambda: rentbox.set_wifi("", "x")]
)
def test_operator_commands_refuse_bad_values(bad: Any) -> None:
    with pytest.raises(rentbox.CommandError):
        bad()
