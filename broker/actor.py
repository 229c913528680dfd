"""The broker as a Ray actor, so kiosk hosts on any node can publish commands through it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors.fleet import Fleet
from broker.service import MqttBroker
from config import Settings
from telemetry import logs, metrics

log = logging.getLogger(__name__)


class FleetRouter:
    """CabinetRouter over Ray: each cabinet's events go to the kiosk host that owns it, in order."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def authenticate(self, serial_number: str, password: str) -> bool:
        ok: bool = await self.fleet.host(serial_number).authenticate.remote(serial_number, password)
        return ok

    def connected(self, serial_number: str) -> None:
        self.fleet.host(serial_number).on_connect.remote(serial_number)

    def subscribed(self, serial_number: str) -> None:
        self.fleet.host(serial_number).on_subscribe.remote(serial_number)

    def disconnected(self, serial_number: str) -> None:
        self.fleet.host(serial_number).on_disconnect.remote(serial_number)

    def frame(self, serial_number: str, kind: str, payload: bytes) -> None:
        self.fleet.host(serial_number).on_frame.remote(serial_number, kind, payload)


class BrokerService:
    def __init__(self, settings: Settings) -> None:
        logs.configure(settings.log_level)
        self.fleet = Fleet(settings)
        self.broker = MqttBroker(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            product_key=settings.mqtt_product_key,
            router=FleetRouter(self.fleet),
            max_payload_bytes=settings.mqtt_max_payload_bytes,
            max_connections_per_ip=settings.mqtt_max_connections_per_ip,
            connect_timeout_s=settings.mqtt_connect_timeout_s,
        )
        self._started = False

    async def start(self) -> None:
        # After a crash and restart every connection is gone: cabinets are offline until they reconnect.
        # Told before the listener opens, so no reconnect can overtake it.
        await asyncio.gather(*(self.fleet.broker_restarted()), return_exceptions=True)
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

    async def publish_command(self, serial_number: str, payload: bytes) -> None:
        await self.broker.publish_command(serial_number, payload)

    async def stop(self) -> None:
        await self.broker.stop()
        self._started = False

    def metric_families(self) -> list[Any]:
        return metrics.local_families()


BrokerActor = ray.remote(BrokerService)
