"""Wallet top-ups through the payment gateways (Khalti, eSewa, Stripe): one row per attempt to pay."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, enum_type


class Gateway(enum.StrEnum):
    KHALTI = "khalti"
    ESEWA = "esewa"
    STRIPE = "stripe"


class IntentStatus(enum.StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


class PaymentIntent(Base):
    """A top-up the user started. `gateway_ref` is how the gateway names it: Khalti's pidx, eSewa's
    transaction_uuid (our id), Stripe's PaymentIntent id. COMPLETED exactly when its ledger credit exists."""

    __tablename__ = "payment_intents"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    gateway: Mapped[Gateway] = mapped_column(enum_type(Gateway, "paymentgateway"))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3), default="NPR")
    status: Mapped[IntentStatus] = mapped_column(
        enum_type(IntentStatus, "paymentintentstatus"), default=IntentStatus.PENDING
    )
    gateway_ref: Mapped[str | None] = mapped_column(String(255))
    gateway_transaction_id: Mapped[str | None] = mapped_column(String(255))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # reconciliation (jobs: reconcile_topups): how often the gateway was asked, and when to ask next
    checks: Mapped[int] = mapped_column(Integer, server_default="0", default=0)
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        UniqueConstraint("gateway", "gateway_ref", name="uq_payment_intents_gateway_ref"),
        Index(
            "ix_payment_intents_unsettled",
            "created_at",
            postgresql_where=text("status IN ('PENDING', 'EXPIRED')"),
        ),
    )


class CreditApproval(Base):
    """An operator's wallet credit over their daily cap (STAFF_DAILY_CREDIT_CAP), waiting for a second
    operator. Approved once: its ledger reference is `credit-approval:<id>`."""

    __tablename__ = "credit_approvals"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    reason: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    requested_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    decided_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    decision_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("amount > 0", name="credit_amount_positive"),
        CheckConstraint("status IN ('PENDING', 'APPROVED', 'REJECTED')", name="credit_status_known"),
        Index("ix_credit_approvals_pending", "created_at", postgresql_where=text("status = 'PENDING'")),
    )
