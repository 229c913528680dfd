"""Operator actions shared by the admin API and the admin web UI: the change, its audit entry, and
what the live fleet must learn of it, in one place."""

from __future__ import annotations

import logging

from api.deps import Services
from domain import audit, stations
from storage.models import Station, User

log = logging.getLogger(__name__)
STATION_AUDIT_FIELDS = (
    "serial_number",
    "name",
    "address",
    "latitude",
    "longitude",
    "status",
    "opening_time",
    "closing_time",
)


async def set_maintenance(
    svc: Services, *, serial_number: str, on: bool, actor: User, ip: str | None = None
) -> Station:
    async with svc.db.transaction() as session:
        station = await stations.by_serial(session, serial_number, lock=True)
        before = audit.snapshot(station, STATION_AUDIT_FIELDS)
        station = await stations.set_maintenance(session, serial_number, on=on)
        await audit.record(
            session,
            actor=actor,
            action="station.maintenance_on" if on else "station.maintenance_off",
            target_type="station",
            target_id=serial_number,
            before=before,
            after=audit.snapshot(station, STATION_AUDIT_FIELDS),
            ip=ip,
        )
    # After the commit: the database is the truth (a restarted host reads it); the live kiosk follows.
    told = await svc.fleet.set_maintenance(serial_number, on)
    if not told:
        log.warning("event=maintenance_not_told station_sn=%s on=%s", serial_number, on)
    return station
