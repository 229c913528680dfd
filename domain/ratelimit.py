"""Sliding-window rate limits kept in Redis: one sorted set of hit times per (scope, subject).

`hit` counts one request and refuses it (RateLimited, 429 with Retry-After) when `limit` hits are already
inside the last `window_s` seconds; check and count are one Lua script, so concurrent requests and API
replicas cannot overshoot. Time is Redis's clock, the same for every replica. `undo` takes a hit back
(e.g. the SMS gateway failed, so no code was sent).
"""

from __future__ import annotations

import math
import secrets

from redis.asyncio import Redis

from domain.errors import RateLimited

# KEYS[1] the sorted set; ARGV: limit, window (s), member. Returns "" (counted) or the seconds to wait.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return ''
"""


def _key(scope: str, subject: str) -> str:
    return f"ratelimit:{scope}:{subject}"


async def hit(
    redis: Redis,
    *,
    scope: str,
    subject: str,
    limit: int,
    window_s: float,
    message: str = "Too many requests: wait and try again.",
) -> str:
    """Count one hit of `subject` in `scope`; the hit's id (for `undo`). Over the limit → RateLimited."""
    member = secrets.token_hex(8)
    wait = await redis.eval(_HIT, 1, _key(scope, subject), limit, window_s, member)
    wait = wait.decode() if isinstance(wait, bytes) else str(wait)
    if wait:
        raise RateLimited(message, context={"retry_after": max(1, math.ceil(float(wait)))})
    return member


async def undo(redis: Redis, *, scope: str, subject: str, hit_id: str) -> None:
    """Take back one counted hit."""
    await redis.zrem(_key(scope, subject), hit_id)
