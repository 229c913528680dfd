"""The broker as a Ray actor, so kiosk hosts on any node can publish commands through it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from redis.asyncio import Redis

from actors.batching import Lookup, Outbox
from actors.bus import Stream, commands_stream, events_stream
from actors.fleet import Fleet
from actors.messages import CONNECTED, DISCONNECTED, SUBSCRIBED, CabinetEvent
from actors.placement import owner
from broker.service import MqttBroker, TlsListener
from config import Settings
from domain import stations
from storage.db import Database
from telemetry import logs, metrics

log = logging.getLogger(__name__)


class FleetRouter:
    """CabinetRouter over Ray: each cabinet's events go to the kiosk host that owns it, in order, in
    batches (one Ray call per host carries everything that arrived since its previous call, see
    `actors.batching`). Credentials are checked here, against the database, on every CONNECT: a rotated or
    revoked secret is refused at once."""

    def __init__(self, fleet: Fleet, db: Database, redis: Redis, settings: Settings) -> None:
        self.fleet = fleet
        self.db = db
        # Read for every CONNECT (never cached), one query for all the CONNECTs that arrive meanwhile
        self._secrets = Lookup[str, str | None](self._secret_hashes, default=None)
        # First logins are recorded (the boot call then needs an operator's window), once per SN and process
        self._first_logins = Lookup[str, None](self._mark_connected, default=None)
        self._marked: set[str] = set()
        self._marking: set[asyncio.Task[None]] = set()
        self.outboxes = {
            name: Outbox[CabinetEvent](
                f"to-{name}",
                Stream(redis, events_stream(settings.ray_namespace, name)).send,
                limit=settings.outbox_limit,
                max_batch=settings.outbox_max_batch,
            )
            for name in fleet.hosts
        }

    async def authenticate(self, serial_number: str, password: str) -> bool:
        stored = await self._secrets.get(serial_number)
        admitted = stored is not None and stations.secret_matches(password, stored)
        if admitted and serial_number not in self._marked:
            self._marked.add(serial_number)
            task = asyncio.get_running_loop().create_task(self._first_logins.get(serial_number))
            self._marking.add(task)
            task.add_done_callback(self._marking.discard)
        return admitted

    async def _secret_hashes(self, serial_numbers: list[str]) -> dict[str, str | None]:
        async with self.db.transaction() as session:
            return dict(await stations.cabinet_secret_hashes(session, serial_numbers))

    async def _mark_connected(self, serial_numbers: list[str]) -> dict[str, None]:
        try:
            async with self.db.transaction() as session:
                await stations.mark_connected(session, serial_numbers)
        except Exception as exc:  # the next login of these cabinets tries again
            self._marked.difference_update(serial_numbers)
            log.warning("event=first_login_not_recorded cabinets=%s error=%r", len(serial_numbers), exc)
        return {}

    def _post(self, serial_number: str, kind: str, payload: bytes = b"") -> None:
        self.outboxes[owner(serial_number, self.fleet.hosts)].put((serial_number, kind, payload))

    def connected(self, serial_number: str) -> None:
        self._post(serial_number, CONNECTED)

    def subscribed(self, serial_number: str) -> None:
        self._post(serial_number, SUBSCRIBED)

    def disconnected(self, serial_number: str) -> None:
        self._post(serial_number, DISCONNECTED)

    def frame(self, serial_number: str, kind: str, payload: bytes) -> None:
        self._post(serial_number, kind, payload)

    async def flushed(self) -> None:
        await asyncio.gather(*(outbox.flushed() for outbox in self.outboxes.values()))


def tls_listener(settings: Settings) -> TlsListener | None:
    if settings.mqtt_tls_certfile is None and settings.mqtt_tls_keyfile is None:
        return None
    if settings.mqtt_tls_certfile is None or settings.mqtt_tls_keyfile is None:
        raise ValueError("MQTT over TLS needs both MQTT_TLS_CERTFILE and MQTT_TLS_KEYFILE.")
    return TlsListener(settings.mqtt_tls_port, settings.mqtt_tls_certfile, settings.mqtt_tls_keyfile)


class BrokerService:
    def __init__(self, settings: Settings) -> None:
        logs.configure(settings.log_level)
        assert settings.database_url, "the broker gets a resolved DATABASE_URL"
        self.fleet = Fleet(settings)
        assert settings.redis_url, "the broker gets a resolved REDIS_URL"
        self.db = Database(settings.database_url, pool_size=2)
        self.redis = Redis.from_url(settings.redis_url)
        self.router = FleetRouter(self.fleet, self.db, self.redis, settings)
        self.commands = Stream(self.redis, commands_stream(settings.ray_namespace))
        self.broker = MqttBroker(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            product_key=settings.mqtt_product_key,
            router=self.router,
            max_payload_bytes=settings.mqtt_max_payload_bytes,
            max_connections_per_ip=settings.mqtt_max_connections_per_ip,
            connect_timeout_s=settings.mqtt_connect_timeout_s,
            tls=tls_listener(settings),
        )
        self._started = False

    async def start(self) -> None:
        # After a crash and restart every connection is gone: cabinets are offline until they reconnect.
        # Told before the listener opens, so no reconnect can overtake it.
        await asyncio.gather(*(self.fleet.broker_restarted()), return_exceptions=True)
        await self.commands.start_reading(self.publish_commands)
        await self.broker.start()
        self._started = True

    async def ensure_started(self) -> None:
        """Idempotent start, called by the supervisor: after Ray restarted this actor it listens again."""
        if not self._started:
            await self.start()

    def connected_cabinets(self) -> list[str]:
        return self.broker.connected_clients()

    async def disconnect_cabinet(self, serial_number: str) -> bool:
        """Close the cabinet's MQTT session now (its station was deleted); whether it was connected."""
        return await self.broker.disconnect(serial_number)

    async def publish_commands(self, commands: list[tuple[str, bytes]]) -> None:
        """Commands from the kiosk hosts (over `actors.bus`, or called directly): (cabinet SN, payload),
        each at QoS 0, in order."""
        for serial_number, payload in commands:
            await self.broker.publish_command(serial_number, payload)

    async def flushed(self) -> None:
        """Every cabinet event received so far has been handed to its kiosk host (tests)."""
        await self.router.flushed()

    async def stop(self) -> None:
        self.commands.stop()
        await self.broker.stop()
        await self.db.dispose()
        await self.redis.aclose()
        self._started = False

    def metric_families(self) -> list[Any]:
        return metrics.local_families()


BrokerActor = ray.remote(BrokerService)
