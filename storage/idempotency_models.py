"""The durable record of an `Idempotency-Key`: one row per (user, endpoint, key)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base

MAX_KEY_LENGTH = 255  # Stripe's limit; longer keys are refused with 400


class IdempotencyKey(Base):
    """A request taken under a key: in flight while `locked_at` is set, finished once `response_status` is.

    The unique (user_id, endpoint, key) is what `INSERT … ON CONFLICT` races on, so two concurrent first
    requests cannot both run. `response_body` is the exact JSON text sent, replayed byte for byte.
    """

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(200))  # "POST /api/rentals/start" (the route template)
    key: Mapped[str] = mapped_column(String(MAX_KEY_LENGTH))
    request_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the canonical request
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSON)
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("user_id", "endpoint", "key", name="uq_idempotency_keys_scope"),
        CheckConstraint("(locked_at IS NULL) = (response_status IS NOT NULL)", name="locked_or_finished"),
    )
