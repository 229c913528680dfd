"""Kiosk and Slot actors: a cabinet's live state and its rentbox protocol logic, in plain asyncio.

A Kiosk has one mailbox, handled by one task, so frames and connection events are applied one at a
time in arrival order. Its Slots are owned by it and changed only from that mailbox. An eject is a
request/response on top: at most one is in flight per cabinet; the cabinet's 0x31 (read from the
mailbox) completes it. Ray is not needed here: a kiosk-host actor hosts many Kiosks (`actors.host`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import rentbox
from actors.messages import (
    CabinetConnected,
    CabinetDisconnected,
    CabinetSubscribed,
    Ejected,
    EjectOutcome,
    EjectRefused,
    FrameReceived,
    KioskMessage,
    KioskNotReady,
    KioskOffline,
    KioskStatus,
    KioskTimedOut,
    NoPowerBank,
    SlotView,
    outcome_reason,
)
from telemetry import metrics

log = logging.getLogger(__name__)
UNKNOWN = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskConfig:
    eject_timeout_s: float
    min_soc: int
    max_temperature_c: int
    strict_checksum: bool = False


class KioskPorts(Protocol):
    """What a kiosk asks of its host: the way out to the cabinet and to the durable world."""

    async def publish(self, serial_number: str, payload: bytes) -> None: ...

    async def snapshot_received(self, serial_number: str, slots: list[SlotView]) -> None: ...

    async def powerbank_returned(
        self, serial_number: str, slot_number: int, powerbank_sn: str, soc: int
    ) -> None: ...

    async def status_changed(self, status: KioskStatus) -> None: ...


class Slot:
    """One hole: what the cabinet last said about it, plus our reservation while an eject is in flight."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = 0
        self.powerbank_sn: str | None = None
        self.soc: int | None = None
        self.temperature: int | None = None
        self.reserved = False

    def apply(self, hole: rentbox.HoleInfo) -> None:
        self.state = hole.state
        self.powerbank_sn = hole.sn
        self.soc = None if hole.soc == UNKNOWN else hole.soc
        self.temperature = None if hole.temperature == UNKNOWN else hole.temperature

    def put(self, powerbank_sn: str, soc: int) -> None:
        self.state, self.powerbank_sn, self.soc, self.reserved = (
            rentbox.HoleState.NORMAL,
            powerbank_sn,
            soc,
            False,
        )

    def empty(self) -> None:
        self.state, self.powerbank_sn, self.soc, self.temperature, self.reserved = 0, None, None, None, False

    def rentable(self, config: KioskConfig) -> bool:
        return (
            self.state == rentbox.HoleState.NORMAL
            and self.powerbank_sn is not None
            and not self.reserved
            and self.soc is not None
            and self.soc >= config.min_soc
            and (self.temperature is None or self.temperature <= config.max_temperature_c)
        )

    def view(self, config: KioskConfig) -> SlotView:
        if self.state >= rentbox.HoleState.CHARGING_FAULT:
            status = "ERROR"
        elif self.powerbank_sn is None:
            status = "AVAILABLE"
        else:
            status = "OCCUPIED"
        return SlotView(
            slot_number=self.number,
            status=status,
            state=self.state,
            powerbank_sn=self.powerbank_sn,
            battery_level=self.soc,
            temperature=self.temperature,
            rentable=self.rentable(config),
        )


@dataclass
class _PendingEject:
    powerbank_sn: str
    reply: asyncio.Future[rentbox.EjectBySnResult]


class Kiosk:
    def __init__(
        self, *, serial_number: str, boards: int, holes_per_board: int, config: KioskConfig, ports: KioskPorts
    ) -> None:
        self.serial_number = serial_number
        self.holes_per_board = holes_per_board
        self.config = config
        self.ports = ports
        self.slots = {n: Slot(n) for n in range(1, boards * holes_per_board + 1)}
        self.online = False
        self.ready = False
        self.last_seen = 0.0
        self._mailbox: asyncio.Queue[KioskMessage] = asyncio.Queue()
        self._eject_lock = asyncio.Lock()
        self._pending: _PendingEject | None = None
        self._snapshot_waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    # --- mailbox --------------------------------------------------------------------------------------
    def tell(self, message: KioskMessage) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"kiosk-{self.serial_number}"
            )
        self._mailbox.put_nowait(message)

    async def drained(self) -> None:
        """Wait until every message told so far has been handled (for tests and shutdown)."""
        await self._mailbox.join()

    async def _run(self) -> None:
        while True:
            message = await self._mailbox.get()
            try:
                await self._handle(message)
            except Exception:
                log.exception(
                    "event=kiosk_message_failed station_sn=%s message=%r", self.serial_number, message
                )
            finally:
                self._mailbox.task_done()

    async def _handle(self, message: KioskMessage) -> None:
        match message:
            case CabinetConnected():
                self.online, self.ready, self.last_seen = True, False, time.monotonic()
                log.info("event=cabinet_connected station_sn=%s", self.serial_number)
                await self.ports.status_changed(self.status())
            case CabinetSubscribed():
                await self.ports.publish(self.serial_number, rentbox.check())
            case CabinetDisconnected():
                self.online = self.ready = False
                log.info("event=cabinet_disconnected station_sn=%s", self.serial_number)
                await self.ports.status_changed(self.status())
            case FrameReceived(kind=kind, payload=payload):
                await self._on_frame(kind, payload)

    async def _on_frame(self, kind: str, payload: bytes) -> None:
        try:
            decoded = rentbox.decode(
                payload, holes_per_board=self.holes_per_board, strict_checksum=self.config.strict_checksum
            )
        except rentbox.FrameError as err:
            metrics.INVALID_FRAMES.labels(reason=err.reason).inc()
            metrics.MQTT_DROPPED.labels(reason="invalid_frame").inc()
            log.warning(
                "event=invalid_frame station_sn=%s topic_kind=%s reason=%s hex=%s",
                self.serial_number,
                kind,
                err.reason,
                payload[:256].hex(),
            )
            return
        self.last_seen = time.monotonic()
        metrics.FRAMES.labels(cmd=f"0x{decoded.cmd:02X}").inc()
        if not decoded.checksum_ok:
            metrics.CHECKSUM_MISMATCHES.inc()
            log.warning("event=checksum_mismatch station_sn=%s hex=%s", self.serial_number, payload.hex())
        match decoded.frame:
            case rentbox.Snapshot() as snapshot:
                await self._on_snapshot(snapshot)
            case rentbox.EjectBySnResult() as result:
                self._on_eject_result(result)
            case rentbox.ReturnEvent() as event:
                await self._on_return(event)
            case _:
                pass  # heartbeats keep the cabinet alive; 0x21/0x28 are handled by later features

    async def _on_snapshot(self, snapshot: rentbox.Snapshot) -> None:
        for hole in snapshot.holes:
            slot = self.slots.get(hole.hole)
            if slot is None:
                log.warning("event=unknown_hole station_sn=%s hole=%s", self.serial_number, hole.hole)
                continue
            reserved = slot.reserved and slot.powerbank_sn == hole.sn
            slot.apply(hole)
            slot.reserved = reserved
        self.ready = self.online
        for waiter in self._snapshot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._snapshot_waiters.clear()
        await self.ports.snapshot_received(
            self.serial_number, [s.view(self.config) for s in self.slots.values()]
        )
        await self.ports.status_changed(self.status())

    def _on_eject_result(self, result: rentbox.EjectBySnResult) -> None:
        pending = self._pending
        if pending is None or pending.reply.done() or result.sn not in (None, pending.powerbank_sn):
            log.warning("event=unexpected_eject_result station_sn=%s sn=%s", self.serial_number, result.sn)
            return
        pending.reply.set_result(result)

    async def _on_return(self, event: rentbox.ReturnEvent) -> None:
        if not event.success or event.sn is None:
            log.warning(
                "event=return_failed station_sn=%s hole=%s state=%s",
                self.serial_number,
                event.hole,
                event.state,
            )
            return
        slot = self.slots.get(event.hole)
        if slot is None:
            log.warning("event=unknown_hole station_sn=%s hole=%s", self.serial_number, event.hole)
            return
        slot.put(event.sn, event.soc)
        await self.ports.powerbank_returned(self.serial_number, event.hole, event.sn, event.soc)
        await self.ports.status_changed(self.status())

    # --- queries ---------------------------------------------------------------------------------------
    def status(self) -> KioskStatus:
        return KioskStatus(
            serial_number=self.serial_number,
            online=self.online,
            ready=self.ready,
            total_slots=len(self.slots),
            available_power_banks=sum(s.rentable(self.config) for s in self.slots.values())
            if self.ready
            else 0,
            empty_slots=sum(s.powerbank_sn is None for s in self.slots.values()),
        )

    def slot_views(self) -> list[SlotView]:
        return [s.view(self.config) for s in self.slots.values()]

    # --- EjectPowerBank ------------------------------------------------------------------------------
    def _best_slot(self) -> Slot | None:
        candidates = [s for s in self.slots.values() if s.rentable(self.config)]
        return max(candidates, key=lambda s: (s.soc or 0, -s.number), default=None)

    async def eject(self, *, request_id: str) -> EjectOutcome:
        """Eject the best power bank: QoS 0, once; on timeout ask for a snapshot instead of re-sending."""
        async with self._eject_lock:
            if not self.online:
                return KioskOffline(request_id=request_id)
            if not self.ready:
                return KioskNotReady(request_id=request_id)
            slot = self._best_slot()
            if slot is None or slot.powerbank_sn is None:
                return NoPowerBank(request_id=request_id)
            started = time.monotonic()
            outcome = await self._eject_slot(slot, slot.powerbank_sn, request_id)
            result = outcome_reason(outcome)
            result = (
                "success"
                if result == "success"
                else result
                if result in ("timeout", "lost_reply")
                else "failed"
            )
            metrics.EJECT_SECONDS.labels(result=result).observe(time.monotonic() - started)
            log.info(
                "event=eject_outcome station_sn=%s request_id=%s outcome=%s seconds=%.3f",
                self.serial_number,
                request_id,
                outcome_reason(outcome),
                time.monotonic() - started,
            )
            await self.ports.status_changed(self.status())
            return outcome

    async def _eject_slot(self, slot: Slot, powerbank_sn: str, request_id: str) -> EjectOutcome:
        slot.reserved = True
        soc = slot.soc
        reply: asyncio.Future[rentbox.EjectBySnResult] = asyncio.get_running_loop().create_future()
        self._pending = _PendingEject(powerbank_sn=powerbank_sn, reply=reply)
        metrics.COMMANDS_IN_FLIGHT.inc()
        try:
            await self.ports.publish(self.serial_number, rentbox.popup_sn(powerbank_sn))
            result = await asyncio.wait_for(reply, self.config.eject_timeout_s)
        except TimeoutError:
            return await self._after_timeout(slot, powerbank_sn, soc, request_id)
        finally:
            self._pending = None
            metrics.COMMANDS_IN_FLIGHT.dec()
        metrics.EJECT_RESULTS.labels(code=f"0x{result.state:02X}").inc()
        if result.success:
            slot.empty()
            return Ejected(request_id=request_id, powerbank_sn=powerbank_sn, slot_number=slot.number, soc=soc)
        slot.reserved = False
        return EjectRefused(request_id=request_id, code=result.state, slot_number=slot.number)

    async def _after_timeout(
        self, slot: Slot, powerbank_sn: str, soc: int | None, request_id: str
    ) -> EjectOutcome:
        """No 0x31: never re-send blindly. Ask for a snapshot; if the bank is gone, the reply was lost."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append(waiter)
        await self.ports.publish(self.serial_number, rentbox.check())
        try:
            await asyncio.wait_for(waiter, self.config.eject_timeout_s)
        except TimeoutError:
            slot.reserved = False
            return KioskTimedOut(request_id=request_id)
        if slot.powerbank_sn != powerbank_sn:
            if slot.powerbank_sn is None:
                slot.empty()
            return Ejected(
                request_id=request_id,
                powerbank_sn=powerbank_sn,
                slot_number=slot.number,
                soc=soc,
                reply_lost=True,
            )
        slot.reserved = False
        return KioskTimedOut(request_id=request_id)
