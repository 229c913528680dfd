"""Kiosk and Slot actors: a cabinet's live state and its rentbox protocol logic, in plain asyncio.

A Kiosk has one mailbox, handled by one task, so frames and connection events are applied one at a
time in arrival order. Its Slots are owned by it and changed only from that mailbox. An eject is a
request/response on top: at most one is in flight per cabinet (others wait in a bounded queue); the
cabinet's 0x31, read from the mailbox, completes it. Ray is not needed here: a kiosk-host actor hosts
many Kiosks (`actors.host`).

Eject protocol (docs/rentbox-v1.md, "Reliability rule"): the command goes out once at QoS 0.
No reply in time → send `check`: the SN gone from its hole means it was ejected and only the reply was
lost; the SN still there means retry once with a fresh timestamp. A hole-level failure code quarantines
the hole and the next-best bank is tried. No snapshot at all → the outcome is unconfirmed and the
rental stays PENDING_POPUP until the cabinet next reports its holes.

Only what arrives over the cabinet's authenticated MQTT session is evidence. A 0x10 posted over HTTP
(`HTTP_UPLOAD`; its `sign` has no secret) is a hint: it changes no hole, rental or pending eject; a connected
cabinet is asked `check` instead (at most once per `upload_check_interval_s`), and its answer does the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import rentbox
from actors.messages import (
    CabinetConnected,
    CabinetDisconnected,
    CabinetSubscribed,
    CommandOutcome,
    CommandRefused,
    CommandSent,
    CommandTimedOut,
    Ejected,
    EjectOutcome,
    EjectRefused,
    EjectUnconfirmed,
    FrameReceived,
    HoleEjected,
    KioskBusy,
    KioskMessage,
    KioskNotReady,
    KioskOffline,
    KioskStatus,
    KioskTimedOut,
    NoPowerBank,
    RemoteCommand,
    RequestWithdrawn,
    SlotView,
    SnapshotTaken,
    Tick,
    outcome_reason,
)
from telemetry import metrics

R = TypeVar("R")  # the reply frame an eject waits for (0x31 or 0x21)
log = logging.getLogger(__name__)
UNKNOWN = 255
HTTP_UPLOAD = "http"  # a 0x10 posted to /api/rentbox/upload/data: anyone may post one, so only a hint
# Failure codes that are about one hole or bank: quarantine that hole and try the next-best bank.
HOLE_FAILURES = frozenset({0x00, 0x11, 0x12, 0xFB, 0xFC})


@dataclass(frozen=True, slots=True, kw_only=True)
class KioskConfig:
    eject_timeout_s: float
    min_soc: int
    max_temperature_c: int
    eject_queue_limit: int = 5
    eject_banks_tried: int = 2
    slot_quarantine_s: float = 600.0
    silence_timeout_s: float = 300.0
    strict_checksum: bool = False
    upload_check_interval_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Returned:
    slot_number: int
    powerbank_sn: str
    soc: int | None


class KioskPorts(Protocol):
    """What a kiosk asks of its host: the way out to the cabinet and to the durable world."""

    async def publish(self, serial_number: str, payload: bytes) -> None: ...

    async def eject_dispatched(
        self, request_id: str, slot_number: int, powerbank_sn: str, soc: int | None
    ) -> bool:
        """Record the bank about to be ejected; False if the request is no longer pending (do not send)."""
        ...

    async def snapshot_received(self, serial_number: str, slots: list[SlotView]) -> None: ...

    async def powerbank_returned(
        self, serial_number: str, slot_number: int, powerbank_sn: str, soc: int
    ) -> None: ...

    async def reconcile(
        self, serial_number: str, *, present: set[str], appeared: list[Returned], in_flight: str | None
    ) -> None: ...

    async def settle_stale(
        self, serial_number: str, *, present: set[str], in_flight: str | None, older_than: datetime
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
        self.quarantined_until = 0.0

    def apply(self, hole: rentbox.HoleInfo) -> None:
        keep_reservation = self.reserved and self.powerbank_sn == hole.sn
        self.state = hole.state
        self.powerbank_sn = hole.sn
        self.soc = None if hole.soc == UNKNOWN else hole.soc
        self.temperature = None if hole.temperature == UNKNOWN else hole.temperature
        self.reserved = keep_reservation

    def put(self, powerbank_sn: str, soc: int | None) -> None:
        self.state, self.powerbank_sn, self.soc = rentbox.HoleState.NORMAL, powerbank_sn, soc
        self.reserved, self.quarantined_until = False, 0.0

    def empty(self) -> None:
        self.state, self.powerbank_sn, self.soc, self.temperature, self.reserved = 0, None, None, None, False

    def rentable(self, config: KioskConfig) -> bool:
        return (
            self.state == rentbox.HoleState.NORMAL
            and self.powerbank_sn is not None
            and not self.reserved
            and self.quarantined_until <= time.monotonic()
            and self.soc is not None
            and self.soc >= config.min_soc
            and (self.temperature is None or self.temperature <= config.max_temperature_c)
        )

    def view(self, config: KioskConfig, *, maintenance: bool = False) -> SlotView:
        """Under maintenance every hole shows MAINTENANCE and nothing is rentable."""
        if maintenance:
            status = "MAINTENANCE"
        elif self.state >= rentbox.HoleState.CHARGING_FAULT or self.quarantined_until > time.monotonic():
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
            rentable=self.rentable(config) and not maintenance,
        )


@dataclass
class _PendingEject:
    request_id: str
    powerbank_sn: str
    reply: asyncio.Future[rentbox.EjectBySnResult]


@dataclass
class _PendingHoleEject:
    hole: int
    reply: asyncio.Future[rentbox.EjectByHoleResult]


class Kiosk:
    def __init__(
        self,
        *,
        serial_number: str,
        boards: int,
        holes_per_board: int,
        config: KioskConfig,
        ports: KioskPorts,
        known: Mapping[int, tuple[str, int | None]] | None = None,
        maintenance: bool = False,
    ) -> None:
        """`known`: the holes' last durable state ({hole: (sn, soc)}), when a host rebuilds this kiosk.
        `maintenance`: the station is out of service (its slots show MAINTENANCE, nothing is rentable)."""
        self.serial_number = serial_number
        self.maintenance = maintenance
        self.holes_per_board = holes_per_board
        self.config = config
        self.ports = ports
        self.slots = {n: Slot(n) for n in range(1, boards * holes_per_board + 1)}
        for number, (sn, soc) in (known or {}).items():
            if number in self.slots:
                self.slots[number].put(sn, soc)
        self.online = False
        self.ready = False
        self.last_seen = 0.0
        self._needs_reconcile = True
        self._mailbox: asyncio.Queue[KioskMessage] = asyncio.Queue()
        self._eject_lock = asyncio.Lock()
        self._waiting = 0
        self._pending: _PendingEject | None = None
        self._pending_hole: _PendingHoleEject | None = None
        self._current: str | None = None  # the request holding the eject lock
        self._current_sn: str | None = None  # ... and the bank it is ejecting
        # Banks of unconfirmed ejects: reserved until a snapshot settles them.
        self._unresolved: set[str] = set()
        self._last_timestamp = 0
        # Settling PENDING_POPUP rentals from the holes (reconcile, stale rentals) and recording a new
        # eject exclude each other: a rental whose eject is sent meanwhile must not be judged by holes
        # seen before it was sent.
        self._settle_lock = asyncio.Lock()
        self._snapshot_waiters: list[asyncio.Future[None]] = []
        self._last_upload_check = float("-inf")
        self._last_frames: dict[str, tuple[bytes, rentbox.Decoded]] = {}  # by topic kind
        self._holes_seen: tuple[rentbox.HoleInfo, ...] = ()  # the last snapshot applied
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

    def stop(self) -> None:
        """The station was removed: stop handling messages."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

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
                await self._connected()
            case CabinetSubscribed():
                await self.ports.publish(self.serial_number, rentbox.check())
            case CabinetDisconnected():
                await self._offline("disconnected")
            case FrameReceived(kind=kind, payload=payload) if kind == HTTP_UPLOAD:
                await self._on_upload(payload)
            case FrameReceived(kind=kind, payload=payload):
                await self._on_frame(kind, payload)
            case Tick(now=now):
                if self.online and now - self.last_seen > self.config.silence_timeout_s:
                    await self._offline("silent")
                elif self.online and self._unresolved:
                    await self.ports.publish(self.serial_number, rentbox.check())

    async def _connected(self) -> None:
        self.online, self.ready, self.last_seen = True, False, time.monotonic()
        self._needs_reconcile = True
        log.info("event=cabinet_connected station_sn=%s", self.serial_number)
        await self.ports.status_changed(self.status())

    async def _offline(self, why: str) -> None:
        if not self.online:
            return
        self.online = self.ready = False
        log.info("event=cabinet_offline station_sn=%s why=%s", self.serial_number, why)
        await self.ports.status_changed(self.status())

    async def _on_frame(self, kind: str, payload: bytes) -> None:
        try:
            decoded = self._decode(kind, payload)
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
        if not self.online:  # a cabinet we took for silent is talking again
            await self._connected()
            await self.ports.publish(self.serial_number, rentbox.check())
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
            case rentbox.EjectByHoleResult() as hole_result:
                self._on_hole_result(hole_result)
            case rentbox.ReturnEvent() as event:
                await self._on_return(event)
            case _:
                pass  # heartbeats only keep the cabinet alive; 0x28 needs no action here

    def _decode(self, kind: str, payload: bytes) -> rentbox.Decoded:
        """Decode a frame; one the same as the last on its topic (most heartbeats and snapshots) is not
        decoded again (frames are immutable)."""
        last = self._last_frames.get(kind)
        if last is not None and last[0] == payload:
            return last[1]
        decoded = rentbox.decode(
            payload, holes_per_board=self.holes_per_board, strict_checksum=self.config.strict_checksum
        )
        self._last_frames[kind] = (payload, decoded)
        return decoded

    async def _on_upload(self, payload: bytes) -> None:
        """A 0x10 posted to /api/rentbox/upload/data. Anyone who knows the SN can post one, so it is a hint,
        never evidence: it changes no hole, rental or pending eject. A connected cabinet is asked `check`
        over its authenticated MQTT session (at most once per `upload_check_interval_s`) and that answer is
        applied; for a cabinet not connected the upload is only logged and counted."""
        try:
            decoded = rentbox.decode(
                payload, holes_per_board=self.holes_per_board, strict_checksum=self.config.strict_checksum
            )
        except rentbox.FrameError as err:
            self._upload_ignored("invalid_frame", detail=err.reason)
            return
        if not isinstance(decoded.frame, rentbox.Snapshot):
            self._upload_ignored("not_snapshot", detail=f"0x{decoded.cmd:02X}")
            return
        posted = {h.hole: h.sn for h in decoded.frame.holes}
        differs = posted != {n: s.powerbank_sn for n, s in self.slots.items()}
        if not self.online:
            self._upload_ignored("cabinet_offline", differs=differs)
            return
        now = time.monotonic()
        if now - self._last_upload_check < self.config.upload_check_interval_s:
            self._upload_ignored("check_throttled", differs=differs)
            return
        self._last_upload_check = now
        self._upload_ignored("check_sent", differs=differs)
        await self.ports.publish(self.serial_number, rentbox.check())

    def _upload_ignored(self, reason: str, *, detail: str = "", differs: bool | None = None) -> None:
        metrics.FIRMWARE_UPLOADS_IGNORED.labels(reason=reason).inc()
        log.log(
            logging.INFO if reason.startswith("check_") and not differs else logging.WARNING,
            "event=http_upload_ignored station_sn=%s reason=%s detail=%s differs_from_view=%s",
            self.serial_number,
            reason,
            detail,
            differs,
        )

    def _banks(self) -> set[str]:
        return {s.powerbank_sn for s in self.slots.values() if s.powerbank_sn}

    async def _on_snapshot(self, snapshot: rentbox.Snapshot) -> None:
        if (
            self.ready
            and snapshot.holes == self._holes_seen
            and not self._needs_reconcile
            and not self._unresolved
        ):
            _wake(self._snapshot_waiters)  # what we know already: nothing to apply, record or settle
            return
        self._holes_seen = snapshot.holes
        before = self._banks()
        for hole in snapshot.holes:
            slot = self.slots.get(hole.hole)
            if slot is None:
                log.warning("event=unknown_hole station_sn=%s hole=%s", self.serial_number, hole.hole)
                continue
            slot.apply(hole)
        self.ready = self.online
        _wake(self._snapshot_waiters)
        await self.ports.snapshot_received(self.serial_number, self.slot_views())
        present = self._banks()
        if self.ready and (self._needs_reconcile or present != before or self._unresolved):
            self._needs_reconcile = False
            await self._reconcile(before, present)
            for (
                slot
            ) in self.slots.values():  # unconfirmed ejects are settled now: still-present banks are free
                if slot.powerbank_sn in self._unresolved and slot.powerbank_sn != self._current_sn:
                    slot.reserved = False
            self._unresolved.clear()
        await self.ports.status_changed(self.status())

    async def _reconcile(self, before: set[str], present: set[str]) -> None:
        """The holes differ from what we knew (always checked after a (re)connect): banks that appeared were
        returned without a 0x40 reaching us; banks that vanished may be ejects whose reply was lost (their
        PENDING_POPUP rentals are resolved by the host)."""
        appeared = [
            Returned(slot_number=s.number, powerbank_sn=s.powerbank_sn, soc=s.soc)
            for s in self.slots.values()
            if s.powerbank_sn and s.powerbank_sn not in before
        ]
        vanished = before - present
        if appeared or vanished:
            log.info(
                "event=reconcile station_sn=%s appeared=%s vanished=%s",
                self.serial_number,
                [r.powerbank_sn for r in appeared],
                sorted(vanished),
            )
        async with self._settle_lock:
            await self.ports.reconcile(
                self.serial_number, present=present, appeared=appeared, in_flight=self._current
            )

    async def settle_stale(self, older_than: datetime) -> None:
        """Settle PENDING_POPUP rentals older than `older_than` from the holes as we know them now."""
        if not self.ready:
            return
        async with self._settle_lock:
            await self.ports.settle_stale(
                self.serial_number, present=self._banks(), in_flight=self._current, older_than=older_than
            )

    def _on_eject_result(self, result: rentbox.EjectBySnResult) -> None:
        pending = self._pending
        if pending is None or pending.reply.done() or result.sn not in (None, pending.powerbank_sn):
            log.warning(
                "event=unexpected_eject_result station_sn=%s sn=%s state=0x%02X",
                self.serial_number,
                result.sn,
                result.state,
            )
            return
        pending.reply.set_result(result)

    def _on_hole_result(self, result: rentbox.EjectByHoleResult) -> None:
        pending = self._pending_hole
        if pending is None or pending.reply.done() or result.hole != pending.hole:
            log.warning(
                "event=unexpected_hole_eject_result station_sn=%s hole=%s state=0x%02X",
                self.serial_number,
                result.hole,
                result.state,
            )
            return
        pending.reply.set_result(result)

    async def _on_return(self, event: rentbox.ReturnEvent) -> None:
        if not event.success or event.sn is None:
            log.warning(
                "event=return_failed station_sn=%s hole=%s state=0x%02X",
                self.serial_number,
                event.hole,
                event.state,
            )
            return
        slot = self.slots.get(event.hole)
        if slot is None:
            log.warning("event=unknown_hole station_sn=%s hole=%s", self.serial_number, event.hole)
            return
        for other in self.slots.values():  # a bank is in one hole at a time
            if other is not slot and other.powerbank_sn == event.sn:
                other.empty()
        slot.put(event.sn, event.soc)
        self._holes_seen = ()  # our view moved on from the last snapshot: apply the next one
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
        return [s.view(self.config, maintenance=self.maintenance) for s in self.slots.values()]

    async def set_maintenance(self, on: bool) -> None:
        """The operator took the station out of service (or put it back): its slots show MAINTENANCE.
        The counts in `status()` stay what the holes hold; the domain refuses rentals at the station."""
        self.maintenance = on
        log.info("event=kiosk_maintenance station_sn=%s on=%s", self.serial_number, on)
        await self.ports.status_changed(self.status())

    def needs_tick(self, now: float) -> bool:
        """Whether a `Tick` at `now` has work: the cabinet fell silent, or unconfirmed ejects want a check."""
        return self.online and (
            now - self.last_seen > self.config.silence_timeout_s or bool(self._unresolved)
        )

    @property
    def in_flight(self) -> str | None:
        return self._current

    # --- EjectPowerBank ------------------------------------------------------------------------------
    def _best_slot(self, exclude: set[int]) -> Slot | None:
        candidates = [s for s in self.slots.values() if s.number not in exclude and s.rentable(self.config)]
        return max(candidates, key=lambda s: (s.soc or 0, -s.number), default=None)

    async def eject(self, *, request_id: str) -> EjectOutcome:
        """Eject the best power bank for one rental: at most one bank comes out, whatever is lost."""
        if self._waiting >= self.config.eject_queue_limit:
            return KioskBusy(request_id=request_id)
        self._waiting += 1
        try:
            await self._eject_lock.acquire()
        finally:
            self._waiting -= 1
        self._current = request_id
        try:
            started = time.monotonic()
            outcome = await self._eject_best(request_id)
            seconds = time.monotonic() - started
            reason = outcome_reason(outcome)
            if reason not in ("offline", "not_ready", "no_power_bank", "busy", "withdrawn"):
                result = reason if reason in ("success", "timeout", "lost_reply") else "failed"
                metrics.EJECT_SECONDS.labels(result=result).observe(seconds)
            log.info(
                "event=eject_outcome station_sn=%s request_id=%s outcome=%s seconds=%.3f",
                self.serial_number,
                request_id,
                reason,
                seconds,
            )
            await self.ports.status_changed(self.status())
            return outcome
        finally:
            self._current = self._current_sn = None
            self._eject_lock.release()

    async def _eject_best(self, request_id: str) -> EjectOutcome:
        tried: set[int] = set()
        outcome: EjectOutcome = NoPowerBank(request_id=request_id)
        for _ in range(self.config.eject_banks_tried):
            if not self.online:
                return KioskOffline(request_id=request_id) if not tried else outcome
            if not self.ready:
                return KioskNotReady(request_id=request_id) if not tried else outcome
            slot = self._best_slot(tried)
            if slot is None or slot.powerbank_sn is None:
                return outcome
            outcome = await self._eject_slot(slot, slot.powerbank_sn, request_id)
            if not (isinstance(outcome, EjectRefused) and outcome.code in HOLE_FAILURES):
                return outcome
            slot.quarantined_until = time.monotonic() + self.config.slot_quarantine_s
            log.warning(
                "event=hole_quarantined station_sn=%s slot=%s code=0x%02X",
                self.serial_number,
                slot.number,
                outcome.code,
            )
            tried.add(slot.number)
        return outcome

    async def _eject_slot(self, slot: Slot, powerbank_sn: str, request_id: str) -> EjectOutcome:
        slot.reserved = True
        self._current_sn = powerbank_sn
        soc = slot.soc
        async with self._settle_lock:  # never while pending rentals are being settled from the holes
            dispatched = await self.ports.eject_dispatched(request_id, slot.number, powerbank_sn, soc)
        if not dispatched:
            slot.reserved = False
            return RequestWithdrawn(request_id=request_id)

        def ejected(*, reply_lost: bool) -> Ejected:
            self._holes_seen = ()  # our view moved on from the last snapshot: apply the next one
            if slot.powerbank_sn in (powerbank_sn, None):
                slot.empty()
            else:  # a snapshot already shows another bank returned into this hole
                slot.reserved = False
            return Ejected(
                request_id=request_id,
                powerbank_sn=powerbank_sn,
                slot_number=slot.number,
                soc=soc,
                reply_lost=reply_lost,
            )

        for send in (1, 2):  # the command, and at most one retry after a check showed the bank still there
            result, snapshot_seen = await self._send_and_wait(request_id, powerbank_sn)
            if result is not None:
                metrics.EJECT_RESULTS.labels(code=f"0x{result.state:02X}").inc()
                if result.success:
                    return ejected(reply_lost=False)
                if send == 2 and result.state == rentbox.EjectState.SN_NOT_FOUND:
                    return ejected(
                        reply_lost=True
                    )  # the retry finds no such bank: the first command ejected it
                slot.reserved = False
                return EjectRefused(request_id=request_id, code=result.state, slot_number=slot.number)
            if not snapshot_seen:
                # Its fate is unknown: the bank stays reserved, so no other rental can take it, until a
                # snapshot tells whether it came out (see _on_snapshot).
                self._unresolved.add(powerbank_sn)
                return EjectUnconfirmed(request_id=request_id, powerbank_sn=powerbank_sn)
            if slot.powerbank_sn != powerbank_sn:
                return ejected(reply_lost=True)
            log.warning(
                "event=eject_no_reply station_sn=%s request_id=%s send=%s still_in_hole=%s",
                self.serial_number,
                request_id,
                send,
                slot.number,
            )
        slot.reserved = False
        return KioskTimedOut(request_id=request_id)

    def _timestamp(self) -> int:
        """Strictly increasing per cabinet, so no two eject commands are ever the same bytes: a repeated
        payload can then only be a redelivery, which shows in the cabinet's log."""
        self._last_timestamp = max(int(time.time()), self._last_timestamp + 1)
        return self._last_timestamp

    async def _send_and_wait(
        self, request_id: str, powerbank_sn: str
    ) -> tuple[rentbox.EjectBySnResult | None, bool]:
        """Send the eject once and wait for its 0x31; if none comes in time, ask for a snapshot and wait for
        whichever comes first, the snapshot or the late 0x31. Returns (the 0x31 or None, snapshot seen)."""
        reply: asyncio.Future[rentbox.EjectBySnResult] = asyncio.get_running_loop().create_future()
        self._pending = _PendingEject(request_id=request_id, powerbank_sn=powerbank_sn, reply=reply)
        try:
            payload = rentbox.popup_sn(powerbank_sn, timestamp=self._timestamp())
            return await self._send_once_then_check(payload, reply)
        finally:
            self._pending = None

    async def _send_once_then_check(self, payload: bytes, reply: asyncio.Future[R]) -> tuple[R | None, bool]:
        """Publish an eject once and wait for `reply`; if none comes in time, ask for a snapshot and wait for
        whichever comes first, the snapshot or the late reply. Returns (the reply or None, snapshot seen)."""
        metrics.COMMANDS_IN_FLIGHT.inc()
        try:
            await self.ports.publish(self.serial_number, payload)
            await asyncio.wait({reply}, timeout=self.config.eject_timeout_s)
            if reply.done():
                return reply.result(), False
            snapshot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._snapshot_waiters.append(snapshot)
            await self.ports.publish(self.serial_number, rentbox.check())
            either: set[asyncio.Future[Any]] = {reply, snapshot}
            await asyncio.wait(either, timeout=self.config.eject_timeout_s, return_when=FIRST_COMPLETED)
            return (reply.result() if reply.done() else None), snapshot.done()
        finally:
            metrics.COMMANDS_IN_FLIGHT.dec()

    # --- RemoteCommand (operators) ---------------------------------------------------------------------
    async def command(self, request: RemoteCommand) -> CommandOutcome:
        """An operator's command: `check` and `eject_hole` wait for their reply frame (EJECT_TIMEOUT_S);
        the others are done once published to the connected cabinet. Every command is sent once."""
        log.info(
            "event=remote_command station_sn=%s request_id=%s command=%s",
            self.serial_number,
            request.request_id,
            request.command,
        )
        if request.command == "eject_hole":
            return await self._eject_hole(request)
        if not self.online:
            return KioskOffline(request_id=request.request_id)
        if request.command == "check":
            return await self._check(request)
        try:
            payload = _no_reply_payload(request)
        except (rentbox.CommandError, ValueError) as exc:
            return CommandRefused(request_id=request.request_id, reason=str(exc))
        await self.ports.publish(self.serial_number, payload)
        return CommandSent(request_id=request.request_id, command=request.command)

    async def _check(self, request: RemoteCommand) -> CommandOutcome:
        snapshot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append(snapshot)
        await self.ports.publish(self.serial_number, rentbox.check())
        await asyncio.wait({snapshot}, timeout=self.config.eject_timeout_s)
        if not snapshot.done():
            snapshot.cancel()
            return CommandTimedOut(request_id=request.request_id, command="check", detail="no_reply")
        return SnapshotTaken(request_id=request.request_id, slots=tuple(self.slot_views()))

    async def _eject_hole(self, request: RemoteCommand) -> CommandOutcome:
        """Eject whatever one hole holds, under the same discipline as a rental's eject: queued behind
        any eject in flight, sent once at QoS 0, and no reply in time → `check` decides, never a resend."""
        request_id = request.request_id
        slot = self.slots.get(request.hole or 0)
        if slot is None:
            return CommandRefused(request_id=request_id, reason=f"hole must be 1..{len(self.slots)}")
        if not self.online:
            return KioskOffline(request_id=request_id)
        if not self.ready:
            return KioskNotReady(request_id=request_id)
        if self._waiting >= self.config.eject_queue_limit:
            return KioskBusy(request_id=request_id)
        self._waiting += 1
        try:
            await self._eject_lock.acquire()
        finally:
            self._waiting -= 1
        self._current = request_id
        try:
            if not self.online:
                return KioskOffline(request_id=request_id)
            sn = slot.powerbank_sn
            if sn is not None and sn in self._unresolved:
                return CommandRefused(
                    request_id=request_id,
                    reason="its bank awaits an unconfirmed rental eject",
                )
            outcome = await self._eject_hole_once(slot, sn, request_id)
            log.info(
                "event=hole_eject_outcome station_sn=%s request_id=%s hole=%s outcome=%r",
                self.serial_number,
                request_id,
                slot.number,
                outcome,
            )
            await self.ports.status_changed(self.status())
            return outcome
        finally:
            self._current = self._current_sn = None
            self._eject_lock.release()

    async def _eject_hole_once(self, slot: Slot, sn: str | None, request_id: str) -> CommandOutcome:
        if sn is not None:
            slot.reserved = True
            self._current_sn = sn

        def ejected(state: int, *, reply_lost: bool) -> HoleEjected:
            self._holes_seen = ()
            if slot.powerbank_sn in (sn, None):
                slot.empty()
            else:
                slot.reserved = False
            return HoleEjected(
                request_id=request_id,
                hole=slot.number,
                success=True,
                state=state,
                powerbank_sn=sn,
                reply_lost=reply_lost,
            )

        result, snapshot_seen = await self._popup_and_wait(slot.number)
        if result is not None:
            metrics.EJECT_RESULTS.labels(code=f"0x{result.state:02X}").inc()
            if result.success:
                return ejected(result.state, reply_lost=False)
            slot.reserved = False
            return HoleEjected(
                request_id=request_id, hole=slot.number, success=False, state=result.state, powerbank_sn=sn
            )
        if not snapshot_seen:
            if sn is not None:  # its fate is unknown: reserved until a snapshot tells (see _on_snapshot)
                self._unresolved.add(sn)
            return CommandTimedOut(request_id=request_id, command="eject_hole", detail="no_reply_no_snapshot")
        if sn is not None and slot.powerbank_sn != sn:
            return ejected(rentbox.EjectState.SUCCESS, reply_lost=True)
        slot.reserved = False
        detail = "no_reply_bank_still_in_hole" if sn is not None else "no_reply"
        return CommandTimedOut(request_id=request_id, command="eject_hole", detail=detail)

    async def _popup_and_wait(self, hole: int) -> tuple[rentbox.EjectByHoleResult | None, bool]:
        """Send `popup` once and wait for its 0x21; if none comes in time, ask for a snapshot and wait for
        whichever comes first, the snapshot or the late 0x21. Returns (the 0x21 or None, snapshot seen)."""
        reply: asyncio.Future[rentbox.EjectByHoleResult] = asyncio.get_running_loop().create_future()
        self._pending_hole = _PendingHoleEject(hole=hole, reply=reply)
        try:
            return await self._send_once_then_check(rentbox.popup(hole, timestamp=self._timestamp()), reply)
        finally:
            self._pending_hole = None


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


def _no_reply_payload(request: RemoteCommand) -> bytes:
    """The JSON of a command that has no reply frame (rentbox-v1.md section 2)."""
    match request.command:
        case "reboot":
            return rentbox.reboot()
        case "volume" if request.level is not None:
            return rentbox.volume(request.level)
        case "wifi" if request.ssid is not None and request.password is not None:
            return rentbox.set_wifi(request.ssid, request.password)
        case "mode" if request.mode is not None:
            return rentbox.set_mode(request.mode)
        case "firmware_push":
            return rentbox.push_version_publish()
    raise ValueError(f"{request.command} is not a command with these arguments")
