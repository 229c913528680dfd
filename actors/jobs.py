"""Background jobs (the seed's Celery beat): a scheduler that runs registered jobs every N seconds each.

One `Scheduler` runs per Ray cluster, as the named actor `jobs-scheduler` (`num_cpus=0`, so it never waits
for a CPU; restarted by Ray, and it restarts its loops itself). It costs one process (≈ 45 MB, ≈ 0.7 % of a
core idle) whatever the number of API replicas, keeps job work (FCM calls, batch updates) off the API's
event loop, and its metrics join `/metrics` like the kiosk hosts' (`metric_families`). Each job has its
own loop — run, then sleep its interval — so a job never overlaps itself within a scheduler.

Across schedulers (two clusters on one database during a deploy, a restarted actor whose predecessor is
still finishing, a test) a run holds the PostgreSQL advisory lock `pg_try_advisory_xact_lock(hashtext(job
name))` on a connection of its own for as long as it runs: a second scheduler finds it taken and skips that
tick. A crashed process's lock goes with its connection. Outcomes are counted in
`powerbank_jobs_runs_total{job, result}`: `success`, `error` (raised or exceeded JOB_TIMEOUT_S; retried on
the next tick), `skipped` (another scheduler held the lock).

Jobs are registered in `JOBS` before `start_scheduler`; the registry travels to the actor with its
constructor arguments, so a job's `run` must be a module-level function (pickled by reference).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import ray
from prometheus_client import Histogram
from sqlalchemy import func, select

from config import Settings
from domain import idempotency, notifications, rentals
from domain.payments import reconcile
from domain.push import PushSender, fcm_client
from domain.sms import SmsBackend, sms_backend
from storage.db import Database
from telemetry import logs, metrics

log = logging.getLogger(__name__)

SCHEDULER_ACTOR = "jobs-scheduler"
JOB_SECONDS = Histogram(
    "powerbank_job_run_seconds",
    "Background job run duration (runs that held the lock)",
    ["job"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)


@dataclass(kw_only=True)
class JobContext:
    """What a job gets: the process's settings, database, push client (None: push off) and SMS backend."""

    settings: Settings
    db: Database
    push: PushSender | None
    sms: SmsBackend

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    name: str
    run: Callable[[JobContext], Awaitable[object]]
    interval_s: Callable[[Settings], float]  # seconds between the end of one run and the next


async def deliver_notifications(ctx: JobContext) -> int:
    return await notifications.deliver_due(
        ctx.db, settings=ctx.settings, push=ctx.push, sms=ctx.sms, now=ctx.now()
    )


async def purge_idempotency_keys(ctx: JobContext) -> int:
    async with ctx.db.transaction() as session:
        return await idempotency.purge_expired(session, ttl_s=ctx.settings.idempotency_ttl_s)


async def mark_overdue(ctx: JobContext) -> int:
    """ACTIVE rentals past due (and grace) become OVERDUE; their users are told."""
    async with ctx.db.transaction() as session:
        events = await rentals.mark_overdue(session, now=ctx.now())
        for event in events:
            assert event.due_at is not None
            await notifications.rental_overdue(
                session,
                user_id=event.user_id,
                rental_id=event.rental_id,
                rental_code=event.rental_code,
                due_at=event.due_at,
                settings=ctx.settings,
            )
    return len(events)


async def complete_lost(ctx: JobContext) -> int:
    """OVERDUE past LOST_AFTER_OVERDUE_S: completed with the lost-bank penalty."""
    async with ctx.db.transaction() as session:
        return len(await rentals.complete_lost(session, now=ctx.now(), settings=ctx.settings))


async def reconcile_topups(ctx: JobContext) -> dict[str, int]:
    """Top-ups paid at the gateway but never verified: credited once; unpaid after 24 h: EXPIRED."""
    return (await reconcile.reconcile(ctx.db, ctx.settings, now=ctx.now())).results


JOBS: dict[str, Job] = {
    "mark_overdue": Job(
        name="mark_overdue", run=mark_overdue, interval_s=attrgetter("job_mark_overdue_interval_s")
    ),
    "complete_lost": Job(
        name="complete_lost", run=complete_lost, interval_s=attrgetter("job_complete_lost_interval_s")
    ),
    "deliver_notifications": Job(
        name="deliver_notifications",
        run=deliver_notifications,
        interval_s=attrgetter("job_deliver_notifications_interval_s"),
    ),
    "purge_idempotency_keys": Job(
        name="purge_idempotency_keys",
        run=purge_idempotency_keys,
        interval_s=attrgetter("job_purge_idempotency_keys_interval_s"),
    ),
    "reconcile_topups": Job(
        name="reconcile_topups",
        run=reconcile_topups,
        interval_s=attrgetter("job_reconcile_topups_interval_s"),
    ),
}


def register(job: Job) -> Job:
    """Add a job to `JOBS` (before `start_scheduler`); a name is registered once."""
    if job.name in JOBS and JOBS[job.name] != job:
        raise ValueError(f"a job named {job.name!r} is already registered")
    JOBS[job.name] = job
    return job


async def run_job(job: Job, ctx: JobContext) -> str:
    """One run under the job's advisory lock; the result counted: success, error or skipped."""
    async with ctx.db.sessions() as lock_session, lock_session.begin():
        taken = await lock_session.scalar(select(func.pg_try_advisory_xact_lock(func.hashtext(job.name))))
        if not taken:
            result = "skipped"
        else:
            started = time.perf_counter()
            try:
                outcome = await asyncio.wait_for(job.run(ctx), ctx.settings.job_timeout_s)
            except Exception as exc:
                result = "error"
                log.error("event=job_failed job=%s error=%r", job.name, exc, exc_info=exc)
            else:
                result = "success"
                log.debug("event=job_ran job=%s outcome=%r", job.name, outcome)
            JOB_SECONDS.labels(job=job.name).observe(time.perf_counter() - started)
    metrics.JOBS_RUNS.labels(job=job.name, result=result).inc()
    return result


@dataclass
class JobState:
    runs: int = 0
    last_result: str | None = None
    last_run_at: datetime | None = None
    last_success_at: datetime | None = None


class Scheduler:
    """Plain async class; `SchedulerActor` is its Ray actor form. Starts its loops on construction when an
    event loop runs (so an actor that Ray restarts resumes by itself)."""

    def __init__(
        self, settings: Settings, jobs: Mapping[str, Job] | None = None, *, autostart: bool = True
    ) -> None:
        logs.configure(settings.log_level)
        notifications.check_settings(settings)
        assert settings.database_url, "the scheduler gets a resolved DATABASE_URL"
        self.settings = settings
        self.jobs = dict(JOBS if jobs is None else jobs)
        self.ctx = JobContext(
            settings=settings,
            db=Database(settings.database_url, pool_size=2),
            push=fcm_client(settings),
            sms=sms_backend(settings.sms_backend, settings),
        )
        self.state: dict[str, JobState] = {name: JobState() for name in self.jobs}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._stopped = False
        if autostart:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            self._start()

    def _start(self) -> list[str]:
        started = []
        for name, job in self.jobs.items():
            loop = self._loops.get(name)
            if loop is None or loop.done():
                self._loops[name] = asyncio.get_running_loop().create_task(
                    self._loop(job), name=f"job:{name}"
                )
                started.append(name)
        if started:
            log.info("event=scheduler_started jobs=%s", ",".join(started))
        return started

    async def ensure_started(self) -> list[str]:
        """Start the loops not running (idempotent); the names started."""
        if self._stopped:
            return []
        return self._start()

    async def _loop(self, job: Job) -> None:
        while True:
            try:
                await self.run_once(job.name)
            except Exception as exc:  # the lock connection failed: counted, tried again next tick
                metrics.JOBS_RUNS.labels(job=job.name, result="error").inc()
                log.warning("event=job_lock_failed job=%s error=%r", job.name, exc)
            await asyncio.sleep(job.interval_s(self.settings))

    async def run_once(self, name: str) -> str:
        """Run a job now (under its lock, counted); its result."""
        result = await run_job(self.jobs[name], self.ctx)
        state, now = self.state[name], datetime.now(UTC)
        state.runs, state.last_result, state.last_run_at = state.runs + 1, result, now
        if result == "success":
            state.last_success_at = now
        return result

    def status(self) -> dict[str, JobState]:
        return dict(self.state)

    def metric_families(self) -> list[Any]:
        return metrics.local_families()

    async def stop(self) -> None:
        """Cancel the loops (a run in progress rolls back its lock transaction) and close connections."""
        self._stopped = True
        loops = list(self._loops.values())
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self.ctx.push is not None:
            await self.ctx.push.aclose()
        await self.ctx.db.dispose()


SchedulerActor = ray.remote(Scheduler)


def start_scheduler(
    settings: Settings, jobs: Mapping[str, Job] | None = None, *, name: str = SCHEDULER_ACTOR
) -> Any:
    """The cluster's scheduler actor, created if it does not exist (idempotent: every replica may call it;
    the first one's job registry wins). It starts its job loops itself."""
    return SchedulerActor.options(
        name=name,
        namespace=settings.ray_namespace,
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_concurrency=100,
    ).remote(settings, dict(JOBS if jobs is None else jobs))
