"""The fleet as seen from a Ray driver (API replicas, the broker): start hosts, address kiosks by SN."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import RayError

from actors.host import BROKER_ACTOR, KioskHostActor
from actors.messages import (
    CommandOutcome,
    CommandTimedOut,
    EjectOutcome,
    EjectUnconfirmed,
    KioskStatus,
    RemoteCommand,
    RentRefused,
    RentRequest,
    SlotView,
)
from actors.placement import host_names, owner
from config import Settings

log = logging.getLogger(__name__)


def start_hosts(settings: Settings) -> list[Any]:
    """Create (or find) the named kiosk-host actors. They reserve no CPU and are restarted if they die."""
    return [
        KioskHostActor.options(
            name=name,
            namespace=settings.ray_namespace,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
        ).remote(settings, name)
        for name in host_names(settings.kiosk_hosts)
    ]


class Fleet:
    """Routes each call to the host that owns the cabinet; actor handles are cached."""

    def __init__(self, settings: Settings) -> None:
        self.namespace = settings.ray_namespace
        self.hosts = host_names(settings.kiosk_hosts)
        self._handles: dict[str, Any] = {}

    def host(self, serial_number: str) -> Any:
        return self.by_name(owner(serial_number, self.hosts))

    def by_name(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return handle

    async def _ask(self, serial_number: str, method: str, *args: Any, unavailable: Any) -> Any:
        """Call the owning host; `unavailable` when it is unreachable or restarting (logged)."""
        try:
            return await getattr(self.host(serial_number), method).remote(serial_number, *args)
        except RayError as exc:
            log.warning("event=host_unavailable station_sn=%s call=%s error=%r", serial_number, method, exc)
            return unavailable

    async def rent(self, serial_number: str, request: RentRequest) -> EjectOutcome | RentRefused:
        # A host that died mid-call may or may not have sent the eject: unconfirmed, settled later.
        unconfirmed = EjectUnconfirmed(request_id=request.rental_id, powerbank_sn="")
        outcome: EjectOutcome | RentRefused = await self._ask(
            serial_number, "rent", request, unavailable=unconfirmed
        )
        return outcome

    async def command(self, serial_number: str, request: RemoteCommand) -> CommandOutcome:
        """An operator's command; a host that is unreachable or died mid-call leaves its fate unknown."""
        unknown = CommandTimedOut(
            request_id=request.request_id, command=request.command, detail="host_unavailable"
        )
        outcome: CommandOutcome = await self._ask(serial_number, "command", request, unavailable=unknown)
        return outcome

    async def set_maintenance(self, serial_number: str, on: bool) -> bool:
        """Tell the live kiosk; False when its host is unreachable (it reads the database on restart)."""
        told: bool = await self._ask(serial_number, "set_maintenance", on, unavailable=False)
        return told

    async def remove(self, serial_number: str) -> bool:
        removed: bool = await self._ask(serial_number, "remove", unavailable=False)
        return removed

    async def disconnect(self, serial_number: str) -> bool:
        """Have the broker close the cabinet's MQTT session now; False when it was not connected, or the
        broker is unreachable or restarting (logged; a restarted broker has no connections anyway)."""
        try:
            broker = ray.get_actor(BROKER_ACTOR, namespace=self.namespace)
            closed: bool = await broker.disconnect_cabinet.remote(serial_number)
        except (RayError, ValueError) as exc:  # ValueError: no such actor (yet)
            log.warning("event=broker_unavailable station_sn=%s call=disconnect error=%r", serial_number, exc)
            return False
        return closed

    async def upload(self, serial_number: str, payload: bytes) -> None:
        """A frame posted over HTTP (a hint, never evidence: see `Kiosk._on_upload`); dropped (logged) while
        the owning host is unreachable."""
        await self._ask(serial_number, "on_upload", payload, unavailable=None)

    async def status(self, serial_number: str) -> KioskStatus | None:
        """The kiosk's live status; None (offline) while its host is unreachable or restarting."""
        status: KioskStatus | None = await self._ask(serial_number, "status", unavailable=None)
        return status

    async def slots(self, serial_number: str) -> list[SlotView] | None:
        views: list[SlotView] | None = await self._ask(serial_number, "slots", unavailable=None)
        return views

    def broker_restarted(self) -> list[Any]:
        return [self.by_name(name).broker_restarted.remote() for name in self.hosts]

    async def tick(self) -> None:
        await asyncio.gather(*(self.by_name(name).tick.remote() for name in self.hosts))

    async def drained(self) -> None:
        await asyncio.gather(*(self.by_name(name).drained.remote() for name in self.hosts))
