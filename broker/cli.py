"""`powerbank broker`: the embedded MQTT broker alone, for development and interoperability testing."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from config import Settings
from telemetry import logs

if TYPE_CHECKING:
    from broker.service import MqttBroker

log = logging.getLogger(__name__)


class StandaloneRouter:
    """The CabinetRouter without a fleet: no cabinet credentials to check, nobody to route to."""

    async def authenticate(self, serial_number: str, password: str) -> bool:
        log.warning(
            "event=cabinet_login_unavailable station_sn=%s why=broker_running_without_the_fleet",
            serial_number,
        )
        return False

    def connected(self, serial_number: str) -> None:
        pass

    def subscribed(self, serial_number: str) -> None:
        pass

    def disconnected(self, serial_number: str) -> None:
        pass

    def frame(self, serial_number: str, kind: str, payload: bytes) -> None:
        pass


def broker_command(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on. Default: the MQTT_HOST setting (127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on. Default: the MQTT_PORT setting (1883)."),
    ] = None,
    allow_anonymous: Annotated[
        bool,
        typer.Option(
            "--allow-anonymous",
            help="Required. Admit any client, with or without credentials, as a guest on every topic "
            "OUTSIDE the cabinet namespace /MQTT_PRODUCT_KEY/... (nothing inside it). For development and "
            "for interoperability testing with third-party MQTT clients and test suites only; logged "
            "loudly.",
        ),
    ] = False,
    max_payload_bytes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Drop (and count) a PUBLISH with a larger payload. Default: MQTT_MAX_PAYLOAD_BYTES (4096).",
        ),
    ] = None,
    max_connections_per_ip: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Close connections from one address beyond this many. "
            "Default: MQTT_MAX_CONNECTIONS_PER_IP (50).",
        ),
    ] = None,
) -> None:
    """Run the MQTT broker alone (no Ray fleet, no database) until Ctrl-C.

    It is the same hardened broker `powerbank up` embeds: MQTT 3.1.1, keepalive enforced at 1.5 x the
    client's, QoS delivered at the lower of publish and subscription QoS, per-cabinet topic ACL, payload
    and per-address connection caps.

    Cabinets cannot log in here: their credentials are checked by the kiosk hosts of the fleet, which
    only `powerbank up` runs. So a broker alone would refuse every client, and this command requires
    --allow-anonymous; a cabinet that dials it is treated as a guest and may not use its topics.
    """
    settings = Settings()
    logs.configure(settings.log_level)
    if not allow_anonymous:
        typer.echo(
            "error: running alone, the broker cannot check cabinet credentials (the fleet's kiosk hosts do, "
            "under `powerbank up`), so it would refuse every client. Pass --allow-anonymous to admit "
            "guests outside the cabinet namespace, for development and interoperability testing only.",
            err=True,
        )
        raise typer.Exit(code=2)

    from broker.service import MqttBroker, PortInUse  # amqtt loads only when the broker runs

    broker = MqttBroker(
        host=host or settings.mqtt_host,
        port=port or settings.mqtt_port,
        product_key=settings.mqtt_product_key,
        router=StandaloneRouter(),
        max_payload_bytes=max_payload_bytes or settings.mqtt_max_payload_bytes,
        max_connections_per_ip=max_connections_per_ip or settings.mqtt_max_connections_per_ip,
        connect_timeout_s=settings.mqtt_connect_timeout_s,
        allow_anonymous=True,
    )
    try:
        asyncio.run(_serve(broker))
    except PortInUse as exc:
        typer.echo(f"error: {exc} Or pass --port.", err=True)
        raise typer.Exit(code=1) from exc
    except KeyboardInterrupt:
        pass


async def _serve(broker: MqttBroker) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await broker.start()
    typer.echo(f"MQTT broker on mqtt://{broker.host}:{broker.port} — Ctrl-C to stop", err=True)
    try:
        await stopping.wait()
    finally:
        await broker.stop()
        log.info("event=broker_stopped")
