"""Helpers for tests of the cabinet simulator against a real amqtt broker on 127.0.0.1.

Not a conftest: import what you need. ``start_broker`` runs an amqtt broker on a free port, ``Peer``
takes the server's seat for one cabinet (it subscribes to the cabinet's up topics and sends commands),
and ``MqttProxy`` sits between a cabinet and the broker to count the MQTT packets the cabinet sends and
to cut connections as a broker or a 4G link would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any, Final

import pytest
from amqtt.broker import Broker
from amqtt.client import MQTTClient

import rentbox
from rentbox import Decoded, Frame
from simulators.cabinet import CabinetCredentials

TIMEOUT_S: Final = 5.0
PK: Final = rentbox.DEFAULT_PRODUCT_KEY

# MQTT control packet types (high nibble of the first byte).
CONNECT: Final = 1
PUBLISH: Final = 3
SUBSCRIBE: Final = 8
PINGREQ: Final = 12
DISCONNECT: Final = 14


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_broker(*, allow_anonymous: bool = True) -> tuple[Broker, int]:
    """A plain amqtt broker on a free 127.0.0.1 port (stop it with ``await broker.shutdown()``)."""
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}
            },
        }
    )
    await broker.start()
    return broker, port


def cabinet_credentials(port: int, sn: str = "864601068412899", **changes: Any) -> CabinetCredentials:
    values: dict[str, Any] = {
        "sn": sn,
        "host": "127.0.0.1",
        "port": port,
        "username": sn,
        "password": "s3cret",
    }
    return CabinetCredentials(**(values | changes))


async def eventually(predicate: Callable[[], bool], what: str, *, timeout_s: float = TIMEOUT_S) -> None:
    """Wait until ``predicate()`` holds (checked every 10 ms), or fail the test naming ``what``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # noqa: ASYNC110 - simulator/proxy state has no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout_s}s")


class Peer:
    """The server's seat for one cabinet: every message the cabinet publishes is kept, per topic kind
    (``update``, ``heart``, ``upload``), in arrival order; nothing is skipped or lost."""

    def __init__(self, client: MQTTClient, sn: str) -> None:
        self.client = client
        self.sn = sn
        self.queues: dict[str, asyncio.Queue[bytes]] = {kind: asyncio.Queue() for kind in rentbox.UP_KINDS}
        self._reader = asyncio.create_task(self._read(), name=f"peer-{sn}")

    @classmethod
    async def connect(cls, port: int, sn: str) -> Peer:
        client = MQTTClient(client_id=f"peer-{sn}", config={"auto_reconnect": False, "plugins": {}})
        await client.connect(f"mqtt://127.0.0.1:{port}")
        await client.subscribe([(rentbox.up_topic(PK, sn, kind), 0) for kind in rentbox.UP_KINDS])
        return cls(client, sn)

    async def _read(self) -> None:
        while True:
            message = await self.client.deliver_message()
            if message is None:
                return
            parsed = rentbox.parse_topic(message.topic)
            assert parsed is not None and parsed[1] == self.sn, message.topic
            self.queues[parsed[2]].put_nowait(bytes(message.data or b""))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    async def command(self, payload: bytes) -> None:
        await self.client.publish(rentbox.command_topic(PK, self.sn), payload, qos=0)

    async def next_message(self, kind: str = "update", *, timeout_s: float = TIMEOUT_S) -> bytes:
        """The next payload the cabinet sent on ``/user/{kind}``, or fail after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self.queues[kind].get()
        except TimeoutError:
            pytest.fail(f"no {kind} message from cabinet {self.sn} within {timeout_s}s")

    async def next_decoded(
        self, kind: str = "update", *, holes_per_board: int | None = None, strict: bool = True
    ) -> Decoded:
        return rentbox.decode(
            await self.next_message(kind), holes_per_board=holes_per_board, strict_checksum=strict
        )

    async def next_frame(self, kind: str = "update", *, holes_per_board: int | None = None) -> Frame:
        """The next frame on ``/user/{kind}``, decoded with a strict checksum."""
        return (await self.next_decoded(kind, holes_per_board=holes_per_board)).frame

    def pending(self, kind: str = "update") -> int:
        """Messages received on ``kind`` and not taken yet."""
        return self.queues[kind].qsize()


class _PacketSplitter:
    """Splits a byte stream into MQTT control packets (fixed header + remaining length)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[int]:
        """Packet types of the packets completed by ``data``."""
        self._buffer += data
        types: list[int] = []
        while len(self._buffer) >= 2:
            length, multiplier, index = 0, 1, 1
            while True:
                if index >= len(self._buffer):
                    return types
                byte = self._buffer[index]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                index += 1
                if not byte & 0x80:
                    break
            if len(self._buffer) < index + length:
                return types
            types.append(self._buffer[0] >> 4)
            del self._buffer[: index + length]
        return types


class MqttProxy:
    """A TCP proxy from a free 127.0.0.1 port to the broker that records every MQTT packet the clients
    send upstream (``packets``: packet types, ``bytes_up``) and can cut every connection (``drop``)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        """Client connections accepted so far."""
        self.open = 0
        """Connections open right now."""
        self.packets: list[int] = []
        self.bytes_up = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def drop(self) -> None:
        """Reset every open connection, both sides (as a broker dropping its clients does)."""
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            self._tasks.discard(task)
            return
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        self.open += 1
        splitter = _PacketSplitter()

        def count(data: bytes) -> None:
            self.bytes_up += len(data)
            self.packets.extend(splitter.feed(data))

        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer, count)),
            asyncio.create_task(self._pump(upstream_reader, client_writer, None)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            client_writer.transport.abort()
            upstream_writer.transport.abort()
            self._pairs.discard(pair)
            self.open -= 1
            self._tasks.discard(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, observe: Callable[[bytes], None] | None
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if observe is not None:
                    observe(data)
                writer.write(data)
                await writer.drain()
