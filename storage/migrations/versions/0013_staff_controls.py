"""Staff controls: a second factor (TOTP secrets) and second-operator approval of large wallet credits

Revision ID: 0013_staff_controls
Revises: 0012_cabinet_credentials
Create Date: 2026-12-05 17:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_staff_controls"
down_revision: str | Sequence[str] | None = "0012_cabinet_credentials"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("totp_secret", sa.String(length=64), nullable=True))
    op.add_column("users", sa.Column("totp_pending_secret", sa.String(length=64), nullable=True))
    op.create_table(
        "credit_approvals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.Uuid(), nullable=False),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("decision_reason", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name=op.f("ck_credit_approvals_credit_amount_positive")),
        sa.CheckConstraint(
            "status IN ('PENDING', 'APPROVED', 'REJECTED')",
            name=op.f("ck_credit_approvals_credit_status_known"),
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_credit_approvals_user_id_users")),
        sa.ForeignKeyConstraint(
            ["requested_by"], ["users.id"], name=op.f("fk_credit_approvals_requested_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["decided_by"], ["users.id"], name=op.f("fk_credit_approvals_decided_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_approvals")),
    )
    op.create_index(
        "ix_credit_approvals_pending",
        "credit_approvals",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'PENDING'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_credit_approvals_pending",
        table_name="credit_approvals",
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.drop_table("credit_approvals")
    op.drop_column("users", "totp_pending_secret")
    op.drop_column("users", "totp_secret")
