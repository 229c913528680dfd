"""A second factor for staff logins by one-time code: an SMS code alone gave an operator a long-lived
token that credits wallets, refunds, reads KYC files and ejects holes.

An operator or admin who verifies a code must also give their password (the argon2 one set with
`powerbank admin create --password`), or, once they enrolled TOTP (RFC 6238, `pyotp`), a current TOTP code
instead. Missing → 401 `second_factor_required` (the code is spent: ask for a new one); wrong → 401 and a
failure towards the same lock-out as wrong codes. Riders are not asked.
"""

from __future__ import annotations

import pyotp
from redis.asyncio import Redis

from config import Settings
from domain import lockout, passwords
from domain.errors import DomainError, Forbidden, InvalidState, Unauthorized
from storage.models import User
from telemetry import metrics

ISSUER = "ChargeGhar"


class SecondFactorRequired(DomainError):
    code, status = "second_factor_required", 401
    default_message = (
        "Staff log in with their password too (or, once enrolled, a TOTP code): ask for a new code."
    )


def _totp_ok(secret: str, code: str) -> bool:
    return pyotp.TOTP(secret).verify(code.strip(), valid_window=1)


async def check(
    redis: Redis,
    settings: Settings,
    user: User,
    *,
    identifier: str,
    ip: str,
    password: str | None,
    totp: str | None,
) -> None:
    """Nothing for riders; for staff, the enrolled factor (TOTP once enrolled, else the password). A login
    that passes clears the lock-out failures of (identifier, IP)."""
    if user.role not in passwords.STAFF_ROLES:
        await lockout.succeeded(redis, identifier=identifier, ip=ip)
        return
    factor = "totp" if user.totp_secret else "password"
    given = totp if factor == "totp" else password
    if not given:
        metrics.AUTH_FAILURES.labels(reason="second_factor_missing").inc()
        raise SecondFactorRequired(context={"factor": factor})
    good = (
        _totp_ok(user.totp_secret, given) if user.totp_secret else passwords.verify(user.password_hash, given)
    )
    if not good:
        metrics.AUTH_FAILURES.labels(reason="second_factor_wrong").inc()
        await lockout.failed(redis, settings, identifier=identifier, ip=ip)
        raise Unauthorized("Wrong password or TOTP code: ask for a new code and try again.")
    await lockout.succeeded(redis, identifier=identifier, ip=ip)


def start_enrolment(user: User) -> tuple[str, str]:
    """A new TOTP secret (kept pending until confirmed) and its otpauth:// URI for an authenticator app."""
    if user.role not in passwords.STAFF_ROLES:
        raise Forbidden("Only operators and admins enrol a second factor.")
    user.totp_pending_secret = pyotp.random_base32()
    label = user.phone or user.email or str(user.id)
    uri = pyotp.TOTP(user.totp_pending_secret).provisioning_uri(name=label, issuer_name=ISSUER)
    return user.totp_pending_secret, uri


def confirm_enrolment(user: User, code: str) -> None:
    """The first code from the authenticator proves it holds the secret; from now on logins need TOTP."""
    if not user.totp_pending_secret:
        raise InvalidState("Start the enrolment first (POST /api/auth/totp/enroll).")
    if not _totp_ok(user.totp_pending_secret, code):
        raise Unauthorized("Wrong TOTP code: check the authenticator's clock and try again.")
    user.totp_secret, user.totp_pending_secret = user.totp_pending_secret, None
