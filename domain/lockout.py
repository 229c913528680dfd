"""Failed-login lock-out in the spirit of django-axes, kept in Redis.

Two counters, both over a LOCKOUT_S window:
- per (identifier, IP): OTP_MAX_ATTEMPTS failures lock that pair, so an attacker cannot lock the real
  user out from elsewhere (the code itself also dies after OTP_MAX_ATTEMPTS wrong tries);
- per IP: LOGIN_MAX_FAILURES_PER_IP failures over any identifiers lock the address.
A lock answers 423 `locked_out` with Retry-After until it expires.
"""

from __future__ import annotations

import hashlib
import logging

from redis.asyncio import Redis

from config import Settings
from domain.errors import LockedOut
from telemetry import metrics

log = logging.getLogger(__name__)


def _keys(identifier: str, ip: str) -> dict[str, str]:
    pair = hashlib.sha256(f"{identifier}|{ip}".encode()).hexdigest()[:32]
    return {"pair": f"auth:fail:pair:{pair}", "ip": f"auth:fail:ip:{ip}"}


async def ensure_not_locked(redis: Redis, *, identifier: str, ip: str) -> None:
    """Raise LockedOut (with retry_after) if the pair or the IP is locked now (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in _keys(identifier, ip).values():
            pipe.ttl(f"{key}:locked")
        ttls: list[int] = await pipe.execute()
    if (longest := max(ttls)) > 0:
        raise LockedOut(context={"retry_after": longest})


async def failed(redis: Redis, settings: Settings, *, identifier: str, ip: str) -> None:
    """Count one failed attempt; lock (and count the lock-out) when a limit is reached."""
    keys = _keys(identifier, ip)
    limits = {"pair": settings.otp_max_attempts, "ip": settings.login_max_failures_per_ip}
    for scope, key in keys.items():
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, settings.lockout_s, nx=True)
            count, _ = await pipe.execute()
        if count >= limits[scope] and await redis.set(f"{key}:locked", "1", nx=True, ex=settings.lockout_s):
            await redis.delete(key)
            metrics.LOGINS_LOCKED_OUT.inc()
            log.warning("event=locked_out scope=%s ip=%s lockout_s=%s", scope, ip, settings.lockout_s)


async def succeeded(redis: Redis, *, identifier: str, ip: str) -> None:
    """A good login clears the pair's failures (not the IP's: others behind it may be guessing)."""
    await redis.delete(_keys(identifier, ip)["pair"])
