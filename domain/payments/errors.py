"""Payment failures, each one exception (mapped to the error envelope by `api.envelope`)."""

from __future__ import annotations

from domain.errors import DomainError, ValidationFailed


class PaymentSignatureInvalid(ValidationFailed):
    default_message = "The payment confirmation could not be authenticated; nothing was credited."


class PaymentAmountMismatch(ValidationFailed):
    default_message = "The amount the payment gateway reports differs from the top-up; nothing was credited."


class GatewayUnavailable(DomainError):
    code, status = "payment_gateway_unavailable", 503
    default_message = "The payment gateway cannot be reached now: try again in a moment."
