"""A simulated power-bank cabinet that speaks the rentbox protocol byte for byte over MQTT.

It imports nothing from the server side but :mod:`rentbox`: it sees the orchestrator exactly as a real
cabinet does, through the broker.

Behaviour (rentbox-v1.md): it connects with client id = its SN, subscribes to ``/{pk}/{sn}/user/get``
with QoS 0, answers ``check`` / ``check_all`` / ``upload_all`` with a 0x10 snapshot, ``popup_sn`` with
0x31 and ``popup`` with 0x21 on ``/user/update``, sends a 0x7A heartbeat on ``/user/heart`` on connect
and every ``heartbeat_s``, and a periodic 0x10 on ``/user/upload``. ``reboot`` drops the connection and
reconnects, as the firmware does; ``volume``, ``setWifi``, ``setMode``, ``push_version_publish`` and
``load_ad`` have no reply and are applied to :attr:`settings` (the Wi-Fi password too, so tests can check
it arrived; it is never logged); a lost connection is re-established with backoff. Every publish is
QoS 0. Unknown commands are logged and ignored.

Like the firmware, a command that arrives twice (e.g. a broker redelivery) is executed twice, and
``timestamp`` / ``ttl`` are ignored: a repeated ``popup_sn`` whose power bank already came out ejects the
next-best one instead. Every physical eject is counted per command payload (:attr:`ejects_per_command`,
:attr:`physical_ejects`) so tests can prove "at most once".

Faults (:class:`~simulators.faults.Faults`, the ``faults`` attribute, switchable while running) plug in at
four seams: :meth:`SimulatedCabinet._on_message` (silence, random disconnects, duplicate detection), the
``_eject_*`` methods (what physically happens and which state code comes back), :meth:`_answering`
(whether/when a reply leaves) and :meth:`_publish_frame` (what the bytes look like).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import quote

from amqtt.adapters import StreamWriterAdapter
from amqtt.client import MQTTClient
from amqtt.errors import AMQTTError, ClientError, ConnectError
from amqtt.mqtt.protocol.client_handler import ClientProtocolHandler

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
from simulators.faults import HOT_TEMPERATURE_C, Faults

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
RANDOM_DISCONNECT_S: Final = (0.8, 1.2)
"""Reconnect delay range after a ``disconnect_probability`` drop ("about 1 s")."""
SILENCE_POLL_S: Final = 0.2
"""How often a silent cabinet re-reads its faults (assigning ``cabinet.faults`` wakes it at once)."""

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


def _client_config(keepalive_s: int = KEEPALIVE_S) -> dict[str, Any]:
    # auto_reconnect off: amqtt's reconnect would not re-subscribe a clean session; the cabinet
    # reconnects and re-subscribes itself. keep_alive - ping_delay is what CONNECT advertises.
    return {
        "keep_alive": keepalive_s,
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


async def _connect_client(credentials: CabinetCredentials, *, keepalive_s: int = KEEPALIVE_S) -> MQTTClient:
    client = MQTTClient(client_id=credentials.sn, config=_client_config(keepalive_s))
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
    except (AMQTTError, ClientError, OSError, TimeoutError) as exc:
        log.debug("event=cabinet_disconnect_failed error=%r", exc)


def _gate_keepalive(client: MQTTClient, is_silenced: Callable[[], bool]) -> None:
    """Hold back ``client``'s keepalive PINGREQ while ``is_silenced()`` (the ``silent`` fault).

    amqtt 0.12.1 pings on its own: its client protocol handler arms a timer for
    ``handle_write_timeout`` ``keep_alive`` seconds after every packet it sends, and that method sends
    the PINGREQ. The method is wrapped on this one handler instance (site-packages stay untouched).
    Call right after connecting: the timer armed at CONNECT still holds the original method, and the
    next packet (the SUBSCRIBE) re-arms it with the wrapper.
    """
    handler = client._handler
    if type(handler) is not ClientProtocolHandler or not callable(
        getattr(handler, "handle_write_timeout", None)
    ):
        raise CabinetError(
            f"amqtt's client handler is {type(handler).__name__} without handle_write_timeout: the silent "
            "fault cannot hold back its keepalive pings with this amqtt version"
        )
    ping_when_idle: Callable[[], None] = handler.handle_write_timeout

    def handle_write_timeout() -> None:
        if not is_silenced():
            ping_when_idle()  # silent: no PINGREQ; the next packet sent re-arms the timer

    handler.handle_write_timeout = handle_write_timeout


def _abort_connection(client: MQTTClient) -> None:
    """Drop the TCP connection as a lost 4G link does: no DISCONNECT packet, the socket is reset."""
    handler = client._handler
    writer = handler.writer if handler is not None else None
    if isinstance(writer, StreamWriterAdapter):
        writer.is_closed = True  # amqtt writes nothing more on it, not even the DISCONNECT of disconnect()
        writer._writer.transport.abort()


@dataclass(slots=True, kw_only=True)
class _Command:
    """A command as received: its fields, the raw payload (the counting key) and what faults decided."""

    fields: dict[str, str]
    key: str
    duplicate: bool
    drop_after: float | None = None
    """Drop the connection after executing it, without replying, and reconnect after this many seconds."""


class _EjectOutcome(NamedTuple):
    hole: int
    sn: str | None
    state: int
    ejected: bool


class SimulatedCabinet:
    """One cabinet: boards x holes of power banks, an MQTT connection, and the firmware's replies.

    ``faults`` (a :class:`Faults`, default none) can be replaced while running and applies from the
    next packet. ``upload_s`` is the periodic 0x10 interval, ``heartbeat_s`` the 0x7A interval and
    ``keepalive_s`` the MQTT keepalive the cabinet advertises. ``seed`` seeds every random choice (the
    initial banks and the probabilistic faults).
    """

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
        faults: Faults | None = None,
        upload_s: float = UPLOAD_INTERVAL_S,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        if not 1 <= boards <= 10:
            raise ValueError(f"boards must be 1..10, got {boards}")
        if holes_per_board < 1 or boards * holes_per_board > MAX_HOLE:
            raise ValueError(f"holes_per_board must be at least 1 and boards x holes at most {MAX_HOLE}")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        if upload_s <= 0:
            raise ValueError(f"upload_s must be positive, got {upload_s}")
        if not 0 <= keepalive_s <= 0xFFFF:
            raise ValueError(f"keepalive_s must be 0..65535 seconds (0 = no keepalive), got {keepalive_s}")
        self.credentials = credentials
        self.sn = credentials.sn
        self.boards = boards
        self.holes_per_board = holes_per_board
        self.heartbeat_s = heartbeat_s
        self.upload_s = upload_s
        self.keepalive_s = keepalive_s
        self.eject_counts: collections.Counter[str] = collections.Counter()
        """Physical ejects per power-bank SN."""
        self.ejects_per_command: collections.Counter[str] = collections.Counter()
        """Physical ejects per received eject command, keyed by its raw payload (a retry with a fresh
        timestamp is another key; a redelivery of the same payload is the same key)."""
        self.physical_ejects: list[tuple[str, str]] = []
        """``(command payload, power-bank SN)`` of every physical eject, in order."""
        self.commands: list[dict[str, str]] = []
        self.settings: dict[str, str] = {}
        """What the no-reply commands set: ``volume``, ``wifi_ssid``, ``wifi_password``, ``mode``."""
        self.firmware_updates = 0
        self.ad_reloads = 0
        self._received: collections.Counter[str] = collections.Counter()
        self._faults = faults if faults is not None else Faults()
        self._faults_assigned = asyncio.Event()
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
        self._handlers: dict[str, Callable[[_Command], Awaitable[None]]] = {
            "check": self._on_check,
            "check_all": self._on_check,
            "upload_all": self._on_check,
            "popup_sn": self._on_popup_sn,
            "popup": self._on_popup,
            "reboot": self._on_reboot,
            "volume": self._on_volume,
            "setWifi": self._on_set_wifi,
            "setMode": self._on_set_mode,
            "push_version_publish": self._on_firmware_update,
            "load_ad": self._on_load_ad,
        }
        self._client: MQTTClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._reboot_requested = False
        self._drop_after: float | None = None

    def __repr__(self) -> str:
        return f"SimulatedCabinet(sn={self.sn!r}, banks={len(self.banks())}/{len(self._holes)})"

    # ------------------------------------------------------------------------------------- state

    @property
    def faults(self) -> Faults:
        """The active faults. Assign a new :class:`Faults` to switch them on a running cabinet."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        if not isinstance(faults, Faults):
            raise TypeError(f"faults must be a Faults, got {type(faults).__name__}")
        self._faults = faults
        assigned, self._faults_assigned = self._faults_assigned, asyncio.Event()
        assigned.set()  # wake whoever waits for the end (or the start) of silence
        log.info("event=cabinet_faults station_sn=%s faults=%r", self.sn, faults.describe() or "none")

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
        """The 0x10 frame describing the cabinet right now (stuck and hot holes as the faults say)."""
        boards = tuple(
            BoardInfo(
                index=board,
                temperature=BOARD_TEMPERATURE_C,
                software_version=BOARD_SOFTWARE_VERSION,
                hardware_version=BOARD_HARDWARE_VERSION,
            )
            for board in range(1, self.boards + 1)
        )
        faults = self.faults
        return Snapshot(
            boards=boards, holes=tuple(self._hole_info(hole, faults) for hole in sorted(self._holes))
        )

    def _hole_info(self, hole: int, faults: Faults) -> HoleInfo:
        bank = self._holes[hole]
        stuck = hole in faults.stuck_holes
        if bank is None:
            return HoleInfo(
                hole=hole,
                board=self.board_of(hole),
                state=faults.stuck_state if stuck else HoleState.EMPTY,
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
            state=faults.stuck_state if stuck else HoleState.NORMAL,
            current=0.5 if charging else 0.0,
            voltage=BANK_VOLTAGE,
            area=0,
            sn=bank.sn,
            soc=bank.soc,
            temperature=HOT_TEMPERATURE_C if hole in faults.hot_holes else bank.temperature,
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
        A cabinet started ``silent`` connects (CONNECT, SUBSCRIBE) and then sends nothing.
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
        client = await _connect_client(self.credentials, keepalive_s=self.keepalive_s)
        topic = rentbox.command_topic(self.credentials.product_key, self.sn)
        try:
            _gate_keepalive(client, lambda: self.faults.silent)
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
            if self._drop_after is not None:
                delay, self._drop_after = self._drop_after, None
            elif self._reboot_requested:
                delay = REBOOT_DELAY_S
            else:
                delay = RECONNECT_INITIAL_S
            self._reboot_requested = False
            client = await self._reconnect(delay)

    async def _reconnect(self, delay: float) -> MQTTClient:
        """Reconnect after ``delay`` with backoff; a silent cabinet waits until it is no longer silent."""
        while True:
            await asyncio.sleep(delay)
            await self._until_loud()
            try:
                return await self._connect()
            except CabinetError as exc:
                log.warning("event=cabinet_reconnect_failed station_sn=%s error=%s", self.sn, exc)
                delay = min(max(delay * 2, RECONNECT_INITIAL_S), RECONNECT_MAX_S)

    async def _serve(self, client: MQTTClient) -> None:
        """Run one connection: heartbeats, periodic uploads and commands, until it is lost or rebooted."""
        periodic = [
            asyncio.create_task(self._heartbeats(), name=f"heart-{self.sn}"),
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
        while not self._reboot_requested and self._drop_after is None:
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
            await self._periodic(action)
            await asyncio.sleep(interval_s)

    async def _periodic(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except (CabinetError, ClientError, OSError) as exc:
            log.debug("event=cabinet_periodic_publish_failed station_sn=%s error=%r", self.sn, exc)

    async def _heartbeats(self) -> None:
        """A heartbeat on connect, then every ``heartbeat_s``; right away again when silence ends."""
        loop = asyncio.get_running_loop()
        while True:
            await self._until_loud()
            await self._periodic(self._send_heartbeat)
            deadline = loop.time() + self.heartbeat_s
            while not self.faults.silent and (remaining := deadline - loop.time()) > 0:
                await self._next_faults(remaining)

    async def _until_loud(self) -> None:
        while self.faults.silent:
            await self._next_faults(SILENCE_POLL_S)

    async def _next_faults(self, timeout_s: float) -> None:
        """Wait until ``faults`` is assigned, at most ``timeout_s``."""
        assigned = self._faults_assigned
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await assigned.wait()

    def _drop_connection(self, reconnect_after_s: float, *, reason: str) -> None:
        """Reset the TCP connection now (no DISCONNECT) and reconnect after ``reconnect_after_s``."""
        log.info(
            "event=cabinet_dropping_connection station_sn=%s reason=%s reconnect_after_s=%.2f",
            self.sn,
            reason,
            reconnect_after_s,
        )
        self._drop_after = reconnect_after_s
        self._connected.clear()
        if self._client is not None:
            _abort_connection(self._client)

    # ------------------------------------------------------------------------------- commands

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if self.faults.silent:
            log.info("event=cabinet_command_lost station_sn=%s reason=silent", self.sn)
            return
        try:
            fields = rentbox.parse_command(payload)
        except rentbox.CommandError as exc:
            log.warning(
                "event=cabinet_command_unparseable station_sn=%s topic=%s error=%s", self.sn, topic, exc
            )
            return
        key = payload.decode("utf-8")
        self.commands.append(fields)
        self._received[key] += 1
        command = _Command(fields=fields, key=key, duplicate=self._received[key] > 1)
        log.info(
            "event=cabinet_command station_sn=%s cmd=%s duplicate=%s",
            self.sn,
            fields["cmd"],
            command.duplicate,
        )
        faults = self.faults
        if faults.disconnect_probability and self._rng.random() < faults.disconnect_probability:
            reconnect_after_s = self._rng.uniform(*RANDOM_DISCONNECT_S)
            if self._rng.random() < 0.5:
                self._drop_connection(reconnect_after_s, reason="random_before_command")
                return
            command.drop_after = reconnect_after_s
        try:
            await self._dispatch(command)
        except (CabinetError, ClientError, OSError) as exc:
            log.warning(
                "event=cabinet_reply_failed station_sn=%s cmd=%s error=%r", self.sn, fields["cmd"], exc
            )
        if command.drop_after is not None and self._drop_after is None:
            self._drop_connection(command.drop_after, reason="after_command")

    async def _dispatch(self, command: _Command) -> None:
        handler = self._handlers.get(command.fields["cmd"])
        if handler is None:
            log.info("event=cabinet_command_ignored station_sn=%s cmd=%s", self.sn, command.fields["cmd"])
            return
        await handler(command)

    async def _answering(self, command: _Command, *, eject: bool = False, ejected: bool = False) -> bool:
        """Apply the reply faults to ``command``'s reply: True when it is to be sent now (after any delay).

        ``eject``: the command is popup_sn/popup; ``ejected``: a power bank physically came out.
        """
        faults = self.faults
        if eject and faults.disconnect_mid_eject is not None and command.drop_after is None:
            command.drop_after = faults.disconnect_mid_eject
        if command.drop_after is not None:
            log.info("event=cabinet_reply_withheld station_sn=%s reason=disconnect", self.sn)
            return False
        if ejected and faults.lose_eject_reply and self._rng.random() < faults.lose_eject_reply:
            log.info("event=cabinet_reply_withheld station_sn=%s reason=lose_eject_reply", self.sn)
            return False
        if faults.reply_delay_s > 0:
            await asyncio.sleep(faults.reply_delay_s)
        return True

    async def _on_check(self, command: _Command) -> None:
        if await self._answering(command):
            await self.send_snapshot()

    async def _on_popup_sn(self, command: _Command) -> None:
        requested = command.fields.get("data", "")
        try:
            sn: str | None = _check_sn(requested)
        except ValueError:
            sn = None
        if sn is None:
            outcome = _EjectOutcome(hole=0, sn=None, state=EjectState.PARSE_FAILED, ejected=False)
        else:
            outcome = self._eject_sn(sn, command)
        if await self._answering(command, eject=True, ejected=outcome.ejected):
            await self._reply(EjectBySnResult(hole=outcome.hole, sn=outcome.sn, state=outcome.state))

    async def _on_popup(self, command: _Command) -> None:
        try:
            hole: int | None = int(command.fields.get("data", ""))
        except ValueError:
            hole = None
        if hole is None:
            frame, ejected = EjectByHoleResult(board=0, hole=0, state=EjectState.PARSE_FAILED), False
        elif hole not in self._holes:
            echoed = hole if 0 <= hole <= 0xFF else 0
            frame, ejected = EjectByHoleResult(board=0, hole=echoed, state=EjectState.FAILED), False
        else:
            state, ejected = self._eject_hole(hole, command)
            frame = EjectByHoleResult(board=self.board_of(hole), hole=hole, state=state)
        if await self._answering(command, eject=True, ejected=ejected):
            await self._reply(frame)

    async def _on_reboot(self, command: _Command) -> None:
        log.info("event=cabinet_rebooting station_sn=%s", self.sn)
        self._reboot_requested = True

    async def _on_volume(self, command: _Command) -> None:
        level = command.fields.get("data", "")
        if level.isdigit() and 0 <= int(level) <= 100:
            self.settings["volume"] = level
        else:
            log.warning("event=cabinet_bad_volume station_sn=%s data=%r", self.sn, level)

    async def _on_set_wifi(self, command: _Command) -> None:
        ssid = command.fields.get("username", "")
        if ssid:
            self.settings["wifi_ssid"] = ssid
            self.settings["wifi_password"] = command.fields.get("password", "")
        log.info("event=cabinet_wifi_set station_sn=%s ssid=%r", self.sn, ssid)

    async def _on_set_mode(self, command: _Command) -> None:
        mode = command.fields.get("data", "")
        if mode in ("wifi", "4g"):
            self.settings["mode"] = mode

    async def _on_firmware_update(self, command: _Command) -> None:
        self.firmware_updates += 1

    async def _on_load_ad(self, command: _Command) -> None:
        self.ad_reloads += 1

    def _eject_sn(self, sn: str, command: _Command) -> _EjectOutcome:
        """Physically eject ``sn`` (or, for a repeated command whose bank already came out, the next-best
        bank, as the firmware does), as the faults allow."""
        faults = self.faults
        hole = self._hole_of(sn)
        if faults.eject_failure_code is not None:
            return _EjectOutcome(hole=hole or 0, sn=sn, state=faults.eject_failure_code, ejected=False)
        if hole is None:
            if not (command.duplicate and sn in self.eject_counts):
                return _EjectOutcome(hole=0, sn=sn, state=EjectState.SN_NOT_FOUND, ejected=False)
            best = self._next_best_hole()
            if best is None:
                return _EjectOutcome(hole=0, sn=sn, state=EjectState.NO_ELIGIBLE_POWER_BANK, ejected=False)
            log.warning(
                "event=cabinet_duplicate_eject station_sn=%s requested_sn=%s hole=%d", self.sn, sn, best
            )
            return _EjectOutcome(
                hole=best, sn=self._remove(best, command), state=EjectState.SUCCESS, ejected=True
            )
        if hole in faults.stuck_holes:
            return _EjectOutcome(hole=hole, sn=sn, state=EjectState.NOT_POPPED_SN_READABLE, ejected=False)
        self._remove(hole, command)
        return _EjectOutcome(hole=hole, sn=sn, state=EjectState.SUCCESS, ejected=True)

    def _eject_hole(self, hole: int, command: _Command) -> tuple[int, bool]:
        """Physically eject whatever is in ``hole``, as the faults allow: ``(state, ejected)``."""
        faults = self.faults
        if faults.eject_failure_code is not None:
            return faults.eject_failure_code, False
        if self._holes[hole] is None:
            return EjectState.FAILED, False
        if hole in faults.stuck_holes:
            return EjectState.NOT_POPPED_SN_READABLE, False
        self._remove(hole, command)
        return EjectState.SUCCESS, True

    def _next_best_hole(self) -> int | None:
        """Where the firmware would rent from: the fullest bank neither stuck nor hot (lowest hole wins)."""
        faults = self.faults
        candidates = [
            (bank.soc, -hole)
            for hole, bank in self._holes.items()
            if bank is not None and hole not in faults.stuck_holes and hole not in faults.hot_holes
        ]
        return -max(candidates)[1] if candidates else None

    def _remove(self, hole: int, command: _Command) -> str:
        bank = self._holes[hole]
        assert bank is not None
        self._holes[hole] = None
        self.eject_counts[bank.sn] += 1
        self.ejects_per_command[command.key] += 1
        self.physical_ejects.append((command.key, bank.sn))
        log.info("event=cabinet_ejected station_sn=%s hole=%d powerbank_sn=%s", self.sn, hole, bank.sn)
        return bank.sn

    # -------------------------------------------------------------------------------- publish

    async def _publish_frame(self, kind: str, frame: Frame) -> None:
        payload = rentbox.encode(frame)
        if self.faults.bad_checksum:
            payload = payload[:-1] + bytes([(payload[-1] + 1) & 0xFF])
        await self.publish_raw(kind, payload)

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
        """Put power bank ``sn`` into ``hole`` (default: the first empty hole not stuck) and publish a 0x40
        return (state 1) on ``/user/update`` (twice with ``duplicate_returns``; not at all while
        ``silent``). Returns the hole. Raises :class:`CabinetNotConnected` when offline (nothing is changed
        then), :class:`CabinetFull` when no hole is free."""
        _check_sn(sn)
        if not 0 <= soc <= 100:
            raise ValueError(f"soc must be 0..100, got {soc}")
        if not self.connected:
            raise CabinetNotConnected(f"cabinet {self.sn} is not connected: start() it first")
        already = self._hole_of(sn)
        if already is not None:
            raise CabinetError(f"power bank {sn} is already in hole {already} of cabinet {self.sn}")
        if hole is None:
            stuck = self.faults.stuck_holes
            hole = next(
                (h for h, bank in sorted(self._holes.items()) if bank is None and h not in stuck), None
            )
            if hole is None:
                raise CabinetFull(f"cabinet {self.sn} has no empty hole")
        elif hole not in self._holes:
            raise ValueError(f"hole {hole} does not exist: cabinet {self.sn} has holes 1..{len(self._holes)}")
        elif self._holes[hole] is not None:
            raise CabinetError(f"hole {hole} of cabinet {self.sn} is not empty")
        self._holes[hole] = self._new_bank(sn, soc=soc)
        event = _return_event(board=self.board_of(hole), hole=hole, sn=sn, soc=soc)
        await self._reply(event)
        if self.faults.duplicate_returns:
            await self._reply(event)
        return hole

    async def publish_raw(self, kind: str, payload: bytes) -> None:
        """Publish arbitrary bytes on ``/{pk}/{sn}/user/{kind}`` (QoS 0)."""
        await self.publish_to(rentbox.up_topic(self.credentials.product_key, self.sn, kind), payload)

    async def publish_to(self, topic: str, payload: bytes) -> None:
        """Publish arbitrary bytes on any topic (QoS 0), e.g. to test the broker's ACL. Nothing is sent
        while the cabinet is ``silent``."""
        client = self._client
        if client is None or not self.connected:
            raise CabinetNotConnected(f"cabinet {self.sn} is not connected")
        if self.faults.silent:
            log.debug("event=cabinet_publish_withheld station_sn=%s topic=%s reason=silent", self.sn, topic)
            return
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
