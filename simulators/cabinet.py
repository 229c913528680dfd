"""A simulated power-bank cabinet that speaks the rentbox protocol byte for byte over MQTT.

It imports nothing from the server side but :mod:`rentbox`: it sees the orchestrator exactly as a real
cabinet does, through the broker.

Behaviour (rentbox-v1.md): it connects with client id = its SN, subscribes to ``/{pk}/{sn}/user/get``
with QoS 0, answers ``check`` / ``check_all`` / ``upload_all`` with a 0x10 snapshot, ``popup_sn`` with
0x31 and ``popup`` with 0x21 on ``/user/update``, sends a 0x7A heartbeat on ``/user/heart`` on connect
and every ``heartbeat_s``, and a periodic 0x10 on ``/user/upload``. ``reboot`` drops the connection and
reconnects, as the firmware does; a lost connection is re-established with backoff. Every publish is
QoS 0. Unknown commands are logged and ignored.

Fault injection plugs in at three seams: :meth:`SimulatedCabinet._dispatch` (which commands are seen),
the ``_eject_*`` methods (what physically happens and which state code comes back) and
:meth:`SimulatedCabinet._publish_frame` (whether/when a reply leaves).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from amqtt.client import MQTTClient
from amqtt.errors import ClientError, ConnectError

import rentbox
from rentbox import (
    BoardInfo,
    EjectByHoleResult,
    EjectBySnResult,
    EjectState,
    Frame,
    Heartbeat,
    HoleInfo,
    HoleState,
    ReturnEvent,
    ReturnState,
    Snapshot,
)
from rentbox.commands import MAX_HOLE

__all__ = [
    "CabinetCredentials",
    "CabinetError",
    "CabinetFull",
    "CabinetNotConnected",
    "CabinetRefused",
    "CabinetUnreachable",
    "SimulatedCabinet",
    "random_banks",
    "send_return",
]

log = logging.getLogger(__name__)

QOS_0: Final = 0
KEEPALIVE_S: Final = 60
CONNECT_TIMEOUT_S: Final = 10
DISCONNECT_TIMEOUT_S: Final = 5.0
RECONNECT_INITIAL_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0
REBOOT_DELAY_S: Final = 1.0
UPLOAD_INTERVAL_S: Final = 20 * 60.0
"""Firmware sends an unsolicited 0x10 on /user/upload every 20 minutes."""

SN_MIN: Final = 10_000_000
SN_MAX: Final = 99_999_999
SOC_MIN: Final = 20
SOC_MAX: Final = 100
EMPTY_SENSOR: Final = 0x80
HEARTBEAT_BOARD_BYTE: Final = 0x10  # as in the vendor example; meaning undocumented
CSQ: Final = 27
BOARD_TEMPERATURE_C: Final = 28
BOARD_SOFTWARE_VERSION: Final = 4
BOARD_HARDWARE_VERSION: Final = 22
BANK_SOFTWARE_VERSION: Final = 13
BANK_VOLTAGE: Final = 23.6  # the byte real cabinets report for a docked bank (vendor example: 0xEC)
CHARGE_VOLTAGE: Final = 5.0


class CabinetError(RuntimeError):
    """Base class of the simulator's errors."""


class CabinetRefused(CabinetError):
    """The broker refused this cabinet's credentials (CONNACK code) or its command-topic subscription."""

    def __init__(self, sn: str, detail: str, *, return_code: int | None = None) -> None:
        super().__init__(f"broker refused cabinet {sn}: {detail}")
        self.sn = sn
        self.return_code = return_code


class CabinetUnreachable(CabinetError):
    """The broker could not be reached at all (connection refused, DNS, timeout)."""


class CabinetNotConnected(CabinetError):
    """An operation needs the MQTT connection, and the cabinet is not connected."""


class CabinetFull(CabinetError):
    """No empty hole to return a power bank into."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CabinetCredentials:
    """What a provisioned cabinet needs to reach the broker (the server issues it once)."""

    sn: str
    host: str
    port: int
    username: str
    password: str
    product_key: str = rentbox.DEFAULT_PRODUCT_KEY

    @property
    def uri(self) -> str:
        """``mqtt://user:password@host:port``, percent-encoded: amqtt reads the credentials from the URI."""
        userinfo = ""
        if self.username:
            userinfo = quote(self.username, safe="")
            if self.password:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{userinfo}{host}:{self.port}"

    def __repr__(self) -> str:  # never print the password
        return (
            f"CabinetCredentials(sn={self.sn!r}, host={self.host!r}, port={self.port}, "
            f"username={self.username!r}, password='***', product_key={self.product_key!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Bank:
    sn: str
    soc: int
    temperature: int


def _check_sn(sn: str) -> str:
    if not sn.isascii() or not sn.isdigit() or str(int(sn)) != sn or not 0 < int(sn) <= 0xFFFFFFFF:
        raise ValueError(
            f"power-bank SN must be a decimal number 1..4294967295 without leading zeros, got {sn!r}"
        )
    return sn


def random_banks(
    rng: random.Random, *, hole_count: int, fill: float, taken: set[str] | None = None
) -> dict[int, str]:
    """``{hole: sn}`` for ``round(fill * hole_count)`` random holes, with random unique 8-digit SNs.

    SNs already in ``taken`` are avoided and the new ones are added to it, so a fleet can keep every
    power bank unique across cabinets.
    """
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


def _return_event(*, board: int, hole: int, sn: str, soc: int) -> ReturnEvent:
    return ReturnEvent(
        board=board,
        hole=hole,
        area=0,
        sn=sn,
        state=ReturnState.SUCCESS,
        software_version=BANK_SOFTWARE_VERSION,
        soc=soc,
    )


def _client_config() -> dict[str, Any]:
    # auto_reconnect off: amqtt's reconnect would not re-subscribe a clean session; the cabinet
    # reconnects and re-subscribes itself. keep_alive - ping_delay is what CONNECT advertises.
    return {
        "keep_alive": KEEPALIVE_S,
        "ping_delay": 0,
        "auto_reconnect": False,
        "cleansession": True,
        "connection_timeout": CONNECT_TIMEOUT_S,
        "default_qos": QOS_0,
        "plugins": {},
    }


_CONNACK_REASONS: Final = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorized",
}


async def _connect_client(credentials: CabinetCredentials) -> MQTTClient:
    client = MQTTClient(client_id=credentials.sn, config=_client_config())
    try:
        await client.connect(credentials.uri, cleansession=True)
    except ConnectError as exc:
        if isinstance(exc.__cause__, asyncio.CancelledError):
            raise asyncio.CancelledError from exc  # amqtt turns cancellation into ConnectError
        if exc.return_code is not None:
            reason = _CONNACK_REASONS.get(exc.return_code, "refused")
            raise CabinetRefused(
                credentials.sn,
                f"CONNACK {exc.return_code} ({reason}): check that the station is provisioned on the server "
                "and that its username and password are the ones the server issued",
                return_code=exc.return_code,
            ) from exc
        raise CabinetUnreachable(
            f"cabinet {credentials.sn} cannot reach the broker at {credentials.host}:{credentials.port}: "
            f"{exc.__cause__ or exc}"
        ) from exc
    return client


async def _disconnect_quietly(client: MQTTClient) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
    except (ClientError, OSError, TimeoutError) as exc:
        log.debug("event=cabinet_disconnect_failed error=%r", exc)


class SimulatedCabinet:
    """One cabinet: boards x holes of power banks, an MQTT connection, and the firmware's replies."""

    def __init__(
        self,
        credentials: CabinetCredentials,
        *,
        boards: int = 1,
        holes_per_board: int = 4,
        fill: float = 0.75,
        seed: int | None = None,
        heartbeat_s: float = 60.0,
        banks: Mapping[int, str] | None = None,
    ) -> None:
        if not 1 <= boards <= 10:
            raise ValueError(f"boards must be 1..10, got {boards}")
        if holes_per_board < 1 or boards * holes_per_board > MAX_HOLE:
            raise ValueError(f"holes_per_board must be at least 1 and boards x holes at most {MAX_HOLE}")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        self.credentials = credentials
        self.sn = credentials.sn
        self.boards = boards
        self.holes_per_board = holes_per_board
        self.heartbeat_s = heartbeat_s
        self.upload_s = UPLOAD_INTERVAL_S
        self.eject_counts: collections.Counter[str] = collections.Counter()
        self.commands: list[dict[str, str]] = []
        self._rng = random.Random(seed)
        hole_count = boards * holes_per_board
        if banks is None:
            banks = random_banks(self._rng, hole_count=hole_count, fill=fill)
        self._holes: dict[int, _Bank | None] = dict.fromkeys(range(1, hole_count + 1))
        for hole, sn in sorted(banks.items()):
            if hole not in self._holes:
                raise ValueError(f"hole {hole} does not exist: this cabinet has holes 1..{hole_count}")
            if sn in self.banks().values():
                raise ValueError(f"power bank {sn} cannot be in two holes")
            self._holes[hole] = self._new_bank(_check_sn(sn), soc=self._rng.randint(SOC_MIN, SOC_MAX))
        self._handlers: dict[str, Callable[[dict[str, str]], Awaitable[None]]] = {
            "check": self._on_check,
            "check_all": self._on_check,
            "upload_all": self._on_check,
            "popup_sn": self._on_popup_sn,
            "popup": self._on_popup,
            "reboot": self._on_reboot,
        }
        self._client: MQTTClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._reboot_requested = False

    def __repr__(self) -> str:
        return f"SimulatedCabinet(sn={self.sn!r}, banks={len(self.banks())}/{len(self._holes)})"

    # ------------------------------------------------------------------------------------- state

    @property
    def hole_count(self) -> int:
        return len(self._holes)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_command(self) -> dict[str, str] | None:
        return self.commands[-1] if self.commands else None

    def banks(self) -> dict[int, str]:
        """``{hole: sn}`` of the power banks currently inside."""
        return {hole: bank.sn for hole, bank in self._holes.items() if bank is not None}

    def board_of(self, hole: int) -> int:
        return (hole - 1) // self.holes_per_board + 1

    def _new_bank(self, sn: str, *, soc: int) -> _Bank:
        return _Bank(sn=sn, soc=soc, temperature=self._rng.randint(25, 34))

    def _hole_of(self, sn: str) -> int | None:
        return next((hole for hole, bank in self._holes.items() if bank is not None and bank.sn == sn), None)

    def snapshot(self) -> Snapshot:
        """The 0x10 frame describing the cabinet right now."""
        boards = tuple(
            BoardInfo(
                index=board,
                temperature=BOARD_TEMPERATURE_C,
                software_version=BOARD_SOFTWARE_VERSION,
                hardware_version=BOARD_HARDWARE_VERSION,
            )
            for board in range(1, self.boards + 1)
        )
        return Snapshot(boards=boards, holes=tuple(self._hole_info(hole) for hole in sorted(self._holes)))

    def _hole_info(self, hole: int) -> HoleInfo:
        bank = self._holes[hole]
        if bank is None:
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
        charging = bank.soc < SOC_MAX
        return HoleInfo(
            hole=hole,
            board=self.board_of(hole),
            state=HoleState.NORMAL,
            current=0.5 if charging else 0.0,
            voltage=BANK_VOLTAGE,
            area=0,
            sn=bank.sn,
            soc=bank.soc,
            temperature=bank.temperature,
            charge_voltage=CHARGE_VOLTAGE,
            charge_current=1.0 if charging else 0.1,
            software_version=BANK_SOFTWARE_VERSION,
            sensor=0,
        )

    # -------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, subscribe to the command topic and start heartbeats.

        Raises :class:`CabinetRefused` if the broker refuses the credentials or the subscription, and
        :class:`CabinetUnreachable` if it cannot be reached. Afterwards a lost connection is retried.
        """
        if self._runner is not None:
            raise CabinetError(f"cabinet {self.sn} is already started")
        client = await self._connect()
        self._runner = asyncio.create_task(self._run(client), name=f"cabinet-{self.sn}")

    async def stop(self) -> None:
        """Disconnect and stop every task. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            await _disconnect_quietly(client)

    async def wait_connected(self) -> None:
        """Wait until the cabinet is connected and subscribed (wrap in ``asyncio.timeout``)."""
        await self._connected.wait()

    async def _connect(self) -> MQTTClient:
        client = await _connect_client(self.credentials)
        topic = rentbox.command_topic(self.credentials.product_key, self.sn)
        try:
            codes = await client.subscribe([(topic, QOS_0)])
        except BaseException:
            await _disconnect_quietly(client)
            raise
        if any(code == 0x80 for code in codes):
            await _disconnect_quietly(client)
            raise CabinetRefused(self.sn, f"subscription to {topic} was refused (SUBACK 0x80)")
        self._client = client
        self._connected.set()
        log.info("event=cabinet_connected station_sn=%s banks=%d", self.sn, len(self.banks()))
        return client

    async def _run(self, client: MQTTClient) -> None:
        while True:
            await self._serve(client)
            self._connected.clear()
            self._client = None
            await _disconnect_quietly(client)
            delay = REBOOT_DELAY_S if self._reboot_requested else RECONNECT_INITIAL_S
            self._reboot_requested = False
            while True:
                await asyncio.sleep(delay)
                try:
                    client = await self._connect()
                    break
                except CabinetError as exc:
                    log.warning("event=cabinet_reconnect_failed station_sn=%s error=%s", self.sn, exc)
                    delay = min(delay * 2, RECONNECT_MAX_S)

    async def _serve(self, client: MQTTClient) -> None:
        """Run one connection: heartbeats, periodic uploads and commands, until it is lost or rebooted."""
        periodic = [
            asyncio.create_task(self._every(self.heartbeat_s, self._send_heartbeat), name=f"heart-{self.sn}"),
            asyncio.create_task(
                self._every(self.upload_s, self._send_upload, immediately=False), name=f"upload-{self.sn}"
            ),
        ]
        try:
            await self._receive(client)
        finally:
            for task in periodic:
                task.cancel()
            await asyncio.gather(*periodic, return_exceptions=True)

    async def _receive(self, client: MQTTClient) -> None:
        while not self._reboot_requested:
            try:
                message = await client.deliver_message()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                message = None  # amqtt cancels its delivery task when the connection closes
            except ClientError:
                message = None
            if message is None:
                log.warning("event=cabinet_connection_lost station_sn=%s", self.sn)
                return
            await self._on_message(message.topic, bytes(message.data or b""))

    async def _every(
        self, interval_s: float, action: Callable[[], Awaitable[None]], *, immediately: bool = True
    ) -> None:
        if not immediately:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await action()
            except (CabinetError, ClientError, OSError) as exc:
                log.debug("event=cabinet_periodic_publish_failed station_sn=%s error=%r", self.sn, exc)
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------------------- commands

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            command = rentbox.parse_command(payload)
        except rentbox.CommandError as exc:
            log.warning(
                "event=cabinet_command_unparseable station_sn=%s topic=%s error=%s", self.sn, topic, exc
            )
            return
        self.commands.append(command)
        log.info("event=cabinet_command station_sn=%s cmd=%s", self.sn, command["cmd"])
        try:
            await self._dispatch(command)
        except (CabinetError, ClientError, OSError) as exc:
            log.warning(
                "event=cabinet_reply_failed station_sn=%s cmd=%s error=%r", self.sn, command["cmd"], exc
            )

    async def _dispatch(self, command: dict[str, str]) -> None:
        handler = self._handlers.get(command["cmd"])
        if handler is None:
            log.info("event=cabinet_command_ignored station_sn=%s cmd=%s", self.sn, command["cmd"])
            return
        await handler(command)

    async def _on_check(self, command: dict[str, str]) -> None:
        await self.send_snapshot()

    async def _on_popup_sn(self, command: dict[str, str]) -> None:
        requested = command.get("data", "")
        try:
            sn: str | None = _check_sn(requested)
        except ValueError:
            sn = None
        if sn is None:
            result = EjectBySnResult(hole=0, sn=None, state=EjectState.PARSE_FAILED)
        else:
            hole, state = self._eject_sn(sn)
            result = EjectBySnResult(hole=hole, sn=sn, state=state)
        await self._reply(result)

    async def _on_popup(self, command: dict[str, str]) -> None:
        try:
            hole = int(command.get("data", ""))
        except ValueError:
            await self._reply(EjectByHoleResult(board=0, hole=0, state=EjectState.PARSE_FAILED))
            return
        if hole not in self._holes:
            echoed = hole if 0 <= hole <= 0xFF else 0
            await self._reply(EjectByHoleResult(board=0, hole=echoed, state=EjectState.FAILED))
            return
        state = self._eject_hole(hole)
        await self._reply(EjectByHoleResult(board=self.board_of(hole), hole=hole, state=state))

    async def _on_reboot(self, command: dict[str, str]) -> None:
        log.info("event=cabinet_rebooting station_sn=%s", self.sn)
        self._reboot_requested = True

    def _eject_sn(self, sn: str) -> tuple[int, int]:
        """Physically eject ``sn``: ``(hole, state)``."""
        hole = self._hole_of(sn)
        if hole is None:
            return 0, EjectState.SN_NOT_FOUND
        self._remove(hole)
        return hole, EjectState.SUCCESS

    def _eject_hole(self, hole: int) -> int:
        """Physically eject whatever is in ``hole``: the state code."""
        if self._holes[hole] is None:
            return EjectState.FAILED
        self._remove(hole)
        return EjectState.SUCCESS

    def _remove(self, hole: int) -> None:
        bank = self._holes[hole]
        if bank is not None:
            self._holes[hole] = None
            self.eject_counts[bank.sn] += 1
            log.info("event=cabinet_ejected station_sn=%s hole=%d powerbank_sn=%s", self.sn, hole, bank.sn)

    # -------------------------------------------------------------------------------- publish

    async def _publish_frame(self, kind: str, frame: Frame) -> None:
        await self.publish_raw(kind, rentbox.encode(frame))

    async def _reply(self, frame: Frame) -> None:
        """Command replies and events go on ``/user/update``."""
        await self._publish_frame("update", frame)

    async def _send_heartbeat(self) -> None:
        await self._publish_frame("heart", Heartbeat(board=HEARTBEAT_BOARD_BYTE, text=f"CSQ:{CSQ};BP:0"))

    async def _send_upload(self) -> None:
        await self._publish_frame("upload", self.snapshot())

    async def send_snapshot(self) -> None:
        """Publish a 0x10 snapshot of the holes on ``/user/update``."""
        await self._reply(self.snapshot())

    async def return_powerbank(self, sn: str, *, hole: int | None = None, soc: int = 80) -> int:
        """Put power bank ``sn`` into ``hole`` (default: the first empty one) and publish a 0x40 return
        (state 1) on ``/user/update``. Returns the hole. Raises :class:`CabinetNotConnected` when offline
        (nothing is changed then), :class:`CabinetFull` when no hole is free."""
        _check_sn(sn)
        if not 0 <= soc <= 100:
            raise ValueError(f"soc must be 0..100, got {soc}")
        if not self.connected:
            raise CabinetNotConnected(f"cabinet {self.sn} is not connected: start() it first")
        already = self._hole_of(sn)
        if already is not None:
            raise CabinetError(f"power bank {sn} is already in hole {already} of cabinet {self.sn}")
        if hole is None:
            hole = next((h for h, bank in sorted(self._holes.items()) if bank is None), None)
            if hole is None:
                raise CabinetFull(f"cabinet {self.sn} has no empty hole")
        elif hole not in self._holes:
            raise ValueError(f"hole {hole} does not exist: cabinet {self.sn} has holes 1..{len(self._holes)}")
        elif self._holes[hole] is not None:
            raise CabinetError(f"hole {hole} of cabinet {self.sn} is not empty")
        self._holes[hole] = self._new_bank(sn, soc=soc)
        await self._reply(_return_event(board=self.board_of(hole), hole=hole, sn=sn, soc=soc))
        return hole

    async def publish_raw(self, kind: str, payload: bytes) -> None:
        """Publish arbitrary bytes on ``/{pk}/{sn}/user/{kind}`` (QoS 0)."""
        await self.publish_to(rentbox.up_topic(self.credentials.product_key, self.sn, kind), payload)

    async def publish_to(self, topic: str, payload: bytes) -> None:
        """Publish arbitrary bytes on any topic (QoS 0), e.g. to test the broker's ACL."""
        client = self._client
        if client is None or not self.connected:
            raise CabinetNotConnected(f"cabinet {self.sn} is not connected")
        await client.publish(topic, payload, qos=QOS_0, retain=False)


async def send_return(
    credentials: CabinetCredentials,
    sn: str,
    *,
    hole: int,
    holes_per_board: int,
    soc: int = 80,
) -> None:
    """Connect as the cabinet, publish one 0x40 return of ``sn`` into ``hole``, and disconnect.

    It answers no command (so it cannot report a wrong snapshot for a cabinet whose state it does not
    know). The broker drops any other connection with the same client id while this runs.
    """
    _check_sn(sn)
    event = _return_event(board=(hole - 1) // holes_per_board + 1, hole=hole, sn=sn, soc=soc)
    client = await _connect_client(credentials)
    try:
        topic = rentbox.up_topic(credentials.product_key, credentials.sn, "update")
        await client.publish(topic, rentbox.encode(event), qos=QOS_0, retain=False)
    finally:
        await _disconnect_quietly(client)
