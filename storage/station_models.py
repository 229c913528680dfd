"""What users keep about stations: their favorites and the issues they report."""

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
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, enum_type

ISSUE_DESCRIPTION_MAX = 1000


class StationIssueType(enum.StrEnum):
    """The first six are the values the existing mobile app sends; the last two are ours."""

    OFFLINE = "OFFLINE"
    DAMAGED = "DAMAGED"
    DIRTY = "DIRTY"
    LOCATION_WRONG = "LOCATION_WRONG"
    SLOT_ERROR = "SLOT_ERROR"
    AMENITY_ISSUE = "AMENITY_ISSUE"
    NO_POWER_BANK = "NO_POWER_BANK"
    OTHER = "OTHER"


class StationIssueStatus(enum.StrEnum):
    OPEN = "OPEN"  # as reported; operators move it on
    RESOLVED = "RESOLVED"


class StationFavorite(Base):
    __tablename__ = "station_favorites"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (UniqueConstraint("user_id", "station_id"),)


class StationIssueReport(Base):
    __tablename__ = "station_issue_reports"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    issue_type: Mapped[StationIssueType] = mapped_column(enum_type(StationIssueType))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[StationIssueStatus] = mapped_column(
        enum_type(StationIssueStatus), default=StationIssueStatus.OPEN
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(f"char_length(description) <= {ISSUE_DESCRIPTION_MAX}", name="description_length"),
        Index("ix_station_issue_reports_user_recent", "user_id", "created_at"),
        Index("ix_station_issue_reports_station_status", "station_id", "status"),
    )
