"""Notifications (issue 4, item 8): the outbox written in the caller's transaction, delivery through the real
FCM HTTP v1 client against a local fake (OAuth2 service-account flow included) and the SMS backends, retries
with backoff on a moved clock, and the in-app API over the running system."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from domain import notifications
from domain.push import FcmClient, PushRetry, PushSent, ServiceAccount, fcm_client
from domain.sms import sms_backend
from storage.models import User
from storage.notification_models import (
    Channel,
    DeliveryStatus,
    DeviceToken,
    Notification,
    NotificationDelivery,
    NotificationKind,
    Platform,
)
from tests.conftest import Api, new_phone
from tests.fakes import serve
from tests.fakes.fcm import FakeFcm

pytestmark = pytest.mark.integration

ALL_KINDS = ",".join(NotificationKind)
BASE_S, MAX_S, ATTEMPTS = 10.0, 25.0, 3


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def fcm() -> AsyncIterator[FakeFcm]:
    fake = FakeFcm()
    async with serve(fake.app()) as url:
        fake.base_url = url
        yield fake


@pytest.fixture(scope="module")
def nsettings(system: Any, fcm: FakeFcm, tmp_root: Path) -> Any:
    """The system's settings with push on (the fake FCM) and short, countable retries."""
    return system.settings.model_copy(
        update={
            "fcm_service_account_file": fcm.service_account_file(tmp_root),
            "fcm_base_url": fcm.base_url,
            "notification_push_kinds": ALL_KINDS,
            "notification_sms_kinds": "RENTAL_RETURNED,RENTAL_OVERDUE",
            "notification_max_attempts": ATTEMPTS,
            "notification_retry_base_s": BASE_S,
            "notification_retry_max_s": MAX_S,
        }
    )


@pytest.fixture(scope="module")
async def push(nsettings: Any) -> AsyncIterator[FcmClient]:
    client = fcm_client(nsettings)
    assert client is not None
    yield client
    await client.aclose()


@pytest.fixture
def fcm_reset(fcm: FakeFcm) -> FakeFcm:
    fcm.failures.clear()
    return fcm


class RecordingSms:
    """An SMS backend that records what it sent and can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.failures = 0

    async def send(self, *, to: str, text: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("SMS gateway down")
        self.sent.append((to, text))


@pytest.fixture
async def exclusive(system: Any) -> AsyncIterator[None]:
    """Hold the deliver_notifications job's advisory lock for the test: a scheduler running in the system
    skips its runs meanwhile, so only the test's own `deliver_due` calls touch the test's deliveries."""
    async with system.services.db.transaction() as session:
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtext("deliver_notifications"))))
        yield


async def new_user(db: Any, *, phone: bool = True) -> uuid.UUID:
    async with db.transaction() as session:
        user = User(phone=new_phone()) if phone else User(email=f"{uuid.uuid4().hex}@example.com")
        session.add(user)
        await session.flush()
        return user.id


async def add_device(db: Any, user_id: uuid.UUID, token: str | None = None) -> str:
    token = token or f"fcm-{uuid.uuid4().hex}"
    async with db.transaction() as session:
        await notifications.register_device(
            session, user_id=user_id, token=token, platform=Platform.ANDROID, now=datetime.now(UTC)
        )
    return token


async def deliveries(db: Any, user_id: uuid.UUID) -> list[NotificationDelivery]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(NotificationDelivery)
            .join(Notification, Notification.id == NotificationDelivery.notification_id)
            .where(Notification.user_id == user_id)
            .order_by(NotificationDelivery.id)
        )
        return list(rows.all())


async def returned(db: Any, settings: Any, user_id: uuid.UUID, *, fee: str = "150.00") -> uuid.UUID:
    rental_id = uuid.uuid4()
    async with db.transaction() as session:
        await notifications.rental_returned(
            session,
            user_id=user_id,
            rental_id=rental_id,
            rental_code="RC1",
            station_sn="S-RET",
            charged=Decimal(fee),
            due=Decimal("0.00"),
            settings=settings,
        )
    return rental_id


# --- settings and backoff (no services) -----------------------------------------------------------------


def test_kind_lists_parse_and_typos_fail_at_start_up() -> None:
    from config import Settings

    assert notifications.kinds(" rental_started, EJECT_FAILED ,") == {
        NotificationKind.RENTAL_STARTED,
        NotificationKind.EJECT_FAILED,
    }
    notifications.check_settings(Settings())  # the defaults are valid
    with pytest.raises(ValueError, match="RENTAL_STRATED"):
        notifications.check_settings(Settings(notification_sms_kinds="RENTAL_STRATED"))


def test_backoff_doubles_up_to_the_cap_and_honours_retry_after(nsettings: Any) -> None:
    delays = [notifications.retry_delay(n, nsettings).total_seconds() for n in (1, 2, 3, 4)]
    assert delays == [BASE_S, 2 * BASE_S, MAX_S, MAX_S]
    assert notifications.retry_delay(1, nsettings, retry_after_s=120).total_seconds() == 120


# --- notify: the outbox in the caller's transaction ------------------------------------------------------


async def test_notify_writes_in_the_callers_transaction_and_rolls_back_with_it(
    system: Any, nsettings: Any, exclusive: None
) -> None:
    db = system.services.db
    user_id = await new_user(db)
    await add_device(db, user_id)
    await add_device(db, user_id)

    class RentalFailed(Exception):
        pass

    with pytest.raises(RentalFailed):
        async with db.transaction() as session:
            await notifications.notify(
                session,
                user_id=user_id,
                kind=NotificationKind.RENTAL_RETURNED,
                title="Power bank returned",
                body="Charged NPR 150.00.",
                settings=nsettings,
            )
            inside = await session.scalar(select(func.count()).where(Notification.user_id == user_id))
            assert inside == 1  # visible inside the caller's transaction...
            raise RentalFailed  # ... and gone with it
    assert await deliveries(db, user_id) == []
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).where(Notification.user_id == user_id)) == 0

    await returned(db, nsettings, user_id)
    rows = await deliveries(db, user_id)
    assert sorted(r.channel for r in rows) == [Channel.PUSH, Channel.PUSH, Channel.SMS]  # 2 devices + phone
    assert {r.status for r in rows} == {DeliveryStatus.PENDING} and {r.attempts for r in rows} == {0}


async def test_notify_is_idempotent_per_key_and_never_breaks_the_caller(system: Any, nsettings: Any) -> None:
    db = system.services.db
    user_id = await new_user(db, phone=False)
    async with db.transaction() as session:
        for _ in range(2):  # a retried transition notifies once
            await notifications.rental_overdue(
                session,
                user_id=user_id,
                rental_id=uuid.UUID(int=7),
                rental_code="RC7",
                due_at=datetime.now(UTC),
                settings=nsettings,
            )
        # a broken notification (no such user) is logged and dropped; the caller's transaction carries on
        await notifications.notify(
            session, user_id=uuid.uuid4(), kind="EJECT_FAILED", title="t", body="b", settings=nsettings
        )
        session.add(User(phone=new_phone()))
    async with db.transaction() as session:
        rows = (await session.scalars(select(Notification).where(Notification.user_id == user_id))).all()
    assert [r.kind for r in rows] == [NotificationKind.RENTAL_OVERDUE]
    assert rows[0].key == f"rental:{uuid.UUID(int=7)}:overdue"
    assert await deliveries(db, user_id) == []  # no device, no phone: in-app only


async def test_without_fcm_configured_no_push_deliveries(system: Any, nsettings: Any) -> None:
    db = system.services.db
    user_id = await new_user(db)
    await add_device(db, user_id)
    off = nsettings.model_copy(update={"fcm_service_account_file": None})
    await returned(db, off, user_id)
    assert [r.channel for r in await deliveries(db, user_id)] == [Channel.SMS]


# --- delivery --------------------------------------------------------------------------------------------


async def test_push_and_sms_delivered_with_a_real_oauth_flow(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, tmp_root: Path, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db)
    token = await add_device(db, user_id)
    rental_id = await returned(db, nsettings, user_id, fee="175.50")
    sms_file = tmp_root / f"sms-{uuid.uuid4().hex}.jsonl"
    tokens_before = len(fcm.token_requests)

    sent = await notifications.deliver_due(
        db, settings=nsettings, push=push, sms=sms_backend(f"file:{sms_file}"), now=datetime.now(UTC)
    )

    assert sent >= 2
    [message] = fcm.sent_to(token)
    assert message["notification"] == {
        "title": "Power bank returned",
        "body": "Rental RC1 ended at S-RET. Charged NPR 175.50.",
    }
    assert message["data"]["kind"] == "RENTAL_RETURNED" and message["data"]["charged"] == "175.50"
    assert message["data"]["rental_id"] == str(rental_id) and "notification_id" in message["data"]
    async with db.transaction() as session:
        phone = await session.scalar(select(User.phone).where(User.id == user_id))
    texts = [json.loads(line) for line in sms_file.read_text().splitlines()]
    assert [t["to"] for t in texts if t["to"] == phone] == [phone]
    assert all(r.status == DeliveryStatus.SENT and r.attempts == 1 for r in await deliveries(db, user_id))
    # the assertion the fake verified (RS256, our key): issuer, audience, scope
    claims = fcm.token_requests[-1]
    assert claims["iss"] == fcm.client_email and claims["aud"] == fcm.token_url
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert len(fcm.token_requests) - tokens_before <= 1  # at most one token per client lifetime so far

    # the access token is cached: more pushes, no new token request
    before = len(fcm.token_requests)
    await returned(db, nsettings, user_id)
    await notifications.deliver_due(
        db, settings=nsettings, push=push, sms=RecordingSms(), now=datetime.now(UTC)
    )
    assert len(fcm.sent_to(token)) == 2 and len(fcm.token_requests) == before


async def test_a_500_is_retried_with_backoff_then_sent(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db, phone=False)
    token = await add_device(db, user_id)
    await returned(db, nsettings, user_id)
    fcm.fail_next(2, status=500, error_code="INTERNAL", token=token)
    sms, t0 = RecordingSms(), datetime.now(UTC)

    async def deliver(at: datetime) -> NotificationDelivery:
        await notifications.deliver_due(db, settings=nsettings, push=push, sms=sms, now=at)
        [row] = await deliveries(db, user_id)
        return row

    row = await deliver(t0)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 1)
    assert row.next_attempt_at == t0 + timedelta(seconds=BASE_S) and "500 INTERNAL" in (row.last_error or "")
    row = await deliver(t0 + timedelta(seconds=BASE_S - 1))  # not due yet: untouched
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 1)
    t1 = t0 + timedelta(seconds=BASE_S)
    row = await deliver(t1)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 2)
    assert row.next_attempt_at == t1 + timedelta(seconds=2 * BASE_S)
    row = await deliver(t1 + timedelta(seconds=2 * BASE_S))
    assert (row.status, row.attempts, row.last_error) == (DeliveryStatus.SENT, 3, None)
    assert len(fcm.sent_to(token)) == 1


async def test_503_retry_after_is_honoured_and_delivery_gives_up_after_max_attempts(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db, phone=False)
    token = await add_device(db, user_id)
    await returned(db, nsettings, user_id)
    fcm.fail_next(1, status=503, error_code="UNAVAILABLE", retry_after="120", token=token)
    fcm.fail_next(ATTEMPTS - 1, status=500, error_code="INTERNAL", token=token)
    sms, at = RecordingSms(), datetime.now(UTC)
    for attempt in range(1, ATTEMPTS + 1):
        await notifications.deliver_due(db, settings=nsettings, push=push, sms=sms, now=at)
        [row] = await deliveries(db, user_id)
        assert row.attempts == attempt
        if attempt == 1:
            assert row.next_attempt_at == at + timedelta(seconds=120)  # FCM's Retry-After beats the backoff
        if attempt < ATTEMPTS:
            assert row.status == DeliveryStatus.PENDING
            at = row.next_attempt_at
    assert row.status == DeliveryStatus.FAILED and "500 INTERNAL" in (row.last_error or "")
    await notifications.deliver_due(db, settings=nsettings, push=push, sms=sms, now=at + timedelta(days=1))
    [row] = await deliveries(db, user_id)
    assert row.attempts == ATTEMPTS and fcm.sent_to(token) == []  # never tried again


async def test_sms_failures_are_retried_too(system: Any, nsettings: Any, exclusive: None) -> None:
    db = system.services.db
    user_id = await new_user(db)
    await returned(db, nsettings, user_id)
    sms, t0 = RecordingSms(), datetime.now(UTC)
    sms.failures = 1
    await notifications.deliver_due(db, settings=nsettings, push=None, sms=sms, now=t0)
    [row] = await deliveries(db, user_id)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 1) and "SMS gateway down" in (
        row.last_error or ""
    )
    await notifications.deliver_due(
        db, settings=nsettings, push=None, sms=sms, now=t0 + timedelta(seconds=BASE_S)
    )
    [row] = await deliveries(db, user_id)
    assert row.status == DeliveryStatus.SENT and [text for _, text in sms.sent if "RC1" in text]


async def test_unregistered_token_is_deleted_and_not_used_again(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db, phone=False)
    dead, alive = await add_device(db, user_id), await add_device(db, user_id)
    fcm.unregister(dead)
    await returned(db, nsettings, user_id)
    await notifications.deliver_due(
        db, settings=nsettings, push=push, sms=RecordingSms(), now=datetime.now(UTC)
    )

    by_status = {r.status: r for r in await deliveries(db, user_id)}
    assert set(by_status) == {DeliveryStatus.SENT, DeliveryStatus.FAILED}
    assert "UNREGISTERED" in (by_status[DeliveryStatus.FAILED].last_error or "")
    async with db.transaction() as session:
        tokens = (
            await session.scalars(select(DeviceToken.token).where(DeviceToken.user_id == user_id))
        ).all()
    assert tokens == [alive] and len(fcm.sent_to(alive)) == 1
    attempts = fcm.send_attempts
    await returned(db, nsettings, user_id)  # only the live device gets a delivery now
    await notifications.deliver_due(
        db, settings=nsettings, push=push, sms=RecordingSms(), now=datetime.now(UTC)
    )
    assert fcm.send_attempts == attempts + 1 and len(fcm.sent_to(alive)) == 2


async def test_a_token_moved_to_another_user_gets_none_of_the_previous_users_pushes(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    first, second = await new_user(db, phone=False), await new_user(db, phone=False)
    token = await add_device(db, first)
    await returned(db, nsettings, first)  # pending for `first`'s device ...
    await add_device(db, second, token)  # ... when `second` logs in on the same phone
    await notifications.deliver_due(
        db, settings=nsettings, push=push, sms=RecordingSms(), now=datetime.now(UTC)
    )
    [row] = await deliveries(db, first)
    assert (row.status, row.last_error) == (DeliveryStatus.FAILED, "device_removed")
    assert fcm.sent_to(token) == []


async def test_a_delivery_interrupted_mid_send_is_never_sent_again(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, push: FcmClient, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db, phone=False)
    token = await add_device(db, user_id)
    await returned(db, nsettings, user_id)
    now = datetime.now(UTC)
    [row] = await deliveries(db, user_id)
    async with db.transaction() as session:  # a worker claimed it, then died before recording the outcome
        await session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.id == row.id)
            .values(status=DeliveryStatus.SENDING, attempts=1, claimed_at=now - timedelta(seconds=1))
        )
    await notifications.deliver_due(db, settings=nsettings, push=push, sms=RecordingSms(), now=now)
    [row] = await deliveries(db, user_id)
    assert row.status == DeliveryStatus.SENDING  # within the lease: maybe still sending
    later = now + timedelta(seconds=nsettings.notification_send_lease_s)
    await notifications.deliver_due(db, settings=nsettings, push=push, sms=RecordingSms(), now=later)
    [row] = await deliveries(db, user_id)
    assert row.status == DeliveryStatus.FAILED and (row.last_error or "").startswith("interrupted")
    assert fcm.sent_to(token) == []


async def test_concurrent_workers_send_each_delivery_exactly_once(
    system: Any, nsettings: Any, fcm_reset: FakeFcm, exclusive: None
) -> None:
    db, fcm = system.services.db, fcm_reset
    user_id = await new_user(db, phone=False)
    tokens = [await add_device(db, user_id) for _ in range(3)]
    for _ in range(10):
        await returned(db, nsettings, user_id)
    small = nsettings.model_copy(update={"notification_batch_size": 4, "notification_send_concurrency": 2})
    workers = [fcm_client(small) for _ in range(3)]  # three processes' worth of clients
    now = datetime.now(UTC)
    try:
        await asyncio.gather(
            *(
                notifications.deliver_due(db, settings=small, push=w, sms=RecordingSms(), now=now)
                for w in workers
                if w is not None
            )
        )
    finally:
        for w in workers:
            if w is not None:
                await w.aclose()
    rows = await deliveries(db, user_id)
    assert len(rows) == 30 and all(r.status == DeliveryStatus.SENT and r.attempts == 1 for r in rows)
    sent = [m for t in tokens for m in fcm.sent_to(t)]
    assert len(sent) == 30
    assert len({(m["token"], m["data"]["notification_id"]) for m in sent}) == 30  # none twice


# --- the FCM client on its own --------------------------------------------------------------------------


async def test_access_token_refreshed_only_near_expiry_and_a_foreign_key_is_refused(tmp_root: Path) -> None:
    now = [time.time()]
    fcm = FakeFcm(clock=lambda: now[0])  # one clock for the client and the fake
    async with serve(fcm.app()) as url:
        fcm.base_url = url
        account = ServiceAccount.load(fcm.service_account_file(tmp_root))
        client = FcmClient(account, base_url=fcm.base_url, clock=lambda: now[0])
        token = f"fcm-{uuid.uuid4().hex}"
        try:
            first = await client.access_token()
            now[0] += fcm.token_lifetime_s - 120  # still valid: cached
            assert await client.access_token() == first and len(fcm.token_requests) == 1
            assert isinstance(await client.send(token=token, title="t", body="b", data={}), PushSent)
            now[0] += 90  # within the refresh margin: a new one
            assert await client.access_token() != first and len(fcm.token_requests) == 2
            now[0] += fcm.token_lifetime_s  # FCM expired it, the client too
            assert isinstance(await client.send(token=token, title="t", body="b", data={}), PushSent)
            assert len(fcm.token_requests) == 3 and len(fcm.sent_to(token)) == 2
        finally:
            await client.aclose()

        other = FakeFcm()  # a key pair the fake does not know
        forged = ServiceAccount(
            project_id=fcm.project_id,
            client_email=fcm.client_email,
            private_key=other.private_key_pem,
            private_key_id=fcm.private_key_id,
            token_uri=fcm.token_url,
        )
        impostor = FcmClient(forged, base_url=fcm.base_url, clock=lambda: now[0])
        try:
            before = len(fcm.token_requests)
            outcome = await impostor.send(token=token, title="t", body="b", data={})
            assert isinstance(outcome, PushRetry) and outcome.reason.startswith("auth")
            assert len(fcm.token_requests) == before
        finally:
            await impostor.aclose()


# --- the in-app API -----------------------------------------------------------------------------------


async def test_in_app_list_read_and_read_all_are_per_user(
    system: Any, nsettings: Any, api: Api, client: httpx.AsyncClient
) -> None:
    db = system.services.db
    alice, bob = await api.login(new_phone()), await api.login(new_phone())
    alice_id, bob_id = uuid.UUID(alice["user"]["id"]), uuid.UUID(bob["user"]["id"])
    async with db.transaction() as session:
        for n in range(3):
            await notifications.topup_credited(
                session,
                user_id=alice_id,
                intent_id=uuid.uuid4(),
                amount=Decimal(100 + n),
                balance=Decimal(500),
                gateway="khalti",
                settings=nsettings,
            )
        await notifications.eject_failed(
            session,
            user_id=bob_id,
            rental_id=uuid.uuid4(),
            rental_code="RB",
            station_sn="S1",
            settings=nsettings,
        )
    as_alice, as_bob = Api.auth(alice["access"]), Api.auth(bob["access"])

    r = await client.get("/api/notifications", params={"page_size": 2}, headers=as_alice)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    data = body["data"]
    assert (data["count"], data["page"], data["page_size"], data["unread_count"]) == (3, 1, 2, 3)
    newest = data["results"][0]
    assert set(newest) == {"id", "kind", "title", "body", "data", "is_read", "read_at", "created_at"}
    assert (
        newest["kind"] == "TOPUP_CREDITED" and newest["data"]["amount"] == "102.00" and not newest["is_read"]
    )
    assert "NPR 102.00" in newest["body"]

    r = await client.get("/api/notifications", headers=as_bob)
    [bobs] = r.json()["data"]["results"]
    assert bobs["kind"] == "EJECT_FAILED" and "Nothing was charged" in bobs["body"]

    # another user's notification is not found, and stays unread
    r = await client.post(f"/api/notifications/{bobs['id']}/read", headers=as_alice)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.post(f"/api/notifications/{newest['id']}/read", headers=as_alice)
    assert r.status_code == 200 and r.json()["data"]["is_read"] is True
    read_at = r.json()["data"]["read_at"]
    r = await client.post(f"/api/notifications/{newest['id']}/read", headers=as_alice)  # idempotent
    assert r.json()["data"]["read_at"] == read_at
    r = await client.get("/api/notifications", params={"unread_only": "true"}, headers=as_alice)
    assert r.json()["data"]["unread_count"] == 2 and r.json()["data"]["count"] == 2

    r = await client.post("/api/notifications/read-all", headers=as_alice)
    assert r.status_code == 200 and r.json()["data"] == {"updated": 2, "unread_count": 0}
    r = await client.get("/api/notifications", headers=as_alice)
    assert r.json()["data"]["unread_count"] == 0
    assert all(item["is_read"] for item in r.json()["data"]["results"])
    r = await client.get("/api/notifications", headers=as_bob)
    assert r.json()["data"]["unread_count"] == 1  # bob's untouched

    r = await client.post("/api/notifications/not-a-uuid/read", headers=as_alice)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert (await client.get("/api/notifications")).status_code == 401


async def test_device_registration_over_the_api(system: Any, api: Api, client: httpx.AsyncClient) -> None:
    db = system.services.db
    alice, bob = await api.login(new_phone()), await api.login(new_phone())
    token = f"fcm-{uuid.uuid4().hex}"
    url = "/api/notifications/devices"

    r = await client.post(
        url, json={"token": token, "platform": "android"}, headers=Api.auth(alice["access"])
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"] == {"token": token, "platform": "android", "registered": True}
    # bob cannot remove alice's token (same answer as for an unknown one)
    r = await client.request(
        "DELETE", url, json={"token": token, "platform": "android"}, headers=Api.auth(bob["access"])
    )
    assert r.status_code == 200 and r.json()["data"]["registered"] is False
    async with db.transaction() as session:
        owner = await session.scalar(select(DeviceToken.user_id).where(DeviceToken.token == token))
    assert str(owner) == alice["user"]["id"]
    r = await client.request(
        "DELETE", url, json={"token": token, "platform": "android"}, headers=Api.auth(alice["access"])
    )
    assert r.status_code == 200
    async with db.transaction() as session:
        assert await session.scalar(select(DeviceToken.id).where(DeviceToken.token == token)) is None

    r = await client.post(
        url, json={"token": token, "platform": "symbian"}, headers=Api.auth(alice["access"])
    )
    assert r.status_code == 422 and r.json()["success"] is False
    assert (await client.post(url, json={"token": token, "platform": "ios"})).status_code == 401


async def test_at_most_ten_devices_per_user(system: Any) -> None:
    db = system.services.db
    user_id = await new_user(db, phone=False)
    tokens = [await add_device(db, user_id) for _ in range(notifications.MAX_DEVICES_PER_USER + 2)]
    async with db.transaction() as session:
        kept = set(
            (await session.scalars(select(DeviceToken.token).where(DeviceToken.user_id == user_id))).all()
        )
    assert kept == set(tokens[2:])  # the oldest two were dropped
