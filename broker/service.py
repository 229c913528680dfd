"""The embedded MQTT broker (amqtt): listener on MQTT_HOST:MQTT_PORT with the cabinet gate plugin."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from amqtt.broker import Broker

import rentbox
from broker.gate import CabinetRouter

log = logging.getLogger(__name__)


class PortInUse(RuntimeError):
    pass


def ensure_port_free(host: str, port: int, setting: str) -> None:
    """Fail fast, naming the setting to change, when the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                hint = f"set {setting} to a free port (e.g. {setting}={port + 1000})"
                raise PortInUse(f"{host}:{port} is already in use: {hint}.") from exc
            raise


class MqttBroker:
    def __init__(
        self, *, host: str, port: int, product_key: str, router: CabinetRouter, max_payload_bytes: int
    ) -> None:
        self.host, self.port, self.product_key = host, port, product_key
        self._config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}},
            "plugins": {
                "broker.gate.CabinetGate": {
                    "router": router,
                    "product_key": product_key,
                    "max_payload_bytes": max_payload_bytes,
                },
            },
        }
        self._broker: Broker | None = None

    async def start(self) -> None:
        ensure_port_free(self.host, self.port, "MQTT_PORT")
        self._broker = Broker(self._config)
        await self._broker.start()
        log.info(
            "event=broker_started host=%s port=%s product_key=%s", self.host, self.port, self.product_key
        )

    async def publish_command(self, serial_number: str, payload: bytes) -> None:
        """Commands always go out at QoS 0: a redelivered eject would eject a second power bank."""
        assert self._broker is not None, "broker not started"
        await self._broker.internal_message_broadcast(
            rentbox.command_topic(self.product_key, serial_number), payload, qos=0
        )

    def connected_clients(self) -> list[str]:
        """Client ids (cabinet SNs) connected now."""
        if self._broker is None:
            return []
        sessions = self._broker.sessions.items()
        return [cid for cid, (session, _) in sessions if session.transitions.state == "connected"]

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
