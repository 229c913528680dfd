"""One exception type per domain failure; the API maps them to the error envelope once."""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    code: ClassVar[str] = "invalid_state"
    status: ClassVar[int] = 409
    default_message: ClassVar[str] = "The request conflicts with the current state."

    def __init__(self, message: str | None = None, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.context = context or {}


class ValidationFailed(DomainError):
    code, status, default_message = "validation_error", 400, "The request is not valid."


class Unauthorized(DomainError):
    code, status, default_message = "unauthorized", 401, "Authentication required: log in again."


class Forbidden(DomainError):
    code, status, default_message = "forbidden", 403, "You may not do this."


class NotFound(DomainError):
    code, status, default_message = "not_found", 404, "Not found."


class InsufficientBalance(DomainError):
    code, status, default_message = (
        "insufficient_balance",
        402,
        "Your wallet balance is too low: top up first.",
    )


class ActiveRentalExists(DomainError):
    code, status, default_message = "active_rental_exists", 409, "You already have an open rental."


class NoPowerBankAvailable(DomainError):
    code, status, default_message = "no_power_bank_available", 409, "No power bank can be rented here now."


class InvalidState(DomainError):
    pass


class Conflict(DomainError):
    code, status, default_message = "conflict", 409, "This already exists."


class RateLimited(DomainError):
    code, status, default_message = "rate_limited", 429, "Too many requests: wait and try again."


class LockedOut(DomainError):
    """Too many failed logins; `context["retry_after"]` (seconds) becomes the Retry-After header."""

    code, status, default_message = "locked_out", 423, "Too many failed attempts: wait and try again."


class StationOffline(DomainError):
    code, status, default_message = "station_offline", 503, "The station is offline: try another station."


class StationNotReady(DomainError):
    code, status = "station_not_ready", 503
    default_message = "The station has just connected and is not ready yet: try again in a moment."


class StationMaintenance(DomainError):
    code, status, default_message = "station_maintenance", 503, "The station is under maintenance."


class CabinetBusy(DomainError):
    code, status, default_message = "cabinet_busy", 503, "The station is busy: try again in a moment."


class EjectFailed(DomainError):
    code, status = "eject_failed", 503
    default_message = (
        "The power bank did not come out; nothing was charged. Try again or use another station."
    )


class Overloaded(DomainError):
    """More requests of a kind in flight than the process admits; `context["retry_after"]` → Retry-After."""

    code, status = "overloaded", 503
    default_message = "The service is busy right now; nothing was done. Try again in a moment."


class IdempotencyKeyReused(DomainError):
    code, status = "idempotency_key_reused", 409
    default_message = (
        "This Idempotency-Key was already used with a different request: use a new key for a new request."
    )


class KycRequired(DomainError):
    code, status = "kyc_required", 403
    default_message = "Verify your identity (KYC) before renting: an operator must approve your documents."


class FileTooLarge(DomainError):
    code, status, default_message = "file_too_large", 413, "The file is too large."


class CommandTimeout(DomainError):
    """An operator's command got no reply frame in time; whether the cabinet acted is in the context."""

    code, status = "command_timeout", 504
    default_message = "The cabinet did not answer the command in time."
