from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from api.deps import CurrentUser, PagingDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.schemas import BalanceOut, TransactionOut
from domain import rentals, wallet
from storage.models import LedgerEntry

router = APIRouter(prefix="/api/payments", tags=["payments"])


@router.get("/wallet/balance")
async def balance(user: CurrentUser, session: SessionDep) -> Envelope[BalanceOut]:
    account = await wallet.wallet_for(session, user.id)
    held = await rentals.held_deposits(session, user.id)
    return ok(BalanceOut(balance=account.balance, currency=account.currency, held=held))


@router.get("/transactions")
async def transactions(
    user: CurrentUser, session: SessionDep, paging: PagingDep
) -> Envelope[Page[TransactionOut]]:
    account = await wallet.wallet_for(session, user.id)
    where = LedgerEntry.account_id == account.id
    count = await session.scalar(select(func.count()).select_from(LedgerEntry).where(where)) or 0
    rows = await session.scalars(
        select(LedgerEntry)
        .where(where)
        .order_by(LedgerEntry.id.desc())
        .offset((paging.page - 1) * paging.page_size)
        .limit(paging.page_size)
    )
    results = [TransactionOut.of(e) for e in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))
