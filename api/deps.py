"""Typed dependency shortcuts, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from actors.fleet import Fleet
from config import Settings
from domain import auth
from domain.errors import Forbidden, Unauthorized
from domain.sms import SmsBackend
from storage.db import Database
from storage.models import Role, User


@dataclass
class Services:
    """What the API needs at run time; built by the composition root (`powerbank.system`)."""

    settings: Settings
    db: Database
    redis: Redis
    fleet: Fleet
    sms: SmsBackend


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


ServicesDep = Annotated[Services, Depends(services)]


async def transaction(svc: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with svc.db.transaction() as session:
        yield session


# scope="function": commit before the response is sent, so a client never reads ahead of its own write.
SessionDep = Annotated[AsyncSession, Depends(transaction, scope="function")]
bearer = HTTPBearer(auto_error=False)


async def current_user(
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    if credentials is None:
        raise Unauthorized("Missing bearer token: log in first.")
    claims = auth.decode(credentials.credentials, kind="access", settings=svc.settings)
    async with svc.db.transaction() as session:
        user = await session.get(User, claims.user_id)
    if user is None:
        raise Unauthorized()
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def operator(user: CurrentUser) -> User:
    if user.role not in (Role.OPERATOR, Role.ADMIN):
        raise Forbidden("Operators only.")
    return user


OperatorUser = Annotated[User, Depends(operator)]


@dataclass(frozen=True)
class Paging:
    page: int
    page_size: int


def paging(
    page: Annotated[int, Query(ge=1)] = 1, page_size: Annotated[int, Query(ge=1, le=100)] = 20
) -> Paging:
    return Paging(page=page, page_size=page_size)


PagingDep = Annotated[Paging, Depends(paging)]
