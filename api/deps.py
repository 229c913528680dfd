"""Typed dependency shortcuts, in one place."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
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
    claims = await auth.authenticate(svc.redis, token=credentials.credentials, settings=svc.settings)
    async with svc.db.transaction() as session:
        user = await session.get(User, claims.user_id)
    if user is None:
        raise Unauthorized()
    if not user.is_active:
        raise Forbidden("This account is disabled.")
    return user


CurrentUser = Annotated[User, Depends(current_user)]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def _networks(spec: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _trusted(host: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_ip(request: Request, settings: Settings) -> str:
    """The client's IP: the TCP peer, unless the peer is one of TRUSTED_PROXIES; then X-Forwarded-For is
    read from the right, skipping trusted proxies, and the first other address is the client (the left
    part of the header is whatever the client wrote, so it is never believed blindly)."""
    peer = request.client.host if request.client else "unknown"
    networks = _networks(settings.trusted_proxies)
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    candidate = peer
    for hop in reversed(hops):
        try:
            candidate = str(ipaddress.ip_address(hop))
        except ValueError:
            break  # garbage: keep the last proxy-vouched address
        if not _trusted(candidate, networks):
            break
    return candidate


def request_ip(request: Request) -> str:
    """`client_ip` with the app's own settings: what lock-out and the audit log key on."""
    return client_ip(request, services(request).settings)


ClientIp = Annotated[str, Depends(request_ip)]


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
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1, page_size: Annotated[int, Query(ge=1, le=100)] = 20
) -> Paging:
    return Paging(page=page, page_size=page_size)


PagingDep = Annotated[Paging, Depends(paging)]
