"""The amqtt plugin that admits cabinets, confines each to its own topics and routes frames to actors.

- Authentication: username = client id = the cabinet SN, password = the secret issued at provisioning
  (checked by the kiosk host that owns the SN). Anonymous clients are refused, unless the broker runs
  with `allow_anonymous` (development and interoperability testing only): then every client that does not
  log in as a cabinet is admitted as a *guest*.
- ACL: a cabinet may publish only to `/{pk}/{sn}/user/{update,heart,upload}` and subscribe to, or
  receive, only `/{pk}/{sn}/user/get`, compared exactly, so no wildcard can widen it. A guest may use any
  topic outside the cabinet namespace `/{pk}/...` and nothing inside it: a filter written inside the
  namespace is refused, and a wildcard that reaches into it (`#`, `/+/...`) is granted but never delivers
  a cabinet topic (the RECEIVE check runs for every message).
- A guest may not take the client id of a cabinet the broker knows (that would take the cabinet's
  session over and cut it off); a cabinet that logs in takes over whatever holds its id.
- Routing: every admitted cabinet frame, and cabinet connect/subscribe/disconnect, goes to the owning kiosk
  host. Guests are never routed.
Everything refused is counted in `powerbank_mqtt_dropped_total{reason}` and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Protocol

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

import rentbox
from telemetry.metrics import MQTT_DROPPED

log = logging.getLogger(__name__)

ROLE: Final = "powerbank.role"
"""`Session.attributes` key: what the client logged in as."""
CABINET: Final = "cabinet"
GUEST: Final = "guest"


class CabinetRouter(Protocol):
    """Where the gate sends what cabinets do (implemented over Ray by `broker.actor`)."""

    async def authenticate(self, serial_number: str, password: str) -> bool: ...

    def connected(self, serial_number: str) -> None: ...

    def subscribed(self, serial_number: str) -> None: ...

    def disconnected(self, serial_number: str) -> None: ...

    def frame(self, serial_number: str, kind: str, payload: bytes) -> None: ...


def drop(reason: str, **fields: object) -> None:
    """Count and log one refused message or connection."""
    MQTT_DROPPED.labels(reason=reason).inc()
    log.warning("event=mqtt_dropped reason=%s %s", reason, " ".join(f"{k}={v}" for k, v in fields.items()))


def role(session: Session | None) -> str | None:
    if session is None:
        return None
    value: str | None = session.attributes.get(ROLE)
    return value


class CabinetGate(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    @dataclass
    class Config:
        router: Any
        product_key: str = "powerbank"
        allow_anonymous: bool = False

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: CabinetGate.Config = self.context.config
        self.router: CabinetRouter = config.router
        self.product_key = config.product_key
        self.allow_anonymous = config.allow_anonymous

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password, client_id = session.username, session.password, session.client_id
        if username and password is not None and client_id == username:
            if await self.router.authenticate(username, str(password)):
                session.attributes[ROLE] = CABINET
                return True
            if not self.allow_anonymous:
                drop("auth", client_id=client_id, why="bad_credentials_or_unknown_cabinet")
                return False
        elif not self.allow_anonymous:
            why = "anonymous" if not username or password is None else "client_id_is_not_username"
            drop("auth", client_id=client_id, username=username, why=why)
            return False
        if self._known_cabinet(client_id):
            drop("auth", client_id=client_id, username=username, why="guest_with_a_cabinets_client_id")
            return False
        session.attributes[ROLE] = GUEST
        log.info("event=mqtt_guest_admitted client_id=%s username=%s", client_id, username)
        return True

    def _known_cabinet(self, client_id: str | None) -> bool:
        known = self.context.get_session(client_id) if client_id else None
        return role(known) == CABINET

    def _in_namespace(self, topic: str) -> bool:
        namespace = f"/{self.product_key}"
        return topic == namespace or topic.startswith(namespace + "/")

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        who = role(session)
        if session is None or who is None or not topic:
            return False
        sn = session.client_id
        if who == GUEST:
            allowed = not self._in_namespace(topic)
        elif action == Action.PUBLISH:
            parsed = rentbox.parse_topic(topic)
            allowed = (
                parsed is not None
                and parsed == (self.product_key, sn, parsed[2])
                and parsed[2] in rentbox.UP_KINDS
            )
        else:  # SUBSCRIBE and RECEIVE: exactly its own command topic
            allowed = topic == rentbox.command_topic(self.product_key, sn)
        if not allowed and action != Action.RECEIVE:
            who_key = "station_sn" if who == CABINET else "client_id"
            drop("acl", **{who_key: sn}, role=who, action=action.value if action else None, topic=topic)
        return allowed

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        if role(client_session) == CABINET:
            self.router.connected(client_id)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        if self._known_cabinet(client_id) and topic == rentbox.command_topic(self.product_key, client_id):
            self.router.subscribed(client_id)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        if role(client_session) == CABINET:
            self.router.disconnected(client_id)

    async def on_broker_message_broadcast(self, *, client_id: str, message: ApplicationMessage) -> None:
        # Only publishes that passed the ACL get here, so a cabinet's topic is its own up topic.
        if not self._known_cabinet(client_id):
            return
        parsed = rentbox.parse_topic(message.topic)
        if parsed is not None:
            self.router.frame(parsed[1], parsed[2], bytes(message.data or b""))
