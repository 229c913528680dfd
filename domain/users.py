"""Users and operators."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.auth import normalise_identifier
from domain.errors import ValidationFailed
from storage.models import Role, User


async def ensure_staff(session: AsyncSession, *, phone: str, role: Role) -> User:
    """Create an operator/admin by phone, or promote the existing user with that phone; a deactivated
    account is re-activated (the way back for a deactivated admin, short of SQL)."""
    kind, ident = normalise_identifier(phone)
    if kind != "phone":
        raise ValidationFailed("Operators are created by phone number (E.164, e.g. +9779812345678).")
    user = await session.scalar(select(User).where(User.phone == ident))
    if user is None:
        user = User(phone=ident, role=role)
        session.add(user)
    else:
        user.role = role
        user.is_active = True
    await session.flush()
    return user
