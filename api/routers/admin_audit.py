"""Operators: the audit log of operator actions, newest first."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import OperatorUser, PagingDep, SessionDep
from api.envelope import Envelope, Page, ok
from domain import audit
from storage.audit_models import AuditEntry

router = APIRouter(prefix="/api/admin/audit", tags=["admin"])


class AuditEntryOut(BaseModel):
    id: int
    actor_id: uuid.UUID | None
    actor_role: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    ip: str | None
    created_at: datetime

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditEntryOut:
        return cls(
            id=entry.id,
            actor_id=entry.actor_id,
            actor_role=entry.actor_role,
            action=entry.action,
            target_type=entry.target_type,
            target_id=entry.target_id,
            before=entry.before,
            after=entry.after,
            ip=entry.ip,
            created_at=entry.created_at,
        )


@router.get("")
async def audit_log(
    operator: OperatorUser,
    session: SessionDep,
    paging: PagingDep,
    target_type: Annotated[str | None, Query(max_length=32)] = None,
    target_id: Annotated[str | None, Query(max_length=64)] = None,
    actor_id: uuid.UUID | None = None,
) -> Envelope[Page[AuditEntryOut]]:
    rows, count = await audit.page(
        session,
        page=paging.page,
        page_size=paging.page_size,
        target_type=target_type,
        target_id=target_id,
        actor_id=actor_id,
    )
    results = [AuditEntryOut.of(e) for e in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))
