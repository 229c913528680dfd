"""Idempotency keys with Stripe's semantics: the rules and the transactions, no HTTP.

A request sent with an `Idempotency-Key` is *claimed* under (user, endpoint, key) before any work:

- the first claim wins (`INSERT … ON CONFLICT` on the unique scope), runs the work once and then
  `complete`s the record with the response it answered (status, headers, exact JSON text);
- a retry with the same key and the same request (equal `request_fingerprint`) gets that `Stored`
  response back, for `IDEMPOTENCY_TTL_S` (24 h) after the first claim;
- the same key with a different request → `IdempotencyKeyReused` (409 `idempotency_key_reused`);
- a retry while the first is still running → `IdempotencyRequestInProgress` (409, with Retry-After):
  the work is never run twice, and the retry does not hold a connection waiting for the work.
  A record left in flight by a process that died (or was shut down) mid-request stays in progress
  until it expires: whether its work happened is unknown, so it is never re-run; the client starts
  over with a new key (for a rental, the one-open-rental rule and the PENDING_POPUP reconciler apply).

A key older than the TTL is free again (the claim takes the row over atomically); `purge_expired`
deletes such rows and is what a background job calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from config import get_settings
from domain.errors import DomainError, IdempotencyKeyReused
from storage.idempotency_models import MAX_KEY_LENGTH, IdempotencyKey

log = logging.getLogger(__name__)

__all__ = [
    "MAX_KEY_LENGTH",
    "Claimed",
    "IdempotencyKeyReused",
    "IdempotencyRequestInProgress",
    "Stored",
    "canonical_json",
    "claim",
    "complete",
    "purge_expired",
    "request_fingerprint",
]


class IdempotencyRequestInProgress(DomainError):
    code, status = "idempotency_request_in_progress", 409
    default_message = (
        "A request with this Idempotency-Key is still being processed: retry in a moment to get its result."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Claimed:
    """This request owns the key: run the work, then `complete(record_id=…)`."""

    record_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """The response the first request with this key answered, to be replayed as it was."""

    status: int
    headers: dict[str, str]
    body: str


# --- canonical request ------------------------------------------------------------------------------


def _canonical_number(number: Decimal) -> str:
    """One spelling per value: 1, 1.0, 1.00 and 10E-1 are all `1E0`; exact, whatever the size."""
    sign, digits, exponent = number.as_tuple()
    if not isinstance(exponent, int):  # NaN / Infinity never come out of strict JSON parsing
        raise ValueError(f"not a finite number: {number}")
    significant = list(digits)
    while len(significant) > 1 and significant[-1] == 0:
        significant.pop()
        exponent += 1
    if significant == [0]:
        return "0"
    return f"{'-' if sign else ''}{''.join(map(str, significant))}E{exponent}"


def _canonical(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, int):
        return _canonical_number(Decimal(value))
    if isinstance(value, Decimal):
        return _canonical_number(value)
    if isinstance(value, float):
        return _canonical_number(Decimal(repr(value)))
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=True)}:{_canonical(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Valid JSON with one spelling per value: keys sorted, no whitespace, ASCII escapes, numbers by value.

    Key order, whitespace, `\\u00e9` vs `é` and `1` vs `1.0` do not matter; types do (`"1"` ≠ `1`).
    """
    return _canonical(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> Any:
    return json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)


def request_fingerprint(
    body: bytes,
    *,
    path_params: Mapping[str, Any] | None = None,
    query: Iterable[tuple[str, str]] = (),
) -> str:
    """sha256 (hex) of the canonical request: its JSON body, plus path and query parameters.

    Path parameters are part of it so that one key sent to `/rentals/A/pay-due` and then to
    `/rentals/B/pay-due` (one endpoint) is a reuse, not a replay of A's answer. An empty body is
    `null`; a body that is not JSON (a form, bytes) is compared byte for byte.
    """
    path, sorted_query = dict(path_params or {}), sorted(query)
    stripped = body.strip()
    try:
        parsed = _parse_json(stripped) if stripped else None
        canonical = canonical_json({"body": parsed, "path": path, "query": sorted_query})
    except (ValueError, InvalidOperation, RecursionError):
        raw = hashlib.sha256(body).hexdigest()
        canonical = canonical_json({"raw_body_sha256": raw, "path": path, "query": sorted_query})
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# --- the durable record --------------------------------------------------------------------------------


def _ttl(ttl_s: int | None) -> timedelta:
    return timedelta(seconds=get_settings().idempotency_ttl_s if ttl_s is None else ttl_s)


async def claim(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    endpoint: str,
    key: str,
    request_hash: str,
    ttl_s: int,
    retry_after_s: int,
) -> Claimed | Stored:
    """Take the key for this request, or say what the first request with it answered.

    Commit right after (a short transaction of its own): the claim must be visible to concurrent retries
    before the work starts. Raises `IdempotencyKeyReused` or `IdempotencyRequestInProgress`.
    """
    expired = func.now() - timedelta(seconds=ttl_s)
    fresh = {
        "request_hash": request_hash,
        "locked_at": func.now(),
        "response_status": None,
        "response_headers": None,
        "response_body": None,
        "created_at": func.now(),
        "completed_at": None,
    }
    stmt = (
        insert(IdempotencyKey)
        .values(user_id=user_id, endpoint=endpoint, key=key, **fresh)
        .on_conflict_do_update(
            constraint="uq_idempotency_keys_scope",
            set_=fresh,
            where=IdempotencyKey.created_at < expired,  # an expired key is free again
        )
        .returning(IdempotencyKey.id)
    )
    record_id = await session.scalar(stmt)
    if record_id is not None:
        log.info("event=idempotency_claimed user_id=%s endpoint=%r key=%r", user_id, endpoint, key)
        return Claimed(record_id=record_id)
    # The row exists, was committed by someone else and is not expired (ON CONFLICT waited for its
    # transaction); read it as it stands now.
    record = await session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id, IdempotencyKey.endpoint == endpoint, IdempotencyKey.key == key
        )
    )
    if record is None:  # purged between the two statements: claim again
        return await claim(
            session,
            user_id=user_id,
            endpoint=endpoint,
            key=key,
            request_hash=request_hash,
            ttl_s=ttl_s,
            retry_after_s=retry_after_s,
        )
    if record.request_hash != request_hash:
        log.info("event=idempotency_key_reused user_id=%s endpoint=%r key=%r", user_id, endpoint, key)
        raise IdempotencyKeyReused(context={"idempotency_key": key})
    if record.response_status is None or record.response_body is None:
        raise IdempotencyRequestInProgress(context={"idempotency_key": key, "retry_after": retry_after_s})
    log.info(
        "event=idempotency_replayed user_id=%s endpoint=%r key=%r status=%d",
        user_id,
        endpoint,
        key,
        record.response_status,
    )
    return Stored(
        status=record.response_status, headers=record.response_headers or {}, body=record.response_body
    )


async def complete(session: AsyncSession, *, record_id: int, response: Stored) -> None:
    """Record what the claiming request answered; from now on retries get it replayed."""
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == record_id)
        .values(
            locked_at=None,
            response_status=response.status,
            response_headers=response.headers,
            response_body=response.body,
            completed_at=func.now(),
        )
    )


async def purge_expired(session: AsyncSession, *, ttl_s: int | None = None) -> int:
    """Delete keys older than the TTL (default `IDEMPOTENCY_TTL_S`); how many. For a background job."""
    result = await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - _ttl(ttl_s))
    )
    purged: int = getattr(result, "rowcount", 0) or 0
    if purged:
        log.info("event=idempotency_purged count=%d", purged)
    return purged
