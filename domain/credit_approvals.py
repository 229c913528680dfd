"""Large operator credits need a second operator.

An operator may credit wallets up to STAFF_DAILY_CREDIT_CAP in any 24 hours (the sum of their
`wallet.credited` audit entries); a credit that would pass it is not made but recorded as a PENDING
approval, which another operator or admin approves (the credit is then made, once: its ledger reference is
`credit-approval:<id>`) or rejects. Each step is audited by the caller. Two credits by the same operator at
once are serialised (an advisory lock per operator), so they cannot both slip under the cap.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Numeric, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from domain import wallet
from domain.errors import Forbidden, InvalidState, NotFound
from storage.audit_models import AuditEntry
from storage.models import EntryType, User
from storage.payment_models import CreditApproval

WINDOW = timedelta(hours=24)


async def credited_today(session: AsyncSession, operator: User, *, now: datetime) -> Decimal:
    """What `operator` credited in the last 24 hours, with their later credits held until this transaction
    ends (the advisory lock)."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"credit-cap:{operator.id}"))))
    total = await session.scalar(
        select(
            func.coalesce(func.sum(cast(AuditEntry.after["amount"].as_string(), Numeric(12, 2))), 0)
        ).where(
            AuditEntry.actor_id == operator.id,
            AuditEntry.action == "wallet.credited",
            AuditEntry.created_at > now - WINDOW,
        )
    )
    return Decimal(total or 0)


async def request(
    session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, reason: str, operator: User
) -> CreditApproval:
    approval = CreditApproval(user_id=user_id, amount=amount, reason=reason, requested_by=operator.id)
    session.add(approval)
    await session.flush()
    return approval


async def pending(session: AsyncSession) -> list[CreditApproval]:
    rows = await session.scalars(
        select(CreditApproval).where(CreditApproval.status == "PENDING").order_by(CreditApproval.created_at)
    )
    return list(rows)


async def _open(session: AsyncSession, approval_id: uuid.UUID, decider: User) -> CreditApproval:
    approval = await session.get(CreditApproval, approval_id, with_for_update=True)
    if approval is None:
        raise NotFound("No such credit approval.", context={"approval_id": str(approval_id)})
    if approval.status != "PENDING":
        raise InvalidState(
            f"This credit was {approval.status.lower()} already.", context={"status": approval.status}
        )
    if approval.requested_by == decider.id:
        raise Forbidden("A second operator must decide on your own credit.")
    return approval


async def approve(session: AsyncSession, approval_id: uuid.UUID, *, decider: User) -> wallet.Movement:
    approval = await _open(session, approval_id, decider)
    movement = await wallet.credit(
        session,
        user_id=approval.user_id,
        amount=approval.amount,
        type=EntryType.TOPUP,
        reference=f"credit-approval:{approval.id}",
    )
    approval.status, approval.decided_by, approval.decided_at = "APPROVED", decider.id, datetime.now(UTC)
    return movement


async def reject(
    session: AsyncSession, approval_id: uuid.UUID, *, decider: User, reason: str
) -> CreditApproval:
    approval = await _open(session, approval_id, decider)
    approval.status, approval.decided_by, approval.decided_at = "REJECTED", decider.id, datetime.now(UTC)
    approval.decision_reason = reason
    return approval
