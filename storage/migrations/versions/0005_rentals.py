"""rentals complete: late fees, charge lines, deposits, lost banks, issues, refunds

Revision ID: 0005_rentals
Revises: 0001
Create Date: 2026-11-28 14:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from config.settings import Settings

# revision identifiers, used by Alembic.
revision: str = "0005_rentals"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('ACTIVE', 'OVERDUE')"


def upgrade() -> None:
    """Upgrade schema."""
    # New enum values are only added here; their first use (the HOLD account, a REFUNDED rental) comes
    # later, in another transaction, as PostgreSQL requires.
    op.execute("ALTER TYPE accountkind ADD VALUE IF NOT EXISTS 'HOLD'")
    op.execute("ALTER TYPE paymentstatus ADD VALUE IF NOT EXISTS 'REFUNDED'")

    op.add_column(
        "rental_packages",
        sa.Column("deposit_amount", sa.Numeric(precision=12, scale=2), server_default="0", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_rental_packages_deposit_nonnegative"), "rental_packages", "deposit_amount >= 0"
    )
    for name in ("overdue_at", "lost_at", "recovered_at"):
        op.add_column("rentals", sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.add_column("rentals", sa.Column("extension_count", sa.Integer(), server_default="0", nullable=False))
    for name in ("deposit_amount", "deposit_captured"):
        op.add_column(
            "rentals",
            sa.Column(name, sa.Numeric(precision=12, scale=2), server_default="0", nullable=False),
        )
    op.create_index(
        "ix_rentals_open_due_at",
        "rentals",
        ["status", "due_at"],
        unique=False,
        postgresql_where=sa.text(OPEN),
    )
    op.create_index(
        "ix_rentals_lost_powerbank",
        "rentals",
        ["powerbank_sn"],
        unique=False,
        postgresql_where=sa.text("lost_at IS NOT NULL AND recovered_at IS NULL"),
    )
    op.add_column("power_banks", sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "late_fee_configurations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "fee_type", sa.Enum("MULTIPLIER", "FLAT_RATE", "COMPOUND", name="latefeetype"), nullable=False
        ),
        sa.Column("multiplier", sa.Numeric(precision=6, scale=2), nullable=False),
        sa.Column("flat_rate_per_hour", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("grace_period_minutes", sa.Integer(), nullable=False),
        sa.Column("max_daily_rate", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "max_daily_rate IS NULL OR max_daily_rate > 0",
            name=op.f("ck_late_fee_configurations_cap_positive"),
        ),
        sa.CheckConstraint(
            "flat_rate_per_hour >= 0", name=op.f("ck_late_fee_configurations_flat_rate_nonnegative")
        ),
        sa.CheckConstraint(
            "grace_period_minutes >= 0", name=op.f("ck_late_fee_configurations_grace_nonnegative")
        ),
        sa.CheckConstraint("multiplier >= 0", name=op.f("ck_late_fee_configurations_multiplier_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_late_fee_configurations")),
    )
    op.create_index(
        "uq_late_fee_configurations_one_active",
        "late_fee_configurations",
        ["is_active"],
        unique=True,
        postgresql_where=sa.text("is_active"),
    )
    # At most one active: the index above. At least one: checked when the transaction commits.
    op.execute(
        """
        CREATE FUNCTION late_fee_configurations_one_active() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM late_fee_configurations WHERE is_active) <> 1 THEN
                RAISE EXCEPTION 'exactly one late-fee configuration must be active'
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE CONSTRAINT TRIGGER late_fee_configurations_one_active"
        " AFTER INSERT OR UPDATE OR DELETE ON late_fee_configurations"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION late_fee_configurations_one_active()"
    )
    # The starting configuration charges what the walking skeleton did: LATE_FEE_PER_HOUR's default per
    # started hour, no grace, no cap. Operators add and activate others.
    flat = Settings.model_fields["late_fee_per_hour"].default
    op.execute(
        sa.text(
            "INSERT INTO late_fee_configurations (name, fee_type, multiplier, flat_rate_per_hour,"
            " grace_period_minutes, max_daily_rate, is_active)"
            " VALUES ('Standard', 'FLAT_RATE', 1.00, :flat, 0, NULL, true)"
        ).bindparams(flat=flat)
    )

    op.create_table(
        "rental_charges",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("rental_id", sa.Uuid(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("PACKAGE", "EXTENSION", "USAGE", "LATE_FEE", "PENALTY", "REFUND", name="chargekind"),
            nullable=False,
        ),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("paid", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=True),
        sa.Column("minutes", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "(kind = 'REFUND' AND amount < 0 AND paid = amount)"
            " OR (kind <> 'REFUND' AND amount >= 0 AND paid >= 0 AND paid <= amount)",
            name=op.f("ck_rental_charges_amounts_consistent"),
        ),
        sa.ForeignKeyConstraint(
            ["package_id"], ["rental_packages.id"], name=op.f("fk_rental_charges_package_id_rental_packages")
        ),
        sa.ForeignKeyConstraint(
            ["rental_id"],
            ["rentals.id"],
            name=op.f("fk_rental_charges_rental_id_rentals"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rental_charges")),
    )
    op.create_index(op.f("ix_rental_charges_rental_id"), "rental_charges", ["rental_id"], unique=False)
    # Rentals charged before bills were itemised get one line for what they cost, so refunds and
    # pay-due work on them. Rentals still running are billed at return as before (see rentals._assess_end).
    op.execute(
        "INSERT INTO rental_charges (rental_id, kind, description, amount, paid, package_id)"
        " SELECT id, 'PACKAGE', 'Rental charges', amount_paid + overdue_amount, amount_paid, package_id"
        " FROM rentals WHERE amount_paid + overdue_amount > 0"
    )

    op.create_table(
        "rental_issues",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("rental_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column(
            "issue_type",
            sa.Enum(
                "POWER_BANK_DAMAGED",
                "POWER_BANK_LOST",
                "CHARGING_ISSUE",
                "RETURN_ISSUE",
                name="rentalissuetype",
            ),
            nullable=False,
        ),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.Enum("REPORTED", "RESOLVED", name="rentalissuestatus"), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "char_length(description) <= 1000", name=op.f("ck_rental_issues_description_length")
        ),
        sa.ForeignKeyConstraint(
            ["rental_id"], ["rentals.id"], name=op.f("fk_rental_issues_rental_id_rentals"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_rental_issues_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rental_issues")),
    )
    op.create_index(op.f("ix_rental_issues_rental_id"), "rental_issues", ["rental_id"], unique=False)

    op.create_table(
        "refunds",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("rental_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("REQUESTED", "APPROVED", "REJECTED", "PROCESSED", name="refundstatus"),
            nullable=False,
        ),
        sa.Column("review_reason", sa.Text(), nullable=True),
        sa.Column("reviewed_by", sa.Uuid(), nullable=True),
        sa.Column("transfer_id", sa.Uuid(), nullable=True),
        sa.Column(
            "requested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint("char_length(reason) <= 500", name=op.f("ck_refunds_reason_length")),
        sa.ForeignKeyConstraint(["rental_id"], ["rentals.id"], name=op.f("fk_refunds_rental_id_rentals")),
        sa.ForeignKeyConstraint(["reviewed_by"], ["users.id"], name=op.f("fk_refunds_reviewed_by_users")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_refunds_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
    )
    op.create_index(op.f("ix_refunds_rental_id"), "refunds", ["rental_id"], unique=False)
    op.create_index(op.f("ix_refunds_user_id"), "refunds", ["user_id"], unique=False)
    op.create_index(
        "uq_refunds_one_requested_per_rental",
        "refunds",
        ["rental_id"],
        unique=True,
        postgresql_where=sa.text("status = 'REQUESTED'"),
    )


def downgrade() -> None:
    """Downgrade schema. The enum values added to accountkind and paymentstatus stay (PostgreSQL cannot
    drop an enum value); nothing uses them once the code is downgraded."""
    op.drop_table("refunds")
    op.drop_table("rental_issues")
    op.drop_table("rental_charges")
    op.execute("DROP TRIGGER IF EXISTS late_fee_configurations_one_active ON late_fee_configurations")
    op.execute("DROP FUNCTION IF EXISTS late_fee_configurations_one_active()")
    op.drop_table("late_fee_configurations")
    for enum_name in ("refundstatus", "rentalissuestatus", "rentalissuetype", "chargekind", "latefeetype"):
        op.execute(f"DROP TYPE IF EXISTS {enum_name}")
    op.drop_column("power_banks", "lost_at")
    op.drop_index("ix_rentals_lost_powerbank", table_name="rentals")
    op.drop_index("ix_rentals_open_due_at", table_name="rentals")
    for name in (
        "deposit_captured",
        "deposit_amount",
        "extension_count",
        "recovered_at",
        "lost_at",
        "overdue_at",
    ):
        op.drop_column("rentals", name)
    op.drop_constraint(op.f("ck_rental_packages_deposit_nonnegative"), "rental_packages", type_="check")
    op.drop_column("rental_packages", "deposit_amount")
