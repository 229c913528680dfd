"""Notifications: the in-app row, its outbox of deliveries (push, SMS), and users' push device tokens."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, enum_type

TITLE_MAX = 120
BODY_MAX = 1000
TOKEN_MAX = 4096  # FCM registration tokens are ~160 characters today; Google documents no bound
KEY_MAX = 200


class NotificationKind(enum.StrEnum):
    RENTAL_STARTED = "RENTAL_STARTED"
    RENTAL_RETURNED = "RENTAL_RETURNED"
    RENTAL_OVERDUE = "RENTAL_OVERDUE"
    EJECT_FAILED = "EJECT_FAILED"
    TOPUP_CREDITED = "TOPUP_CREDITED"
    REFUND_PROCESSED = "REFUND_PROCESSED"


class Channel(enum.StrEnum):
    PUSH = "PUSH"
    SMS = "SMS"


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"  # due at next_attempt_at
    SENDING = "SENDING"  # claimed by a worker (committed before the send: never sent twice)
    SENT = "SENT"
    FAILED = "FAILED"  # gave up: attempts exhausted, refused, token unregistered, or interrupted


class Platform(enum.StrEnum):
    ANDROID = "android"
    IOS = "ios"
    WEB = "web"


class DeviceToken(Base):
    """A push registration token of a user's device. A token names one app install, so it belongs to one
    user at a time: registering it under another user moves it (the previous user's pushes stop)."""

    __tablename__ = "device_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token: Mapped[str] = mapped_column(String(TOKEN_MAX), unique=True)
    platform: Mapped[Platform] = mapped_column(enum_type(Platform, "deviceplatform"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Notification(Base):
    """What the user sees in the app's list. `key` (optional) makes `notify` idempotent per user."""

    __tablename__ = "notifications"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[NotificationKind] = mapped_column(enum_type(NotificationKind, "notificationkind"))
    title: Mapped[str] = mapped_column(String(TITLE_MAX))
    body: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    key: Mapped[str | None] = mapped_column(String(KEY_MAX))
    read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index("ix_notifications_user_recent", "user_id", "created_at"),
        Index("ix_notifications_user_unread", "user_id", postgresql_where=text("read_at IS NULL")),
        Index(
            "uq_notifications_user_key",
            "user_id",
            "key",
            unique=True,
            postgresql_where=text("key IS NOT NULL"),
        ),
    )


class NotificationDelivery(Base):
    """One send of a notification over one channel (the outbox). A push delivery names the device; when
    the device is removed (unregistered, or its token moved to another user) `device_id` becomes NULL and
    the delivery is given up rather than sent."""

    __tablename__ = "notification_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    notification_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[Channel] = mapped_column(enum_type(Channel, "notificationchannel"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("device_tokens.id", ondelete="SET NULL"))
    status: Mapped[DeliveryStatus] = mapped_column(
        enum_type(DeliveryStatus, "deliverystatus"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index(
            "ix_notification_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'PENDING'")
        ),
        Index(
            "ix_notification_deliveries_claimed", "claimed_at", postgresql_where=text("status = 'SENDING'")
        ),
        Index("ix_notification_deliveries_device_id", "device_id"),
    )
