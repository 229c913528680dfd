"""KYC: identity documents a user submits and an operator reviews.

Only where each file is kept (a storage key), its SHA-256, size and detected content type are in the
database, never the bytes. A user has at most one submission PENDING or APPROVED (a partial unique index);
after a rejection they submit again. `users.kyc_status` mirrors the status of their latest submission.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from storage.models import Base, enum_type

KYC_REASON_MAX = 500


class KycStatus(enum.StrEnum):
    NOT_SUBMITTED = "NOT_SUBMITTED"  # a user's status only: no submission has this status
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


class KycDocumentType(enum.StrEnum):
    CITIZENSHIP = "CITIZENSHIP"
    PASSPORT = "PASSPORT"
    DRIVING_LICENSE = "DRIVING_LICENSE"
    NATIONAL_ID = "NATIONAL_ID"


class KycSide(enum.StrEnum):
    FRONT = "front"
    BACK = "back"
    SELFIE = "selfie"


class KycSubmission(Base):
    __tablename__ = "kyc_submissions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    document_type: Mapped[KycDocumentType] = mapped_column(enum_type(KycDocumentType))
    status: Mapped[KycStatus] = mapped_column(enum_type(KycStatus), default=KycStatus.PENDING)
    reason: Mapped[str | None] = mapped_column(String(KYC_REASON_MAX))  # why it was rejected
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reviewed_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))

    documents: Mapped[list[KycDocument]] = relationship(
        lazy="selectin", order_by="KycDocument.id", cascade="all, delete-orphan"
    )

    __table_args__ = (
        CheckConstraint("status <> 'NOT_SUBMITTED'", name="status_submitted"),
        Index(
            "uq_kyc_submissions_open_per_user",
            "user_id",
            unique=True,
            postgresql_where=text("status IN ('PENDING', 'APPROVED')"),
        ),
        Index("ix_kyc_submissions_status_submitted_at", "status", "submitted_at"),
    )


class KycDocument(Base):
    """One uploaded file of a submission: where it is kept and what it was."""

    __tablename__ = "kyc_documents"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    submission_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("kyc_submissions.id", ondelete="CASCADE"), index=True
    )
    side: Mapped[KycSide] = mapped_column(enum_type(KycSide))
    storage_key: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(64))  # detected from the bytes, not as declared

    __table_args__ = (
        UniqueConstraint("submission_id", "side"),
        CheckConstraint("size > 0", name="size_positive"),
    )
