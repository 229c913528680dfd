"""A user's own profile: name, email and avatar URL. Nothing else of the user changes here (role, KYC
status, phone, wallet are someone else's business).

An email is also a login identifier, so a new one must be proven with a one-time code sent to it: otherwise
anyone could claim a victim's address before the victim signs up, and the victim's later email login would
land in the attacker's account ("pre-account hijacking")."""

from __future__ import annotations

import logging
import re
import unicodedata
import uuid
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from domain import auth
from domain.errors import Conflict, NotFound, ValidationFailed
from storage.models import User

log = logging.getLogger(__name__)

NAME_MAX = 120  # users.name
EMAIL_MAX = 254  # users.email
AVATAR_URL_MAX = 500  # users.avatar_url
EDITABLE = ("name", "email", "avatar_url")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def plain_text(value: str, *, field: str, newlines: bool = False) -> str:
    """Refuse control and other unprintable characters (NUL, lone surrogates, ...) that a database column
    cannot hold or that have no business in a name, address or reason; newlines only if allowed."""
    allowed = "\n\t" if newlines else ""
    if any(unicodedata.category(c).startswith("C") and c not in allowed for c in value):
        raise ValidationFailed(f"{field} cannot contain control characters.", context={"field": field})
    return value


def clean_name(value: str | None) -> str | None:
    if value is None:
        return None
    name = plain_text(" ".join(value.split()), field="name")
    if not name or len(name) > NAME_MAX:
        raise ValidationFailed(f"A name is 1 to {NAME_MAX} characters.", context={"field": "name"})
    return name


def clean_email(value: str | None) -> str | None:
    """Lower-cased, as logins by email look it up (`auth.normalise_identifier`)."""
    if value is None:
        return None
    email = plain_text(value.strip().lower(), field="email")
    if len(email) > EMAIL_MAX or not _EMAIL.match(email):
        raise ValidationFailed("Not a valid email address.", context={"field": "email"})
    return email


def clean_avatar_url(value: str | None) -> str | None:
    if value is None:
        return None
    url = plain_text(value.strip(), field="avatar_url")
    parts = urlsplit(url) if len(url) <= AVATAR_URL_MAX else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in url)
    ):
        raise ValidationFailed(
            f"avatar_url must be an http(s) URL of at most {AVATAR_URL_MAX} characters.",
            context={"field": "avatar_url"},
        )
    return url


async def update(
    session: AsyncSession,
    redis: Redis,
    *,
    user_id: uuid.UUID,
    changes: dict[str, Any],
    email_otp: str | None,
    ip: str,
    settings: Settings,
) -> User:
    """Apply the editable fields present in `changes` (None clears one); any other key is ignored.

    A new email needs `email_otp`, a code sent to that address (POST /api/auth/otp/request), checked and
    used up as at login (`auth.consume_code`: hashed, expiry, attempts, lock-out on the email + `ip`);
    keeping the current email or clearing it (only with a phone) needs none. Everything is validated, the
    email's owner checked (409 before the code is spent) and the code checked before any field changes, so
    after a refusal the user is untouched: the caller may commit a wrong code's counted try (401).
    """
    user = await session.get(User, user_id, with_for_update=True, populate_existing=True)
    if user is None:
        raise NotFound("User not found.")
    fields = {k: v for k, v in changes.items() if k in EDITABLE}
    name = clean_name(fields["name"]) if "name" in fields else user.name
    avatar_url = clean_avatar_url(fields["avatar_url"]) if "avatar_url" in fields else user.avatar_url
    email = user.email
    if "email" in fields:
        email = clean_email(fields["email"])
        if email is None and user.phone is None:
            raise ValidationFailed(
                "You log in with this email: it cannot be removed.", context={"field": "email"}
            )
        if email is not None and email != user.email:
            await _prove_new_email(
                session, redis, user=user, email=email, email_otp=email_otp, ip=ip, settings=settings
            )
    user.name, user.avatar_url, user.email = name, avatar_url, email
    try:
        await session.flush()
    except IntegrityError as exc:  # the same email claimed concurrently (the transaction is rolled back)
        raise Conflict("This email belongs to another account.", context={"field": "email"}) from exc
    log.info("event=profile_updated user_id=%s fields=%s", user.id, ",".join(sorted(fields)))
    return user


async def _prove_new_email(
    session: AsyncSession,
    redis: Redis,
    *,
    user: User,
    email: str,
    email_otp: str | None,
    ip: str,
    settings: Settings,
) -> None:
    """409 if another account has `email` (before any code is spent), 400 without a code, else the code
    must be good (401 wrong, counted; 423 locked out)."""
    taken = await session.scalar(select(User.id).where(User.email == email, User.id != user.id))
    if taken is not None:
        raise Conflict("This email belongs to another account.", context={"field": "email"})
    if not email_otp:
        raise ValidationFailed(
            "Confirm the new email first: request a code for it (POST /api/auth/otp/request with the "
            "address as identifier), then send that code as email_otp together with the email.",
            context={"field": "email_otp"},
        )
    await auth.consume_code(session, redis, identifier=email, code=email_otp, ip=ip, settings=settings)
