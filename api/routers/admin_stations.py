"""Operators: stations (list with live state, detail with live slots, edit, delete, secret rotation,
maintenance) and remote commands to a cabinet. Provisioning is in `admin.py`.

Remote commands: `check` and `eject_hole` wait for their reply frame (0x10 / 0x21) up to
EJECT_TIMEOUT_S; the others have no reply frame and are `sent` once published to the connected
cabinet. Cabinet offline → 503 `station_offline`; no reply in time → 504 `command_timeout` (its
`context.detail` says what is known: `no_reply_bank_still_in_hole` means nothing came out,
`no_reply_no_snapshot` means the hole's fate is unknown until the cabinet next reports). An eject
by hole goes through the kiosk's eject discipline (one in flight per cabinet, sent once at QoS 0,
a lost reply settled by `check`, never by resending).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from actors.host import live_key, read_live
from actors.messages import (
    CommandOutcome,
    CommandRefused,
    CommandSent,
    CommandTimedOut,
    HoleEjected,
    KioskBusy,
    KioskNotReady,
    KioskOffline,
    KioskStatus,
    RemoteCommand,
    SlotView,
    SnapshotTaken,
)
from api import operations
from api.deps import OperatorUser, PagingDep, ServicesDep, SessionDep, request_ip
from api.envelope import Envelope, Page, ok
from api.schemas import MqttCredentialsOut, StationOut
from domain import audit, stations
from domain.errors import (
    CabinetBusy,
    CommandTimeout,
    DomainError,
    StationNotReady,
    StationOffline,
    ValidationFailed,
)
from storage.models import Station

router = APIRouter(prefix="/api/admin/stations", tags=["admin"])
log = logging.getLogger(__name__)

Clock = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM")]


class AdminSlotOut(BaseModel):
    slot_number: int
    status: Literal["AVAILABLE", "OCCUPIED", "MAINTENANCE", "ERROR"]
    state: int  # the hole state byte of the last snapshot
    powerbank_sn: str | None
    battery_level: int | None
    temperature: int | None
    rentable: bool

    @classmethod
    def of(cls, view: SlotView) -> AdminSlotOut:
        return cls(
            slot_number=view.slot_number,
            status=view.status,  # type: ignore[arg-type]
            state=view.state,
            powerbank_sn=view.powerbank_sn,
            battery_level=view.battery_level,
            temperature=view.temperature,
            rentable=view.rentable,
        )


class AdminStationOut(StationOut):
    online: bool
    ready: bool  # connected and has sent its first snapshot
    boards: int
    holes_per_board: int
    created_at: datetime
    credentials_issued_at: datetime | None  # by the boot call (/api/iot/client/con) ...
    credentials_issued_ip: str | None  # ... to this client IP
    first_connected_at: datetime | None  # first MQTT login: from then on the boot call needs a window
    reprovision_until: datetime | None  # an open re-provisioning window

    @classmethod
    def build(cls, station: Station, live: KioskStatus | None) -> AdminStationOut:
        return cls(
            **StationOut.of(station, live).model_dump(),
            online=live is not None and live.online,
            ready=live is not None and live.ready,
            boards=station.boards,
            holes_per_board=station.holes_per_board,
            created_at=station.created_at,
            credentials_issued_at=station.credentials_issued_at,
            credentials_issued_ip=station.credentials_issued_ip,
            first_connected_at=station.first_connected_at,
            reprovision_until=station.reprovision_until,
        )


class AdminStationDetailOut(AdminStationOut):
    slots: list[AdminSlotOut]


class StationPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    address: str | None = Field(default=None, max_length=255)
    latitude: float | None = Field(default=None, ge=-90, le=90, allow_inf_nan=False)
    longitude: float | None = Field(default=None, ge=-180, le=180, allow_inf_nan=False)
    opening_time: Clock | None = None
    closing_time: Clock | None = None


class MaintenanceIn(BaseModel):
    on: bool


class SecretOut(BaseModel):
    serial_number: str
    mqtt: MqttCredentialsOut


class DeletedOut(BaseModel):
    serial_number: str
    deleted: bool


class CommandIn(BaseModel):
    command: Literal["check", "eject_hole", "reboot", "volume", "wifi", "mode", "firmware_push"]
    hole: int | None = Field(default=None, ge=1, le=80)
    level: int | None = Field(default=None, ge=0, le=100)
    ssid: str | None = Field(default=None, min_length=1, max_length=64)
    password: str | None = Field(default=None, max_length=128)
    mode: Literal["wifi", "4g"] | None = None

    @model_validator(mode="after")
    def needs_arguments(self) -> CommandIn:
        needed = {
            "eject_hole": ("hole",),
            "volume": ("level",),
            "wifi": ("ssid", "password"),
            "mode": ("mode",),
        }
        missing = [name for name in needed.get(self.command, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.command} needs {', '.join(missing)}")
        return self

    def audited(self) -> dict[str, Any]:
        """The arguments as the audit log keeps them: the Wi-Fi password never."""
        args = self.model_dump(exclude_none=True, exclude={"command"})
        if "password" in args:
            args["password"] = "***"
        return args


class CommandResultOut(BaseModel):
    request_id: str
    command: str
    status: Literal["sent", "answered"]  # sent: no reply frame exists; answered: its reply came
    slots: list[AdminSlotOut] | None = None  # check
    hole: int | None = None  # eject_hole
    success: bool | None = None
    state: str | None = None  # the 0x21 state byte, e.g. "0x01"
    powerbank_sn: str | None = None
    reply_lost: bool | None = None  # the 0x21 was lost; a snapshot showed the hole emptied


@router.get("")
async def list_stations(
    operator: OperatorUser, svc: ServicesDep, session: SessionDep, paging: PagingDep
) -> Envelope[Page[AdminStationOut]]:
    """Every station, with the live summary its kiosk host keeps (online, ready, slot counts)."""
    rows, count = await stations.list_page(session, page=paging.page, page_size=paging.page_size)
    live = await read_live(svc.redis, [s.serial_number for s in rows])
    results = [AdminStationOut.build(s, live.get(s.serial_number)) for s in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/{serial_number}")
async def station_detail(
    serial_number: str, operator: OperatorUser, svc: ServicesDep, session: SessionDep
) -> Envelope[AdminStationDetailOut]:
    station = await stations.by_serial(session, serial_number)
    status = await svc.fleet.status(serial_number)
    views = await svc.fleet.slots(serial_number) or []
    item = AdminStationOut.build(station, status)
    return ok(AdminStationDetailOut(**item.model_dump(), slots=[AdminSlotOut.of(v) for v in views]))


@router.patch("/{serial_number}")
async def update_station(
    serial_number: str, body: StationPatch, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[AdminStationOut]:
    """Change name, address, position or opening hours; a moved station moves in the geo index."""
    changes = body.model_dump(exclude_unset=True)
    for name in ("name", "latitude", "longitude"):
        if name in changes and changes[name] is None:
            raise ValidationFailed(f"{name} cannot be null.", context={"field": name})
    async with svc.db.transaction() as session:
        station = await stations.by_serial(session, serial_number, lock=True)
        before = audit.snapshot(station, operations.STATION_AUDIT_FIELDS)
        station = await stations.update(session, serial_number, **changes)
        await audit.record(
            session,
            actor=operator,
            action="station.updated",
            target_type="station",
            target_id=serial_number,
            before=before,
            after=audit.snapshot(station, operations.STATION_AUDIT_FIELDS),
            ip=request_ip(request),
        )
    if "latitude" in changes or "longitude" in changes:
        async with svc.db.transaction() as session:
            await stations.sync_geo_index(session, svc.redis, live_key=live_key)
    live = await svc.fleet.status(serial_number)
    return ok(AdminStationOut.build(station, live), "Station updated.")


@router.delete("/{serial_number}")
async def delete_station(
    serial_number: str, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[DeletedOut]:
    """Refused (409) while the station has open rentals, or once it has any rental history. A cabinet still
    connected is disconnected at once, and refused when it reconnects (its credentials are gone)."""
    async with svc.db.transaction() as session:
        station = await stations.by_serial(session, serial_number, lock=True)
        before = audit.snapshot(station, operations.STATION_AUDIT_FIELDS)
        await stations.delete_station(session, serial_number)
        await audit.record(
            session,
            actor=operator,
            action="station.deleted",
            target_type="station",
            target_id=serial_number,
            before=before,
            ip=request_ip(request),
        )
    # After the commit (a reconnect is refused from now on): the kiosk goes, then the connection, so no
    # status of the dead kiosk is written after its live summary was removed.
    await svc.fleet.remove(serial_number)
    disconnected = await svc.fleet.disconnect(serial_number)
    log.info(
        "event=station_deleted station_sn=%s operator=%s disconnected=%s",
        serial_number,
        operator.id,
        disconnected,
    )
    async with svc.db.transaction() as session:
        await stations.sync_geo_index(session, svc.redis, live_key=live_key)
    return ok(DeletedOut(serial_number=serial_number, deleted=True), "Station deleted.")


@router.post("/{serial_number}/rotate-secret")
async def rotate_secret(
    serial_number: str, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[SecretOut]:
    """A new MQTT password, shown only now. A connected session is closed at once (after the commit, so its
    reconnect meets the new password): whoever held it, cabinet or impostor, must log in again."""
    async with svc.db.transaction() as session:
        secret = await stations.rotate_secret(session, serial_number)
        await audit.record(
            session,
            actor=operator,
            action="station.secret_rotated",
            target_type="station",
            target_id=serial_number,
            ip=request_ip(request),
        )
    await svc.fleet.disconnect(serial_number)
    mqtt = MqttCredentialsOut(
        host=svc.settings.public_mqtt_host,
        port=svc.settings.mqtt_port,
        username=serial_number,
        password=secret,
        product_key=svc.settings.mqtt_product_key,
    )
    return ok(
        SecretOut(serial_number=serial_number, mqtt=mqtt), "New secret: the password is shown only now."
    )


class ReprovisionOut(BaseModel):
    serial_number: str
    reprovision_until: datetime
    disconnected: bool  # a live MQTT session was closed


@router.post("/{serial_number}/reprovision")
async def reprovision(
    serial_number: str, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[ReprovisionOut]:
    """Open a re-provisioning window (`REPROVISION_WINDOW_S`): the cabinet's next boot call within it gets new
    MQTT credentials, once (a cabinet that has logged in before gets none otherwise). Any live session is
    closed now, so that no one holding it can answer for the cabinet. Audited."""
    until = datetime.now(UTC) + timedelta(seconds=svc.settings.reprovision_window_s)
    async with svc.db.transaction() as session:
        await stations.open_reprovision_window(session, serial_number, until=until)
        await audit.record(
            session,
            actor=operator,
            action="station.reprovision_opened",
            target_type="station",
            target_id=serial_number,
            after={"reprovision_until": until.isoformat()},
            ip=request_ip(request),
        )
    disconnected = await svc.fleet.disconnect(serial_number)
    out = ReprovisionOut(serial_number=serial_number, reprovision_until=until, disconnected=disconnected)
    return ok(out, "Re-provisioning window open: reboot the cabinet now.")


@router.post("/{serial_number}/maintenance")
async def set_maintenance(
    serial_number: str, body: MaintenanceIn, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[AdminStationOut]:
    station = await operations.set_maintenance(
        svc, serial_number=serial_number, on=body.on, actor=operator, ip=request_ip(request)
    )
    live = await svc.fleet.status(serial_number)
    return ok(
        AdminStationOut.build(station, live),
        "Station under maintenance." if body.on else "Station in service.",
    )


@router.post("/{serial_number}/commands")
async def remote_command(
    serial_number: str, body: CommandIn, operator: OperatorUser, svc: ServicesDep, request: Request
) -> Envelope[CommandResultOut]:
    """Send a command to the cabinet and report its result; every command is audited, whatever its fate."""
    async with svc.db.transaction() as session:
        station = await stations.by_serial(session, serial_number)
        total = station.boards * station.holes_per_board
    if body.hole is not None and body.hole > total:
        raise ValidationFailed(f"hole must be 1..{total}.", context={"hole": body.hole, "total_slots": total})
    request_id = str(uuid.uuid4())
    outcome = await svc.fleet.command(
        serial_number,
        RemoteCommand(
            request_id=request_id,
            command=body.command,
            hole=body.hole,
            level=body.level,
            ssid=body.ssid,
            password=body.password,
            mode=body.mode,
        ),
    )
    result, error = _result(body.command, request_id, outcome)
    async with svc.db.transaction() as session:
        await audit.record(
            session,
            actor=operator,
            action=f"station.command.{body.command}",
            target_type="station",
            target_id=serial_number,
            after={
                "request_id": request_id,
                "command": body.command,
                "args": body.audited(),
                "result": result.model_dump(exclude_none=True, exclude={"slots"})
                if result is not None
                else {"error": error.code if error else None, **(error.context if error else {})},
            },
            ip=request_ip(request),
        )
    if error is not None:
        raise error
    assert result is not None
    return ok(result)


def _result(
    command: str, request_id: str, outcome: CommandOutcome
) -> tuple[CommandResultOut | None, DomainError | None]:
    context: dict[str, Any] = {"request_id": request_id, "command": command}
    match outcome:
        case CommandSent():
            return CommandResultOut(request_id=request_id, command=command, status="sent"), None
        case SnapshotTaken(slots=slots):
            out = CommandResultOut(
                request_id=request_id,
                command=command,
                status="answered",
                slots=[AdminSlotOut.of(v) for v in slots],
            )
            return out, None
        case HoleEjected():
            out = CommandResultOut(
                request_id=request_id,
                command=command,
                status="answered",
                hole=outcome.hole,
                success=outcome.success,
                state=f"0x{outcome.state:02X}",
                powerbank_sn=outcome.powerbank_sn,
                reply_lost=outcome.reply_lost,
            )
            return out, None
        case CommandTimedOut(detail=detail):
            return None, CommandTimeout(context={**context, "detail": detail})
        case CommandRefused(reason=reason):
            return None, ValidationFailed(f"The cabinet cannot take this command: {reason}.", context=context)
        case KioskOffline():
            return None, StationOffline(context=context)
        case KioskNotReady():
            return None, StationNotReady(context=context)
        case KioskBusy():
            return None, CabinetBusy(context=context)
