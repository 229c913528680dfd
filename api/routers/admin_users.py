"""Operators: users (search, detail with wallet and open rental, role and active flag)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import func, or_, select

from api import operations
from api.deps import OperatorUser, PagingDep, SessionDep, request_ip
from api.envelope import Envelope, Money, Page, ok
from api.schemas import RentalOut, UserOut
from domain import rentals, wallet
from domain.errors import NotFound
from storage.models import Role, User

router = APIRouter(prefix="/api/admin/users", tags=["admin"])


class AdminUserOut(UserOut):
    is_active: bool

    @classmethod
    def build(cls, user: User) -> AdminUserOut:
        return cls(**UserOut.of(user).model_dump(), is_active=user.is_active)


class WalletOut(BaseModel):
    balance: Money
    held: Money
    currency: str


class AdminUserDetailOut(AdminUserOut):
    wallet: WalletOut
    open_rental: RentalOut | None


class UserPatch(BaseModel):
    role: Role | None = None
    is_active: bool | None = None


async def _user(session: SessionDep, user_id: uuid.UUID, *, lock: bool = False) -> User:
    user = await session.get(User, user_id, with_for_update=lock)
    if user is None:
        raise NotFound("User not found.", context={"user_id": str(user_id)})
    return user


@router.get("")
async def list_users(
    operator: OperatorUser,
    session: SessionDep,
    paging: PagingDep,
    search: Annotated[str | None, Query(max_length=254, description="part of a phone or email")] = None,
    role: Role | None = None,
) -> Envelope[Page[AdminUserOut]]:
    """Newest first; `search` matches part of the phone number or email (case-insensitive)."""
    where = []
    if search:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(or_(User.phone.ilike(pattern), User.email.ilike(pattern)))
    if role is not None:
        where.append(User.role == role)
    count = await session.scalar(select(func.count()).select_from(User).where(*where)) or 0
    rows = await session.scalars(
        select(User)
        .where(*where)
        .order_by(User.created_at.desc(), User.id)
        .offset((paging.page - 1) * paging.page_size)
        .limit(paging.page_size)
    )
    results = [AdminUserOut.build(u) for u in rows.all()]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/{user_id}")
async def user_detail(
    user_id: uuid.UUID, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminUserDetailOut]:
    user = await _user(session, user_id)
    account = await wallet.wallet_for(session, user.id)
    held = await rentals.held_deposits(session, user.id)
    rental = await rentals.open_rental(session, user.id)
    return ok(
        AdminUserDetailOut(
            **AdminUserOut.build(user).model_dump(),
            wallet=WalletOut(balance=account.balance, held=held, currency=account.currency),
            open_rental=RentalOut.of(rental) if rental else None,
        )
    )


@router.patch("/{user_id}")
async def update_user(
    user_id: uuid.UUID, body: UserPatch, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminUserOut]:
    """Only an admin changes roles (and not their own); nobody deactivates themself."""
    user = await operations.update_user(
        session,
        user_id=user_id,
        role=body.role,
        is_active=body.is_active,
        actor=operator,
        ip=request_ip(request),
    )
    return ok(AdminUserOut.build(user), "User updated.")
