"""Kiosk actor logic without Ray or MQTT: a scripted cabinet answers through the kiosk's ports."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

import rentbox
from actors.kiosk import HTTP_UPLOAD, Kiosk, KioskConfig, Returned
from actors.messages import (
    CabinetConnected,
    CabinetSubscribed,
    Ejected,
    EjectRefused,
    EjectUnconfirmed,
    FrameReceived,
    KioskBusy,
    KioskStatus,
    KioskTimedOut,
    NoPowerBank,
    RemoteCommand,
    RequestWithdrawn,
    SlotView,
    SnapshotTaken,
    Tick,
)

CONFIG = KioskConfig(
    eject_timeout_s=0.3, min_soc=20, max_temperature_c=60, eject_queue_limit=1, silence_timeout_s=5
)


@dataclass
class Bank:
    sn: str
    soc: int = 90
    temperature: int = 30
    state: int = 1


@dataclass
class ScriptedCabinet:
    """Answers the kiosk like a cabinet would, with switches for what goes wrong."""

    holes: dict[int, Bank | None]
    eject: bool = True  # the bank physically comes out
    reply: bool = True  # the 0x31 is sent
    code: int = 1  # the 0x31 state byte when the bank does not come out
    answer_check: bool = True
    refuse: frozenset[str] = frozenset()  # these banks do not come out: answered with `code`
    hold: asyncio.Event | None = None  # replies wait for this
    popup_seen: asyncio.Event = field(default_factory=asyncio.Event)
    reconciling: asyncio.Event = field(default_factory=asyncio.Event)
    hold_reconcile: asyncio.Event | None = None  # reconcile waits for this
    kiosk: Kiosk | None = None
    commands: list[dict[str, str]] = field(default_factory=list)
    returned: list[tuple[int, str]] = field(default_factory=list)
    reconciled: list[tuple[set[str], list[Returned], str | None]] = field(default_factory=list)
    dispatched: list[tuple[str, int, str]] = field(default_factory=list)

    def snapshot(self) -> bytes:
        holes = []
        for number, bank in sorted(self.holes.items()):
            holes.append(
                rentbox.HoleInfo(
                    hole=number,
                    board=1,
                    state=bank.state if bank else 0,
                    current=0.0,
                    voltage=0.0,
                    area=0,
                    sn=bank.sn if bank else None,
                    soc=bank.soc if bank else 0,
                    temperature=bank.temperature if bank else 0,
                    charge_voltage=0.0,
                    charge_current=0.0,
                    software_version=1,
                    sensor=0 if bank else 0x80,
                )
            )
        board = rentbox.BoardInfo(index=1, temperature=25, software_version=1, hardware_version=1)
        return rentbox.encode(rentbox.Snapshot(boards=(board,), holes=tuple(holes)))

    def send(self, frame: bytes) -> None:
        assert self.kiosk is not None
        self.kiosk.tell(FrameReceived(kind="update", payload=frame))

    async def _later(self, frame: bytes) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.send(frame)

    # --- KioskPorts -------------------------------------------------------------------------------------
    async def publish(self, serial_number: str, payload: bytes) -> None:
        command = rentbox.parse_command(payload)
        self.commands.append(command)
        if command["cmd"] == "check" and self.answer_check:
            asyncio.get_running_loop().create_task(self._later(self.snapshot()))
        if command["cmd"] == "popup_sn":
            self.popup_seen.set()
            hole = next((h for h, b in self.holes.items() if b and b.sn == command["data"]), None)
            state = 0xFC
            if hole is not None:
                comes_out = self.eject and command["data"] not in self.refuse
                state = 1 if comes_out else self.code
                if comes_out:
                    self.holes[hole] = None
            if self.reply:
                result = rentbox.EjectBySnResult(hole=hole or 0, sn=command["data"], state=state)
                asyncio.get_running_loop().create_task(self._later(rentbox.encode(result)))

    async def eject_dispatched(
        self, request_id: str, slot_number: int, powerbank_sn: str, soc: int | None
    ) -> bool:
        self.dispatched.append((request_id, slot_number, powerbank_sn))
        return request_id != "withdrawn"

    async def snapshot_received(self, serial_number: str, slots: list[SlotView]) -> None:
        pass

    async def powerbank_returned(
        self, serial_number: str, slot_number: int, powerbank_sn: str, soc: int
    ) -> None:
        self.returned.append((slot_number, powerbank_sn))

    async def reconcile(
        self, serial_number: str, *, present: set[str], appeared: list[Returned], in_flight: str | None
    ) -> None:
        self.reconciling.set()
        if self.hold_reconcile is not None:
            await self.hold_reconcile.wait()
        self.reconciled.append((present, appeared, in_flight))

    async def settle_stale(
        self, serial_number: str, *, present: set[str], in_flight: str | None, older_than: datetime
    ) -> None:
        self.reconciled.append((present, [], in_flight))

    async def status_changed(self, status: KioskStatus) -> None:
        pass


async def ready_kiosk(cabinet: ScriptedCabinet, config: KioskConfig = CONFIG, **kw: Any) -> Kiosk:
    kiosk = Kiosk(
        serial_number="K1", boards=1, holes_per_board=len(cabinet.holes), config=config, ports=cabinet, **kw
    )
    cabinet.kiosk = kiosk
    kiosk.tell(CabinetConnected())
    kiosk.tell(CabinetSubscribed())  # → check → snapshot
    async with asyncio.timeout(2):
        while not kiosk.ready:
            await kiosk.drained()
            await asyncio.sleep(0)
    return kiosk


def popups(cabinet: ScriptedCabinet) -> list[str]:
    return [c["data"] for c in cabinet.commands if c["cmd"] == "popup_sn"]


async def test_eject_takes_the_fullest_bank_once() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111", soc=50), 2: Bank("22222222", soc=95), 3: None})
    kiosk = await ready_kiosk(cabinet)
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == Ejected(request_id="r1", powerbank_sn="22222222", slot_number=2, soc=95)
    assert popups(cabinet) == ["22222222"]
    assert cabinet.dispatched == [("r1", 2, "22222222")]
    assert kiosk.slots[2].powerbank_sn is None
    assert json.loads(rentbox.popup_sn("1", timestamp=5)) == {
        "cmd": "popup_sn",
        "data": "1",
        "timestamp": "5",
    }


async def test_lost_reply_is_detected_by_a_check_not_by_sending_again() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")}, reply=False)
    kiosk = await ready_kiosk(cabinet)
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == Ejected(
        request_id="r1", powerbank_sn="11111111", slot_number=1, soc=90, reply_lost=True
    )
    assert popups(cabinet) == ["11111111"]
    assert [c["cmd"] for c in cabinet.commands][-2:] == ["popup_sn", "check"]


async def test_no_reply_and_bank_still_there_retries_once_then_times_out() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")}, eject=False, reply=False)
    kiosk = await ready_kiosk(cabinet)
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == KioskTimedOut(request_id="r1")
    assert popups(cabinet) == ["11111111", "11111111"]
    first, second = (c for c in cabinet.commands if c["cmd"] == "popup_sn")
    assert "timestamp" in first and "timestamp" in second
    assert kiosk.slots[1].rentable(CONFIG)  # the reservation is released


async def test_hole_failure_quarantines_the_hole_and_tries_the_next_bank() -> None:
    cabinet = ScriptedCabinet(
        {1: Bank("11111111", soc=99), 2: Bank("22222222", soc=80)}, refuse=frozenset({"11111111"}), code=0x11
    )
    kiosk = await ready_kiosk(cabinet)
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == Ejected(request_id="r1", powerbank_sn="22222222", slot_number=2, soc=80)
    assert popups(cabinet) == ["11111111", "22222222"]
    assert not kiosk.slots[1].rentable(CONFIG)
    assert kiosk.slot_views()[0].status == "ERROR"


async def test_cabinet_level_failure_is_not_retried_on_another_bank() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: Bank("22222222")}, eject=False, code=0xFE)
    kiosk = await ready_kiosk(cabinet)
    outcome = await kiosk.eject(request_id="r1")
    assert isinstance(outcome, EjectRefused) and outcome.code == 0xFE
    assert len(popups(cabinet)) == 1


async def test_no_reply_and_no_snapshot_is_unconfirmed() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")}, reply=False)
    kiosk = await ready_kiosk(cabinet)
    cabinet.answer_check = False
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == EjectUnconfirmed(request_id="r1", powerbank_sn="11111111")
    assert len(popups(cabinet)) == 1


async def test_faulty_and_hot_banks_are_never_chosen() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111", state=0x04), 2: Bank("22222222", temperature=65), 3: None})
    kiosk = await ready_kiosk(cabinet)
    assert await kiosk.eject(request_id="r1") == NoPowerBank(request_id="r1")
    assert popups(cabinet) == []


async def test_a_full_queue_answers_busy() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: Bank("22222222"), 3: Bank("33333333")})
    kiosk = await ready_kiosk(cabinet)
    cabinet.hold = asyncio.Event()
    first = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r1"))
    second = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r2"))
    await asyncio.wait_for(cabinet.popup_seen.wait(), 2)  # r1 is in flight, so r2 is queued behind it
    assert await kiosk.eject(request_id="r3") == KioskBusy(request_id="r3")
    cabinet.hold.set()
    results = await asyncio.gather(first, second)
    assert all(isinstance(r, Ejected) for r in results)
    assert len(set(popups(cabinet))) == 2


async def test_a_return_during_an_eject_is_handled() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet)
    cabinet.hold = asyncio.Event()
    eject = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r1"))
    await asyncio.wait_for(cabinet.popup_seen.wait(), 2)
    cabinet.send(
        rentbox.encode(
            rentbox.ReturnEvent(board=1, hole=2, area=0, sn="99999999", state=1, software_version=1, soc=70)
        )
    )
    await kiosk.drained()
    assert cabinet.returned == [(2, "99999999")]
    cabinet.hold.set()
    assert isinstance(await eject, Ejected)
    assert kiosk.slots[2].powerbank_sn == "99999999" and kiosk.slots[1].powerbank_sn is None


async def test_a_silent_cabinet_goes_offline_and_comes_back_when_it_talks() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")})
    kiosk = await ready_kiosk(cabinet)
    kiosk.tell(Tick(now=kiosk.last_seen + CONFIG.silence_timeout_s + 1))
    await kiosk.drained()
    assert not kiosk.online and not kiosk.ready
    heartbeat = rentbox.encode(rentbox.Heartbeat(board=0x10, text="CSQ:27;BP:0"))
    cabinet.send(heartbeat)
    async with asyncio.timeout(2):
        while not kiosk.ready:  # it came back: a check was sent and answered
            await kiosk.drained()
            await asyncio.sleep(0)
    assert kiosk.online


async def test_reconnect_reconciles_appeared_and_vanished_banks() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None, 3: Bank("33333333")})
    kiosk = Kiosk(
        serial_number="K1",
        boards=1,
        holes_per_board=3,
        config=CONFIG,
        ports=cabinet,
        known={1: ("11111111", 90), 2: ("22222222", 80)},  # what the database last knew
    )
    cabinet.kiosk = kiosk
    kiosk.tell(CabinetConnected())
    kiosk.tell(CabinetSubscribed())
    async with asyncio.timeout(2):
        while not cabinet.reconciled:
            await kiosk.drained()
            await asyncio.sleep(0)
    (present, appeared, in_flight) = cabinet.reconciled[0]
    assert present == {"11111111", "33333333"}
    assert appeared == [Returned(slot_number=3, powerbank_sn="33333333", soc=90)]
    assert in_flight is None


@pytest.mark.parametrize("payload", [b"", b"\xa8\x00", b"\xa8\x00\x05\x99\x00", bytes(range(40))])
async def test_invalid_frames_change_nothing(payload: bytes) -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")})
    kiosk = await ready_kiosk(cabinet)
    before = kiosk.slot_views()
    cabinet.send(payload)
    await kiosk.drained()
    assert kiosk.slot_views() == before and kiosk.ready


async def test_a_request_settled_elsewhere_is_not_sent() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")})
    kiosk = await ready_kiosk(cabinet)
    assert await kiosk.eject(request_id="withdrawn") == RequestWithdrawn(request_id="withdrawn")
    assert popups(cabinet) == [] and kiosk.slots[1].rentable(CONFIG)


async def test_a_late_reply_during_the_check_is_taken_as_the_answer() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111")}, answer_check=False)
    kiosk = Kiosk(
        serial_number="K1",
        boards=1,
        holes_per_board=1,
        config=CONFIG,
        ports=cabinet,
    )
    cabinet.kiosk = kiosk
    kiosk.online = kiosk.ready = True
    kiosk.slots[1].put("11111111", 90)
    cabinet.hold = asyncio.Event()
    eject = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r1"))
    await asyncio.wait_for(cabinet.popup_seen.wait(), 2)
    async with asyncio.timeout(2):
        while not any(c["cmd"] == "check" for c in cabinet.commands):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the reply timed out and a check went out: now the late 0x31 arrives
    cabinet.hold.set()
    assert await eject == Ejected(request_id="r1", powerbank_sn="11111111", slot_number=1, soc=90)
    assert popups(cabinet) == ["11111111"]


async def test_no_two_eject_commands_are_the_same_bytes() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet)
    for n in range(3):  # the same bank out and back within one second
        assert isinstance(await kiosk.eject(request_id=f"r{n}"), Ejected)
        cabinet.holes[1] = Bank("11111111")
        cabinet.send(
            rentbox.encode(
                rentbox.ReturnEvent(
                    board=1, hole=1, area=0, sn="11111111", state=1, software_version=1, soc=90
                )
            )
        )
        await kiosk.drained()
    sent = [json.dumps(c, sort_keys=True) for c in cabinet.commands if c["cmd"] == "popup_sn"]
    assert len(sent) == 3 == len(set(sent))


async def test_a_retry_answered_sn_not_found_means_the_first_command_ejected() -> None:
    """The first command arrived late: the check still saw the bank, then it came out; the retry finds no
    such bank (0xFC). That is the first eject, not a failure to move past to another bank."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: Bank("22222222", soc=50)}, eject=False, reply=False)
    kiosk = await ready_kiosk(cabinet)
    answer = cabinet.publish

    async def late_first_command(serial_number: str, payload: bytes) -> None:
        if rentbox.parse_command(payload)["cmd"] == "popup_sn" and popups(cabinet):  # the retry
            cabinet.holes[1], cabinet.reply = None, True
        await answer(serial_number, payload)

    cabinet.publish = late_first_command  # type: ignore[method-assign]
    outcome = await kiosk.eject(request_id="r1")
    assert outcome == Ejected(
        request_id="r1", powerbank_sn="11111111", slot_number=1, soc=90, reply_lost=True
    )
    assert popups(cabinet) == ["11111111", "11111111"]  # never the second bank


async def test_no_eject_is_recorded_while_pending_rentals_are_settled_from_the_holes() -> None:
    """A rental whose eject is sent during a reconcile must not be judged by holes seen before it was sent."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet)
    cabinet.hold_reconcile, cabinet.reconciling = asyncio.Event(), asyncio.Event()
    cabinet.holes[2] = Bank("22222222")  # a bank appeared: this snapshot is reconciled
    cabinet.send(cabinet.snapshot())
    await asyncio.wait_for(cabinet.reconciling.wait(), 2)
    eject = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r1"))
    await asyncio.sleep(0.05)  # ample for the eject to reach its dispatch (no I/O in this test)
    assert cabinet.dispatched == []  # held back until the settling is done
    cabinet.hold_reconcile.set()
    assert isinstance(await eject, Ejected)
    assert [d[0] for d in cabinet.dispatched] == ["r1"]


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("strict", [True, False])
async def test_a_bad_checksum_is_rejected_only_with_strict_checksum(strict: bool) -> None:
    """STRICT_CHECKSUM on: a frame whose checksum is wrong changes nothing and is counted as invalid.
    Off (the default, as the vendor's own example frames carry wrong checksums): it is applied, and counted
    as a mismatch."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet, replace(CONFIG, strict_checksum=strict))
    frame = rentbox.encode(
        rentbox.ReturnEvent(board=1, hole=2, area=0, sn="99999999", state=1, software_version=1, soc=70)
    )
    corrupt = frame[:-1] + bytes([(frame[-1] + 1) & 0xFF])
    assert rentbox.decode(corrupt).checksum_ok is False  # only the checksum is wrong
    invalid = counted("powerbank_invalid_frames_total", reason="bad_checksum")
    dropped = counted("powerbank_mqtt_dropped_total", reason="invalid_frame")
    mismatches = counted("powerbank_checksum_mismatches_total")
    returns = counted("powerbank_frames_total", cmd="0x40")
    before = kiosk.slot_views()

    cabinet.send(corrupt)
    await kiosk.drained()

    if strict:
        assert kiosk.slot_views() == before and kiosk.slots[2].powerbank_sn is None
        assert cabinet.returned == []
        assert counted("powerbank_invalid_frames_total", reason="bad_checksum") == invalid + 1
        assert counted("powerbank_mqtt_dropped_total", reason="invalid_frame") == dropped + 1
        assert counted("powerbank_checksum_mismatches_total") == mismatches
        assert counted("powerbank_frames_total", cmd="0x40") == returns
    else:
        assert kiosk.slots[2].powerbank_sn == "99999999"
        assert cabinet.returned == [(2, "99999999")]
        assert counted("powerbank_checksum_mismatches_total") == mismatches + 1
        assert counted("powerbank_frames_total", cmd="0x40") == returns + 1
        assert counted("powerbank_invalid_frames_total", reason="bad_checksum") == invalid
    # Either way the cabinet is still trusted: the next good frame is applied.
    cabinet.send(frame)
    await kiosk.drained()
    assert kiosk.slots[2].powerbank_sn == "99999999" and kiosk.ready


def checks(cabinet: ScriptedCabinet) -> int:
    return sum(c["cmd"] == "check" for c in cabinet.commands)


def post_over_http(kiosk: Kiosk, frame: bytes) -> None:
    kiosk.tell(FrameReceived(kind=HTTP_UPLOAD, payload=frame))


async def test_an_http_snapshot_is_a_hint_answered_by_a_check_over_mqtt() -> None:
    """Anyone can post a 0x10 over HTTP: one showing a rented bank back changes nothing by itself; the
    cabinet is asked `check` over MQTT (at most once per interval) and only its answer is applied."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet)
    forged = replace(cabinet, holes={1: Bank("11111111"), 2: Bank("22222222")}).snapshot()
    before, reconciled, sent = kiosk.slot_views(), len(cabinet.reconciled), checks(cabinet)
    hinted = counted("powerbank_firmware_uploads_ignored_total", reason="check_sent")
    throttled = counted("powerbank_firmware_uploads_ignored_total", reason="check_throttled")
    cabinet.hold = asyncio.Event()  # the cabinet's answer waits: first see what the hint alone did

    post_over_http(kiosk, forged)
    await kiosk.drained()

    assert kiosk.slot_views() == before and kiosk.ready
    assert cabinet.returned == [] and len(cabinet.reconciled) == reconciled
    assert checks(cabinet) == sent + 1
    assert counted("powerbank_firmware_uploads_ignored_total", reason="check_sent") == hinted + 1
    post_over_http(kiosk, forged)  # again within the interval: no second check
    await kiosk.drained()
    assert checks(cabinet) == sent + 1
    assert counted("powerbank_firmware_uploads_ignored_total", reason="check_throttled") == throttled + 1

    cabinet.hold.set()  # the truthful answer (hole 2 is empty) comes before that of this operator check
    assert isinstance(await kiosk.command(RemoteCommand(request_id="c1", command="check")), SnapshotTaken)
    await kiosk.drained()
    assert kiosk.slot_views() == before and cabinet.returned == []

    cabinet.holes[2] = Bank("22222222")  # now it is really there: the next answer is applied as a return
    kiosk._last_upload_check = float("-inf")  # the interval has passed
    post_over_http(kiosk, forged)
    async with asyncio.timeout(2):
        while kiosk.slots[2].powerbank_sn is None:
            await kiosk.drained()
            await asyncio.sleep(0.01)
    assert cabinet.reconciled[-1][1] == [Returned(slot_number=2, powerbank_sn="22222222", soc=90)]


async def test_replies_and_returns_posted_over_http_change_nothing() -> None:
    """A forged 0x31 does not answer the eject in flight, a forged 0x40 is no return; neither asks a check."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = await ready_kiosk(cabinet)
    cabinet.hold = asyncio.Event()
    eject = asyncio.get_running_loop().create_task(kiosk.eject(request_id="r1"))
    await asyncio.wait_for(cabinet.popup_seen.wait(), 2)
    refused = counted("powerbank_firmware_uploads_ignored_total", reason="not_snapshot")
    sent = checks(cabinet)

    post_over_http(kiosk, rentbox.encode(rentbox.EjectBySnResult(hole=1, sn="11111111", state=0xFE)))
    post_over_http(
        kiosk,
        rentbox.encode(
            rentbox.ReturnEvent(board=1, hole=2, area=0, sn="99999999", state=1, software_version=1, soc=70)
        ),
    )
    await kiosk.drained()

    assert not eject.done() and cabinet.returned == [] and kiosk.slots[2].powerbank_sn is None
    assert checks(cabinet) == sent
    assert counted("powerbank_firmware_uploads_ignored_total", reason="not_snapshot") == refused + 2
    cabinet.hold.set()  # the real 0x31 decides
    assert await eject == Ejected(request_id="r1", powerbank_sn="11111111", slot_number=1, soc=90)


async def test_an_http_snapshot_for_a_cabinet_not_connected_is_only_counted() -> None:
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: None})
    kiosk = Kiosk(serial_number="K1", boards=1, holes_per_board=2, config=CONFIG, ports=cabinet)
    cabinet.kiosk = kiosk
    offline = counted("powerbank_firmware_uploads_ignored_total", reason="cabinet_offline")

    post_over_http(kiosk, cabinet.snapshot())
    await kiosk.drained()

    assert cabinet.commands == [] and cabinet.reconciled == []
    assert all(s.powerbank_sn is None for s in kiosk.slots.values()) and not kiosk.online
    assert counted("powerbank_firmware_uploads_ignored_total", reason="cabinet_offline") == offline + 1


async def test_a_repeated_snapshot_is_not_applied_again_until_the_kiosk_view_moves_on() -> None:
    """The same 0x10 again (a periodic upload of unchanged holes) costs nothing; after an eject the
    kiosk's view differs from the last snapshot, so the same bytes are applied (and reconciled) again."""
    cabinet = ScriptedCabinet({1: Bank("11111111"), 2: Bank("22222222")})
    kiosk = await ready_kiosk(cabinet)
    same = cabinet.snapshot()
    reconciled = len(cabinet.reconciled)
    for _ in range(3):
        cabinet.send(same)
    await kiosk.drained()
    assert len(cabinet.reconciled) == reconciled  # nothing new: no reconciliation asked
    assert await kiosk.eject(request_id="r1") == Ejected(
        request_id="r1", powerbank_sn="11111111", slot_number=1, soc=90
    )
    cabinet.send(same)  # a stale snapshot that still shows bank 1: it must be looked at
    await kiosk.drained()
    assert kiosk.slots[1].powerbank_sn == "11111111"
    assert len(cabinet.reconciled) == reconciled + 1
