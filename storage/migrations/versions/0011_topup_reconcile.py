"""Top-up reconciliation: when a PENDING (or locally expired) intent is next checked with its gateway

Revision ID: 0011_topup_reconcile
Revises: 0010_pending_index
Create Date: 2026-12-05 17:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_topup_reconcile"
down_revision: str | Sequence[str] | None = "0010_pending_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("payment_intents", sa.Column("checks", sa.Integer(), server_default="0", nullable=False))
    op.add_column("payment_intents", sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_payment_intents_unsettled",
        "payment_intents",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('PENDING', 'EXPIRED')"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_payment_intents_unsettled",
        table_name="payment_intents",
        postgresql_where=sa.text("status IN ('PENDING', 'EXPIRED')"),
    )
    op.drop_column("payment_intents", "next_check_at")
    op.drop_column("payment_intents", "checks")
