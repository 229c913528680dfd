"""Operator actions shared by the admin API and the admin web UI: the change, its audit entry, and
what the live fleet must learn of it, in one place; and the `Idempotency-Key` the operators' money
routes require."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Header, Request

from api.deps import CurrentUser, Services, ServicesDep
from api.idempotency import KEY_HEADER, Idempotency, idempotency
from domain import audit, stations
from domain import idempotency as rules
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


async def required_idempotency(
    request: Request,
    services: ServicesDep,
    user: CurrentUser,
    key: Annotated[
        str,
        Header(
            alias=KEY_HEADER,
            description=(
                "Required: the operators' money routes move money once per key. Retries with the same key "
                "and body replay the first response (for IDEMPOTENCY_TTL_S, 24 h by default); the same key "
                f"with another body is 409 `idempotency_key_reused`; ≤ {rules.MAX_KEY_LENGTH} characters."
            ),
        ),
    ],
) -> Idempotency:
    """`api.idempotency` with the key required: without it the request is refused (422 `validation_error`)
    before any work; the key's rules (length → 400) and semantics are that module's.

    An operator's credit or refund has no once-only reference a retry could be recognised by (each call
    is a new movement), so the client names the attempt; the app's user routes keep the key optional."""
    return await idempotency(request, services, user, key)


RequiredIdempotencyDep = Annotated[Idempotency, Depends(required_idempotency)]
