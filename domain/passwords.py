"""Operator passwords for the /admin web login: argon2id hashes (argon2-cffi's recommended parameters).

Only operators and admins have a password; app users log in with one-time codes. Hashing and
verifying take a fraction of a second of CPU on purpose: call them off the event loop
(`asyncio.to_thread`) in a server.
"""

from __future__ import annotations

from contextlib import suppress
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from domain.errors import ValidationFailed
from storage.models import Role, User

STAFF_ROLES = (Role.OPERATOR, Role.ADMIN)
MAX_LENGTH = 1024  # longer input is refused, so a login cannot be made to hash megabytes

_hasher = PasswordHasher()


@cache
def _dummy_hash() -> str:
    """Verified when there is no hash to compare with, so a miss costs what a hit costs."""
    return _hasher.hash("not anyone's password")


def check_policy(password: str, *, min_length: int) -> None:
    if len(password) < min_length:
        raise ValidationFailed(f"The password needs at least {min_length} characters.")
    if len(password) > MAX_LENGTH:
        raise ValidationFailed(f"The password may have at most {MAX_LENGTH} characters.")
    if not password.strip():
        raise ValidationFailed("The password cannot be only spaces.")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches; False for no hash, a malformed hash or an over-long password."""
    if password_hash is None or len(password) > MAX_LENGTH:
        with suppress(VerificationError):
            _hasher.verify(_dummy_hash(), password[:MAX_LENGTH])
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with weaker parameters than today's: rehash after a good login."""
    return _hasher.check_needs_rehash(password_hash)


def set_password(user: User, password: str, *, min_length: int) -> None:
    """Give an operator or admin a new password (the caller's transaction stores it)."""
    if user.role not in STAFF_ROLES:
        raise ValidationFailed("Only operators and admins have a password; app users log in by code.")
    check_policy(password, min_length=min_length)
    user.password_hash = hash_password(password)
