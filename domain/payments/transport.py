"""The one place gateway HTTP calls are made: transport failures become `GatewayUnavailable`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from domain.payments.errors import GatewayUnavailable
from domain.payments.metrics import PAYMENTS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def call(gateway: str, method: str, url: str, *, timeout_s: float, **kwargs: Any) -> Reply:
    """One request; the JSON object it answered (empty if the body was not a JSON object)."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        PAYMENTS.labels(gateway=gateway, result="gateway_error").inc()
        log.warning("event=gateway_unreachable gateway=%s url=%s error=%r", gateway, url, exc)
        raise GatewayUnavailable(context={"gateway": gateway}) from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    return Reply(status=response.status_code, body=body if isinstance(body, dict) else {})


def refused(gateway: str, reply: Reply, action: str) -> GatewayUnavailable:
    """The gateway answered our request with an error: logged with its body, reported as unavailable."""
    PAYMENTS.labels(gateway=gateway, result="gateway_error").inc()
    log.error(
        "event=gateway_refused gateway=%s action=%s status=%s body=%s",
        gateway,
        action,
        reply.status,
        reply.body,
    )
    return GatewayUnavailable(
        "The payment gateway refused the request: try again later or use another method.",
        context={"gateway": gateway},
    )
