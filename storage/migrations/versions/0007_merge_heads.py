"""Merge the branches of 0002-0006 into one head, so new migrations have one parent.

Revision ID: 0007_merge
Revises: 0002_payments, 0003_idempotency, 0004_stations, 0005_rentals, 0006_notifications
"""

from collections.abc import Sequence

revision: str = "0007_merge"
down_revision: str | Sequence[str] | None = (
    "0002_payments",
    "0003_idempotency",
    "0004_stations",
    "0005_rentals",
    "0006_notifications",
)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
