"""Cabinet credentials: when and to which IP the boot call issued them, first MQTT login, re-provisioning window

Revision ID: 0012_cabinet_credentials
Revises: 0011_topup_reconcile
Create Date: 2026-12-05 17:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_cabinet_credentials"
down_revision: str | Sequence[str] | None = "0011_topup_reconcile"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("credentials_issued_at", "credentials_issued_ip", "first_connected_at", "reprovision_until")


def upgrade() -> None:
    op.add_column("stations", sa.Column("credentials_issued_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("stations", sa.Column("credentials_issued_ip", sa.String(length=45), nullable=True))
    op.add_column("stations", sa.Column("first_connected_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("stations", sa.Column("reprovision_until", sa.DateTime(timezone=True), nullable=True))
    # stations that already exist have connected, or will be re-provisioned by an operator if they cannot
    op.execute("UPDATE stations SET first_connected_at = created_at")


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_column("stations", column)
