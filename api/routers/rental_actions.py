"""What a user does with a rental after starting it: cancel, extend, pay what is due, report an issue,
read the receipt; and their rental statistics. A rental that is not the caller's is 404, as an unknown
one is."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime

from fastapi import APIRouter, Response, status

from api.deps import CurrentUser, Services, ServicesDep, SessionDep
from api.envelope import Envelope, ok
from api.idempotency import IdempotencyDep
from api.schemas import (
    CancelIn,
    DepositOut,
    ExtendIn,
    ExtensionOut,
    PayDueOut,
    ReceiptLineOut,
    ReceiptOut,
    RentalIssueIn,
    RentalIssueOut,
    RentalOut,
    RentalStatsOut,
)
from domain import rentals
from storage.models import User

router = APIRouter(prefix="/api/rentals", tags=["rentals"])


@router.get("/stats")
async def rental_stats(user: CurrentUser, session: SessionDep) -> Envelope[RentalStatsOut]:
    result = await rentals.stats(session, user.id, now=datetime.now(UTC))
    return ok(RentalStatsOut(**asdict(result)))


@router.post("/{rental_id}/cancel")
async def cancel_rental(
    rental_id: uuid.UUID,
    user: CurrentUser,
    svc: ServicesDep,
    session: SessionDep,
    body: CancelIn | None = None,
) -> Envelope[RentalOut]:
    """Within CANCEL_WINDOW_S of the start, once the power bank is back in any station: CANCELLED,
    and everything paid for the rental goes back to the wallet."""
    rental = await rentals.cancel(
        session,
        rental_id=rental_id,
        user_id=user.id,
        now=datetime.now(UTC),
        window_s=svc.settings.cancel_window_s,
        reason=body.reason if body else "",
    )
    return ok(RentalOut.of(rental), "Rental cancelled: what you paid is back in your wallet.")


@router.post("/{rental_id}/extend")
async def extend_rental(
    rental_id: uuid.UUID, body: ExtendIn, user: CurrentUser, svc: ServicesDep, session: SessionDep
) -> Envelope[ExtensionOut]:
    limit = svc.settings.rental_max_extensions
    rental, extension = await rentals.extend(
        session, rental_id=rental_id, user_id=user.id, package_id=body.package_id, max_extensions=limit
    )
    out = ExtensionOut(
        id=extension.id,
        package_name=extension.package_name,
        extended_minutes=extension.extended_minutes,
        extension_cost=extension.extension_cost,
        extended_at=extension.extended_at,
        due_at=rental.due_at,
        extensions_used=extension.extensions_used,
        extensions_left=max(0, limit - extension.extensions_used),
        rental=RentalOut.of(rental),
    )
    return ok(out, "Rental extended.")


@router.post("/{rental_id}/pay-due", response_model=Envelope[PayDueOut])
async def pay_due(
    rental_id: uuid.UUID, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[PayDueOut] | Response:
    """With `Idempotency-Key`, a retry replays the first answer."""
    return await idempotency.run(lambda: _pay_due(rental_id, user, svc))


async def _pay_due(rental_id: uuid.UUID, user: User, svc: Services) -> Envelope[PayDueOut]:
    async with svc.db.transaction() as session:
        paid = await rentals.pay_due(session, rental_id=rental_id, user_id=user.id)
        out = PayDueOut(
            rental_id=paid.rental.id,
            amount_paid=paid.amount,
            balance=paid.balance,
            transaction_ids=paid.transfer_ids,
            rental_status=paid.rental.status.value,
            payment_status=paid.rental.payment_status.value,
            rental=RentalOut.of(paid.rental),
        )
    return ok(out, "Paid.")


@router.post("/{rental_id}/issues", status_code=status.HTTP_201_CREATED)
async def report_rental_issue(
    rental_id: uuid.UUID, body: RentalIssueIn, user: CurrentUser, session: SessionDep
) -> Envelope[RentalIssueOut]:
    rental, issue = await rentals.report_issue(
        session,
        rental_id=rental_id,
        user_id=user.id,
        issue_type=body.issue_type,
        description=body.description.strip(),
    )
    return ok(RentalIssueOut.of(rental, issue), "Issue reported: thank you.")


@router.get("/{rental_id}/receipt")
async def rental_receipt(
    rental_id: uuid.UUID, user: CurrentUser, svc: ServicesDep, session: SessionDep
) -> Envelope[ReceiptOut]:
    """Line amounts include the service charge and VAT; subtotal + service charge + VAT = total."""
    r = await rentals.receipt(session, rental_id=rental_id, user_id=user.id, settings=svc.settings)
    out = ReceiptOut(
        rental_id=r.rental.id,
        rental_code=r.rental.rental_code,
        status=r.rental.status.value,
        payment_status=r.rental.payment_status.value,
        currency=svc.settings.currency,
        started_at=r.rental.started_at,
        ended_at=r.rental.ended_at,
        lines=[
            ReceiptLineOut(kind=line.kind, description=line.description, amount=line.amount, paid=line.paid)
            for line in r.lines
        ],
        prices_include_tax=True,
        subtotal=r.tax.subtotal,
        service_charge_rate=str(r.service_charge_rate),
        service_charge=r.tax.service_charge,
        vat_rate=str(r.vat_rate),
        vat=r.tax.vat,
        total=r.tax.total,
        amount_paid=r.amount_paid,
        amount_due=r.amount_due,
        deposit=DepositOut(held=r.deposit_held, captured=r.deposit_captured, released=r.deposit_released),
        issued_at=datetime.now(UTC),
    )
    return ok(out)
