"""Pure codec for the binary frames that cabinets send (rentbox protocol V1, section 3).

Bytes in, frozen dataclasses out, and back. No I/O: the MQTT layer, the simulator and the tests all
share this module. ``decode`` never raises anything but :class:`FrameError` for any input bytes.

Frame layout::

    byte 0      0xA8 (head)
    byte 1-2    total frame length, big-endian (includes head and checksum)
    byte 3      cmd
    byte 4..n-2 data
    byte n-1    checksum = (-(sum of bytes 0..n-2)) & 0xFF

A checksum mismatch is reported in :attr:`Decoded.checksum_ok` and only rejected in strict mode,
because the vendor's own example frames carry wrong checksums (see the spec).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Literal, TypeAlias

__all__ = [
    "HEAD",
    "SNAPSHOT_HOLE_COUNTS",
    "BoardInfo",
    "Decoded",
    "EjectByHoleResult",
    "EjectBySnResult",
    "EjectState",
    "Frame",
    "FrameError",
    "FrameErrorReason",
    "Heartbeat",
    "HoleInfo",
    "HoleState",
    "ReturnEvent",
    "ReturnFix",
    "ReturnState",
    "Snapshot",
    "checksum",
    "decode",
    "encode",
]

HEAD: Final = 0xA8
MIN_FRAME_LENGTH: Final = 5  # head + 2 length bytes + cmd + checksum
MAX_FRAME_LENGTH: Final = 0xFFFF
BOARD_HEADER_SIZE: Final = 6
HOLE_RECORD_SIZE: Final = 15
SNAPSHOT_HOLE_COUNTS: Final = (8, 6, 5, 4, 3, 2)
"""Holes per board tried, in this order, when a snapshot's layout must be inferred from its length."""

FrameErrorReason: TypeAlias = Literal[
    "too_short", "bad_head", "length_mismatch", "unknown_cmd", "bad_structure", "bad_checksum"
]


class FrameError(ValueError):
    """A byte string that is not a valid rentbox frame. ``reason`` is a stable, metric-friendly tag."""

    reason: FrameErrorReason

    def __init__(self, reason: FrameErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HoleState(IntEnum):
    """Hole state byte of a 0x10 snapshot record. Other values are reserved."""

    EMPTY = 0x00
    NORMAL = 0x01
    CHARGING_FAULT = 0x02
    COMMUNICATION_FAULT = 0x03
    STUCK = 0x04
    KEY_FORCED = 0x05
    SOLENOID_NOT_RETURNED = 0x06
    ANTI_THEFT_FAILED = 0x08
    TYPE_C_SHORT = 0x09
    RETURN_NOT_POPPED = 0x0A


class EjectState(IntEnum):
    """State byte of 0x31 (eject by SN) and 0x21 (eject by hole) results."""

    FAILED = 0x00
    SUCCESS = 0x01
    SERIAL_TIMEOUT = 0x11
    NOT_POPPED_SN_READABLE = 0x12
    NO_TIMESTAMP = 0x87
    TTL_EXCEEDED = 0x88
    NO_ELIGIBLE_POWER_BANK = 0xFB
    SN_NOT_FOUND = 0xFC
    TASK_QUEUE_FULL = 0xFD
    PREVIOUS_RENTAL_UNFINISHED = 0xFE
    PARSE_FAILED = 0xFF


class ReturnState(IntEnum):
    """State byte of 0x40 (return) and 0x28 (return self-test) frames."""

    FAILED = 0x00
    SUCCESS = 0x01
    REGION_CODE_ERROR = 0x10
    SN_UNREADABLE = 0x11
    VOLTAGE_TEMPERATURE_UNREADABLE = 0x12
    VERSION_UNREADABLE = 0x13
    BATTERY_LOCK_FAILED = 0x14
    SN_UNREADABLE_MOTOR_FAILURE = 0x21
    VOLTAGE_TEMPERATURE_UNREADABLE_MOTOR_FAILURE = 0x22
    VERSION_UNREADABLE_MOTOR_FAILURE = 0x23
    ANTI_THEFT_SWITCH_FAILED = 0x24


# --------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True, kw_only=True)
class BoardInfo:
    """6-byte control-board header of a 0x10 snapshot."""

    index: int
    temperature: int
    software_version: int
    hardware_version: int
    reserved: bytes = b"\xff\xff"
    """Bytes 1-2 of the header, kept raw (byte 2 may be an area high byte) so frames round-trip."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HoleInfo:
    """15-byte hole record of a 0x10 snapshot. ``board`` is the index of the enclosing board header."""

    hole: int
    board: int
    state: int
    current: float
    voltage: float
    area: int
    sn: str | None
    soc: int
    temperature: int
    charge_voltage: float
    charge_current: float
    software_version: int
    sensor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """0x10: every board and hole of a cabinet (reply to check / check_all / upload_all, periodic)."""

    CMD: ClassVar[int] = 0x10

    boards: tuple[BoardInfo, ...]
    holes: tuple[HoleInfo, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectBySnResult:
    """0x31: result of ``popup_sn``."""

    CMD: ClassVar[int] = 0x31

    hole: int
    sn: str | None
    state: int
    reserved: int = 0

    @property
    def success(self) -> bool:
        return self.state == EjectState.SUCCESS


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectByHoleResult:
    """0x21: result of ``popup`` (eject by hole)."""

    CMD: ClassVar[int] = 0x21

    board: int
    hole: int
    state: int
    reserved: int = 0

    @property
    def success(self) -> bool:
        return self.state == EjectState.SUCCESS


@dataclass(frozen=True, slots=True, kw_only=True)
class ReturnEvent:
    """0x40: a power bank was put into a hole (unsolicited; may be repeated)."""

    CMD: ClassVar[int] = 0x40

    board: int
    hole: int
    area: int
    sn: str | None
    state: int
    software_version: int
    soc: int

    @property
    def success(self) -> bool:
        return self.state == ReturnState.SUCCESS


@dataclass(frozen=True, slots=True, kw_only=True)
class ReturnFix:
    """0x28: return self-test, sent within 5 minutes after a 0x40 with state 0x24."""

    CMD: ClassVar[int] = 0x28

    board: int
    hole: int
    state: int
    area: int
    sn: str | None
    soc: int
    temperature: int
    charge_voltage: float
    charge_current: float
    software_version: int
    hardware_version: int
    reserved: bytes = b"\x00\x00"
    """The two reserved bytes after ``state``, kept raw so frames round-trip."""

    @property
    def success(self) -> bool:
        return self.state == ReturnState.SUCCESS


_CSQ_RE: Final = re.compile(r"(?:^|[;,\s])CSQ\s*[:=]\s*(\d{1,3})(?!\d)", re.IGNORECASE)
_BP_RE: Final = re.compile(r"(?:^|[;,\s])BP\s*[:=]\s*(\d{1,3})(?!\d)", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """0x7A heartbeat (on ``/user/heart``). ``board`` is the undocumented byte after the cmd, kept raw.

    ``text`` is the payload decoded as Latin-1 (every byte maps to one character, so nothing is lost).
    """

    CMD: ClassVar[int] = 0x7A

    board: int
    text: str

    @property
    def csq(self) -> int | None:
        """Cellular signal quality (99 = none, 0-31 otherwise), or None when absent."""
        match = _CSQ_RE.search(self.text)
        return int(match.group(1)) if match else None

    @property
    def backup_power(self) -> int | None:
        """Backup power state (``BP``), or None when absent."""
        match = _BP_RE.search(self.text)
        return int(match.group(1)) if match else None


Frame: TypeAlias = Snapshot | EjectBySnResult | EjectByHoleResult | ReturnEvent | ReturnFix | Heartbeat


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """A decoded frame plus what the wire said about it."""

    frame: Frame
    checksum_ok: bool
    cmd: int


_FIXED_LENGTHS: Final[dict[int, int]] = {
    EjectBySnResult.CMD: 12,
    EjectByHoleResult.CMD: 9,
    ReturnEvent.CMD: 15,
    ReturnFix.CMD: 21,
}
_KNOWN_CMDS: Final = frozenset({*_FIXED_LENGTHS, Snapshot.CMD, Heartbeat.CMD})


# --------------------------------------------------------------------------------------------- decode


def checksum(data: bytes) -> int:
    """Checksum of a frame: ``(-(sum of all bytes but the last)) & 0xFF``. ``data`` is the whole frame."""
    return -sum(data[:-1]) & 0xFF


def _sn_from(data: bytes, offset: int) -> str | None:
    value = int.from_bytes(data[offset : offset + 4], "big")
    return str(value) if value else None


def _tenth(raw: int) -> float:
    return round(raw / 10, 1)


def _infer_holes_per_board(body_length: int) -> int | None:
    for holes in SNAPSHOT_HOLE_COUNTS:
        if body_length % (BOARD_HEADER_SIZE + HOLE_RECORD_SIZE * holes) == 0:
            return holes
    return None


def _decode_snapshot(data: bytes, holes_per_board: int | None) -> Snapshot:
    body = data[4:-1]
    if not body:
        raise FrameError("bad_structure", "0x10 snapshot has no board")
    if holes_per_board is None:
        inferred = _infer_holes_per_board(len(body))
        if inferred is None:
            raise FrameError(
                "bad_structure",
                f"0x10 snapshot body of {len(body)} bytes is not a whole number of boards "
                f"for any of {SNAPSHOT_HOLE_COUNTS} holes per board",
            )
        holes_per_board = inferred
    board_size = BOARD_HEADER_SIZE + HOLE_RECORD_SIZE * holes_per_board
    if len(body) % board_size:
        raise FrameError(
            "bad_structure",
            f"0x10 snapshot body of {len(body)} bytes is not a whole number of boards "
            f"of {holes_per_board} holes ({board_size} bytes each)",
        )
    boards: list[BoardInfo] = []
    holes: list[HoleInfo] = []
    for start in range(0, len(body), board_size):
        header = body[start : start + BOARD_HEADER_SIZE]
        board = BoardInfo(
            index=header[0],
            reserved=bytes(header[1:3]),
            temperature=header[3],
            software_version=header[4],
            hardware_version=header[5],
        )
        boards.append(board)
        for offset in range(start + BOARD_HEADER_SIZE, start + board_size, HOLE_RECORD_SIZE):
            record = body[offset : offset + HOLE_RECORD_SIZE]
            holes.append(
                HoleInfo(
                    hole=record[0],
                    board=board.index,
                    state=record[1],
                    current=_tenth(record[2]),
                    voltage=_tenth(record[3]),
                    area=record[4],
                    sn=_sn_from(record, 5),
                    soc=record[9],
                    temperature=record[10],
                    charge_voltage=_tenth(record[11]),
                    charge_current=_tenth(record[12]),
                    software_version=record[13],
                    sensor=record[14],
                )
            )
    return Snapshot(boards=tuple(boards), holes=tuple(holes))


def _decode_body(cmd: int, data: bytes, holes_per_board: int | None) -> Frame:
    expected = _FIXED_LENGTHS.get(cmd)
    if expected is not None and len(data) != expected:
        raise FrameError(
            "bad_structure", f"a 0x{cmd:02X} frame is exactly {expected} bytes, this one has {len(data)}"
        )
    if cmd == Snapshot.CMD:
        return _decode_snapshot(data, holes_per_board)
    if cmd == EjectBySnResult.CMD:
        return EjectBySnResult(hole=data[4], sn=_sn_from(data, 5), state=data[9], reserved=data[10])
    if cmd == EjectByHoleResult.CMD:
        return EjectByHoleResult(board=data[4], hole=data[5], state=data[6], reserved=data[7])
    if cmd == ReturnEvent.CMD:
        return ReturnEvent(
            board=data[4],
            hole=data[5],
            area=data[6],
            sn=_sn_from(data, 7),
            state=data[11],
            software_version=data[12],
            soc=data[13],
        )
    if cmd == ReturnFix.CMD:
        return ReturnFix(
            board=data[4],
            hole=data[5],
            state=data[6],
            reserved=bytes(data[7:9]),
            area=data[9],
            sn=_sn_from(data, 10),
            soc=data[14],
            temperature=data[15],
            charge_voltage=_tenth(data[16]),
            charge_current=_tenth(data[17]),
            software_version=data[18],
            hardware_version=data[19],
        )
    # Heartbeat: the only remaining known cmd.
    if len(data) < MIN_FRAME_LENGTH + 1:
        raise FrameError(
            "bad_structure", f"a 0x7A heartbeat needs at least 6 bytes, this one has {len(data)}"
        )
    return Heartbeat(board=data[4], text=bytes(data[5:-1]).decode("latin-1"))


def decode(data: bytes, *, holes_per_board: int | None = None, strict_checksum: bool = False) -> Decoded:
    """Decode one binary frame.

    ``holes_per_board`` is the cabinet model's layout for 0x10 snapshots; when None it is inferred from
    the frame length. With ``strict_checksum`` a checksum mismatch raises ``FrameError("bad_checksum")``;
    by default it is only reported in ``Decoded.checksum_ok``.

    Raises :class:`FrameError` (and nothing else) for any invalid input.
    """
    if holes_per_board is not None and holes_per_board < 1:
        raise FrameError("bad_structure", f"holes_per_board must be at least 1, got {holes_per_board}")
    data = bytes(data)
    if len(data) < MIN_FRAME_LENGTH:
        raise FrameError(
            "too_short", f"frame of {len(data)} bytes is shorter than the minimum {MIN_FRAME_LENGTH}"
        )
    if data[0] != HEAD:
        raise FrameError("bad_head", f"frame starts with 0x{data[0]:02X}, expected head 0x{HEAD:02X}")
    declared = int.from_bytes(data[1:3], "big")
    if declared != len(data):
        raise FrameError(
            "length_mismatch", f"length field says {declared} bytes but the frame has {len(data)}"
        )
    cmd = data[3]
    if cmd not in _KNOWN_CMDS:
        raise FrameError("unknown_cmd", f"unknown frame cmd 0x{cmd:02X}")
    frame = _decode_body(cmd, data, holes_per_board)
    expected_checksum = checksum(data)
    checksum_ok = data[-1] == expected_checksum
    if strict_checksum and not checksum_ok:
        raise FrameError(
            "bad_checksum",
            f"0x{cmd:02X} frame checksum is 0x{data[-1]:02X}, expected 0x{expected_checksum:02X}",
        )
    return Decoded(frame=frame, checksum_ok=checksum_ok, cmd=cmd)


# --------------------------------------------------------------------------------------------- encode


def _u8(value: int, name: str) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must fit in one byte (0-255), got {value}")
    return value


def _tenth_byte(value: float, name: str) -> int:
    return _u8(round(value * 10), f"{name} x10")


def _sn_bytes(sn: str | None) -> bytes:
    if sn is None:
        return bytes(4)
    if not sn.isascii() or not sn.isdigit() or str(int(sn)) != sn:
        raise ValueError(f"power-bank SN must be a canonical decimal number, got {sn!r}")
    value = int(sn)
    if not 0 < value <= 0xFFFFFFFF:
        raise ValueError(f"power-bank SN must be 1..4294967295 (0 means empty; use None), got {sn}")
    return value.to_bytes(4, "big")


def _reserved(value: bytes, name: str) -> bytes:
    if len(value) != 2:
        raise ValueError(f"{name} must be exactly 2 bytes, got {len(value)}")
    return bytes(value)


def _snapshot_body(frame: Snapshot) -> bytes:
    if not frame.boards:
        raise ValueError("a snapshot needs at least one board")
    per_board, extra = divmod(len(frame.holes), len(frame.boards))
    if extra or not per_board:
        raise ValueError(
            f"a snapshot needs the same number (at least 1) of holes on every board: "
            f"{len(frame.holes)} holes over {len(frame.boards)} boards"
        )
    out = bytearray()
    for position, board in enumerate(frame.boards):
        out += bytes(
            [
                _u8(board.index, "board index"),
                *_reserved(board.reserved, "board reserved"),
                _u8(board.temperature, "board temperature"),
                _u8(board.software_version, "board software_version"),
                _u8(board.hardware_version, "board hardware_version"),
            ]
        )
        for hole in frame.holes[position * per_board : (position + 1) * per_board]:
            if hole.board != board.index:
                raise ValueError(
                    f"hole {hole.hole} says board {hole.board} but sits under board {board.index}: "
                    f"holes must be listed board by board, {per_board} per board"
                )
            out += bytes(
                [
                    _u8(hole.hole, "hole"),
                    _u8(hole.state, "hole state"),
                    _tenth_byte(hole.current, "hole current"),
                    _tenth_byte(hole.voltage, "hole voltage"),
                    _u8(hole.area, "hole area"),
                    *_sn_bytes(hole.sn),
                    _u8(hole.soc, "hole soc"),
                    _u8(hole.temperature, "hole temperature"),
                    _tenth_byte(hole.charge_voltage, "hole charge_voltage"),
                    _tenth_byte(hole.charge_current, "hole charge_current"),
                    _u8(hole.software_version, "hole software_version"),
                    _u8(hole.sensor, "hole sensor"),
                ]
            )
    return bytes(out)


def _body(frame: Frame) -> bytes:
    if isinstance(frame, Snapshot):
        return _snapshot_body(frame)
    if isinstance(frame, EjectBySnResult):
        return bytes(
            [
                _u8(frame.hole, "hole"),
                *_sn_bytes(frame.sn),
                _u8(frame.state, "state"),
                _u8(frame.reserved, "reserved"),
            ]
        )
    if isinstance(frame, EjectByHoleResult):
        return bytes(
            [
                _u8(frame.board, "board"),
                _u8(frame.hole, "hole"),
                _u8(frame.state, "state"),
                _u8(frame.reserved, "reserved"),
            ]
        )
    if isinstance(frame, ReturnEvent):
        return bytes(
            [
                _u8(frame.board, "board"),
                _u8(frame.hole, "hole"),
                _u8(frame.area, "area"),
                *_sn_bytes(frame.sn),
                _u8(frame.state, "state"),
                _u8(frame.software_version, "software_version"),
                _u8(frame.soc, "soc"),
            ]
        )
    if isinstance(frame, ReturnFix):
        return bytes(
            [
                _u8(frame.board, "board"),
                _u8(frame.hole, "hole"),
                _u8(frame.state, "state"),
                *_reserved(frame.reserved, "reserved"),
                _u8(frame.area, "area"),
                *_sn_bytes(frame.sn),
                _u8(frame.soc, "soc"),
                _u8(frame.temperature, "temperature"),
                _tenth_byte(frame.charge_voltage, "charge_voltage"),
                _tenth_byte(frame.charge_current, "charge_current"),
                _u8(frame.software_version, "software_version"),
                _u8(frame.hardware_version, "hardware_version"),
            ]
        )
    try:
        text = frame.text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"heartbeat text must be Latin-1 (one byte per character): {exc}") from exc
    return bytes([_u8(frame.board, "board")]) + text


def encode(frame: Frame) -> bytes:
    """Build the wire bytes of ``frame``, with a correct length field and checksum.

    Raises ValueError when a field does not fit its wire representation (e.g. a byte over 255, an SN
    that is not a canonical decimal uint32, holes not listed board by board).
    """
    body = _body(frame)
    length = len(body) + MIN_FRAME_LENGTH
    if length > MAX_FRAME_LENGTH:
        raise ValueError(f"frame of {length} bytes exceeds the maximum {MAX_FRAME_LENGTH}")
    without_checksum = bytes([HEAD, *length.to_bytes(2, "big"), frame.CMD]) + body
    return without_checksum + bytes([-sum(without_checksum) & 0xFF])
