"""payments: wallet top-up intents (Khalti, eSewa, Stripe)

Revision ID: 0002_payments
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_payments"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "payment_intents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("gateway", sa.Enum("khalti", "esewa", "stripe", name="paymentgateway"), nullable=False),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column(
            "status",
            sa.Enum("PENDING", "COMPLETED", "FAILED", "CANCELLED", "EXPIRED", name="paymentintentstatus"),
            nullable=False,
        ),
        sa.Column("gateway_ref", sa.String(length=255), nullable=True),
        sa.Column("gateway_transaction_id", sa.String(length=255), nullable=True),
        sa.Column("failure_reason", sa.String(length=64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_payment_intents_amount_positive")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_payment_intents_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_intents")),
        sa.UniqueConstraint("gateway", "gateway_ref", name="uq_payment_intents_gateway_ref"),
    )
    op.create_index(op.f("ix_payment_intents_user_id"), "payment_intents", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_payment_intents_user_id"), table_name="payment_intents")
    op.drop_table("payment_intents")
    for enum_name in ("paymentintentstatus", "paymentgateway"):
        op.execute(f"DROP TYPE IF EXISTS {enum_name}")
