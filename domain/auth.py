"""Identity: one-time codes (stored hashed, rate-limited, lock-out) and JWT access/refresh tokens.

Tokens are HS256 only, signed with the first key of JWT_KEYS (`kid` header; every listed key verifies).
Every refresh token belongs to a family (claim `fam`) born at login; a refresh rotates within the family,
and presenting an already-rotated refresh token (a stolen copy, or the thief's) revokes the whole family:
its refresh and access tokens are refused from then on (one Redis key per revoked family).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
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
from domain import lockout, ratelimit
from domain.errors import Forbidden, LockedOut, RateLimited, Unauthorized, ValidationFailed
from domain.sms import SmsBackend, SmsFailed
from storage.models import OneTimeCode, Role, User
from telemetry import metrics

log = logging.getLogger(__name__)
ALGORITHM = "HS256"  # pinned: a token whose header names anything else is refused
ACCESS, REFRESH = "access", "refresh"
HOUR_S = 3600


def normalise_identifier(identifier: str) -> tuple[str, str]:
    """('phone', E.164) or ('email', lower-cased). Nepal is the default region for phone numbers."""
    identifier = identifier.strip()
    if "@" in identifier:
        local, _, domain = identifier.partition("@")
        if not local or "." not in domain or any(c.isspace() for c in identifier):
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


def _subject(identifier: str) -> str:
    """Redis keys name identifiers by hash (no phone numbers or emails in key names)."""
    return hashlib.sha256(identifier.encode()).hexdigest()[:32]


def _code_pepper(settings: Settings) -> str:
    return derived_secret(settings, "otp pepper")


async def request_code(
    session: AsyncSession, redis: Redis, *, identifier: str, ip: str, settings: Settings, sms: SmsBackend
) -> int:
    """Issue a 6-digit code, store its hash, send it. Returns seconds until it expires.

    Limits, each a 429 with Retry-After: OTP_PER_IP_PER_HOUR requests per client IP; one live code per
    identifier per OTP_RESEND_INTERVAL_S (a used or dead code does not hold the next one back);
    OTP_PER_IDENTIFIER_PER_HOUR codes sent per identifier (a send the gateway refused is not counted).
    """
    try:
        await ratelimit.hit(
            redis,
            scope="otp:ip",
            subject=ip,
            limit=settings.otp_per_ip_per_hour,
            window_s=HOUR_S,
            message="Too many code requests from your network: try again later.",
        )
        _, ident = normalise_identifier(identifier)
        now = datetime.now(UTC)
        last = await session.scalar(
            select(OneTimeCode.created_at)
            .where(
                OneTimeCode.identifier == ident,
                OneTimeCode.used_at.is_(None),
                OneTimeCode.expires_at > now,
                OneTimeCode.attempts < settings.otp_max_attempts,
            )
            .order_by(OneTimeCode.created_at.desc())
            .limit(1)
        )
        waited = (now - last).total_seconds() if last is not None else math.inf
        if waited < settings.otp_resend_interval_s:
            raise RateLimited(
                "A code was sent moments ago: wait before asking again.",
                context={"retry_after": max(1, math.ceil(settings.otp_resend_interval_s - waited))},
            )
        hit_id = await ratelimit.hit(
            redis,
            scope="otp:identifier",
            subject=_subject(ident),
            limit=settings.otp_per_identifier_per_hour,
            window_s=HOUR_S,
            message="Too many codes were sent to this number: try again later.",
        )
    except RateLimited:
        metrics.AUTH_FAILURES.labels(reason="rate_limited").inc()
        raise
    code = f"{secrets.randbelow(10**6):06d}"
    session.add(
        OneTimeCode(
            identifier=ident,
            code_hash=_code_hash(ident, code, _code_pepper(settings)),
            expires_at=now + timedelta(seconds=settings.otp_ttl_s),
            created_at=now,
        )
    )
    await session.flush()
    try:
        await sms.send(
            to=ident,
            text=f"Your ChargeGhar code is {code}. It expires in {settings.otp_ttl_s // 60} minutes.",
        )
    except SmsFailed:
        await ratelimit.undo(redis, scope="otp:identifier", subject=_subject(ident), hit_id=hit_id)
        raise
    return settings.otp_ttl_s


async def verify_code(
    session: AsyncSession, redis: Redis, *, identifier: str, code: str, ip: str, settings: Settings
) -> tuple[User, bool]:
    """Check the latest live code (`consume_code`); on success return (user, is_new_user), creating the
    user on the first login."""
    kind, ident = await consume_code(
        session, redis, identifier=identifier, code=code, ip=ip, settings=settings, keep_failures=True
    )
    column = User.phone if kind == "phone" else User.email
    user = await session.scalar(select(User).where(column == ident))
    is_new = user is None
    if user is None:
        user = User(phone=ident) if kind == "phone" else User(email=ident)
        session.add(user)
        await session.flush()
    if not user.is_active:
        metrics.AUTH_FAILURES.labels(reason="inactive").inc()
        raise Forbidden("This account is disabled.")
    return user, is_new


async def consume_code(
    session: AsyncSession,
    redis: Redis,
    *,
    identifier: str,
    code: str,
    ip: str,
    settings: Settings,
    keep_failures: bool = False,
) -> tuple[str, str]:
    """Check the latest live code sent to `identifier` and mark it used; return (kind, normalised
    identifier). No user is looked up or created: a login (`verify_code`) or a proof of owning an
    address (a new profile email) builds on it.

    A locked (identifier, IP) pair or IP is refused first (423). Every refusal (401) counts towards the
    lock-out of this IP only, so wrong codes sent from elsewhere never lock the real user out; the code
    itself dies after OTP_MAX_ATTEMPTS wrong tries from anywhere (the user then asks for a new one at once).
    A wrong try is recorded in `session`: the caller commits it even though the request fails.
    """
    kind, ident = normalise_identifier(identifier)
    try:
        await lockout.ensure_not_locked(redis, identifier=ident, ip=ip)
    except LockedOut:
        metrics.AUTH_FAILURES.labels(reason="locked_out").inc()
        raise
    try:
        await _check_code(session, ident=ident, code=code, settings=settings)
    except Unauthorized:
        await lockout.failed(redis, settings, identifier=ident, ip=ip)
        raise
    if not keep_failures:  # a login clears them only once its second factor (if any) passed too
        await lockout.succeeded(redis, identifier=ident, ip=ip)
    return kind, ident


async def _check_code(session: AsyncSession, *, ident: str, code: str, settings: Settings) -> None:
    now = datetime.now(UTC)
    otp = await session.scalar(
        select(OneTimeCode)
        .where(OneTimeCode.identifier == ident, OneTimeCode.used_at.is_(None), OneTimeCode.expires_at > now)
        .order_by(OneTimeCode.created_at.desc())
        .limit(1)
        .with_for_update()
    )
    if otp is None or otp.attempts >= settings.otp_max_attempts:
        metrics.AUTH_FAILURES.labels(reason="no_code").inc()
        raise Unauthorized("No valid code: ask for a new one.")
    if not hmac.compare_digest(otp.code_hash, _code_hash(ident, code.strip(), _code_pepper(settings))):
        otp.attempts += 1
        metrics.AUTH_FAILURES.labels(reason="wrong_code").inc()
        raise Unauthorized("Wrong code.", context={"attempts_left": settings.otp_max_attempts - otp.attempts})
    otp.used_at = now


# --- tokens -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenPair:
    access: str
    refresh: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    user_id: uuid.UUID
    role: Role
    jti: str
    family: str
    expires_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Keyring:
    signing_kid: str
    keys: dict[str, str]


def keyring(settings: Settings) -> Keyring:
    """JWT_KEYS ("kid1:secret1,kid2:secret2": the first signs, all verify), else the JWT secret as
    kid "default"."""
    if not settings.jwt_keys.strip():
        return Keyring(signing_kid="default", keys={"default": settings.resolved_jwt_secret()})
    keys: dict[str, str] = {}
    for item in settings.jwt_keys.split(","):
        kid, sep, secret = item.strip().partition(":")
        if not sep or not kid or not secret or kid in keys:
            raise ValueError("JWT_KEYS must be 'kid1:secret1,kid2:secret2' with distinct kids.")
        keys[kid] = secret
    return Keyring(signing_kid=next(iter(keys)), keys=keys)


def derived_secret(settings: Settings, purpose: str) -> str:
    """A key for `purpose` (the OTP pepper, the admin session cookie) derived from the configured signing
    key: replicas that share JWT_KEYS (or JWT_SECRET) agree on it without another secret to distribute.
    Rotating the signing key ends the codes and admin sessions of the moment, as it should."""
    ring = keyring(settings)
    root = ring.keys[ring.signing_kid].encode()
    return hmac.new(root, f"powerbank {purpose}".encode(), hashlib.sha256).hexdigest()


def _encode(user: User, *, kind: str, ttl: int, family: str, settings: Settings) -> str:
    ring = keyring(settings)
    now = datetime.now(UTC)
    payload = {
        "sub": str(user.id),
        "role": user.role.value,
        "type": kind,
        "fam": family,
        "jti": secrets.token_hex(16),
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
    }
    return jwt.encode(
        payload, ring.keys[ring.signing_kid], algorithm=ALGORITHM, headers={"kid": ring.signing_kid}
    )


def issue_tokens(user: User, settings: Settings, *, family: str | None = None) -> TokenPair:
    """A new access + refresh pair; without `family` a new family starts (a login)."""
    family = family or secrets.token_hex(16)
    staff = user.role in (Role.OPERATOR, Role.ADMIN)
    refresh_ttl = settings.jwt_staff_refresh_ttl_s if staff else settings.jwt_refresh_ttl_s
    return TokenPair(
        access=_encode(user, kind=ACCESS, ttl=settings.jwt_access_ttl_s, family=family, settings=settings),
        refresh=_encode(user, kind=REFRESH, ttl=refresh_ttl, family=family, settings=settings),
    )


def decode(token: str, *, kind: str, settings: Settings) -> Claims:
    """Verify signature (HS256 only, key chosen by `kid`), expiry and type; no Redis look-up."""
    try:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid", "default")
        key = keyring(settings).keys.get(kid) if isinstance(kid, str) else None
        if header.get("alg") != ALGORITHM or key is None:
            raise jwt.InvalidTokenError("algorithm or key id not accepted")
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp", "iat", "type", "jti", "fam"]},
        )
        if payload["type"] != kind:
            raise jwt.InvalidTokenError(f"not an {kind} token")
        return Claims(
            user_id=uuid.UUID(payload["sub"]),
            role=Role(payload.get("role", "user")),
            jti=str(payload["jti"]),
            family=str(payload["fam"]),
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
        )
    except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
        metrics.AUTH_FAILURES.labels(reason="bad_token").inc()
        raise Unauthorized("Invalid or expired token: log in again.") from exc


def _family_key(family: str) -> str:
    return f"auth:family:revoked:{family}"


async def revoke_family(redis: Redis, *, family: str, settings: Settings) -> None:
    """Refuse every token of this family from now on (kept as long as any of its tokens can live)."""
    await redis.set(_family_key(family), "1", ex=settings.jwt_refresh_ttl_s)


async def _ensure_family_live(redis: Redis, claims: Claims) -> None:
    if await redis.get(_family_key(claims.family)) is not None:
        metrics.AUTH_FAILURES.labels(reason="family_revoked").inc()
        raise Unauthorized("This session was closed: log in again.")


async def authenticate(redis: Redis, *, token: str, settings: Settings) -> Claims:
    """An access token's claims, if it verifies and its family was not revoked (one Redis GET)."""
    claims = decode(token, kind=ACCESS, settings=settings)
    await _ensure_family_live(redis, claims)
    return claims


# Marks a refresh token used (for as long as it could live) and keeps the pair it was exchanged for during
# the grace period, atomically. Returns 1 for the first use, then that pair while it is kept, then 0.
_CLAIM_REFRESH = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
    return 1
end
return redis.call('GET', KEYS[2]) or 0
"""


async def rotate(session: AsyncSession, redis: Redis, *, refresh: str, settings: Settings) -> TokenPair:
    """Exchange a refresh token for a new pair of the same family; the old refresh token stops working.

    Presenting it again within REFRESH_REUSE_GRACE_S returns the same new pair (the app retrying after a
    lost response on a flaky network); after that it revokes the family (a stolen copy, or the thief's)."""
    claims = decode(refresh, kind=REFRESH, settings=settings)
    await _ensure_family_live(redis, claims)
    user = await session.get(User, claims.user_id)
    if user is None:
        raise Unauthorized()
    if not user.is_active:
        metrics.AUTH_FAILURES.labels(reason="inactive").inc()
        raise Forbidden("This account is disabled.")
    pair = issue_tokens(user, settings, family=claims.family)
    ttl = max(1, int((claims.expires_at - datetime.now(UTC)).total_seconds()))
    keys = [f"auth:refresh:used:{claims.jti}", f"auth:refresh:answer:{claims.jti}"]
    grace = max(1, settings.refresh_reuse_grace_s)
    claimed = redis.eval(_CLAIM_REFRESH, 2, *keys, ttl, grace, f"{pair.access} {pair.refresh}")
    earlier = await claimed
    if earlier == 1:
        return pair
    if settings.refresh_reuse_grace_s > 0 and earlier != 0:
        text = earlier.decode() if isinstance(earlier, bytes) else str(earlier)
        access, _, new_refresh = text.partition(" ")
        log.info("event=refresh_replayed user_id=%s family=%s", claims.user_id, claims.family)
        return TokenPair(access=access, refresh=new_refresh)
    await revoke_family(redis, family=claims.family, settings=settings)
    metrics.AUTH_FAILURES.labels(reason="refresh_reused").inc()
    log.warning("event=refresh_reused user_id=%s family=%s", claims.user_id, claims.family)
    raise Unauthorized("This refresh token was already used: the session is closed, log in again.")


async def logout(redis: Redis, *, refresh: str, settings: Settings) -> None:
    """Revoke the refresh token's family (idempotent)."""
    claims = decode(refresh, kind=REFRESH, settings=settings)
    await revoke_family(redis, family=claims.family, settings=settings)
    log.info("event=logged_out user_id=%s family=%s", claims.user_id, claims.family)
