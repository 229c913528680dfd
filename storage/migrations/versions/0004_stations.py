"""station favorites and issue reports

Revision ID: 0004_stations
Revises: 0001
Create Date: 2026-11-28 12:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_stations"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ISSUE_TYPES = (
    "OFFLINE",
    "DAMAGED",
    "DIRTY",
    "LOCATION_WRONG",
    "SLOT_ERROR",
    "AMENITY_ISSUE",
    "NO_POWER_BANK",
    "OTHER",
)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "station_favorites",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("station_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_station_favorites_user_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["station_id"],
            ["stations.id"],
            name=op.f("fk_station_favorites_station_id_stations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_station_favorites")),
        sa.UniqueConstraint("user_id", "station_id", name=op.f("uq_station_favorites_user_id")),
    )
    op.create_table(
        "station_issue_reports",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("station_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("issue_type", sa.Enum(*ISSUE_TYPES, name="stationissuetype"), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.Enum("OPEN", "RESOLVED", name="stationissuestatus"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "char_length(description) <= 1000", name=op.f("ck_station_issue_reports_description_length")
        ),
        sa.ForeignKeyConstraint(
            ["station_id"],
            ["stations.id"],
            name=op.f("fk_station_issue_reports_station_id_stations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_station_issue_reports_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_station_issue_reports")),
    )
    op.create_index(
        "ix_station_issue_reports_user_recent",
        "station_issue_reports",
        ["user_id", "created_at"],
        unique=False,
    )
    op.create_index(
        "ix_station_issue_reports_station_status",
        "station_issue_reports",
        ["station_id", "status"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_station_issue_reports_station_status", table_name="station_issue_reports")
    op.drop_index("ix_station_issue_reports_user_recent", table_name="station_issue_reports")
    op.drop_table("station_issue_reports")
    op.drop_table("station_favorites")
    sa.Enum(name="stationissuestatus").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="stationissuetype").drop(op.get_bind(), checkfirst=True)
