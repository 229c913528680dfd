"""Background jobs (issue 4, item 9): the built-in jobs, the advisory lock that keeps a job to one run at a
time across schedulers in different processes (Ray actors), errors counted and retried, and the counts in
the fleet-wide /metrics scrape.

The jobs the scheduler actors run here are module-level functions of this module: the actor process
imports them by name (Ray workers start in the project directory). They keep their evidence in Redis, under
a prefix unique to the test (the settings' `ray_namespace`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import select

from actors.jobs import (
    JOBS,
    Job,
    JobContext,
    deliver_notifications,
    purge_idempotency_keys,
    run_job,
    start_scheduler,
)
from api.main import create_app
from domain import notifications
from domain.push import fcm_client
from domain.sms import sms_backend
from storage.idempotency_models import IdempotencyKey
from storage.models import User
from storage.notification_models import DeliveryStatus, NotificationDelivery, Platform
from tests.conftest import new_phone
from tests.fakes import serve
from tests.fakes.fcm import FakeFcm
from tests.support import eventually

pytestmark = pytest.mark.integration

RUN_S = 0.08  # how long one run of the `overlap` job takes


# --- jobs for the scheduler actors (imported by name in the actor process) -----------------------------


def every_10ms(settings: Any) -> float:
    return 0.01


async def overlap(ctx: JobContext) -> None:
    """Count runs and runs that started while another was still going (anywhere, any process)."""
    prefix = ctx.settings.ray_namespace
    redis = Redis.from_url(ctx.settings.redis_url)
    try:
        if await redis.incr(f"{prefix}:running") > 1:
            await redis.incr(f"{prefix}:overlaps")
        await asyncio.sleep(RUN_S)
        await redis.incr(f"{prefix}:runs")
    finally:
        await redis.decr(f"{prefix}:running")
        await redis.aclose()


async def flaky(ctx: JobContext) -> None:
    """Fails its first two runs, then succeeds."""
    redis = Redis.from_url(ctx.settings.redis_url)
    try:
        if await redis.incr(f"{ctx.settings.ray_namespace}:flaky") <= 2:
            raise RuntimeError("the database is having a bad day")
    finally:
        await redis.aclose()


TEST_JOBS = {
    "overlap": Job(name="overlap", run=overlap, interval_s=every_10ms),
    "flaky": Job(name="flaky", run=flaky, interval_s=every_10ms),
}


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def jsettings(system: Any) -> Any:
    """The system's settings in a Ray namespace (and Redis prefix) of this test's own."""
    return system.settings.model_copy(update={"ray_namespace": f"jobs-{uuid.uuid4().hex[:10]}"})


@pytest.fixture
async def redis(system: Any) -> AsyncIterator[Redis]:
    client = Redis.from_url(system.settings.redis_url)
    yield client
    await client.aclose()


async def counter(redis: Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


def context(system: Any, settings: Any, push: Any = None) -> JobContext:
    return JobContext(
        settings=settings, db=system.services.db, push=push, sms=sms_backend(settings.sms_backend)
    )


async def stop(*handles: Any) -> None:
    await asyncio.gather(*(h.stop.remote() for h in handles), return_exceptions=True)
    for handle in handles:
        ray.kill(handle, no_restart=True)


def runs_total(text: str, job: str) -> dict[str, float]:
    """powerbank_jobs_runs_total{job=...} by result, from a scrape."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "powerbank_jobs_runs_total" and sample.labels.get("job") == job:
                found[sample.labels["result"]] = sample.value
    return found


# --- the registry and the built-in jobs (in-process) ----------------------------------------------------


def test_registry_has_the_built_in_jobs_with_intervals_from_settings(system: Any) -> None:
    assert {"deliver_notifications", "purge_idempotency_keys"} <= set(JOBS)
    assert all(name == job.name for name, job in JOBS.items())
    s = system.settings
    assert JOBS["deliver_notifications"].interval_s(s) == s.job_deliver_notifications_interval_s
    assert JOBS["purge_idempotency_keys"].interval_s(s) == s.job_purge_idempotency_keys_interval_s


async def test_purge_idempotency_keys_job(system: Any, jsettings: Any) -> None:
    db = system.services.db
    async with db.transaction() as session:
        user = User(phone=new_phone())
        session.add(user)
        await session.flush()
        old, fresh = (
            IdempotencyKey(
                user_id=user.id,
                endpoint="POST /api/rentals/start",
                key=uuid.uuid4().hex,
                request_hash="0" * 64,
                locked_at=datetime.now(UTC),
                created_at=datetime.now(UTC) - timedelta(seconds=age),
            )
            for age in (jsettings.idempotency_ttl_s + 60, 60)
        )
        session.add_all([old, fresh])
    ctx = context(system, jsettings)
    job = JOBS["purge_idempotency_keys"]
    assert job.run is purge_idempotency_keys
    assert await eventually(lambda: _succeeds(job, ctx)) == "success"
    async with db.transaction() as session:
        left = set(
            (await session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.user_id == user.id))).all()
        )
    assert left == {fresh.key}


async def _succeeds(job: Job, ctx: JobContext) -> str | None:
    """Run the job; None if another scheduler (the system's own, once wired) held its lock this time."""
    result = await run_job(job, ctx)
    assert result != "error"
    return result if result == "success" else None


async def test_deliver_notifications_job_pushes_through_fcm(
    system: Any, jsettings: Any, tmp_root: Any
) -> None:
    fcm = FakeFcm()
    async with serve(fcm.app()) as url:
        fcm.base_url = url
        settings = jsettings.model_copy(
            update={
                "fcm_service_account_file": fcm.service_account_file(tmp_root),
                "fcm_base_url": url,
                "notification_sms_kinds": "",
            }
        )
        db = system.services.db
        token = f"fcm-{uuid.uuid4().hex}"
        async with db.transaction() as session:
            user = User(phone=new_phone())
            session.add(user)
            await session.flush()
            device = await notifications.register_device(
                session, user_id=user.id, token=token, platform=Platform.IOS, now=datetime.now(UTC)
            )
            await notifications.rental_started(
                session,
                user_id=user.id,
                rental_id=uuid.uuid4(),
                rental_code="RJOB",
                station_sn="SJ",
                due_at=datetime.now(UTC) + timedelta(hours=1),
                settings=settings,
            )
        push = fcm_client(settings)
        ctx = context(system, settings, push)
        try:
            assert JOBS["deliver_notifications"].run is deliver_notifications
            await eventually(lambda: _succeeds(JOBS["deliver_notifications"], ctx))
        finally:
            assert push is not None
            await push.aclose()
    [message] = fcm.sent_to(token)
    assert (
        message["notification"]["title"] == "Rental started" and message["data"]["kind"] == "RENTAL_STARTED"
    )
    async with db.transaction() as session:
        row = await session.scalar(
            select(NotificationDelivery).where(NotificationDelivery.device_id == device.id)
        )
    assert row is not None and (row.status, row.attempts) == (DeliveryStatus.SENT, 1)


# --- schedulers in separate processes (Ray actors) ------------------------------------------------------


async def test_the_overlap_detector_sees_overlaps_without_a_lock(
    system: Any, jsettings: Any, redis: Redis
) -> None:
    """Control for the test below: two runs at once without the lock are caught."""
    ctx = context(system, jsettings)
    await asyncio.gather(overlap(ctx), overlap(ctx))
    assert await counter(redis, f"{jsettings.ray_namespace}:overlaps") == 1


async def test_two_schedulers_race_and_a_job_runs_at_most_once_at_a_time(
    system: Any, jsettings: Any, redis: Redis
) -> None:
    jobs = {"overlap": TEST_JOBS["overlap"]}
    first = start_scheduler(jsettings, jobs, name="scheduler-a")
    second = start_scheduler(jsettings, jobs, name="scheduler-b")
    prefix = jsettings.ray_namespace
    try:
        await eventually(lambda: _at_least(redis, f"{prefix}:runs", 8), within=20)
        families = [*await first.metric_families.remote(), *await second.metric_families.remote()]
    finally:
        await stop(first, second)
    assert await counter(redis, f"{prefix}:overlaps") == 0
    counts = runs_total(_render(families), "overlap")
    assert counts.get("skipped", 0) > 0  # they did race: each found the other holding the lock
    assert counts.get("success", 0) >= 8 and counts.get("error", 0) == 0


async def test_a_failing_job_is_counted_as_error_retried_and_shows_in_the_fleet_scrape(
    system: Any, jsettings: Any, redis: Redis
) -> None:
    scheduler = start_scheduler(jsettings, {"flaky": TEST_JOBS["flaky"]}, name="scheduler-flaky")
    try:
        await eventually(lambda: _at_least(redis, f"{jsettings.ray_namespace}:flaky", 3), within=20)

        async def fleet_and_scheduler() -> list[Any]:
            return [*await system.remote_metrics(), *await scheduler.metric_families.remote()]

        # the API's real /metrics endpoint, with the scheduler actor among the processes it merges
        app = create_app(system.services, remote_metrics=fleet_and_scheduler)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            text = (await client.get("/metrics")).text
        status = await scheduler.status.remote()
    finally:
        await stop(scheduler)
    counts = runs_total(text, "flaky")
    assert counts.get("error") == 2 and counts.get("success", 0) >= 1  # failed twice, then ran fine
    assert "powerbank_cabinets_online" in text  # the same scrape as the kiosk hosts'
    assert status["flaky"].last_result == "success" and status["flaky"].runs >= 3


async def test_a_scheduler_that_ray_restarts_resumes_its_jobs_by_itself(
    system: Any, jsettings: Any, redis: Redis
) -> None:
    scheduler = start_scheduler(jsettings, {"overlap": TEST_JOBS["overlap"]}, name="scheduler-crashing")
    runs = f"{jsettings.ray_namespace}:runs"
    try:
        await eventually(lambda: _at_least(redis, runs, 2), within=20)
        ray.kill(scheduler, no_restart=False)  # the process dies; Ray starts it again
        before = await counter(redis, runs)
        await eventually(lambda: _at_least(redis, runs, before + 3), within=20)
        assert (await scheduler.status.remote())["overlap"].runs >= 1  # a new instance, counting from zero
    finally:
        await stop(scheduler)


async def test_the_systems_own_scheduler_shows_in_its_metrics(system: Any, client: httpx.AsyncClient) -> None:
    """Once the system starts the scheduler (`system.scheduler`), its runs appear in the fleet scrape."""
    if getattr(system, "scheduler", None) is None:
        pytest.skip("the system does not start a job scheduler yet")

    async def counted() -> bool:
        text = (await client.get("/metrics")).text
        return bool(runs_total(text, "deliver_notifications"))

    assert await eventually(counted, within=3 * system.settings.job_deliver_notifications_interval_s + 5)


async def _at_least(redis: Redis, key: str, n: int) -> bool:
    return await counter(redis, key) >= n


def _render(families: list[Any]) -> str:
    from telemetry.metrics import render

    return render(families).decode()
