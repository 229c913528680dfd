"""The composition root: starts embedded services, Ray, kiosk hosts, the broker and the API app."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import FastAPI
from ray.exceptions import RayError
from redis.asyncio import Redis

from actors.fleet import Fleet, start_hosts
from actors.host import BROKER_ACTOR
from actors.jobs import start_scheduler
from api.deps import Services
from api.main import create_app
from broker.actor import BrokerActor
from broker.service import ensure_port_free
from config import Settings
from domain.sms import sms_backend
from storage.db import Database
from storage.embedded import EmbeddedServices
from storage.migrate import upgrade

log = logging.getLogger(__name__)


def init_ray(settings: Settings) -> None:
    """Join RAY_ADDRESS, or start a private local Ray (own temp dir, no dashboard).

    Ray starts its workers (the broker, the kiosk hosts, the scheduler) at nice 15 unless told otherwise,
    so under load the API process (nice 0) took the CPU the actors needed to answer it. A local Ray runs
    them at RAY_WORKER_NICENESS (default 0: the same as the API); a cluster's nodes are started with
    `RAY_worker_niceness` in their environment (docker-compose.yaml)."""
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=settings.ray_namespace, log_to_driver=True)
        return
    os.environ["RAY_worker_niceness"] = str(settings.ray_worker_niceness)  # read by the raylet it starts
    ray.init(
        namespace=settings.ray_namespace,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-pb-"),
        configure_logging=False,
    )


@dataclass
class System:
    settings: Settings
    services: Services
    app: FastAPI
    hosts: list[Any]
    broker: Any
    scheduler: Any = None
    embedded: EmbeddedServices | None = None
    started_ray: bool = False
    _stopped: bool = field(default=False, init=False)
    _supervisor: asyncio.Task[None] | None = field(default=None, init=False)
    _last_families: dict[str, list[Any]] = field(default_factory=dict, init=False)

    def supervise(self) -> None:
        """Every SUPERVISE_INTERVAL_S: keep the broker listening (also after Ray restarted it) and let the
        hosts check silent cabinets and stale PENDING_POPUP rentals. Idempotent work, so N API replicas
        doing it too is harmless."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.settings.supervise_interval_s)
                try:
                    await self.broker.ensure_started.remote()
                    await self.services.fleet.tick()
                except Exception as exc:
                    log.warning("event=supervise_failed error=%r", exc)
                try:
                    await self.scheduler.ensure_started.remote()
                except RayError:  # its owner (another replica) exited: take over
                    self.scheduler = start_scheduler(self.settings)

        self._supervisor = asyncio.get_running_loop().create_task(loop(), name="supervisor")

    async def remote_metrics(self, timeout_s: float = 2.0) -> list[Any]:
        """Every actor's metric families for the fleet-wide scrape. An actor that does not answer within
        `timeout_s` counts with what it answered last (logged), so that a busy process never makes the
        fleet look smaller than it is."""
        actors = {name: self.services.fleet.by_name(name) for name in self.services.fleet.hosts}
        actors.update(broker=self.broker, scheduler=self.scheduler)
        results = await asyncio.gather(
            *(asyncio.wait_for(actor.metric_families.remote(), timeout_s) for actor in actors.values()),
            return_exceptions=True,
        )
        families: list[Any] = []
        for name, result in zip(actors, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("event=metrics_unavailable actor=%s error=%r used=last_answer", name, result)
                result = self._last_families.get(name, [])
            else:
                self._last_families[name] = result
            families.extend(result)
        return families

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for actor, name in ((self.broker, "broker"), (self.scheduler, "scheduler")):
            try:
                await asyncio.wait_for(actor.stop.remote(), 5.0)
            except Exception as exc:
                log.warning("event=actor_stop_failed actor=%s error=%r", name, exc)
        for actor in [self.broker, self.scheduler, *self.hosts]:
            ray.kill(actor, no_restart=True)
        await self.services.redis.aclose()
        await self.services.db.dispose()
        if self.started_ray:
            ray.shutdown()
        if self.embedded is not None:
            self.embedded.stop()


async def start_system(settings: Settings, *, check_http_port: bool = True) -> System:
    """Bring up everything the settings describe; unset DATABASE_URL/REDIS_URL/RAY_ADDRESS mean embedded."""
    settings = settings.model_copy()
    if check_http_port:
        ensure_port_free(settings.http_host, settings.http_port, "HTTP_PORT")
    ensure_port_free(settings.mqtt_host, settings.mqtt_port, "MQTT_PORT")
    embedded = None
    if not settings.database_url or not settings.redis_url:
        embedded = EmbeddedServices(settings.data_dir)
        if not settings.database_url:
            settings.database_url = await asyncio.to_thread(embedded.start_postgres)
        if not settings.redis_url:
            settings.redis_url = await asyncio.to_thread(embedded.start_valkey)
    assert settings.database_url and settings.redis_url
    log.info("event=migrating")
    await asyncio.to_thread(upgrade, settings.database_url)
    settings.jwt_secret = settings.resolved_jwt_secret()  # every process signs and checks with the same key
    started_ray = not ray.is_initialized()
    await asyncio.to_thread(init_ray, settings)
    hosts = start_hosts(settings)
    broker: Any = BrokerActor.options(
        name=BROKER_ACTOR,
        namespace=settings.ray_namespace,
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        max_concurrency=1000,
    ).remote(settings)
    await broker.start.remote()
    scheduler = start_scheduler(settings)
    services = Services(
        settings=settings,
        db=Database(settings.database_url),
        redis=Redis.from_url(settings.redis_url),
        fleet=Fleet(settings),
        sms=sms_backend(settings.sms_backend, settings),
    )
    system = System(
        settings=settings,
        services=services,
        app=FastAPI(),
        hosts=hosts,
        broker=broker,
        scheduler=scheduler,
        embedded=embedded,
        started_ray=started_ray,
    )
    system.app = create_app(services, remote_metrics=system.remote_metrics)
    system.supervise()
    log.info(
        "event=system_started http=%s:%s mqtt=%s:%s hosts=%s",
        settings.http_host,
        settings.http_port,
        settings.mqtt_host,
        settings.mqtt_port,
        len(hosts),
    )
    return system
