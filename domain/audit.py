"""Audit log of operator actions: written in the same transaction as the change it describes."""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.audit_models import AuditEntry
from storage.models import User

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """JSON-safe copy: Decimal → "12.50", enums → value, datetimes → ISO 8601, UUID → str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def snapshot(obj: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The named attributes of a model, JSON-safe: the `before`/`after` of an entry."""
    return {name: _plain(getattr(obj, name)) for name in fields}


async def record(
    session: AsyncSession,
    *,
    actor: User,
    action: str,
    target_type: str,
    target_id: object,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    ip: str | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor_id=actor.id,
        actor_role=actor.role.value,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        before=_plain(before) if before is not None else None,
        after=_plain(after) if after is not None else None,
        ip=ip,
    )
    session.add(entry)
    await session.flush()
    log.info("event=audit action=%s target=%s:%s actor=%s", action, target_type, target_id, actor.id)
    return entry


async def page(
    session: AsyncSession,
    *,
    page: int,
    page_size: int,
    target_type: str | None = None,
    target_id: str | None = None,
    actor_id: uuid.UUID | None = None,
) -> tuple[Sequence[AuditEntry], int]:
    """Newest first, optionally for one target or one actor."""
    query = select(AuditEntry)
    if target_type is not None:
        query = query.where(AuditEntry.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditEntry.target_id == target_id)
    if actor_id is not None:
        query = query.where(AuditEntry.actor_id == actor_id)
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    rows = await session.scalars(
        query.order_by(AuditEntry.id.desc()).offset((page - 1) * page_size).limit(page_size)
    )
    return rows.all(), total or 0
