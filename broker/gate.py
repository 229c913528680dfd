"""The amqtt plugin that admits cabinets, confines each to its own topics and routes frames to actors.

- Authentication: username = client id = the cabinet SN, password = the secret issued at provisioning
  (checked by the kiosk host that owns the SN). Anonymous clients are refused.
- ACL: a cabinet may publish only to `/{pk}/{sn}/user/{update,heart,upload}` and subscribe to, or
  receive, only `/{pk}/{sn}/user/get`, compared exactly, so no wildcard can widen it.
- Routing: every admitted frame, and connect/subscribe/disconnect, goes to the owning kiosk host.
Everything refused is counted in `powerbank_mqtt_dropped_total{reason}` and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

import rentbox
from telemetry.metrics import MQTT_DROPPED

log = logging.getLogger(__name__)


class CabinetRouter(Protocol):
    """Where the gate sends what cabinets do (implemented over Ray by `broker.actor`)."""

    async def authenticate(self, serial_number: str, password: str) -> bool: ...

    def connected(self, serial_number: str) -> None: ...

    def subscribed(self, serial_number: str) -> None: ...

    def disconnected(self, serial_number: str) -> None: ...

    def frame(self, serial_number: str, kind: str, payload: bytes) -> None: ...


def _drop(reason: str, **fields: object) -> None:
    MQTT_DROPPED.labels(reason=reason).inc()
    log.warning("event=mqtt_dropped reason=%s %s", reason, " ".join(f"{k}={v}" for k, v in fields.items()))


class CabinetGate(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    @dataclass
    class Config:
        router: Any
        product_key: str = "powerbank"
        max_payload_bytes: int = 4096

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: CabinetGate.Config = self.context.config
        self.router: CabinetRouter = config.router
        self.product_key = config.product_key
        self.max_payload_bytes = config.max_payload_bytes

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password, client_id = session.username, session.password, session.client_id
        if not username or password is None:
            _drop("auth", client_id=client_id, why="anonymous")
            return False
        if client_id != username:
            _drop("auth", client_id=client_id, username=username, why="client_id_is_not_username")
            return False
        if not await self.router.authenticate(username, str(password)):
            _drop("auth", client_id=client_id, why="bad_credentials_or_unknown_cabinet")
            return False
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        sn = session.username if session else None
        if not sn or not topic:
            return False
        own_commands = rentbox.command_topic(self.product_key, sn)
        if action == Action.PUBLISH:
            parsed = rentbox.parse_topic(topic)
            allowed = (
                parsed is not None
                and parsed == (self.product_key, sn, parsed[2])
                and parsed[2] in rentbox.UP_KINDS
            )
        else:  # SUBSCRIBE and RECEIVE: exactly its own command topic
            allowed = topic == own_commands
        if not allowed and action != Action.RECEIVE:
            _drop("acl", station_sn=sn, action=action.value if action else None, topic=topic)
        return allowed

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        self.router.connected(client_id)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        if topic == rentbox.command_topic(self.product_key, client_id):
            self.router.subscribed(client_id)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        self.router.disconnected(client_id)

    async def on_broker_message_broadcast(self, *, client_id: str, message: ApplicationMessage) -> None:
        parsed = rentbox.parse_topic(message.topic)
        if parsed is None:
            return
        data = bytes(message.data or b"")
        if len(data) > self.max_payload_bytes:
            _drop("size", station_sn=client_id, bytes=len(data))
            return
        self.router.frame(parsed[1], parsed[2], data)
