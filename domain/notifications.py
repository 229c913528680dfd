"""Notifications with an outbox: written in the caller's transaction, delivered later by a worker.

`notify` inserts the in-app notification and one delivery row per channel that its kind uses (a push per
registered device when FCM is configured, an SMS when the user has a phone): database writes only, inside
the caller's transaction and a savepoint, so a rental or payment commits or rolls back together with its
notification, never waits on FCM or an SMS gateway, and is never failed by a notification problem.

`deliver_due` (the `deliver_notifications` job) sends what is due, at most once per delivery:

1. claim — one short transaction marks a batch `SENDING` (`FOR UPDATE SKIP LOCKED`, so concurrent workers
   take disjoint rows) and counts the attempt, and commits *before* anything is sent;
2. send — outside any transaction, a few at a time;
3. record — `SENT`; or back to `PENDING` with exponential backoff (`NOTIFICATION_RETRY_BASE_S`·2^(n-1), at
   most `NOTIFICATION_RETRY_MAX_S`, at least FCM's Retry-After) until `NOTIFICATION_MAX_ATTEMPTS`; or
   `FAILED` (refused, attempts used up, token UNREGISTERED — that token is deleted).

A delivery left `SENDING` longer than `NOTIFICATION_SEND_LEASE_S` belonged to a worker that died mid-send:
whether it went out is unknown, so it is marked FAILED, never sent again (the in-app row stays).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache

from prometheus_client import Counter
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings, get_settings
from domain.errors import NotFound
from domain.push import PushRejected, PushRetry, PushSender, PushSent, PushUnregistered
from domain.sms import SmsBackend
from storage.db import Database
from storage.models import User
from storage.notification_models import (
    BODY_MAX,
    KEY_MAX,
    TITLE_MAX,
    Channel,
    DeliveryStatus,
    DeviceToken,
    Notification,
    NotificationDelivery,
    NotificationKind,
    Platform,
)

log = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "NotificationKind",
    "Platform",
    "check_settings",
    "deliver_due",
    "eject_failed",
    "notify",
    "refund_processed",
    "rental_overdue",
    "rental_returned",
    "rental_started",
    "topup_credited",
]

DELIVERIES = Counter(
    "powerbank_notification_deliveries",
    "Notification sends by channel and result (sent, retry, failed, unregistered, interrupted)",
    ["channel", "result"],
)
MAX_DEVICES_PER_USER = 10  # registering an 11th token drops the least recently registered one
NEPAL_TIME = timezone(timedelta(hours=5, minutes=45), "NPT")  # how times read in texts (no DST in Nepal)
INTERRUPTED = "interrupted: the worker stopped mid-send, outcome unknown"


# --- which channels a kind uses ------------------------------------------------------------------------


@lru_cache(maxsize=16)
def kinds(spec: str) -> frozenset[NotificationKind]:
    """Parse a comma-separated list of kinds (a NOTIFICATION_*_KINDS setting); unknown names raise."""
    names = [name.strip().upper() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in NotificationKind.__members__]
    if unknown:
        known = ", ".join(NotificationKind.__members__)
        raise ValueError(f"unknown notification kind(s) {', '.join(unknown)}: use some of {known}")
    return frozenset(NotificationKind(name) for name in names)


def check_settings(settings: Settings) -> None:
    """Fail at start-up, not inside a rental, on a mistyped NOTIFICATION_PUSH_KINDS / _SMS_KINDS."""
    kinds(settings.notification_push_kinds)
    kinds(settings.notification_sms_kinds)


# --- writing (in the caller's transaction) -------------------------------------------------------------


async def notify(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    kind: NotificationKind | str,
    title: str,
    body: str,
    data: Mapping[str, str] | None = None,
    key: str | None = None,
    settings: Settings | None = None,
) -> None:
    """Record a notification and its deliveries in the caller's transaction; never raises.

    `key` (e.g. `rental:<id>:returned`) makes it idempotent: a second call with the same user and key adds
    nothing. `settings` default to `get_settings()` (which channels a kind uses, whether push is on).
    """
    try:
        async with session.begin_nested():
            await _record(
                session,
                user_id=user_id,
                kind=NotificationKind(kind),
                title=title,
                body=body,
                data=dict(data or {}),
                key=key,
                settings=settings or get_settings(),
            )
    except (SQLAlchemyError, ValueError):
        log.exception("event=notify_failed user_id=%s kind=%s key=%s", user_id, kind, key)


async def _record(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    kind: NotificationKind,
    title: str,
    body: str,
    data: dict[str, str],
    key: str | None,
    settings: Settings,
) -> None:
    now = datetime.now(UTC)
    inserted = (
        insert(Notification)
        .values(
            id=uuid.uuid4(),
            user_id=user_id,
            kind=kind,
            title=title[:TITLE_MAX],
            body=body[:BODY_MAX],
            data={str(k): str(v) for k, v in data.items()},
            key=key[:KEY_MAX] if key else None,
            created_at=now,
        )
        .on_conflict_do_nothing(
            index_elements=[Notification.user_id, Notification.key],
            index_where=Notification.key.is_not(None),
        )
        .returning(Notification.id)
    )
    notification_id = await session.scalar(inserted)
    if notification_id is None:
        log.info("event=notify_duplicate user_id=%s kind=%s key=%s", user_id, kind.value, key)
        return
    rows: list[dict[str, object]] = []
    if settings.fcm_service_account_file is not None and kind in kinds(settings.notification_push_kinds):
        devices = await session.scalars(select(DeviceToken.id).where(DeviceToken.user_id == user_id))
        rows += [{"channel": Channel.PUSH, "device_id": device_id} for device_id in devices.all()]
    if kind in kinds(settings.notification_sms_kinds):
        if await session.scalar(select(User.phone).where(User.id == user_id)):
            rows.append({"channel": Channel.SMS, "device_id": None})
    if rows:
        await session.execute(
            insert(NotificationDelivery),
            [
                {
                    **row,
                    "notification_id": notification_id,
                    "status": DeliveryStatus.PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                }
                for row in rows
            ],
        )
    log.info(
        "event=notified user_id=%s kind=%s notification_id=%s deliveries=%d",
        user_id,
        kind.value,
        notification_id,
        len(rows),
    )


# --- what each event says ------------------------------------------------------------------------------


def _npr(amount: Decimal) -> str:
    return f"NPR {amount:.2f}"


def _local(at: datetime) -> str:
    return at.astimezone(NEPAL_TIME).strftime("%d %b %H:%M")


async def rental_started(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    rental_id: uuid.UUID,
    rental_code: str,
    station_sn: str,
    due_at: datetime,
    settings: Settings | None = None,
) -> None:
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.RENTAL_STARTED,
        title="Rental started",
        body=f"Power bank rented at {station_sn} (rental {rental_code}). Return it by {_local(due_at)}.",
        data={"rental_id": str(rental_id), "rental_code": rental_code, "due_at": due_at.isoformat()},
        key=f"rental:{rental_id}:started",
        settings=settings,
    )


async def rental_returned(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    rental_id: uuid.UUID,
    rental_code: str,
    station_sn: str,
    charged: Decimal,
    due: Decimal,
    settings: Settings | None = None,
) -> None:
    body = f"Rental {rental_code} ended at {station_sn}. Charged {_npr(charged)}."
    if due > 0:
        body += f" {_npr(due)} is still due: top up your wallet to settle it."
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.RENTAL_RETURNED,
        title="Power bank returned",
        body=body,
        data={
            "rental_id": str(rental_id),
            "rental_code": rental_code,
            "charged": f"{charged:.2f}",
            "due": f"{due:.2f}",
        },
        key=f"rental:{rental_id}:returned",
        settings=settings,
    )


async def rental_overdue(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    rental_id: uuid.UUID,
    rental_code: str,
    due_at: datetime,
    settings: Settings | None = None,
) -> None:
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.RENTAL_OVERDUE,
        title="Rental overdue",
        body=(
            f"Rental {rental_code} was due at {_local(due_at)}. Late fees apply until you return the "
            "power bank to any station."
        ),
        data={"rental_id": str(rental_id), "rental_code": rental_code, "due_at": due_at.isoformat()},
        key=f"rental:{rental_id}:overdue",
        settings=settings,
    )


async def eject_failed(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    rental_id: uuid.UUID,
    rental_code: str,
    station_sn: str,
    settings: Settings | None = None,
) -> None:
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.EJECT_FAILED,
        title="Power bank not released",
        body=(
            f"The power bank did not come out at {station_sn} (rental {rental_code}). Nothing was charged: "
            "try again or use another station."
        ),
        data={"rental_id": str(rental_id), "rental_code": rental_code, "charged": "0.00"},
        key=f"rental:{rental_id}:eject_failed",
        settings=settings,
    )


async def topup_credited(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    intent_id: uuid.UUID,
    amount: Decimal,
    balance: Decimal,
    gateway: str,
    settings: Settings | None = None,
) -> None:
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.TOPUP_CREDITED,
        title="Wallet topped up",
        body=f"{_npr(amount)} from {gateway} was added to your wallet. Balance: {_npr(balance)}.",
        data={"intent_id": str(intent_id), "amount": f"{amount:.2f}", "balance": f"{balance:.2f}"},
        key=f"topup:{intent_id}",
        settings=settings,
    )


async def refund_processed(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    refund_id: uuid.UUID | int | str,
    amount: Decimal,
    settings: Settings | None = None,
) -> None:
    await notify(
        session,
        user_id=user_id,
        kind=NotificationKind.REFUND_PROCESSED,
        title="Refund processed",
        body=f"Your refund of {_npr(amount)} was credited to your wallet.",
        data={"refund_id": str(refund_id), "amount": f"{amount:.2f}"},
        key=f"refund:{refund_id}",
        settings=settings,
    )


# --- the in-app list -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationPage:
    rows: list[Notification]
    count: int
    unread: int


async def page(
    session: AsyncSession, *, user_id: uuid.UUID, page: int, page_size: int, unread_only: bool = False
) -> NotificationPage:
    """The user's notifications, newest first, with the total and unread counts."""
    count, unread = (
        await session.execute(
            select(func.count(), func.count().filter(Notification.read_at.is_(None))).where(
                Notification.user_id == user_id
            )
        )
    ).one()
    stmt = select(Notification).where(Notification.user_id == user_id)
    if unread_only:
        stmt = stmt.where(Notification.read_at.is_(None))
    stmt = (
        stmt.order_by(Notification.created_at.desc(), Notification.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    rows = list((await session.scalars(stmt)).all())
    return NotificationPage(rows=rows, count=unread if unread_only else count, unread=unread)


async def mark_read(
    session: AsyncSession, *, user_id: uuid.UUID, notification_id: uuid.UUID, now: datetime
) -> Notification:
    """Mark one of the user's notifications read (idempotent); another user's is NotFound."""
    row = await session.scalar(
        select(Notification)
        .where(Notification.id == notification_id, Notification.user_id == user_id)
        .with_for_update()
    )
    if row is None:
        raise NotFound("No such notification.")
    if row.read_at is None:
        row.read_at = now
    return row


async def mark_all_read(session: AsyncSession, *, user_id: uuid.UUID, now: datetime) -> int:
    result = await session.execute(
        update(Notification)
        .where(Notification.user_id == user_id, Notification.read_at.is_(None))
        .values(read_at=now)
    )
    updated: int = getattr(result, "rowcount", 0) or 0
    return updated


# --- device tokens -------------------------------------------------------------------------------------


async def register_device(
    session: AsyncSession, *, user_id: uuid.UUID, token: str, platform: Platform, now: datetime
) -> DeviceToken:
    """Register (or refresh) a push token for the user; a token registered by another user moves here."""
    stmt = (
        insert(DeviceToken)
        .values(user_id=user_id, token=token, platform=platform, created_at=now, updated_at=now)
        .on_conflict_do_update(
            index_elements=[DeviceToken.token],
            set_={"user_id": user_id, "platform": platform, "updated_at": now},
        )
        .returning(DeviceToken)
    )
    device = (await session.scalars(stmt, execution_options={"populate_existing": True})).one()
    newest = (
        select(DeviceToken.id)
        .where(DeviceToken.user_id == user_id)
        .order_by(DeviceToken.updated_at.desc(), DeviceToken.id.desc())
        .limit(MAX_DEVICES_PER_USER)
    )
    await session.execute(
        delete(DeviceToken).where(
            DeviceToken.user_id == user_id, DeviceToken.id.not_in(newest.scalar_subquery())
        )
    )
    return device


async def unregister_device(session: AsyncSession, *, user_id: uuid.UUID, token: str) -> bool:
    """Forget the user's token (logout); False if the user had no such token."""
    result = await session.execute(
        delete(DeviceToken).where(DeviceToken.user_id == user_id, DeviceToken.token == token)
    )
    return bool(getattr(result, "rowcount", 0))


# --- delivery (the outbox worker) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Work:
    delivery_id: int
    channel: Channel
    attempts: int  # including this one
    notification_id: uuid.UUID
    kind: NotificationKind
    title: str
    body: str
    data: dict[str, str]
    device_id: int | None
    target: str | None  # the device's token or the user's phone; None → nowhere to send any more


@dataclass(frozen=True, slots=True, kw_only=True)
class _Result:
    work: _Work
    result: str  # sent | retry | failed | unregistered
    error: str | None = None
    retry_after_s: float | None = None


def retry_delay(attempts: int, settings: Settings, retry_after_s: float | None = None) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt."""
    backoff = settings.notification_retry_base_s * 2 ** max(0, attempts - 1)
    delay = min(backoff, settings.notification_retry_max_s)
    return timedelta(seconds=max(delay, retry_after_s or 0.0))


async def deliver_due(
    db: Database, *, settings: Settings, push: PushSender | None, sms: SmsBackend | None, now: datetime
) -> int:
    """Send every delivery due at `now` over the channels given (None: that channel's rows wait); how many
    were sent. Safe to run in several processes at once: each delivery is claimed by one of them."""
    channels = [
        channel for channel, sender in ((Channel.PUSH, push), (Channel.SMS, sms)) if sender is not None
    ]
    if not channels:
        return 0
    sent = 0
    while True:
        batch = await _claim(db, settings=settings, channels=channels, now=now)
        if not batch:
            return sent
        limit = asyncio.Semaphore(settings.notification_send_concurrency)

        async def one(work: _Work, limit: asyncio.Semaphore = limit) -> _Result:
            async with limit:
                return await _send(work, push=push, sms=sms)

        results = await asyncio.gather(*(one(work) for work in batch))
        await _finish(db, results, settings=settings, now=now)
        sent += sum(r.result == "sent" for r in results)
        if len(batch) < settings.notification_batch_size:
            return sent


async def _claim(db: Database, *, settings: Settings, channels: list[Channel], now: datetime) -> list[_Work]:
    D = NotificationDelivery
    async with db.transaction() as session:
        stale = await session.execute(
            update(D)
            .where(
                D.status == DeliveryStatus.SENDING,
                D.claimed_at < now - timedelta(seconds=settings.notification_send_lease_s),
            )
            .values(status=DeliveryStatus.FAILED, last_error=INTERRUPTED)
            .returning(D.id, D.channel)
        )
        for delivery_id, channel in stale.all():
            DELIVERIES.labels(channel=channel.value.lower(), result="interrupted").inc()
            log.warning(
                "event=notification_interrupted delivery_id=%s channel=%s", delivery_id, channel.value
            )
        due = (
            select(D.id)
            .where(D.status == DeliveryStatus.PENDING, D.next_attempt_at <= now, D.channel.in_(channels))
            .order_by(D.next_attempt_at, D.id)
            .limit(settings.notification_batch_size)
            .with_for_update(skip_locked=True)
        )
        claimed = (
            await session.scalars(
                update(D)
                .where(D.id.in_(due.scalar_subquery()))
                .values(status=DeliveryStatus.SENDING, attempts=D.attempts + 1, claimed_at=now)
                .returning(D.id)
            )
        ).all()
        if not claimed:
            return []
        rows = await session.execute(
            select(
                D.id,
                D.channel,
                D.attempts,
                D.device_id,
                Notification.id,
                Notification.user_id,
                Notification.kind,
                Notification.title,
                Notification.body,
                Notification.data,
                DeviceToken.token,
                DeviceToken.user_id,
                User.phone,
            )
            .join(Notification, Notification.id == D.notification_id)
            .join(User, User.id == Notification.user_id)
            .outerjoin(DeviceToken, DeviceToken.id == D.device_id)
            .where(D.id.in_(claimed))
            .order_by(D.id)
        )
        work = []
        for (
            delivery_id,
            channel,
            attempts,
            device_id,
            notification_id,
            user_id,
            kind,
            title,
            body,
            data,
            token,
            token_owner,
            phone,
        ) in rows.all():
            if channel == Channel.PUSH:
                target = token if token_owner == user_id else None  # removed, or moved to another user
            else:
                target = phone
            work.append(
                _Work(
                    delivery_id=delivery_id,
                    channel=channel,
                    attempts=attempts,
                    notification_id=notification_id,
                    kind=kind,
                    title=title,
                    body=body,
                    data=dict(data or {}),
                    device_id=device_id,
                    target=target,
                )
            )
        return work


async def _send(work: _Work, *, push: PushSender | None, sms: SmsBackend | None) -> _Result:
    if work.target is None:
        gone = "device_removed" if work.channel == Channel.PUSH else "no_phone"
        return _Result(work=work, result="failed", error=gone)
    try:
        if work.channel == Channel.SMS:
            assert sms is not None
            await sms.send(to=work.target, text=f"{work.title}: {work.body}")
            return _Result(work=work, result="sent")
        assert push is not None
        data = {**work.data, "kind": work.kind.value, "notification_id": str(work.notification_id)}
        outcome = await push.send(token=work.target, title=work.title, body=work.body, data=data)
    except Exception as exc:  # a backend bug or outage must not stop the rest of the batch
        log.warning("event=notification_send_error delivery_id=%s error=%r", work.delivery_id, exc)
        return _Result(work=work, result="retry", error=f"{type(exc).__name__}: {exc}")
    match outcome:
        case PushSent():
            return _Result(work=work, result="sent")
        case PushRetry(reason=reason, retry_after_s=retry_after_s):
            return _Result(work=work, result="retry", error=reason, retry_after_s=retry_after_s)
        case PushUnregistered(reason=reason):
            return _Result(work=work, result="unregistered", error=reason)
        case PushRejected(reason=reason):
            return _Result(work=work, result="failed", error=reason)
    raise AssertionError(f"unexpected push outcome {outcome!r}")


async def _finish(db: Database, results: list[_Result], *, settings: Settings, now: datetime) -> None:
    D = NotificationDelivery
    async with db.transaction() as session:
        for r in results:
            work, result = r.work, r.result
            error = r.error[:255] if r.error else None
            values: dict[str, object]
            if result == "sent":
                values = {"status": DeliveryStatus.SENT, "sent_at": now, "last_error": None}
            elif result == "retry" and work.attempts < settings.notification_max_attempts:
                next_at = now + retry_delay(work.attempts, settings, r.retry_after_s)
                values = {"status": DeliveryStatus.PENDING, "next_attempt_at": next_at, "last_error": error}
            else:
                result = "failed" if result == "retry" else result  # a retry with no attempts left fails
                values = {"status": DeliveryStatus.FAILED, "last_error": error}
            await session.execute(
                update(D).where(D.id == work.delivery_id, D.status == DeliveryStatus.SENDING).values(**values)
            )
            if result == "unregistered" and work.device_id is not None:
                await session.execute(delete(DeviceToken).where(DeviceToken.id == work.device_id))
            DELIVERIES.labels(channel=work.channel.value.lower(), result=result).inc()
            log.info(
                "event=notification_delivery delivery_id=%s notification_id=%s channel=%s attempt=%d "
                "result=%s%s",
                work.delivery_id,
                work.notification_id,
                work.channel.value,
                work.attempts,
                result,
                f" error={r.error!r}" if r.error else "",
            )
