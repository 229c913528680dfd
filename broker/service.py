"""The embedded MQTT broker: amqtt (hardened, see `broker.hardened`) on MQTT_HOST:MQTT_PORT with the gate."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rentbox
from broker.gate import CABINET, CabinetRouter, role
from broker.hardened import HardenedBroker, upstream_drift

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""Bound on broker shutdown, so that a stuck client connection cannot hang the process's exit."""


class PortInUse(RuntimeError):
    pass


@dataclass(frozen=True)
class TlsListener:
    """A second listener, MQTT over TLS (MQTT_TLS_PORT, 8883 by default), beside plain TCP for cabinets
    whose firmware cannot do TLS. Same gate, same rules; only the transport differs."""

    port: int
    certfile: Path
    keyfile: Path

    def check(self) -> None:
        """Refuse to start with a clear message when the certificate or key cannot be used."""
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            files = f"{self.certfile}, {self.keyfile}"
            raise ValueError(f"MQTT_TLS_CERTFILE / MQTT_TLS_KEYFILE ({files}) cannot be used: {exc}") from exc


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
    """The broker the cabinets dial.

    `max_payload_bytes`: a PUBLISH payload above it is dropped (and counted); one that would need a
    single read above max(it, 64 KiB) closes the connection. `max_connections_per_ip`: connections from one
    address beyond it are closed at once. `allow_anonymous`: admit every client that does not log in as a
    cabinet as a guest, confined to topics outside `/{product_key}/` (development and interoperability
    testing only). `connect_timeout_s`: a connection that sends no CONNECT within it is closed.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        product_key: str,
        router: CabinetRouter,
        max_payload_bytes: int,
        max_connections_per_ip: int = 50,
        allow_anonymous: bool = False,
        connect_timeout_s: float = 10.0,
        tls: TlsListener | None = None,
    ) -> None:
        if max_payload_bytes < 1 or max_connections_per_ip < 1 or connect_timeout_s <= 0:
            raise ValueError(
                "max_payload_bytes, max_connections_per_ip and connect_timeout_s must be positive"
            )
        self.host, self.port, self.product_key, self.tls = host, port, product_key, tls
        self.allow_anonymous = allow_anonymous
        self._limits: dict[str, Any] = {
            "max_payload_bytes": max_payload_bytes,
            "max_connections_per_ip": max_connections_per_ip,
            "connect_timeout_s": connect_timeout_s,
        }
        self._config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}},
            "plugins": {
                "broker.gate.CabinetGate": {
                    "router": router,
                    "product_key": product_key,
                    "allow_anonymous": allow_anonymous,
                },
            },
        }
        if tls is not None:
            self._config["listeners"]["tls"] = {
                "type": "tcp",
                "bind": f"{host}:{tls.port}",
                "max_connections": -1,
                "ssl": True,
                "certfile": str(tls.certfile),
                "keyfile": str(tls.keyfile),
            }
        self._broker: HardenedBroker | None = None

    async def start(self) -> None:
        ensure_port_free(self.host, self.port, "MQTT_PORT")
        if self.tls is not None:
            self.tls.check()
            ensure_port_free(self.host, self.tls.port, "MQTT_TLS_PORT")
        for name, what in upstream_drift().items():
            log.warning("event=amqtt_drift function=%s %s: re-review broker/hardened.py", name, what)
        self._broker = HardenedBroker(self._config, **self._limits)
        await self._broker.start()
        log.info(
            "event=broker_started host=%s port=%s tls_port=%s product_key=%s allow_anonymous=%s %s",
            self.host,
            self.port,
            self.tls.port if self.tls is not None else "off",
            self.product_key,
            self.allow_anonymous,
            " ".join(f"{k}={v}" for k, v in self._limits.items()),
        )
        if self.allow_anonymous:
            log.warning(
                "event=broker_allow_anonymous *** ANY client may connect WITHOUT credentials and use every "
                "topic outside /%s/ — for development and interoperability testing only, never in "
                "production; cabinets keep their strict rules ***",
                self.product_key,
            )

    async def publish_command(self, serial_number: str, payload: bytes) -> None:
        """Commands always go out at QoS 0: a redelivered eject would eject a second power bank."""
        assert self._broker is not None, "broker not started"
        await self._broker.internal_message_broadcast(
            rentbox.command_topic(self.product_key, serial_number), payload, qos=0
        )

    async def disconnect(self, serial_number: str) -> bool:
        """Close the cabinet's connection now and forget its session; whether it was connected. It stays
        out only if it can no longer log in (its station was deleted)."""
        if self._broker is None:
            return False
        closed: bool = await self._broker.disconnect(serial_number)
        log.info("event=cabinet_disconnected_by_server station_sn=%s was_connected=%s", serial_number, closed)
        return closed

    def connected_clients(self) -> list[str]:
        """Client ids (cabinet SNs) of the cabinets connected now; guests are not cabinets."""
        if self._broker is None:
            return []
        return [
            client_id
            for client_id, (session, _) in self._broker.sessions.items()
            if session.transitions.state == "connected" and role(session) == CABINET
        ]

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            try:
                await asyncio.wait_for(broker.shutdown(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("event=broker_stop_timeout timeout_s=%s", STOP_TIMEOUT_S)
