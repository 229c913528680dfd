"""PENDING_POPUP rentals by station: a partial index (connect storms and the reconciler look them up)

Revision ID: 0010_pending_index
Revises: 0009_kyc
Create Date: 2026-12-05 13:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_pending_index"
down_revision: str | Sequence[str] | None = "0009_kyc"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_rentals_pending_by_station",
        "rentals",
        ["station_id"],
        unique=False,
        postgresql_where=sa.text("status = 'PENDING_POPUP'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_rentals_pending_by_station",
        table_name="rentals",
        postgresql_where=sa.text("status = 'PENDING_POPUP'"),
    )
