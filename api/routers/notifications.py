"""In-app notifications (the caller's own, paged, with the unread count) and push device registration."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import status as http_status
from pydantic import BaseModel, Field

from api.deps import CurrentUser, PagingDep, SessionDep
from api.envelope import Envelope, Page, ok
from domain import notifications
from storage.notification_models import TOKEN_MAX, Notification, NotificationKind, Platform

router = APIRouter(prefix="/api/notifications", tags=["notifications"])


class NotificationOut(BaseModel):
    id: uuid.UUID
    kind: NotificationKind
    title: str
    body: str
    data: dict[str, str]
    is_read: bool
    read_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: Notification) -> NotificationOut:
        return cls(
            id=row.id,
            kind=row.kind,
            title=row.title,
            body=row.body,
            data=dict(row.data or {}),
            is_read=row.read_at is not None,
            read_at=row.read_at,
            created_at=row.created_at,
        )


class NotificationPageOut(Page[NotificationOut]):
    unread_count: int


class ReadAllOut(BaseModel):
    updated: int
    unread_count: int


class DeviceIn(BaseModel):
    token: str = Field(min_length=1, max_length=TOKEN_MAX)
    platform: Platform


class DeviceOut(BaseModel):
    token: str
    platform: Platform
    registered: bool


@router.get("")
async def list_notifications(
    user: CurrentUser,
    session: SessionDep,
    paging: PagingDep,
    unread_only: Annotated[bool, Query(description="only notifications not read yet")] = False,
) -> Envelope[NotificationPageOut]:
    """The caller's notifications, newest first; `unread_count` counts all unread ones (a badge)."""
    found = await notifications.page(
        session, user_id=user.id, page=paging.page, page_size=paging.page_size, unread_only=unread_only
    )
    return ok(
        NotificationPageOut(
            results=[NotificationOut.of(row) for row in found.rows],
            count=found.count,
            page=paging.page,
            page_size=paging.page_size,
            unread_count=found.unread,
        )
    )


@router.post("/read-all")
async def read_all(user: CurrentUser, session: SessionDep) -> Envelope[ReadAllOut]:
    updated = await notifications.mark_all_read(session, user_id=user.id, now=datetime.now(UTC))
    return ok(ReadAllOut(updated=updated, unread_count=0), "All notifications marked read.")


@router.post("/{notification_id}/read")
async def read_one(
    notification_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> Envelope[NotificationOut]:
    row = await notifications.mark_read(
        session, user_id=user.id, notification_id=notification_id, now=datetime.now(UTC)
    )
    return ok(NotificationOut.of(row))


@router.post("/devices", status_code=http_status.HTTP_201_CREATED)
async def register_device(body: DeviceIn, user: CurrentUser, session: SessionDep) -> Envelope[DeviceOut]:
    """Register this device's push token (FCM registration token) for the caller."""
    device = await notifications.register_device(
        session, user_id=user.id, token=body.token, platform=body.platform, now=datetime.now(UTC)
    )
    return ok(DeviceOut(token=device.token, platform=device.platform, registered=True), "Device registered.")


@router.delete("/devices")
async def unregister_device(body: DeviceIn, user: CurrentUser, session: SessionDep) -> Envelope[DeviceOut]:
    """Stop pushes to this token (on logout). Idempotent: an unknown token answers `registered: false` too."""
    await notifications.unregister_device(session, user_id=user.id, token=body.token)
    return ok(DeviceOut(token=body.token, platform=body.platform, registered=False), "Device removed.")
