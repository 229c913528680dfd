"""A swarm of simulated cabinets over raw MQTT 3.1.1: thousands of connections in one Python process.

:class:`~simulators.cabinet.SimulatedCabinet` runs one amqtt client (and several tasks) per cabinet:
right for behaviour tests, far too heavy for fleet benchmarks. A :class:`Swarm` emulates many cabinets
with one :class:`asyncio.Protocol` object per cabinet (``__slots__``, reused across reconnects), a
minimal MQTT 3.1.1 codec and **one** scheduler task for the whole swarm, which walks the cabinets in
two rings: heartbeats (each cabinet every ``heartbeat_s``, the cabinets spread evenly and in random
order over the period) and keepalive (a PINGREQ when a cabinet sent nothing for ``keepalive_s``). No
task or timer exists per connection except while it connects.

The rentbox bytes are the full simulator's, with its defaults and no faults: client id = username =
the cabinet SN, the password its secret; a QoS 0 subscription to ``/{pk}/{sn}/user/get`` right after
CONNACK and one 0x7A heartbeat on ``/user/heart`` after SUBACK; ``check`` / ``check_all`` /
``upload_all`` answered with a 0x10 snapshot, ``popup_sn`` with 0x31 and ``popup`` with 0x21 on
``/user/update``; other commands are counted and ignored. Like the firmware, a command that arrives
twice is executed twice (a repeated ``popup_sn`` whose power bank already came out ejects the next-best
bank); :attr:`SwarmStats.duplicate_ejects` counts the command payloads that ejected more than once, so
a benchmark can check "at most one eject per command". SoC (20..100) and temperature of a bank derive
from its SN (no per-bank state); a bank put back with :meth:`Swarm.return_bank` keeps the SoC given.

Also here: :class:`Subscriber` (one plain MQTT client that counts what it receives, to measure a
reference broker end to end), :class:`Mosquitto` (a private Mosquitto on a free 127.0.0.1 port) and
:func:`raise_nofile_limit`.

Only the standard library and :mod:`rentbox` are imported here (no amqtt, no paho). Note that importing
``simulators.swarm`` still runs ``simulators/__init__.py``, which imports the amqtt-based simulator.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import random
import resource
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Self, cast

import rentbox
from rentbox import (
    BoardInfo,
    EjectByHoleResult,
    EjectBySnResult,
    EjectState,
    Heartbeat,
    HoleInfo,
    HoleState,
    ReturnEvent,
    ReturnState,
    Snapshot,
)
from rentbox.commands import MAX_HOLE

__all__ = [
    "ConnackRefused",
    "Mosquitto",
    "MqttProtocolError",
    "Subscriber",
    "Swarm",
    "SwarmCabinetSpec",
    "SwarmError",
    "SwarmStats",
    "connect_packet",
    "make_specs",
    "percentile",
    "publish_packet",
    "raise_nofile_limit",
    "random_banks",
    "split_packets",
    "subscribe_packet",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the full simulator's bytes
# Copied from simulators/cabinet.py (importing it would import amqtt).
SN_MIN: Final = 10_000_000
SN_MAX: Final = 99_999_999
SOC_MIN: Final = 20
SOC_MAX: Final = 100
BANK_TEMPERATURE_C: Final = (25, 34)
EMPTY_SENSOR: Final = 0x80
HEARTBEAT_BOARD_BYTE: Final = 0x10
CSQ: Final = 27
BOARD_TEMPERATURE_C: Final = 28
BOARD_SOFTWARE_VERSION: Final = 4
BOARD_HARDWARE_VERSION: Final = 22
BANK_SOFTWARE_VERSION: Final = 13
BANK_VOLTAGE: Final = 23.6
CHARGE_VOLTAGE: Final = 5.0
SNAPSHOT_COMMANDS: Final = frozenset({"check", "check_all", "upload_all"})

# ----------------------------------------------------------------------------------------- swarm knobs
KEEPALIVE_S: Final = 60
HEARTBEAT_S: Final = 60.0
CONNECT_TIMEOUT_S: Final = 10.0
RETRY_INITIAL_S: Final = 1.0
RETRY_MAX_S: Final = 30.0
SCHEDULER_TICK_S: Final = 0.05
"""How often the one scheduler task wakes to walk the heartbeat and keepalive rings."""
KEEPALIVE_RING_FRACTION: Final = 0.25
"""Each cabinet's idle time is checked every ``keepalive_s / 4``: a PINGREQ goes when it has sent nothing
for ``keepalive_s``, so no gap exceeds 1.25 x keepalive (brokers disconnect at 1.5 x)."""
PUBLISH_BURST: Final = 2000
"""At most this many snapshots per loop iteration in :meth:`Swarm.publish_snapshots` (reads go on)."""
PUBLISH_TICK_S: Final = 0.002
"""Below this, :meth:`Swarm.publish_snapshots` sends what is due in bursts instead of one by one."""
CLOSE_TIMEOUT_S: Final = 5.0
FD_MARGIN: Final = 64
"""File descriptors kept free beyond one per connection (event loop, logs, a broker subprocess' pipes)."""

# ------------------------------------------------------------------------------------------- MQTT 3.1.1
CONNECT: Final = 0x10
CONNACK: Final = 0x20
PUBLISH: Final = 0x30
PUBACK: Final = 0x40
SUBSCRIBE: Final = 0x82  # the reserved flags of SUBSCRIBE are 0b0010
SUBACK: Final = 0x90
PINGREQ_PACKET: Final = b"\xc0\x00"
PINGRESP: Final = 0xD0
DISCONNECT_PACKET: Final = b"\xe0\x00"
SUBACK_FAILURE: Final = 0x80
MAX_REMAINING_LENGTH: Final = 268_435_455
CONNACK_REASONS: Final = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorized",
}


class SwarmError(RuntimeError):
    """A swarm (or its helpers) cannot do what was asked; the message says what to change."""


class MqttProtocolError(ValueError):
    """Bytes from the broker that are not MQTT 3.1.1."""


class ConnackRefused(SwarmError):
    """The broker answered CONNACK with a non-zero return code (or refused the subscription)."""

    def __init__(self, detail: str, *, return_code: int | None) -> None:
        super().__init__(detail)
        self.return_code = return_code


def _remaining_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"an MQTT packet carries at most {MAX_REMAINING_LENGTH} bytes, got {length}")
    out = bytearray()
    while True:
        length, digit = divmod(length, 0x80)
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _remaining_length(len(body)) + body


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT string is at most 65535 bytes, got {len(data)}")
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    keepalive_s: int = KEEPALIVE_S,
    clean_session: bool = True,
) -> bytes:
    """CONNECT (MQTT 3.1.1, protocol level 4). A password needs a username (MQTT 3.1.1 §3.1.2.9)."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keepalive_s must be 0..65535, got {keepalive_s}")
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        if username is None:
            raise ValueError("MQTT 3.1.1 sends a password only together with a username")
        flags |= 0x40
        payload += _string(password)
    header = b"\x00\x04MQTT\x04" + bytes((flags,)) + keepalive_s.to_bytes(2, "big")
    return _packet(CONNECT, header + payload)


def subscribe_packet(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    """SUBSCRIBE ``(filter, qos)`` pairs."""
    body = packet_id.to_bytes(2, "big") + b"".join(_string(f) + bytes((qos,)) for f, qos in filters)
    return _packet(SUBSCRIBE, body)


def publish_packet(topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    """PUBLISH (QoS 0, or 1 with ``packet_id``), never retained."""
    topic_bytes = topic.encode() if isinstance(topic, str) else topic
    if qos == 0:
        body_length = 2 + len(topic_bytes) + len(payload)
        return b"".join(
            (
                b"\x30",
                _remaining_length(body_length),
                len(topic_bytes).to_bytes(2, "big"),
                topic_bytes,
                payload,
            )
        )
    if qos != 1:
        raise ValueError(f"only QoS 0 and 1 are supported, got {qos}")
    return _packet(PUBLISH | 0x02, _string(topic_bytes) + packet_id.to_bytes(2, "big") + payload)


def split_packets(buffer: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The complete MQTT packets at the start of ``buffer`` as ``(first byte, body)``, and how many bytes
    they take. What is left after them is the start of an incomplete packet. Raises
    :class:`MqttProtocolError` for a remaining length longer than 4 bytes."""
    packets: list[tuple[int, bytes]] = []
    size = len(buffer)
    position = 0
    while size - position >= 2:
        index = position + 1
        length = 0
        multiplier = 1
        while True:
            if index >= size:
                return packets, position
            digit = buffer[index]
            index += 1
            length += (digit & 0x7F) * multiplier
            if digit < 0x80:
                break
            multiplier *= 0x80
            if multiplier > 0x80**3:
                raise MqttProtocolError("MQTT remaining length is longer than 4 bytes")
        end = index + length
        if end > size:
            break
        packets.append((buffer[position], buffer[index:end]))
        position = end
    return packets, position


class _Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    packet_id: int


def _parse_publish(first: int, body: bytes) -> _Publish:
    if len(body) < 2:
        raise MqttProtocolError("PUBLISH without a topic")
    topic_end = 2 + int.from_bytes(body[:2], "big")
    qos = (first >> 1) & 0x03
    packet_id = 0
    payload_start = topic_end
    if qos:
        packet_id = int.from_bytes(body[topic_end : topic_end + 2], "big")
        payload_start += 2
    if payload_start > len(body):
        raise MqttProtocolError("PUBLISH shorter than its topic")
    try:
        topic = body[2:topic_end].decode()
    except UnicodeDecodeError as exc:
        raise MqttProtocolError(f"PUBLISH topic is not UTF-8: {exc}") from exc
    return _Publish(topic=topic, payload=body[payload_start:], qos=qos, packet_id=packet_id)


def _puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def _connack_code(body: bytes) -> int:
    if len(body) != 2:
        raise MqttProtocolError(f"CONNACK body is 2 bytes, got {len(body)}")
    return body[1]


def _suback_codes(body: bytes) -> bytes:
    if len(body) < 3:
        raise MqttProtocolError("SUBACK without return codes")
    return body[2:]


def _refusal(code: int) -> str:
    return f"CONNACK {code} ({CONNACK_REASONS.get(code, 'refused')})"


# ---------------------------------------------------------------------------------------- small helpers


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100, nearest rank) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def raise_nofile_limit(needed: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit and return the new soft limit.

    Raises :class:`SwarmError` when even the hard limit is below ``needed`` file descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = max(soft, needed or 0, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("event=swarm_nofile_raise_failed target=%s error=%r", target, exc)
    if needed is not None and soft != resource.RLIM_INFINITY and soft < needed:
        raise SwarmError(
            f"this process may open {soft} files (RLIMIT_NOFILE soft {soft}, hard {hard}) but needs {needed} "
            "for its connections: raise the hard limit (e.g. `ulimit -Hn 65536` as root before starting, "
            "LimitNOFILE= in a systemd unit, nofile in /etc/security/limits.conf) or use fewer cabinets"
        )
    return soft


def _bank_soc_temperature(sn: str) -> tuple[int, int]:
    """SoC 20..100 and temperature 25..34 of bank ``sn``: fixed per SN, spread like the simulator's."""
    digest = zlib.crc32(sn.encode())
    soc = SOC_MIN + digest % (SOC_MAX - SOC_MIN + 1)
    low, high = BANK_TEMPERATURE_C
    return soc, low + (digest >> 8) % (high - low + 1)


def _check_bank_sn(sn: str) -> str:
    if not sn.isascii() or not sn.isdigit() or str(int(sn)) != sn or not 0 < int(sn) <= 0xFFFFFFFF:
        raise ValueError(
            f"power-bank SN must be a decimal number 1..4294967295 without leading zeros, got {sn!r}"
        )
    return sn


def random_banks(
    rng: random.Random, *, hole_count: int, fill: float, taken: set[str] | None = None
) -> dict[int, str]:
    """``{hole: sn}`` for ``round(fill * hole_count)`` random holes with random unique 8-digit SNs (as
    :func:`simulators.cabinet.random_banks`; SNs in ``taken`` are avoided and the new ones added)."""
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"fill must be between 0 and 1, got {fill}")
    taken = set() if taken is None else taken
    holes = sorted(rng.sample(range(1, hole_count + 1), round(fill * hole_count)))
    banks: dict[int, str] = {}
    for hole in holes:
        sn = str(rng.randint(SN_MIN, SN_MAX))
        while sn in taken:
            sn = str(rng.randint(SN_MIN, SN_MAX))
        taken.add(sn)
        banks[hole] = sn
    return banks


class _Level:
    """A counter one can wait on until it reaches a value (no polling)."""

    __slots__ = ("_order", "_waiters", "value")

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def add(self, delta: int = 1) -> None:
        self.value += delta
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.value:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    async def wait(self, value: int) -> None:
        if self.value >= value:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (value, next(self._order), future))
        await future


# ---------------------------------------------------------------------------------------------- swarm


@dataclass(frozen=True, slots=True)
class SwarmCabinetSpec:
    """One cabinet of a swarm: its SN (client id and username), MQTT password (None: none sent), layout
    and ``{hole: power-bank SN}``. The swarm never mutates ``banks``."""

    sn: str
    password: str | None
    banks: Mapping[int, str]
    boards: int = 1
    holes_per_board: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.boards <= 10:
            raise ValueError(f"boards must be 1..10, got {self.boards}")
        if self.holes_per_board < 1 or self.hole_count > MAX_HOLE:
            raise ValueError(f"holes_per_board must be at least 1 and boards x holes at most {MAX_HOLE}")
        rentbox.command_topic(rentbox.DEFAULT_PRODUCT_KEY, self.sn)  # a valid topic segment
        if len(set(self.banks.values())) != len(self.banks):
            raise ValueError(f"cabinet {self.sn}: a power bank cannot be in two holes")
        for hole, bank in self.banks.items():
            if not 1 <= hole <= self.hole_count:
                raise ValueError(f"cabinet {self.sn}: hole {hole} is not in 1..{self.hole_count}")
            _check_bank_sn(bank)

    @property
    def hole_count(self) -> int:
        return self.boards * self.holes_per_board


def make_specs(
    count: int,
    *,
    fill: float = 0.75,
    boards: int = 1,
    holes_per_board: int = 8,
    seed: int | None = None,
    sn_prefix: str = "SWARM",
    password: Callable[[str], str | None] | None = None,
) -> list[SwarmCabinetSpec]:
    """``count`` cabinets ``{sn_prefix}0000000000``, ``...01``, … with random banks, every power-bank
    SN unique across them. ``password(sn)`` gives each its MQTT password (default: none)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    specs = []
    for index in range(count):
        sn = f"{sn_prefix}{index:010d}"
        banks = random_banks(rng, hole_count=boards * holes_per_board, fill=fill, taken=taken)
        specs.append(
            SwarmCabinetSpec(
                sn=sn,
                password=password(sn) if password is not None else None,
                banks=banks,
                boards=boards,
                holes_per_board=holes_per_board,
            )
        )
    return specs


@dataclass(slots=True)
class SwarmStats:
    """What a swarm saw. Latencies are seconds; ``connack_s`` from the start of the TCP connect to
    CONNACK, ``first_command_s`` from CONNACK to the first command on that connection."""

    connect_attempts: int = 0
    connects: int = 0
    """Connections that reached SUBACK (reconnects included)."""
    connect_timeouts: int = 0
    connect_errors: int = 0
    """TCP connect failed (refused, reset, no route) or the broker closed before CONNACK/SUBACK."""
    refused: collections.Counter[int] = field(default_factory=collections.Counter)
    """Non-zero CONNACK return codes."""
    subscribe_refused: int = 0
    retries: int = 0
    peer_disconnects: int = 0
    """Established connections closed by the broker (or the network), not by the swarm."""
    protocol_errors: int = 0
    connack_s: array.array[float] = field(default_factory=lambda: array.array("d"))
    first_command_s: array.array[float] = field(default_factory=lambda: array.array("d"))
    commands: collections.Counter[str] = field(default_factory=collections.Counter)
    bad_commands: int = 0
    ejects: int = 0
    duplicate_ejects: int = 0
    """Command payloads (per cabinet) that physically ejected more than once."""
    heartbeats: int = 0
    pings: int = 0
    replies: int = 0
    uploads: int = 0
    returns: int = 0
    backpressure_skips: int = 0
    """Snapshots not sent because the cabinet's socket buffer was full (the broker reads too slowly)."""

    def summary(self) -> dict[str, object]:
        """Counts and p50/p99/max latencies, JSON-friendly."""

        def latencies(values: array.array[float]) -> dict[str, float | int]:
            return {
                "n": len(values),
                "p50": percentile(values, 50),
                "p99": percentile(values, 99),
                "max": max(values, default=math.nan),
            }

        out: dict[str, object] = {
            name: getattr(self, name)
            for name in (
                "connect_attempts",
                "connects",
                "connect_timeouts",
                "connect_errors",
                "subscribe_refused",
                "retries",
                "peer_disconnects",
                "protocol_errors",
                "bad_commands",
                "ejects",
                "duplicate_ejects",
                "heartbeats",
                "pings",
                "replies",
                "uploads",
                "returns",
                "backpressure_skips",
            )
        }
        out["refused"] = dict(self.refused)
        out["commands"] = dict(self.commands)
        out["connack_s"] = latencies(self.connack_s)
        out["first_command_s"] = latencies(self.first_command_s)
        return out


# Connection states of a swarm cabinet.
_IDLE: Final = 0
_CONNECTING: Final = 1  # TCP up, CONNECT sent
_SUBSCRIBING: Final = 2  # CONNACK 0 received, SUBSCRIBE sent
_SUBSCRIBED: Final = 3
_CLOSING: Final = 4


class _Cabinet(asyncio.Protocol):
    """One cabinet: its rentbox state and its MQTT connection (this object is the protocol of every
    connection it makes, one at a time)."""

    __slots__ = (
        "_attempt",
        "_banks",
        "_buffer",
        "_checked",
        "_commanded",
        "_connack_at",
        "_paused",
        "_snapshot",
        "_started_at",
        "_state",
        "_swarm",
        "_transport",
        "last_heartbeat",
        "last_sent",
        "spec",
    )

    def __init__(self, swarm: Swarm, spec: SwarmCabinetSpec) -> None:
        self._swarm = swarm
        self.spec = spec
        self._banks: Mapping[int, str] = spec.banks  # copied on the first change
        self._snapshot: bytes | None = None
        self._transport: asyncio.Transport | None = None
        self._attempt: asyncio.Future[None] | None = None
        self._buffer = b""
        self._state = _IDLE
        self._paused = False
        self._checked = False
        self._commanded = False
        self._started_at = 0.0
        self._connack_at = 0.0
        self.last_sent = 0.0
        self.last_heartbeat = 0.0

    # ------------------------------------------------------------------------------- connection

    @property
    def subscribed(self) -> bool:
        return self._state == _SUBSCRIBED

    @property
    def writable(self) -> bool:
        return self._state == _SUBSCRIBED and not self._paused

    def begin_attempt(self, started_at: float) -> asyncio.Future[None]:
        self._started_at = started_at
        self._attempt = asyncio.get_running_loop().create_future()
        return self._attempt

    def abandon_attempt(self) -> None:
        """The connect timed out or was cancelled: drop whatever connection there is, quietly."""
        self._attempt = None
        transport, self._transport = self._transport, None
        self._state = _IDLE
        if transport is not None:
            transport.abort()

    def _fail_attempt(self, error: BaseException) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.set_exception(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._state = _CONNECTING
        self._paused = False
        self._checked = False
        self._commanded = False
        self._swarm._open += 1
        spec = self.spec
        self._send(
            connect_packet(
                spec.sn, username=spec.sn, password=spec.password, keepalive_s=self._swarm.keepalive_s
            )
        )

    def connection_lost(self, exc: Exception | None) -> None:
        swarm = self._swarm
        swarm._open -= 1
        if swarm._open == 0 and swarm._all_closed is not None:
            swarm._all_closed.set()
        if self._transport is None:  # abandoned by a timed-out attempt
            return
        self._transport = None
        state, self._state = self._state, _IDLE
        self._buffer = b""
        if state == _SUBSCRIBED:
            swarm._connected.add(-1)
            if not swarm._closing:
                swarm.stats.peer_disconnects += 1
                swarm._reconnect_later(self)
        elif state in (_CONNECTING, _SUBSCRIBING):
            self._fail_attempt(ConnectionError(f"the broker closed the connection of {self.spec.sn}: {exc}"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        try:
            packets, used = split_packets(buffer)
            self._buffer = buffer[used:]
            for first, body in packets:
                if self._transport is None:  # closed by the previous packet (a refusal)
                    return
                self._packet(first, body)
        except MqttProtocolError as exc:
            self._protocol_error(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def _protocol_error(self, exc: Exception) -> None:
        self._swarm.stats.protocol_errors += 1
        log.warning("event=swarm_protocol_error station_sn=%s error=%s", self.spec.sn, exc)
        self._fail_attempt(exc)
        if self._transport is not None:
            self._transport.abort()

    def _packet(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            message = _parse_publish(first, body)
            if message.qos == 1:
                self._send(_puback(message.packet_id))
            if self._state == _SUBSCRIBED:
                self._on_command(message.payload)
        elif kind == PINGRESP:
            pass
        elif kind == CONNACK and self._state == _CONNECTING:
            self._on_connack(_connack_code(body))
        elif kind == SUBACK and self._state == _SUBSCRIBING:
            self._on_suback(_suback_codes(body))
        else:
            raise MqttProtocolError(f"unexpected packet 0x{first:02X} in state {self._state}")

    def _on_connack(self, code: int) -> None:
        swarm = self._swarm
        now = time.monotonic()
        if code:
            swarm.stats.refused[code] += 1
            self._fail_attempt(ConnackRefused(f"{self.spec.sn}: {_refusal(code)}", return_code=code))
            self._close_quietly()
            return
        self._connack_at = now
        swarm.stats.connack_s.append(now - self._started_at)
        self._state = _SUBSCRIBING
        self._send(subscribe_packet(1, [(rentbox.command_topic(swarm.product_key, self.spec.sn), 0)]))

    def _on_suback(self, codes: bytes) -> None:
        swarm = self._swarm
        if not codes or codes[0] == SUBACK_FAILURE:
            swarm.stats.subscribe_refused += 1
            self._fail_attempt(ConnackRefused(f"{self.spec.sn}: subscription refused", return_code=None))
            self._close_quietly()
            return
        self._state = _SUBSCRIBED
        swarm.stats.connects += 1
        swarm._connected.add(1)
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.set_result(None)
        self.send_heartbeat(time.monotonic())

    def _close_quietly(self) -> None:
        """Close after a refusal: the attempt already failed, connection_lost must not count it again."""
        transport, self._transport = self._transport, None
        self._state = _IDLE
        if transport is not None:
            transport.write(DISCONNECT_PACKET)
            transport.close()

    def close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._state == _SUBSCRIBED:
            transport.write(DISCONNECT_PACKET)
        transport.close()

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None:
            transport.write(data)
            self.last_sent = time.monotonic()

    def _publish(self, kind: str, payload: bytes) -> None:
        self._send(publish_packet(rentbox.up_topic(self._swarm.product_key, self.spec.sn, kind), payload))

    def send_heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self._swarm.stats.heartbeats += 1
        self._publish("heart", self._swarm._heartbeat_payload)

    def send_ping(self) -> None:
        self._swarm.stats.pings += 1
        self._send(PINGREQ_PACKET)

    def send_upload(self) -> None:
        self._swarm.stats.uploads += 1
        self._publish("upload", self.snapshot_bytes())

    # ---------------------------------------------------------------------------------- rentbox

    def board_of(self, hole: int) -> int:
        return (hole - 1) // self.spec.holes_per_board + 1

    def banks(self) -> dict[int, str]:
        return dict(self._banks)

    def _mutable_banks(self) -> dict[int, str]:
        if self._banks is self.spec.banks or not isinstance(self._banks, dict):
            self._banks = dict(self._banks)
        self._snapshot = None
        return cast(dict[int, str], self._banks)

    def _soc_temperature(self, sn: str) -> tuple[int, int]:
        soc, temperature = _bank_soc_temperature(sn)
        return self._swarm._returned_soc.get(sn, soc), temperature

    def _hole_info(self, hole: int) -> HoleInfo:
        sn = self._banks.get(hole)
        if sn is None:
            return HoleInfo(
                hole=hole,
                board=self.board_of(hole),
                state=HoleState.EMPTY,
                current=0.0,
                voltage=0.0,
                area=0,
                sn=None,
                soc=0,
                temperature=0,
                charge_voltage=0.0,
                charge_current=0.0,
                software_version=0,
                sensor=EMPTY_SENSOR,
            )
        soc, temperature = self._soc_temperature(sn)
        charging = soc < SOC_MAX
        return HoleInfo(
            hole=hole,
            board=self.board_of(hole),
            state=HoleState.NORMAL,
            current=0.5 if charging else 0.0,
            voltage=BANK_VOLTAGE,
            area=0,
            sn=sn,
            soc=soc,
            temperature=temperature,
            charge_voltage=CHARGE_VOLTAGE,
            charge_current=1.0 if charging else 0.1,
            software_version=BANK_SOFTWARE_VERSION,
            sensor=0,
        )

    def snapshot(self) -> Snapshot:
        boards = tuple(
            BoardInfo(
                index=board,
                temperature=BOARD_TEMPERATURE_C,
                software_version=BOARD_SOFTWARE_VERSION,
                hardware_version=BOARD_HARDWARE_VERSION,
            )
            for board in range(1, self.spec.boards + 1)
        )
        return Snapshot(
            boards=boards, holes=tuple(self._hole_info(hole) for hole in range(1, self.spec.hole_count + 1))
        )

    def snapshot_bytes(self) -> bytes:
        if self._snapshot is None:
            self._snapshot = rentbox.encode(self.snapshot())
        return self._snapshot

    def _hole_of(self, sn: str) -> int | None:
        return next((hole for hole, bank in self._banks.items() if bank == sn), None)

    def _next_best_hole(self) -> int | None:
        """Where the firmware would rent from: the fullest bank (lowest hole wins)."""
        candidates = [(self._soc_temperature(sn)[0], -hole) for hole, sn in self._banks.items()]
        return -max(candidates)[1] if candidates else None

    def _remove(self, hole: int, key: str) -> str:
        swarm = self._swarm
        sn = self._mutable_banks().pop(hole)
        swarm.stats.ejects += 1
        ejects = swarm._ejects_per_command
        ejects[self.spec.sn, key] += 1
        if ejects[self.spec.sn, key] == 2:
            swarm.stats.duplicate_ejects += 1
            log.warning("event=swarm_duplicate_eject station_sn=%s command=%s", self.spec.sn, key)
        return sn

    def _on_command(self, payload: bytes) -> None:
        swarm = self._swarm
        stats = swarm.stats
        if not self._commanded:
            self._commanded = True
            stats.first_command_s.append(time.monotonic() - self._connack_at)
        try:
            fields = rentbox.parse_command(payload)
        except rentbox.CommandError:
            stats.bad_commands += 1
            return
        cmd = fields["cmd"]
        stats.commands[cmd] += 1
        if cmd in SNAPSHOT_COMMANDS:
            if not self._checked:
                self._checked = True
                swarm._checked.add(1)
            if swarm.answer:
                self._reply(self.snapshot_bytes())
        elif cmd == "popup_sn":
            self._on_popup_sn(fields, payload.decode())
        elif cmd == "popup":
            self._on_popup(fields, payload.decode())

    def _reply(self, frame: bytes) -> None:
        self._swarm.stats.replies += 1
        self._publish("update", frame)

    def _on_popup_sn(self, fields: dict[str, str], key: str) -> None:
        requested = fields.get("data", "")
        try:
            sn = _check_bank_sn(requested)
        except ValueError:
            frame = EjectBySnResult(hole=0, sn=None, state=EjectState.PARSE_FAILED)
        else:
            hole = self._hole_of(sn)
            if hole is not None:
                self._remove(hole, key)
                frame = EjectBySnResult(hole=hole, sn=sn, state=EjectState.SUCCESS)
            elif self._swarm._ejects_per_command[self.spec.sn, key] == 0:
                frame = EjectBySnResult(hole=0, sn=sn, state=EjectState.SN_NOT_FOUND)
            else:  # the same command again, its bank already out: the firmware ejects the next best
                best = self._next_best_hole()
                if best is None:
                    frame = EjectBySnResult(hole=0, sn=sn, state=EjectState.NO_ELIGIBLE_POWER_BANK)
                else:
                    frame = EjectBySnResult(hole=best, sn=self._remove(best, key), state=EjectState.SUCCESS)
        if self._swarm.answer:
            self._reply(rentbox.encode(frame))

    def _on_popup(self, fields: dict[str, str], key: str) -> None:
        try:
            hole: int | None = int(fields.get("data", ""))
        except ValueError:
            hole = None
        if hole is None:
            frame = EjectByHoleResult(board=0, hole=0, state=EjectState.PARSE_FAILED)
        elif not 1 <= hole <= self.spec.hole_count:
            echoed = hole if 0 <= hole <= 0xFF else 0
            frame = EjectByHoleResult(board=0, hole=echoed, state=EjectState.FAILED)
        elif hole not in self._banks:
            frame = EjectByHoleResult(board=self.board_of(hole), hole=hole, state=EjectState.FAILED)
        else:
            self._remove(hole, key)
            frame = EjectByHoleResult(board=self.board_of(hole), hole=hole, state=EjectState.SUCCESS)
        if self._swarm.answer:
            self._reply(rentbox.encode(frame))

    def return_bank(self, sn: str, *, hole: int | None, soc: int) -> int:
        _check_bank_sn(sn)
        if not 0 <= soc <= 100:
            raise ValueError(f"soc must be 0..100, got {soc}")
        if self._state != _SUBSCRIBED:
            raise SwarmError(f"cabinet {self.spec.sn} is not connected")
        already = self._hole_of(sn)
        if already is not None:
            raise SwarmError(f"power bank {sn} is already in hole {already} of cabinet {self.spec.sn}")
        if hole is None:
            hole = next((h for h in range(1, self.spec.hole_count + 1) if h not in self._banks), None)
            if hole is None:
                raise SwarmError(f"cabinet {self.spec.sn} has no empty hole")
        elif not 1 <= hole <= self.spec.hole_count:
            raise ValueError(
                f"hole {hole} does not exist: cabinet {self.spec.sn} has 1..{self.spec.hole_count}"
            )
        elif hole in self._banks:
            raise SwarmError(f"hole {hole} of cabinet {self.spec.sn} is not empty")
        self._swarm._returned_soc[sn] = soc
        self._mutable_banks()[hole] = sn
        event = ReturnEvent(
            board=self.board_of(hole),
            hole=hole,
            area=0,
            sn=sn,
            state=ReturnState.SUCCESS,
            software_version=BANK_SOFTWARE_VERSION,
            soc=soc,
        )
        self._swarm.stats.returns += 1
        self._publish("update", rentbox.encode(event))
        return hole


class Swarm:
    """Many rentbox cabinets over raw MQTT 3.1.1 from one process (see the module docstring).

    ``connect_timeout_s`` bounds one attempt from the TCP connect to SUBACK. ``keepalive_s`` is what
    CONNECT advertises (0: none); ``heartbeat_s`` the 0x7A period: one on SUBACK, then at the cabinet's
    slot of the heartbeat ring, so the first interval is 0.5..1.5 x ``heartbeat_s`` and the next ones
    ``heartbeat_s``. ``answer=False`` counts commands without replying. ``reconnect`` re-establishes
    connections the broker drops (after about 1 s, then backoff). ``seed`` fixes the ring order and the
    jitter. Call :meth:`connect_all` first and :meth:`close` at the end (or use ``async with``).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        product_key: str = rentbox.DEFAULT_PRODUCT_KEY,
        specs: Sequence[SwarmCabinetSpec],
        keepalive_s: int = KEEPALIVE_S,
        heartbeat_s: float = HEARTBEAT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        answer: bool = True,
        reconnect: bool = True,
        seed: int | None = None,
    ) -> None:
        if not 0 <= keepalive_s <= 0xFFFF:
            raise ValueError(f"keepalive_s must be 0..65535 seconds (0 = no keepalive), got {keepalive_s}")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        if connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        rentbox.command_topic(product_key, "x")  # a valid topic segment
        self.host = host
        self.port = port
        self.product_key = product_key
        self.keepalive_s = keepalive_s
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.answer = answer
        self.reconnect = reconnect
        self.stats = SwarmStats()
        self._rng = random.Random(seed)
        self._cabinets: dict[str, _Cabinet] = {}
        for spec in specs:
            if spec.sn in self._cabinets:
                raise ValueError(f"cabinet {spec.sn} is twice in the swarm")
            self._cabinets[spec.sn] = _Cabinet(self, spec)
        self._ring = list(self._cabinets.values())
        self._rng.shuffle(self._ring)  # the heartbeat order: every cabinet at a random slot
        self._heartbeat_payload = rentbox.encode(
            Heartbeat(board=HEARTBEAT_BOARD_BYTE, text=f"CSQ:{CSQ};BP:0")
        )
        self._returned_soc: dict[str, int] = {}
        self._ejects_per_command: collections.Counter[tuple[str, str]] = collections.Counter()
        self._connected = _Level()
        self._checked = _Level()
        self._open = 0
        self._all_closed: asyncio.Event | None = None
        self._closing = False
        self._launching = False
        self._scheduler: asyncio.Task[None] | None = None
        self._connecting: dict[str, asyncio.Task[bool]] = {}
        """The connect (or reconnect) task of each cabinet that has one running."""

    def __len__(self) -> int:
        return len(self._cabinets)

    @property
    def cabinet_sns(self) -> list[str]:
        return list(self._cabinets)

    @property
    def connected(self) -> int:
        """Cabinets connected and subscribed right now."""
        return self._connected.value

    @property
    def checked(self) -> int:
        """Connections that have received a snapshot request (check, check_all, upload_all) so far; it
        only grows (a reconnected cabinet counts again when it is checked again)."""
        return self._checked.value

    def ejects_per_command(self) -> dict[tuple[str, str], int]:
        """Physical ejects per ``(cabinet SN, raw command payload)``."""
        return dict(self._ejects_per_command)

    async def wait_connected(self, count: int | None = None) -> None:
        """Until ``count`` (default: every) cabinets are connected and subscribed."""
        await self._connected.wait(len(self._cabinets) if count is None else count)

    async def wait_checked(self, count: int | None = None) -> None:
        """Until :attr:`checked` reaches ``count`` (default: the number of cabinets). Wrap it in
        ``asyncio.timeout``."""
        await self._checked.wait(len(self._cabinets) if count is None else count)

    def banks(self, cabinet_sn: str) -> dict[int, str]:
        """``{hole: power-bank SN}`` of a cabinet right now."""
        return self._cabinet(cabinet_sn).banks()

    def snapshot(self, cabinet_sn: str) -> Snapshot:
        """The 0x10 frame the cabinet would send now."""
        return self._cabinet(cabinet_sn).snapshot()

    def is_connected(self, cabinet_sn: str) -> bool:
        return self._cabinet(cabinet_sn).subscribed

    def _cabinet(self, cabinet_sn: str) -> _Cabinet:
        try:
            return self._cabinets[cabinet_sn]
        except KeyError:
            raise KeyError(f"cabinet {cabinet_sn} is not in this swarm") from None

    # ---------------------------------------------------------------------------------- connect

    async def connect_all(self, *, rate_per_s: float, retry: bool = True) -> None:
        """Open every cabinet's connection that is not open, launching ``rate_per_s`` per second on an
        open-loop schedule (a slow broker does not slow the launches), and return when each is connected
        and subscribed. A timed-out, refused or dropped attempt is counted in :attr:`stats` and, with
        ``retry``, retried after a jittered backoff (1 s doubling to 30 s) until it succeeds; without
        ``retry`` this returns once every cabinet has tried once (see :attr:`connected`)."""
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        if self._closing:
            raise SwarmError("the swarm is closed")
        if self._launching:
            raise SwarmError("connect_all() is already running on this swarm")
        raise_nofile_limit(len(self._cabinets) + FD_MARGIN)
        self._start_scheduler()
        loop = asyncio.get_running_loop()
        tasks = list(self._connecting.values())  # reconnects under way: wait for them too
        pending = [
            cabinet
            for sn, cabinet in self._cabinets.items()
            if cabinet._state == _IDLE and sn not in self._connecting
        ]
        self._launching = True
        try:
            started = loop.time()
            for index, cabinet in enumerate(pending):
                delay = started + index / rate_per_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(self._spawn_connect(cabinet, retry=retry, delay_s=0.0))
        finally:
            self._launching = False
        await asyncio.gather(*tasks)

    def _spawn_connect(self, cabinet: _Cabinet, *, retry: bool, delay_s: float) -> asyncio.Task[bool]:
        sn = cabinet.spec.sn
        task = asyncio.create_task(self._connect(cabinet, retry=retry, delay_s=delay_s))
        self._connecting[sn] = task

        def done(finished: asyncio.Task[bool]) -> None:
            if self._connecting.get(sn) is finished:
                del self._connecting[sn]

        task.add_done_callback(done)
        return task

    def _reconnect_later(self, cabinet: _Cabinet) -> None:
        if self.reconnect and cabinet.spec.sn not in self._connecting:
            self._spawn_connect(cabinet, retry=True, delay_s=RETRY_INITIAL_S * self._rng.uniform(0.5, 1.5))

    async def _connect(self, cabinet: _Cabinet, *, retry: bool, delay_s: float) -> bool:
        backoff = RETRY_INITIAL_S
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        while not self._closing:
            if await self._attempt(cabinet):
                return True
            if not retry or self._closing:
                return False
            self.stats.retries += 1
            await asyncio.sleep(backoff * self._rng.uniform(0.5, 1.0))
            backoff = min(backoff * 2, RETRY_MAX_S)
        return False

    async def _attempt(self, cabinet: _Cabinet) -> bool:
        stats = self.stats
        stats.connect_attempts += 1
        attempt = cabinet.begin_attempt(time.monotonic())
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await asyncio.get_running_loop().create_connection(lambda: cabinet, self.host, self.port)
                await attempt
        except TimeoutError:
            stats.connect_timeouts += 1
            cabinet.abandon_attempt()
            return False
        except ConnackRefused:
            return False  # counted by the cabinet
        except (OSError, MqttProtocolError) as exc:
            stats.connect_errors += 1
            log.debug("event=swarm_connect_failed station_sn=%s error=%r", cabinet.spec.sn, exc)
            cabinet.abandon_attempt()
            return False
        except BaseException:
            cabinet.abandon_attempt()
            raise
        return True

    # --------------------------------------------------------------------------------- scheduler

    def _start_scheduler(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._schedule(), name="swarm-scheduler")

    async def _schedule(self) -> None:
        """The one periodic task: heartbeat ring (period ``heartbeat_s``) and keepalive ring."""
        ring = self._ring
        size = len(ring)
        if not size:
            return
        heartbeat_s = self.heartbeat_s
        keepalive_s = float(self.keepalive_s)
        keepalive_period = keepalive_s * KEEPALIVE_RING_FRACTION
        start = time.monotonic()
        heartbeat_done = 0  # ring visits made so far
        keepalive_done = 0
        while True:
            await asyncio.sleep(SCHEDULER_TICK_S)
            now = time.monotonic()
            elapsed = now - start
            heartbeat_due = int(elapsed * size / heartbeat_s)
            while heartbeat_done < heartbeat_due:
                cabinet = ring[heartbeat_done % size]
                heartbeat_done += 1
                # Half a period since the last one: a cabinet that just connected (and sent its
                # connect heartbeat) waits for its slot in the next round.
                if cabinet.writable and now - cabinet.last_heartbeat >= heartbeat_s / 2:
                    cabinet.send_heartbeat(now)
            if keepalive_s:
                keepalive_due = int(elapsed * size / keepalive_period)
                while keepalive_done < keepalive_due:
                    cabinet = ring[keepalive_done % size]
                    keepalive_done += 1
                    if cabinet.subscribed and now - cabinet.last_sent >= keepalive_s:
                        cabinet.send_ping()

    # ----------------------------------------------------------------------------------- traffic

    async def publish_snapshots(self, *, rate_per_s: float, duration_s: float) -> int:
        """Ingest load: 0x10 snapshots on ``/user/upload``, ``rate_per_s`` for ``duration_s`` seconds on
        an open-loop schedule, round-robin over the connected cabinets (one whose socket buffer is full
        is skipped and counted in :attr:`SwarmStats.backpressure_skips`). Returns the number sent; below
        ``rate_per_s * duration_s`` means this process could not keep up."""
        if rate_per_s <= 0 or duration_s <= 0:
            raise ValueError("rate_per_s and duration_s must be positive")
        cabinets = list(self._cabinets.values())
        if not any(cabinet.subscribed for cabinet in cabinets):
            raise SwarmError("no cabinet is connected: call connect_all() first")
        size = len(cabinets)
        cursor = 0
        sent = 0
        start = time.monotonic()
        end = start + duration_s
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * rate_per_s) + 1
            burst = min(due - sent, PUBLISH_BURST)
            scanned = 0
            while burst > 0 and scanned < size:
                cabinet = cabinets[cursor]
                cursor = (cursor + 1) % size
                if cabinet.writable:
                    cabinet.send_upload()
                    sent += 1
                    burst -= 1
                    scanned = 0
                else:
                    scanned += 1
                    if cabinet.subscribed:
                        self.stats.backpressure_skips += 1
            if scanned >= size:
                await asyncio.sleep(PUBLISH_TICK_S)  # every socket is full: let the broker read
            elif sent < due:
                await asyncio.sleep(0)  # behind schedule: read what came in, then go on
            else:  # sleep in ticks rather than per message: one wakeup costs more than a publish
                next_due = min(start + sent / rate_per_s, end)
                await asyncio.sleep(max(next_due - time.monotonic(), PUBLISH_TICK_S))
        return sent

    def return_bank(
        self, cabinet_sn: str, powerbank_sn: str, *, hole: int | None = None, soc: int = 80
    ) -> int:
        """Put ``powerbank_sn`` into ``hole`` (default: the first empty one) of a connected cabinet and
        publish the 0x40 return on ``/user/update``, as the simulator's ``return_powerbank``. Returns the
        hole. Raises :class:`SwarmError` when the cabinet is offline or full."""
        return self._cabinet(cabinet_sn).return_bank(powerbank_sn, hole=hole, soc=soc)

    def send_snapshot(self, cabinet_sn: str, kind: str = "update") -> None:
        """Publish the cabinet's 0x10 now on ``/user/{kind}``."""
        cabinet = self._cabinet(cabinet_sn)
        if not cabinet.subscribed:
            raise SwarmError(f"cabinet {cabinet_sn} is not connected")
        cabinet._publish(kind, cabinet.snapshot_bytes())

    # ------------------------------------------------------------------------------------- close

    async def close(self, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the scheduler and pending connects, send DISCONNECT on every connection and close it."""
        self._closing = True
        tasks = [task for task in (self._scheduler, *self._connecting.values()) if task is not None]
        self._scheduler = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._all_closed = asyncio.Event()
        if self._open == 0:
            self._all_closed.set()
        for cabinet in self._cabinets.values():
            cabinet.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self._all_closed.wait()
        except TimeoutError:
            for cabinet in self._cabinets.values():
                cabinet.abandon_attempt()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# ------------------------------------------------------------------------------------------ subscriber


class _SubscriberProtocol(asyncio.Protocol):
    def __init__(self, owner: Subscriber) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        try:
            packets, used = split_packets(buffer)
            self.buffer = buffer[used:]
            for first, body in packets:
                self.owner._packet(first, body)
        except MqttProtocolError as exc:
            self.owner._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner._lost(exc)


class Subscriber:
    """One plain MQTT 3.1.1 client: subscribes to ``filters`` (QoS 0) and counts every PUBLISH it gets.

    Messages are kept in :attr:`messages` with ``keep_messages``. Use :meth:`connect` to make one.
    """

    def __init__(
        self,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        keepalive_s: int,
        keep_messages: bool,
    ) -> None:
        self.client_id = client_id
        self.username = username
        self.password = password
        self.keepalive_s = keepalive_s
        self.keep_messages = keep_messages
        self.messages: list[tuple[str, bytes]] = []
        self._received = _Level()
        self._protocol: _SubscriberProtocol | None = None
        self._connack: asyncio.Future[int] | None = None
        self._suback: asyncio.Future[bytes] | None = None
        self._matchers: list[tuple[Callable[[str, bytes], bool], asyncio.Future[tuple[str, bytes]]]] = []
        self._closed: asyncio.Future[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._last_sent = 0.0
        self.lost = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        filters: Sequence[str] = ("#",),
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = KEEPALIVE_S,
        keep_messages: bool = False,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> Subscriber:
        """Connect, subscribe and return once SUBACK arrived. Raises :class:`ConnackRefused` when the broker
        refuses the credentials or a filter, :class:`OSError`/``TimeoutError`` when it is unreachable."""
        subscriber = cls(
            client_id=client_id or f"swarm-sub-{os.getpid()}-{random.randrange(1 << 30)}",
            username=username,
            password=password,
            keepalive_s=keepalive_s,
            keep_messages=keep_messages,
        )
        try:
            async with asyncio.timeout(timeout_s):
                await subscriber._start(host, port, filters)
        except BaseException:
            subscriber._abort()
            raise
        return subscriber

    @property
    def received(self) -> int:
        """PUBLISH packets received so far."""
        return self._received.value

    async def _start(self, host: str, port: int, filters: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._suback = loop.create_future()
        self._closed = loop.create_future()
        _, protocol = await loop.create_connection(lambda: _SubscriberProtocol(self), host, port)
        self._protocol = protocol
        self._send(
            connect_packet(
                self.client_id, username=self.username, password=self.password, keepalive_s=self.keepalive_s
            )
        )
        code = await self._connack
        if code:
            raise ConnackRefused(f"subscriber {self.client_id}: {_refusal(code)}", return_code=code)
        self._send(subscribe_packet(1, [(topic_filter, 0) for topic_filter in filters]))
        codes = await self._suback
        if SUBACK_FAILURE in codes:
            raise ConnackRefused(
                f"subscriber {self.client_id}: the broker refused a subscription of {list(filters)}",
                return_code=None,
            )
        if self.keepalive_s:
            self._arm_pinger()

    def _arm_pinger(self) -> None:
        loop = asyncio.get_running_loop()
        self._pinger = loop.call_later(self.keepalive_s / 2, self._ping_if_idle)

    def _ping_if_idle(self) -> None:
        if self._protocol is None or self._protocol.transport is None:
            return
        if time.monotonic() - self._last_sent >= self.keepalive_s / 2:
            self._send(PINGREQ_PACKET)
        self._arm_pinger()

    def _send(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise SwarmError(f"subscriber {self.client_id} is not connected")
        protocol.transport.write(data)
        self._last_sent = time.monotonic()

    def _packet(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            message = _parse_publish(first, body)
            if message.qos == 1:
                self._send(_puback(message.packet_id))
            item = (message.topic, message.payload)
            if self.keep_messages:
                self.messages.append(item)
            if self._matchers:
                still: list[tuple[Callable[[str, bytes], bool], asyncio.Future[tuple[str, bytes]]]] = []
                for match, future in self._matchers:
                    if future.done():
                        continue
                    if match(*item):
                        future.set_result(item)
                    else:
                        still.append((match, future))
                self._matchers = still
            self._received.add(1)
        elif kind == CONNACK and self._connack is not None and not self._connack.done():
            self._connack.set_result(_connack_code(body))
        elif kind == SUBACK and self._suback is not None and not self._suback.done():
            self._suback.set_result(_suback_codes(body))

    def _fail(self, exc: BaseException) -> None:
        for future in (self._connack, self._suback):
            if future is not None and not future.done():
                future.set_exception(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._pinger is not None:
            self._pinger.cancel()
        self._fail(ConnectionError(f"subscriber {self.client_id} lost its connection: {exc}"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _abort(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    async def wait_closed(self) -> None:
        """Until the connection is closed (by :meth:`close`, the broker or the network)."""
        if self._closed is not None:
            await self._closed

    async def wait_count(self, count: int) -> None:
        """Until :attr:`received` reaches ``count`` (wrap it in ``asyncio.timeout``)."""
        await self._received.wait(count)

    async def wait_message(
        self, match: Callable[[str, bytes], bool], *, since: int | None = None
    ) -> tuple[str, bytes]:
        """The first message ``match(topic, payload)`` accepts: among :attr:`messages` from index
        ``since`` on (with ``keep_messages``), else the next one to arrive."""
        if since is not None:
            for item in self.messages[since:]:
                if match(*item):
                    return item
        future: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self._matchers.append((match, future))
        return await future

    def publish(self, topic: str, payload: bytes, *, qos: int = 0) -> None:
        """Publish (QoS 0 by default; QoS 1 is sent with packet id 1 and its PUBACK ignored)."""
        self._send(publish_packet(topic, payload, qos=qos, packet_id=1 if qos else 0))

    async def close(self, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """DISCONNECT and close."""
        if self._pinger is not None:
            self._pinger.cancel()
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        protocol.transport.write(DISCONNECT_PACKET)
        protocol.transport.close()
        if self._closed is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._closed
            except TimeoutError:
                self._abort()


# -------------------------------------------------------------------------------------------- mosquitto


class Mosquitto:
    """A private Mosquitto broker on ``127.0.0.1:port`` (a free port by default), anonymous access (unless
    ``allow_anonymous=False``: then every client is refused, as no password file is configured), unlimited
    connections and no persistence: the reference broker for tests and benchmarks.

    ``async with Mosquitto() as broker:`` starts it (waiting for its "running" log line) and stops it.
    Its RLIMIT_NOFILE soft limit is raised to the hard limit. ``extra_config`` lines are appended to the
    configuration file.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        allow_anonymous: bool = True,
        binary: str = "mosquitto",
        extra_config: Sequence[str] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else _free_port()
        self.allow_anonymous = allow_anonymous
        self.binary = binary
        self.extra_config = tuple(extra_config)
        self.log_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, *, timeout_s: float = 10.0) -> None:
        executable = shutil.which(self.binary)
        if executable is None:
            raise SwarmError(f"{self.binary} is not installed (apt-get install mosquitto)")
        self._directory = tempfile.TemporaryDirectory(prefix="swarm-mosquitto-")
        config = Path(self._directory.name) / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
                    "max_connections -1",
                    "persistence false",
                    "log_dest stderr",
                    "connection_messages false",
                    *self.extra_config,
                    "",
                ]
            )
        )
        self._process = await asyncio.create_subprocess_exec(
            executable,
            "-c",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_raise_child_nofile,
        )
        stream = self._process.stderr
        assert stream is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = (await stream.readline()).decode(errors="replace").rstrip()
                    if not line:
                        raise SwarmError(
                            f"mosquitto on port {self.port} exited at start: " + " | ".join(self.log_tail)
                        )
                    self.log_tail.append(line)
                    if " running" in line:
                        break
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._drain_log(stream))

    async def _drain_log(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log_tail.append(line.decode(errors="replace").rstrip())

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _raise_child_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
