"""Top-ups nobody verified: paid at the gateway, but the app never came back (a crash, a lost network).

Khalti and eSewa have no webhook, so a paid top-up was credited only if the app called `verify`. The job
`reconcile_topups` asks the gateway about every intent still open for up to `TOPUP_RECONCILE_FOR_S`
(24 h): PENDING ones, and ones expired here for lack of news (the user may have paid late). Each intent
is asked first `TOPUP_RECONCILE_FIRST_S` after it was created, then with doubling gaps up to an hour; what
the gateway says goes through `service.settle`, which credits at most once whoever else (callback,
`verify`, webhook) reports the payment. After the 24 h a PENDING intent is EXPIRED and no longer asked.
Outcomes are counted in `powerbank_topups_reconciled_total{gateway, result}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from sqlalchemy import or_, select, update

from config import Settings
from domain.errors import DomainError
from domain.payments import gateways, service
from domain.payments.metrics import TOPUPS_RECONCILED
from storage.db import Database
from storage.payment_models import IntentStatus, PaymentIntent

log = logging.getLogger(__name__)
BATCH = 100
MAX_GAP = timedelta(hours=1)


@dataclass
class Reconciled:
    results: dict[str, int] = field(default_factory=dict)

    def count(self, gateway: str, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1
        TOPUPS_RECONCILED.labels(gateway=gateway, result=result).inc()


def _next_check(settings: Settings, checks: int, now: datetime) -> datetime:
    gap: timedelta = timedelta(seconds=settings.topup_reconcile_first_s) * (2 ** min(checks, 16))
    return now + min(gap, MAX_GAP)


async def reconcile(db: Database, settings: Settings, *, now: datetime) -> Reconciled:
    """One pass: the intents whose check is due (at most BATCH), then the 24 h expiry."""
    done = Reconciled()
    live = [g for g in gateways.states(settings) if g.live]  # an intent of a gateway that is off waits
    if not live:
        return done
    since = now - timedelta(seconds=settings.topup_reconcile_for_s)
    first = timedelta(seconds=settings.topup_reconcile_first_s)
    async with db.transaction() as session:
        rows = await session.scalars(
            select(PaymentIntent)
            .where(
                or_(
                    PaymentIntent.status == IntentStatus.PENDING,
                    (PaymentIntent.status == IntentStatus.EXPIRED)
                    & (PaymentIntent.failure_reason == "expired"),
                ),
                PaymentIntent.gateway.in_([g.gateway for g in live]),
                PaymentIntent.created_at > since,
                or_(
                    PaymentIntent.next_check_at <= now,
                    PaymentIntent.next_check_at.is_(None) & (PaymentIntent.created_at <= now - first),
                ),
            )
            .order_by(PaymentIntent.created_at)
            .limit(BATCH)
        )
        due = [(service.Intent.of(row), row.checks) for row in rows]
    for intent, checks in due:
        gateway = intent.gateway.value
        try:
            outcome = await service.check_with_gateway(settings, intent)
            state = await service.settle(db, intent_id=intent.id, outcome=outcome, source="reconcile")
        except (DomainError, httpx.HTTPError) as exc:
            log.warning(
                "event=topup_reconcile_failed intent_id=%s gateway=%s error=%r", intent.id, gateway, exc
            )
            done.count(gateway, "error")
        else:
            settled = state.status not in (IntentStatus.PENDING, IntentStatus.EXPIRED)
            done.count(
                gateway,
                "credited" if state.credited else state.status.value.lower() if settled else "pending",
            )
        async with db.transaction() as session:
            await session.execute(
                update(PaymentIntent)
                .where(PaymentIntent.id == intent.id)
                .values(checks=checks + 1, next_check_at=_next_check(settings, checks, now))
            )
    async with db.transaction() as session:  # asked for 24 h, never paid: closed (checked again by nobody)
        expired = await session.execute(
            update(PaymentIntent)
            .where(PaymentIntent.status == IntentStatus.PENDING, PaymentIntent.created_at <= since)
            .values(status=IntentStatus.EXPIRED, failure_reason="unpaid_after_24h")
            .returning(PaymentIntent.gateway)
        )
        for (gateway_enum,) in expired:
            done.count(gateway_enum.value, "expired")
    return done
