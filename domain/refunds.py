"""Refund requests: REQUESTED → APPROVED → PROCESSED, or REQUESTED → REJECTED.

A user asks for (part of) what they paid for a rental back; an operator approves or rejects it with a
reason. Approval processes the refund in the same transaction: REFUND ledger entries (revenue → wallet)
with reference `refund:<id>`, so it moves money exactly once, and a negative line on the rental's bill.
The money refundable for a rental is what it has paid (net of earlier refunds) minus what requests
still under review or approved ask for; one request per rental is under review at a time (a partial
unique index). Cancelling inside the cancel window needs no request: `rentals.cancel` refunds itself.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from domain import notifications, rentals, wallet
from domain.errors import InvalidState, NotFound, ValidationFailed
from domain.pricing import money
from storage.models import Rental, RentalStatus
from storage.rental_models import Refund, RefundStatus

log = logging.getLogger(__name__)

PENDING = (RefundStatus.REQUESTED, RefundStatus.APPROVED)


async def refundable(session: AsyncSession, rental: Rental) -> Decimal:
    """What may still be asked back for this rental."""
    asked = await session.scalar(
        select(func.coalesce(func.sum(Refund.amount), 0)).where(
            Refund.rental_id == rental.id, Refund.status.in_(PENDING)
        )
    )
    return money(max(Decimal("0.00"), rental.amount_paid - Decimal(asked or 0)))


async def _refundable_amount(session: AsyncSession, rental: Rental, amount: Decimal) -> Decimal:
    """`amount` rounded to money, if the rental is completed and can still refund that much."""
    if rental.status != RentalStatus.COMPLETED:
        raise InvalidState(
            "Refunds are for completed rentals.",
            context={"rental_id": str(rental.id), "status": rental.status.value},
        )
    amount = money(amount)
    available = await refundable(session, rental)
    if amount > available:
        raise ValidationFailed(
            "The amount is more than this rental can refund.",
            context={"amount": str(amount), "refundable": str(available)},
        )
    return amount


async def request(
    session: AsyncSession, *, user_id: uuid.UUID, rental_id: uuid.UUID, amount: Decimal, reason: str
) -> Refund:
    rental = await rentals.owned(session, rental_id, user_id, lock=True)
    amount = await _refundable_amount(session, rental, amount)
    refund = Refund(
        user_id=user_id,
        rental_id=rental.id,
        amount=amount,
        reason=reason,
        status=RefundStatus.REQUESTED,
        requested_at=datetime.now(UTC),
    )
    try:
        async with session.begin_nested():  # the savepoint first: begin_nested flushes what is pending
            session.add(refund)
            await session.flush()
    except IntegrityError as exc:
        raise InvalidState(
            "A refund request for this rental is already waiting for review.",
            context={"rental_id": str(rental.id)},
        ) from exc
    log.info("event=refund_requested refund_id=%s rental_id=%s amount=%s", refund.id, rental.id, amount)
    return refund


async def mine(
    session: AsyncSession, user_id: uuid.UUID, *, page: int, page_size: int
) -> tuple[list[Refund], int]:
    where = Refund.user_id == user_id
    count = await session.scalar(select(func.count()).select_from(Refund).where(where)) or 0
    rows = await session.scalars(
        select(Refund)
        .where(where)
        .order_by(Refund.requested_at.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.all()), count


async def listing(
    session: AsyncSession, *, status: RefundStatus | None, page: int, page_size: int
) -> tuple[list[Refund], int]:
    """For operators: every request, or those in one status; oldest first (the review queue)."""
    where = [Refund.status == status] if status is not None else []
    count = await session.scalar(select(func.count()).select_from(Refund).where(*where)) or 0
    rows = await session.scalars(
        select(Refund)
        .where(*where)
        .order_by(Refund.requested_at)
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.all()), count


async def _locked(session: AsyncSession, refund_id: uuid.UUID) -> Refund:
    refund = await session.get(Refund, refund_id, with_for_update=True)
    if refund is None:
        raise NotFound("Refund not found.", context={"refund_id": str(refund_id)})
    return refund


def _must_be(refund: Refund, status: RefundStatus) -> None:
    if refund.status != status:
        raise InvalidState(
            f"This refund is {refund.status.value}, not {status.value}.",
            context={"refund_id": str(refund.id), "status": refund.status.value},
        )


async def approve(
    session: AsyncSession, *, refund_id: uuid.UUID, operator_id: uuid.UUID, reason: str
) -> Refund:
    """REQUESTED → APPROVED → PROCESSED (the money moves now)."""
    refund = await _locked(session, refund_id)
    _must_be(refund, RefundStatus.REQUESTED)
    refund.status = RefundStatus.APPROVED
    refund.review_reason = reason
    refund.reviewed_by = operator_id
    refund.reviewed_at = datetime.now(UTC)
    await session.flush()
    await process(session, refund_id=refund.id)
    log.info("event=refund_approved refund_id=%s operator=%s", refund.id, operator_id)
    return refund


async def reject(
    session: AsyncSession, *, refund_id: uuid.UUID, operator_id: uuid.UUID, reason: str
) -> Refund:
    refund = await _locked(session, refund_id)
    _must_be(refund, RefundStatus.REQUESTED)
    refund.status = RefundStatus.REJECTED
    refund.review_reason = reason
    refund.reviewed_by = operator_id
    refund.reviewed_at = datetime.now(UTC)
    log.info("event=refund_rejected refund_id=%s operator=%s", refund.id, operator_id)
    return refund


async def process(session: AsyncSession, *, refund_id: uuid.UUID) -> Refund:
    """APPROVED → PROCESSED: REFUND entries (revenue → wallet) once; idempotent once PROCESSED."""
    refund = await _locked(session, refund_id)
    if refund.status == RefundStatus.PROCESSED:
        return refund
    _must_be(refund, RefundStatus.APPROVED)
    rental = await rentals.get(session, refund.rental_id, lock=True)
    if refund.amount > rental.amount_paid:  # e.g. cancelled (and refunded) since the request
        raise InvalidState(
            "The rental no longer has that much paid to refund.",
            context={"refund_id": str(refund.id), "amount_paid": str(rental.amount_paid)},
        )
    movement = await wallet.refund(
        session, user_id=refund.user_id, amount=refund.amount, reference=f"refund:{refund.id}"
    )
    await rentals.record_refund(session, rental, amount=refund.amount, description=f"Refund: {refund.reason}")
    refund.status = RefundStatus.PROCESSED
    refund.transfer_id = movement.transfer_id
    refund.processed_at = datetime.now(UTC)
    await notifications.refund_processed(
        session, user_id=refund.user_id, refund_id=refund.id, amount=refund.amount
    )
    log.info("event=refund_processed refund_id=%s amount=%s", refund.id, refund.amount)
    return refund


async def by_operator(
    session: AsyncSession, *, rental_id: uuid.UUID, amount: Decimal, reason: str, operator_id: uuid.UUID
) -> Refund:
    """An operator gives (part of) a completed rental's payment back at once: a refund approved by them
    and processed in this transaction (REFUND entries with reference `refund:<id>`: the money moves once).
    More than the rental can still refund is ValidationFailed."""
    rental = await rentals.get(session, rental_id, lock=True)
    amount = await _refundable_amount(session, rental, amount)
    now = datetime.now(UTC)
    refund = Refund(
        user_id=rental.user_id,
        rental_id=rental.id,
        amount=amount,
        reason=reason,
        status=RefundStatus.APPROVED,
        review_reason=reason,
        reviewed_by=operator_id,
        requested_at=now,
        reviewed_at=now,
    )
    session.add(refund)
    await session.flush()
    await process(session, refund_id=refund.id)
    log.info("event=refund_by_operator refund_id=%s rental_id=%s amount=%s", refund.id, rental.id, amount)
    return refund
