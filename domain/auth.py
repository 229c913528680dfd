"""Identity: one-time codes (stored hashed) and JWT access/refresh tokens with rotation."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import phonenumbers
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from domain.errors import RateLimited, Unauthorized, ValidationFailed
from domain.sms import SmsBackend
from storage.models import OneTimeCode, Role, User

log = logging.getLogger(__name__)
ALGORITHM = "HS256"


def normalise_identifier(identifier: str) -> tuple[str, str]:
    """('phone', E.164) or ('email', lower-cased). Nepal is the default region for phone numbers."""
    identifier = identifier.strip()
    if "@" in identifier:
        local, _, domain = identifier.partition("@")
        if not local or "." not in domain:
            raise ValidationFailed("Not a valid email address.", context={"identifier": identifier})
        return "email", identifier.lower()
    try:
        number = phonenumbers.parse(identifier, "NP")
    except phonenumbers.NumberParseException as exc:
        raise ValidationFailed(
            "Not a valid phone number or email.", context={"identifier": identifier}
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise ValidationFailed("Not a valid phone number.", context={"identifier": identifier})
    return "phone", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _code_hash(identifier: str, code: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), f"{identifier}:{code}".encode(), hashlib.sha256).hexdigest()


async def request_code(session: AsyncSession, *, identifier: str, settings: Settings, sms: SmsBackend) -> int:
    """Issue a 6-digit code, store its hash, send it. Returns seconds until it expires."""
    _, ident = normalise_identifier(identifier)
    now = datetime.now(UTC)
    last = await session.scalar(
        select(OneTimeCode.created_at)
        .where(OneTimeCode.identifier == ident)
        .order_by(OneTimeCode.created_at.desc())
        .limit(1)
    )
    if last is not None and (now - last).total_seconds() < settings.otp_resend_interval_s:
        raise RateLimited(
            "A code was sent moments ago: wait before asking again.",
            context={"retry_after": settings.otp_resend_interval_s},
        )
    code = f"{secrets.randbelow(10**6):06d}"
    session.add(
        OneTimeCode(
            identifier=ident,
            code_hash=_code_hash(ident, code, settings.resolved_jwt_secret()),
            expires_at=now + timedelta(seconds=settings.otp_ttl_s),
        )
    )
    await session.flush()
    await sms.send(
        to=ident, text=f"Your ChargeGhar code is {code}. It expires in {settings.otp_ttl_s // 60} minutes."
    )
    return settings.otp_ttl_s


async def verify_code(
    session: AsyncSession, *, identifier: str, code: str, settings: Settings
) -> tuple[User, bool]:
    """Check the latest live code; on success return (user, is_new_user). Wrong codes count attempts."""
    kind, ident = normalise_identifier(identifier)
    now = datetime.now(UTC)
    otp = await session.scalar(
        select(OneTimeCode)
        .where(OneTimeCode.identifier == ident, OneTimeCode.used_at.is_(None), OneTimeCode.expires_at > now)
        .order_by(OneTimeCode.created_at.desc())
        .limit(1)
        .with_for_update()
    )
    if otp is None or otp.attempts >= settings.otp_max_attempts:
        raise Unauthorized("No valid code: ask for a new one.")
    if not hmac.compare_digest(
        otp.code_hash, _code_hash(ident, code.strip(), settings.resolved_jwt_secret())
    ):
        otp.attempts += 1
        raise Unauthorized("Wrong code.", context={"attempts_left": settings.otp_max_attempts - otp.attempts})
    otp.used_at = now
    column = User.phone if kind == "phone" else User.email
    user = await session.scalar(select(User).where(column == ident))
    if user is not None:
        return user, False
    user = User(phone=ident) if kind == "phone" else User(email=ident)
    session.add(user)
    await session.flush()
    return user, True


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenPair:
    access: str
    refresh: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    user_id: uuid.UUID
    role: Role
    jti: str
    expires_at: datetime


def _encode(user: User, kind: str, ttl: int, settings: Settings) -> str:
    now = datetime.now(UTC)
    payload = {
        "sub": str(user.id),
        "role": user.role.value,
        "type": kind,
        "jti": secrets.token_hex(16),
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
    }
    return jwt.encode(payload, settings.resolved_jwt_secret(), algorithm=ALGORITHM)


def issue_tokens(user: User, settings: Settings) -> TokenPair:
    return TokenPair(
        access=_encode(user, "access", settings.jwt_access_ttl_s, settings),
        refresh=_encode(user, "refresh", settings.jwt_refresh_ttl_s, settings),
    )


def decode(token: str, *, kind: str, settings: Settings) -> Claims:
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            settings.resolved_jwt_secret(),
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp", "type", "jti"]},
        )
        if payload["type"] != kind:
            raise Unauthorized(f"Not an {kind} token.")
        return Claims(
            user_id=uuid.UUID(payload["sub"]),
            role=Role(payload.get("role", "user")),
            jti=payload["jti"],
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
        )
    except (jwt.PyJWTError, ValueError, KeyError) as exc:
        raise Unauthorized("Invalid or expired token: log in again.") from exc


async def rotate(session: AsyncSession, redis: Redis, *, refresh: str, settings: Settings) -> TokenPair:
    """Exchange a refresh token for a new pair; the old refresh token stops working."""
    claims = decode(refresh, kind="refresh", settings=settings)
    ttl = max(1, int((claims.expires_at - datetime.now(UTC)).total_seconds()))
    if not await redis.set(f"auth:refresh:used:{claims.jti}", "1", nx=True, ex=ttl):
        raise Unauthorized("This refresh token was already used: log in again.")
    user = await session.get(User, claims.user_id)
    if user is None:
        raise Unauthorized()
    return issue_tokens(user, settings)
