"""amqtt 0.12.1, fixed where it falls short of MQTT 3.1.1 or of what a cabinet fleet needs.

Each defect below was measured; tests/test_broker_hardening.py reproduces it (and failed on plain amqtt):

- Keepalive was never enforced (`handle_read_timeout` is `pass`): a silent client stayed "connected"
  and its will was never published. Now the read deadline is 1.5 x the client's keepalive
  [MQTT-3.1.2-24], for whole packets (a packet that stalls halfway counts as silence); on expiry the
  connection is closed as an abnormal disconnect, so the will goes out and the router hears
  `disconnected`. A connection that sends no CONNECT is closed after `connect_timeout_s`.
- Delivery used the subscription's QoS instead of min(publish QoS, subscription QoS) [MQTT-3.8.4-6];
  overlapping subscriptions got one copy per matching filter. Now one copy per client, at
  min(publish QoS, highest matching subscription QoS) [MQTT-3.3.5-1].
- Credentials were checked *after* the client id's existing session was deleted or taken over: any failed
  login with a cabinet's client id silently unsubscribed the connected cabinet. Now nothing is touched
  before the client is admitted.
- A clean-session reconnect left the old connection open; when it finally closed, the router heard
  `disconnected` after the new `connected`. Now the old connection is closed first [MQTT-3.1.4-2].
- A clean session that ended less than a second before a persistent reconnect was resumed (still
  marked clean) and then deleted with its queued messages; queued messages came back with RETAIN=1;
  a re-SUBSCRIBE kept the old QoS [MQTT-3.8.4-3]; on every reconnect the client was sent the retained
  messages of *every* filter any client had subscribed to, without the RECEIVE check; a retained QoS 0
  message went out at the subscription's QoS.
- A will was published without the publish ACL: a cabinet (or, with allow-anonymous, anyone) could set
  its will to another cabinet's command topic. Now a will that fails the ACL or the size cap is dropped at
  CONNECT (counted; the client is still admitted).
- A client that published to an invalid topic stayed "connected" for ever (amqtt only stopped reading its
  session's messages). A QoS 1/2 message unacknowledged when a persistent session's connection ended was
  dropped instead of being sent again on reconnect [MQTT-4.4.0-1]. Stopping the broker could hang for
  ever (on Python 3.11, `asyncio.wait_for` swallows a cancellation that races with a read completing).
- Payload size and connections per IP were unbounded; amqtt read any packet whole into memory (up to
  256 MB). Now a payload over `max_payload_bytes` is dropped (counted `size`), a single read beyond
  max(`max_payload_bytes`, 64 KiB) closes the connection (counted `size`), and connections beyond
  `max_connections_per_ip` are closed at once (counted `connections`).

Methods marked "replaces amqtt 0.12.1" are amqtt's code with the fix. `UPSTREAM` fingerprints every amqtt
function replaced here or whose internals these fixes rely on; `upstream_drift()` names those an upgrade
changed (a test fails, and start-up logs a warning), so that the copies are re-reviewed, never silently
stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import time
from collections import Counter
from math import floor
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import OUTGOING, OutgoingApplicationMessage, Session
from amqtt.utils import format_client_message, gen_client_id
from transitions import MachineError

from broker.gate import drop

log = logging.getLogger(__name__)

KEEPALIVE_GRACE: Final = 1.5
"""[MQTT-3.1.2-24]: disconnect after 1.5 x the keepalive without a control packet."""
READ_LIMIT_FLOOR: Final = 65_535
"""The largest read a legitimate packet needs besides a PUBLISH payload (a 16-bit-length string)."""
TAKEOVER_TIMEOUT_S: Final = 5.0
"""How long a reconnect waits for the old connection of its client id to finish closing."""
CLIENT_KEEPALIVE: Final = "powerbank.keepalive_s"
"""`Session.attributes` key: the keepalive the client asked for (`GuardedReader` enforces 1.5 x it)."""
_ADMITTED: Final = "powerbank.admitted"


class PacketTooLarge(Exception):
    """A read beyond the limit: the connection is closed (not a NoDataError, which amqtt would skip)."""


class GuardedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """Bounds each read in size and time, and can be shut so the reader loop ends on its next read.

    The time bound (`set_deadline`) costs next to nothing per read (amqtt's `wait_for`, and then an
    `asyncio.timeout` per read, took half the broker's CPU under a flood of small messages): a read only
    notes when it started, and one timer per connection, due when the read in progress would be
    `deadline_s` old, looks when it fires and sets itself again if reads went on meanwhile. A read that has
    waited that long ends in TimeoutError, which amqtt's reader loop turns into `handle_read_timeout`."""

    def __init__(self, inner: ReaderAdapter, *, max_read_bytes: int, peer: str) -> None:
        self._inner = inner
        self.max_read_bytes = max_read_bytes
        self.peer = peer
        self.deadline_s: float | None = None
        self._shut = False
        self._reading = False
        self._since = 0.0  # when the read in progress (or the last one) started
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    def set_deadline(self, seconds: float | None) -> None:
        self.deadline_s = seconds
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._since = loop.time()
            self._timer = loop.call_at(self._since + seconds, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._shut or self.deadline_s is None:
            return
        loop = asyncio.get_running_loop()
        due = self._since + self.deadline_s
        if not self._reading:  # busy with what it read: the next read starts the clock again
            due = loop.time() + self.deadline_s
        elif loop.time() >= due:
            self._expired = True
            self._inner.feed_eof()  # wakes the read, which raises TimeoutError
            return
        self._timer = loop.call_at(due, self._check)

    async def read(self, n: int = -1) -> bytes:
        if self._shut:
            return b""
        if n < 0 or n > self.max_read_bytes:
            drop("size", peer=self.peer, read_bytes=n, limit=self.max_read_bytes, action="disconnect")
            raise PacketTooLarge(f"{self.peer}: a read of {n} bytes exceeds {self.max_read_bytes}")
        if self.deadline_s is None:
            data: bytes = await self._inner.read(n)
            return data
        self._since, self._reading = asyncio.get_running_loop().time(), True
        try:
            data = await self._inner.read(n)
        finally:
            self._reading = False
        if self._expired:
            raise TimeoutError(f"{self.peer}: nothing read for {self.deadline_s} s")
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def shut(self) -> None:
        """Make every further read return end-of-stream, waking a read in progress."""
        self._shut = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.feed_eof()


def _shut(handler: BrokerProtocolHandler) -> None:
    if isinstance(handler.reader, GuardedReader):
        handler.reader.shut()


def _unacknowledged(message: Any) -> bool:
    if message.direction != OUTGOING or message.packet_id is None or message.publish_packet is None:
        return False
    if message.qos == QOS_1:
        return message.puback_packet is None
    return message.qos == QOS_2 and message.pubcomp_packet is None


class KeepaliveHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler, with keepalive enforced and a few lifecycle holes closed."""

    def handle_read_timeout(self) -> None:
        """Replaces amqtt 0.12.1's `pass`: the read deadline is 1.5 x keepalive, so this is the drop."""
        session = self.session
        drop(
            "keepalive",
            client_id=session.client_id if session else None,
            keepalive_s=session.attributes.get(CLIENT_KEEPALIVE) if session else None,
        )
        if isinstance(self.reader, GuardedReader):
            self.reader.shut()
        elif self.reader is not None:
            self.reader.feed_eof()

    async def _handle_message_flow(self, app_message: Any) -> None:
        """amqtt's, but a QoS 1/2 message still unacknowledged when the connection ends stays in flight
        (amqtt dropped it): a persistent session gets it again, DUP=1, when it reconnects [MQTT-4.4.0-1]."""
        try:
            await super()._handle_message_flow(app_message)
        except asyncio.CancelledError:
            if self.session is not None and _unacknowledged(app_message):
                self.session.inflight_out[app_message.packet_id] = app_message
            raise

    async def start(self) -> None:
        """amqtt's, but a connection that ended while it started is seen as ended: amqtt made the waiter
        for the end of the connection only after the reader had started, so a client that dropped at once
        (reader already done) left the broker waiting for ever."""
        await super().start()
        stopped = self._reader_stopped is not None and self._reader_stopped.is_set()
        if stopped and self._disconnect_waiter is not None and not self._disconnect_waiter.done():
            self._disconnect_waiter.set_result(None)

    async def stop(self) -> None:
        # On Python 3.11, asyncio.wait_for swallows a cancellation that races with the read it wraps;
        # amqtt's stop() then waits for the reader task for ever. Shutting the reader ends it regardless.
        _shut(self)
        await super().stop()


class HardenedBroker(Broker):  # type: ignore[misc]
    def __init__(
        self,
        config: dict[str, Any],
        *,
        max_payload_bytes: int,
        max_connections_per_ip: int,
        connect_timeout_s: float,
    ) -> None:
        super().__init__(config)
        self._max_payload_bytes = max_payload_bytes
        self._max_read_bytes = max(max_payload_bytes, READ_LIMIT_FLOOR)
        self._max_connections_per_ip = max_connections_per_ip
        self._connect_timeout_s = connect_timeout_s
        self._connections_per_ip: Counter[str] = Counter()
        self._live: dict[str, tuple[BrokerProtocolHandler, asyncio.Event]] = {}
        self._disconnected: set[str] = set()  # client ids whose connection ended: the session monitor's work
        # Indexes of amqtt's `_subscriptions` ({filter: [(session, qos)]}), so that no message, connect or
        # disconnect walks every filter: the filters with wildcards, and each client's filters.
        self._wildcard_filters: set[str] = set()
        self._filters_of: dict[str, set[str]] = {}

    # -- connections ---------------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """Replaces amqtt 0.12.1: caps connections per IP, and reads through a GuardedReader."""
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        if self._connections_per_ip[ip] >= self._max_connections_per_ip:
            drop("connections", ip=ip, limit=self._max_connections_per_ip)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        self._connections_per_ip[ip] += 1
        try:
            guarded = GuardedReader(
                StreamReaderAdapter(reader),
                max_read_bytes=self._max_read_bytes,
                peer=f"{ip}:{peer[1]}" if peer else ip,
            )
            await self._client_connected(listener_name, guarded, StreamWriterAdapter(writer))
        finally:
            self._connections_per_ip[ip] -= 1
            if self._connections_per_ip[ip] <= 0:
                del self._connections_per_ip[ip]

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Replaces amqtt 0.12.1: CONNECT deadline; credentials and will checked before any existing
        session is touched; takeover of a live connection; 1.5 x keepalive."""
        peer = format_client_message(address=remote_address, port=remote_port)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                handler, session = await KeepaliveHandler.init_from_connect(
                    reader, writer, self.plugins_manager
                )
        except TimeoutError as exc:
            log.warning("event=mqtt_connect_timeout peer=%s timeout_s=%s", peer, self._connect_timeout_s)
            await writer.close()
            raise AMQTTError(f"no CONNECT from {peer} within {self._connect_timeout_s} s") from exc
        except MQTTError as exc:
            log.warning("event=mqtt_connect_refused peer=%s error=%s", peer, exc)
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        except AMQTTError:
            raise
        except Exception as exc:  # garbage instead of a CONNECT must not leak the socket
            log.warning("event=mqtt_connect_invalid peer=%s error=%r", peer, exc)
            await writer.close()
            raise AMQTTError(f"invalid CONNECT from {peer}: {exc!r}") from exc

        if not await self._admit(session):
            connack = ConnackPacket.build(0, NOT_AUTHORIZED)
            await connack.to_stream(writer)
            await writer.close()
            raise MQTTError(f"{peer} client_id={session.client_id}: not authorized")
        if session.will_flag:
            await self._check_will(session)

        client_id = session.client_id
        if not client_id:
            session.client_id = gen_client_id()
            session.parent = 0
        else:
            await self._take_over(client_id)
            existing = self._sessions.get(client_id, (None, None))[0]
            if session.clean_session or existing is None or existing.clean_session:
                # a clean session ends with its connection: never resume one
                await self._delete_session(client_id)
                session.parent = 0
            else:
                for name in (
                    "will_flag",
                    "will_message",
                    "will_topic",
                    "will_qos",
                    "will_retain",
                    "keep_alive",
                    "username",
                    "password",
                    "remote_address",
                    "remote_port",
                    "ssl_object",
                ):
                    setattr(existing, name, getattr(session, name))
                existing.attributes.update(session.attributes)
                session = existing
                session.parent = 1

        session.attributes[CLIENT_KEEPALIVE] = session.keep_alive
        deadline = session.keep_alive * KEEPALIVE_GRACE if session.keep_alive > 0 else None
        session.keep_alive = 0  # amqtt would time every packet (and every write) itself: the reader does it
        if isinstance(reader, GuardedReader):
            reader.set_deadline(deadline)
        return handler, session

    async def _admit(self, session: Session) -> bool:
        try:
            admitted = bool(await super()._authenticate(session, self.listeners_config["default"]))
        except Exception:
            log.exception("event=mqtt_auth_failed client_id=%s", session.client_id)
            admitted = False
        session.attributes[_ADMITTED] = admitted
        return admitted

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        """`_initialize_client_session` decided already, before touching any session."""
        return bool(session.attributes.pop(_ADMITTED, False))

    async def _check_will(self, session: Session) -> None:
        """A will is a publish on the client's behalf: same topic rules, ACL and size cap."""
        topic, message = session.will_topic, bytes(session.will_message or b"")
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            drop("acl", client_id=session.client_id, will_topic=topic, why="invalid_will_topic")
        elif len(message) > self._max_payload_bytes:
            drop("size", client_id=session.client_id, will_topic=topic, bytes=len(message))
        elif not await self._topic_filtering(session, topic, Action.PUBLISH):
            pass  # the gate counted and logged it
        else:
            return
        log.warning("event=mqtt_will_refused client_id=%s will_topic=%s", session.client_id, topic)
        session.will_flag = False
        session.will_topic = session.will_message = None

    async def _take_over(self, client_id: str) -> None:
        """Close the live connection of `client_id`, if any, and wait until the router heard it."""
        await self._end_connection(client_id, event="mqtt_session_takeover")

    async def disconnect(self, client_id: str) -> bool:
        """Cut `client_id` off now, for good: its connection is closed as on keepalive expiry (an abnormal
        disconnect; by the time this returns the connection has ended and `disconnected` was fired to the
        router) and its session is deleted with its subscriptions and queued messages. Whether it was
        connected. Whether it may come back is for authentication to say (a deleted station's cabinet
        cannot: its credentials are gone)."""
        connected = await self._end_connection(client_id, event="mqtt_disconnected_by_server")
        await self._delete_session(client_id)
        return connected

    async def _end_connection(self, client_id: str, *, event: str) -> bool:
        """Close the live connection of `client_id`, if any, and wait (bounded) until it has ended and
        `disconnected` was fired to the router (logged as `event`); whether there was one."""
        live = self._live.get(client_id)
        if live is None:
            return False
        handler, finished = live
        log.info("event=%s client_id=%s", event, client_id)
        await self._close(handler)
        try:
            await asyncio.wait_for(finished.wait(), TAKEOVER_TIMEOUT_S)
        except TimeoutError:
            log.warning("event=%s_slow client_id=%s timeout_s=%s", event, client_id, TAKEOVER_TIMEOUT_S)
        return True

    @staticmethod
    async def _close(handler: BrokerProtocolHandler) -> None:
        """End a connection as an abnormal disconnect (the will goes out)."""
        _shut(handler)
        await handler.handle_connection_closed()

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        """Replaces amqtt 0.12.1: the connection is registered so that a takeover can wait for its end, and a
        connect costs the same whatever the number of clients (amqtt awaited a retained-message lookup for
        every filter any client had subscribed to, on every connect: quadratic in a connect storm)."""
        client_id = client_session.client_id
        finished = asyncio.Event()
        self._live[client_id] = (handler, finished)
        self._disconnected.discard(client_id)
        try:
            await self._run_client_session(reader, writer, client_session, handler, listener_name)
        finally:
            finished.set()
            if self._live.get(client_id, (None, None))[0] is handler:
                del self._live[client_id]
                self._disconnected.add(client_id)

    async def _run_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        listener_name: str,
    ) -> None:
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if client_session.client_id is None:
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():  # `_take_over` closed it; amqtt's fallback
                    old_handler = self._sessions[client_session.client_id][1]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    break
                await asyncio.sleep(1)  # amqtt: "reconnecting too quickly, make it wait"
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Replaces amqtt 0.12.1, which logged `repr()` of every subscription of every client (built even
        with debug logging off) after each SUBSCRIBE: quadratic in a connect storm."""
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True
        while connected:
            try:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if disconnect_waiter in done:
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
            except asyncio.CancelledError:
                break
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    async def _session_monitor(self) -> None:
        """Replaces amqtt 0.12.1, which could delete the *new* session of a client that reconnected while
        it was cleaning up others (each session is re-checked just before it goes), and looked at every
        session every second (only those whose connection ended are candidates)."""
        while True:
            expiry = self.config.session_expiry_interval
            retain_after = floor(time.time() - expiry) if expiry is not None else None
            for client_id in list(self._disconnected):
                session = self._sessions.get(client_id, (None, None))[0]
                if session is None:
                    self._disconnected.discard(client_id)
                elif self._ended(session, retain_after):
                    self._disconnected.discard(client_id)
                    await self._cleanup_session(client_id)
            await asyncio.sleep(1)

    @staticmethod
    def _ended(session: Session, retain_after: int | None) -> bool:
        if session.transitions.state != "disconnected":
            return False
        if session.clean_session:
            return True
        last: int | None = session.last_disconnect_time
        return retain_after is not None and last is not None and last < retain_after

    # -- messages in ----------------------------------------------------------------------------

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Replaces amqtt 0.12.1: size cap first; the publish QoS travels with the message; an invalid
        topic closes the connection for real (amqtt only stopped reading the session's messages)."""
        app_message = wait_deliver.result()
        if app_message is None:
            return True
        topic, data = app_message.topic, app_message.data or b""
        if len(data) > self._max_payload_bytes:
            drop("size", client_id=client_session.client_id, topic=topic, bytes=len(data))
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
        )
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # [MQTT-4.7.3-1] [MQTT-3.3.2-2] [MQTT-4.7.2-1]
            log.warning("event=mqtt_invalid_topic client_id=%s topic=%r", client_session.client_id, topic)
            await self._close(handler)
            return True
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            return True  # the gate counted and logged it
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
        )
        if self._matching_filters(topic):  # most messages (a cabinet's frames) have no subscriber
            await self._broadcast_message(client_session, topic, data, app_message.qos)
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, data, app_message.qos)
        return True

    # -- messages out ---------------------------------------------------------------------------

    def _matching_filters(self, topic: str) -> list[str]:
        """The subscribed filters that match `topic`: the exact one, if any, and the wildcards that match."""
        subscriptions = self._subscriptions
        found = [topic] if topic in subscriptions else []
        found += [f for f in self._wildcard_filters if f in subscriptions and self._matches(topic, f)]
        return found

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Replaces amqtt 0.12.1: one copy per client at min(publish QoS, its highest matching subscription
        QoS); targets are collected before any await (amqtt iterated the live subscription dict); only the
        filters that can match are looked at (amqtt matched every message against every filter)."""
        broadcast = await self._broadcast_queue.get()
        topic, data = broadcast["topic"], broadcast["data"]
        publish_qos: int | None = broadcast.get("qos")  # None: a plugin broadcast with no QoS of its own
        targets: dict[str, tuple[Session, int]] = {}
        for a_filter in self._matching_filters(topic):
            for session, sub_qos in self._subscriptions[a_filter]:
                known = targets.get(session.client_id)
                if known is None or sub_qos > known[1]:
                    targets[session.client_id] = (session, sub_qos)
        for session, sub_qos in targets.values():
            qos = sub_qos if publish_qos is None else min(publish_qos, sub_qos)
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            if session.transitions.state != "connected":
                # [MQTT-3.1.2-5] queue QoS 1 and 2 for a disconnected persistent session
                if not session.clean_session and qos in (QOS_1, QOS_2):
                    await self._retain_broadcast_message(broadcast, qos, session)
                continue
            handler = self._get_handler(session)
            if handler:
                running_tasks.append(
                    asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
                )

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Replaces amqtt 0.12.1, which sent the messages queued for an offline session with RETAIN=1."""
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks: list[asyncio.Future[OutgoingApplicationMessage]] = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Disabled: on every reconnect amqtt 0.12.1 calls this for every filter *any* client subscribed to,
        sending this client others' retained messages without the RECEIVE check. Retained messages go out
        for a new subscription only [MQTT-3.3.1-6], from `_handle_subscription`."""

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        """Replaces amqtt 0.12.1: retained messages through `_send_retained` (RECEIVE check, right QoS)."""
        subscriptions = subscribe_waiter.result()
        codes = [
            await self.add_subscription(subscription, client_session) for subscription in subscriptions.topics
        ]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for (a_filter, _), granted in zip(subscriptions.topics, codes, strict=True):
            if granted == 0x80:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=a_filter,
                qos=granted,
            )
            await self._send_retained(a_filter, granted, client_session, handler)

    async def _send_retained(
        self, a_filter: str, sub_qos: int, session: Session, handler: BrokerProtocolHandler
    ) -> None:
        tasks: list[asyncio.Future[OutgoingApplicationMessage]] = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, a_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            qos = sub_qos if retained.qos is None else min(sub_qos, retained.qos)
            tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, qos, retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's, but a SUBSCRIBE to a filter the client already has replaces its QoS [MQTT-3.8.4-3];
        the filter indexes are kept."""
        granted: int = await super().add_subscription(subscription, session)
        if granted != 0x80:
            a_filter = subscription[0]
            entries = self._subscriptions.get(a_filter, [])
            for index, (subscriber, _) in enumerate(entries):
                if subscriber.client_id == session.client_id:
                    entries[index] = (session, granted)
            if "+" in a_filter or "#" in a_filter:
                self._wildcard_filters.add(a_filter)
            self._filters_of.setdefault(session.client_id, set()).add(a_filter)
        return granted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Replaces amqtt 0.12.1, which walked every filter of every client on each disconnect."""
        for a_filter in self._filters_of.pop(session.client_id, ()):
            self._del_subscription(a_filter, session)
            if not self._subscriptions.get(a_filter, True):
                del self._subscriptions[a_filter]
                self._wildcard_filters.discard(a_filter)

    async def _delete_session(self, client_id: str) -> None:
        """Replaces amqtt 0.12.1, which formatted `repr(session)` for two debug lines on every call."""
        session = self._sessions.pop(client_id, (None, None))[0]
        if session is not None:
            await self._del_all_subscriptions(session)
            session.clear_queues()


# -- the amqtt code these fixes were written against ---------------------------------------------

UPSTREAM: Final[dict[str, dict[str, str]]] = {
    # owner -> function -> sha256 (first 16 hex digits) of its source in amqtt 0.12.1, as reviewed here
    "amqtt.broker.Broker": {
        "stream_connected": "d1c68240cb49f94a",
        "_client_connected": "432b724bc4fb7946",
        "_initialize_client_session": "5dd89158bbe46266",
        "_handle_client_session": "8b1b52a03df9daf5",
        "_client_message_loop": "916c4647c3389918",
        "_handle_disconnect": "8c3b8702f3567055",
        "_handle_subscription": "3dae18afa195209e",
        "_handle_message_delivery": "89727723da550bed",
        "_publish_session_retained_messages": "78cd66096c935c1f",
        "_publish_retained_messages_for_subscription": "d6ad257821ba29ef",
        "_run_broadcast": "e852128b3e38e04a",
        "_retain_broadcast_message": "884c193d6731d048",
        "_broadcast_message": "78ad4edb7efb3b72",
        "add_subscription": "07757b63113c395e",
        "_authenticate": "4d7db8cc6fe2c3f6",
        "_session_monitor": "5091fa20cdfdc203",
        "_cleanup_session": "530ae891d9f536cc",
        "_delete_session": "a8333dded50648a7",
        "_del_all_subscriptions": "615579810f47d1e0",
        "_del_subscription": "415f349273b0552d",
        "retain_message": "6233eff2618baede",
        "shutdown": "800adcdd80ded223",
    },
    "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler": {
        "init_from_connect": "036dc04c1133a18f",
        "start": "f7637c34a27f905e",
        "stop": "70e440da78e7178b",
        "handle_read_timeout": "ffd79f12457f41e1",
        "handle_disconnect": "63b454d06eab58f8",
        "handle_connection_closed": "e9c448557a8dab58",
    },
    "amqtt.mqtt.protocol.handler.ProtocolHandler": {
        "_reader_loop": "93f3b8e4483040d0",
        "start": "684c58c16be73a2d",
        "stop": "874ae8871911881f",
        "_init_session": "d8f6979793e163e9",
        "_retry_deliveries": "16fd2ca86991aba9",
        "_stop_waiters": "78a59ebc21c3e9fa",
        "_handle_message_flow": "610dae5c5d7f3b8d",
        "_handle_qos1_message_flow": "944e6a8130c70daf",
        "_handle_qos2_message_flow": "f2d96f1fc4eca34f",
    },
    "amqtt.adapters.StreamReaderAdapter": {
        "read": "e445534526f94201",
        "feed_eof": "de886d5703af8ece",
    },
}

_OWNERS: Final[dict[str, Any]] = {
    "amqtt.broker.Broker": Broker,
    "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler": BrokerProtocolHandler,
    "amqtt.mqtt.protocol.handler.ProtocolHandler": ProtocolHandler,
    "amqtt.adapters.StreamReaderAdapter": StreamReaderAdapter,
}


def fingerprint(owner: str, name: str) -> str | None:
    """The first 16 hex digits of the sha256 of the source of `owner`'s own `name`, if it has one."""
    function = _OWNERS[owner].__dict__.get(name)
    if function is None:
        return None
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def upstream_drift() -> dict[str, str]:
    """The fingerprinted amqtt functions whose source is not the reviewed one: name -> what happened."""
    drift: dict[str, str] = {}
    for owner, functions in UPSTREAM.items():
        for name, expected in functions.items():
            actual = fingerprint(owner, name)
            if actual != expected:
                drift[f"{owner}.{name}"] = "missing" if actual is None else f"changed (now {actual})"
    return drift
