"""Refund requests by app users: ask for money paid for a rental back, and follow the requests.
Operators review them under /api/admin/refunds."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import CurrentUser, PagingDep, Services, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.idempotency import IdempotencyDep
from api.schemas import RefundIn, RefundOut
from domain import refunds
from storage.models import User

router = APIRouter(prefix="/api/payments/refunds", tags=["payments"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Envelope[RefundOut])
async def request_refund(
    body: RefundIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[RefundOut] | Response:
    """REQUESTED until an operator approves (then PROCESSED: the money is back in the wallet) or
    rejects it. With `Idempotency-Key`, a retry replays the first answer."""
    return await idempotency.run(lambda: _request(body, user, svc))


async def _request(body: RefundIn, user: User, svc: Services) -> Envelope[RefundOut]:
    async with svc.db.transaction() as session:
        refund = await refunds.request(
            session, user_id=user.id, rental_id=body.rental_id, amount=body.amount, reason=body.reason.strip()
        )
        out = RefundOut.of(refund)
    return ok(out, "Refund requested: an operator will review it.")


@router.get("")
async def my_refunds(user: CurrentUser, session: SessionDep, paging: PagingDep) -> Envelope[Page[RefundOut]]:
    rows, count = await refunds.mine(session, user.id, page=paging.page, page_size=paging.page_size)
    return ok(
        Page(
            results=[RefundOut.of(r) for r in rows], count=count, page=paging.page, page_size=paging.page_size
        )
    )
