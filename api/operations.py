"""Operator actions shared by the admin API and the admin web UI: the change, its audit entry, and
what the live fleet must learn of it, in one place."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import Services
from domain import audit, passwords, stations
from domain.errors import Forbidden, NotFound
from storage.models import Role, Station, User

log = logging.getLogger(__name__)
USER_AUDIT_FIELDS = ("role", "is_active")
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


async def update_user(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    role: Role | None,
    is_active: bool | None,
    actor: User,
    ip: str | None,
) -> User:
    """Change a user's role or active flag, audited. Only an admin acts on an admin, changes roles (never
    their own) or (de)activates staff; nobody deactivates themself; a user demoted to `user` loses their
    /admin password. (An operator deactivated admins and other operators, and nothing but SQL brought an
    admin back; `powerbank admin create` now re-activates.)"""
    user = await session.get(User, user_id, with_for_update=True)
    if user is None:
        raise NotFound("User not found.", context={"user_id": str(user_id)})
    if actor.role != Role.ADMIN:
        if user.role == Role.ADMIN:
            raise Forbidden("Only an admin may change an admin.", context={"user_id": str(user_id)})
        if is_active is not None and is_active != user.is_active and user.role in passwords.STAFF_ROLES:
            raise Forbidden("Only an admin may (de)activate staff.", context={"user_id": str(user_id)})
    if role is not None and role != user.role:
        if actor.role != Role.ADMIN:
            raise Forbidden("Only an admin may change roles.", context={"user_id": str(user_id)})
        if user.id == actor.id:
            raise Forbidden("You cannot change your own role.", context={"user_id": str(user_id)})
    if is_active is False and user.id == actor.id:
        raise Forbidden("You cannot deactivate yourself.", context={"user_id": str(user_id)})
    before = audit.snapshot(user, USER_AUDIT_FIELDS)
    if role is not None:
        user.role = role
    if is_active is not None:
        user.is_active = is_active
    if user.role not in passwords.STAFF_ROLES:
        user.password_hash = None  # only operators and admins have a password
    await session.flush()
    await audit.record(
        session,
        actor=actor,
        action="user.updated",
        target_type="user",
        target_id=user.id,
        before=before,
        after=audit.snapshot(user, USER_AUDIT_FIELDS),
        ip=ip,
    )
    return user
