"""What rentals keep beyond their row: late-fee configurations, the charge lines behind every amount,
the issues users report about a rental, and refund requests."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, EntryType, Money, Rental, enum_type

RENTAL_ISSUE_DESCRIPTION_MAX = 1000
REFUND_REASON_MAX = 500


class LateFeeType(enum.StrEnum):
    MULTIPLIER = "MULTIPLIER"  # multiplier * the package's hourly rate, per started late hour
    FLAT_RATE = "FLAT_RATE"  # flat_rate_per_hour per started late hour
    COMPOUND = "COMPOUND"  # both added: (multiplier * hourly rate + flat_rate_per_hour) per started hour


class LateFeeConfiguration(Base):
    """How a late return is charged. Exactly one row is active: a partial unique index allows at most one,
    and a deferred constraint trigger (migration 0005) refuses a commit that leaves none."""

    __tablename__ = "late_fee_configurations"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    fee_type: Mapped[LateFeeType] = mapped_column(enum_type(LateFeeType))
    multiplier: Mapped[Decimal] = mapped_column(Numeric(6, 2), default=Decimal("1.00"))
    flat_rate_per_hour: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    grace_period_minutes: Mapped[int] = mapped_column(Integer, default=0)
    max_daily_rate: Mapped[Decimal | None] = mapped_column(Money)  # cap per 24 h of lateness; None = none
    is_active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index(
            "uq_late_fee_configurations_one_active",
            "is_active",
            unique=True,
            postgresql_where=text("is_active"),
        ),
        CheckConstraint("multiplier >= 0", name="multiplier_nonnegative"),
        CheckConstraint("flat_rate_per_hour >= 0", name="flat_rate_nonnegative"),
        CheckConstraint("grace_period_minutes >= 0", name="grace_nonnegative"),
        CheckConstraint("max_daily_rate IS NULL OR max_daily_rate > 0", name="cap_positive"),
    )


class ChargeKind(enum.StrEnum):
    PACKAGE = "PACKAGE"  # a PREPAID package, paid at activation
    EXTENSION = (
        "EXTENSION"  # an extension (PREPAID: its price; POSTPAID: 0, the minutes are billed at return)
    )
    USAGE = "USAGE"  # POSTPAID minutes, billed at return
    LATE_FEE = "LATE_FEE"
    PENALTY = "PENALTY"  # the lost-bank penalty
    REFUND = "REFUND"  # money given back (cancel window, approved refund): a negative line


ENTRY_TYPE_OF = {
    ChargeKind.PACKAGE: EntryType.RENTAL_CHARGE,
    ChargeKind.EXTENSION: EntryType.RENTAL_CHARGE,
    ChargeKind.USAGE: EntryType.RENTAL_CHARGE,
    ChargeKind.LATE_FEE: EntryType.LATE_FEE,
    ChargeKind.PENALTY: EntryType.PENALTY,
    ChargeKind.REFUND: EntryType.REFUND,
}


class RentalCharge(Base):
    """One line of a rental's bill. `paid` is how much of `amount` has been collected (from the wallet or
    the deposit); what is not is due. A rental's `amount_paid` is the sum of `paid` over its lines (refund
    lines are negative) and its `overdue_amount` the sum of `amount - paid`."""

    __tablename__ = "rental_charges"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ChargeKind] = mapped_column(enum_type(ChargeKind))
    description: Mapped[str] = mapped_column(String(200))
    amount: Mapped[Decimal] = mapped_column(Money)
    paid: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    package_id: Mapped[int | None] = mapped_column(ForeignKey("rental_packages.id"))
    minutes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(
            "(kind = 'REFUND' AND amount < 0 AND paid = amount)"
            " OR (kind <> 'REFUND' AND amount >= 0 AND paid >= 0 AND paid <= amount)",
            name="amounts_consistent",
        ),
    )

    @property
    def entry_type(self) -> EntryType:
        return ENTRY_TYPE_OF[self.kind]

    @property
    def unpaid(self) -> Decimal:
        return self.amount - self.paid if self.kind != ChargeKind.REFUND else Decimal("0.00")


class RentalIssueType(enum.StrEnum):
    POWER_BANK_DAMAGED = "POWER_BANK_DAMAGED"
    POWER_BANK_LOST = "POWER_BANK_LOST"
    CHARGING_ISSUE = "CHARGING_ISSUE"
    RETURN_ISSUE = "RETURN_ISSUE"


class RentalIssueStatus(enum.StrEnum):
    REPORTED = "REPORTED"
    RESOLVED = "RESOLVED"


class RentalIssue(Base):
    __tablename__ = "rental_issues"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    issue_type: Mapped[RentalIssueType] = mapped_column(enum_type(RentalIssueType))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[RentalIssueStatus] = mapped_column(
        enum_type(RentalIssueStatus), default=RentalIssueStatus.REPORTED
    )
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            f"char_length(description) <= {RENTAL_ISSUE_DESCRIPTION_MAX}", name="description_length"
        ),
    )


class RefundStatus(enum.StrEnum):
    REQUESTED = "REQUESTED"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    PROCESSED = "PROCESSED"


class Refund(Base):
    """A user's request to get money paid for a rental back; an operator approves or rejects it, and an
    approved one is processed into REFUND ledger entries exactly once (reference `refund:<id>`)."""

    __tablename__ = "refunds"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id"), index=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    reason: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[RefundStatus] = mapped_column(enum_type(RefundStatus), default=RefundStatus.REQUESTED)
    review_reason: Mapped[str | None] = mapped_column(Text)
    reviewed_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    transfer_id: Mapped[uuid.UUID | None] = mapped_column()
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(f"char_length(reason) <= {REFUND_REASON_MAX}", name="reason_length"),
        # One request under review per rental at a time.
        Index(
            "uq_refunds_one_requested_per_rental",
            "rental_id",
            unique=True,
            postgresql_where=text("status = 'REQUESTED'"),
        ),
    )


# Indexes on `rentals` that serve the jobs over rentals (overdue marking, lost banks, banks coming back).
Index(
    "ix_rentals_open_due_at",
    Rental.status,
    Rental.due_at,
    postgresql_where=text("status IN ('ACTIVE', 'OVERDUE')"),
)
Index(
    "ix_rentals_lost_powerbank",
    Rental.powerbank_sn,
    postgresql_where=text("lost_at IS NOT NULL AND recovered_at IS NULL"),
)
