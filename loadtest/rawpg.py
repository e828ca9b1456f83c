"""Just enough of the PostgreSQL wire protocol for clients and a server that the measurements time.

`RawClient` sends a startup packet, and a query once it is told ReadyForQuery,
then sits there: a client waiting in a queue costs the harness almost nothing.
`FakeBackend` plays a trust-auth server that answers every startup at once
and never answers a query, so that a session holds its "slot" until the
backend closes it: the moment a slot frees is then in the harness's hands.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


def startup_packet(user: str, database: str, application_name: str = "loadtest") -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0)
    for k, v in (("user", user), ("database", database), ("application_name", application_name)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


QUERY = message(b"Q", b"select 1\0")


def _messages(buffer: bytearray) -> list[bytes]:
    """Take whole messages off the front of `buffer`; return their type bytes."""
    kinds = []
    while len(buffer) >= 5:
        length = struct.unpack_from("!i", buffer, 1)[0]
        if len(buffer) < 1 + length:
            break
        kinds.append(bytes(buffer[:1]))
        del buffer[: 1 + length]
    return kinds


class RawClient(asyncio.Protocol):
    """Sends its startup packet; once told ReadyForQuery, sends one query and waits."""

    def __init__(self, startup: bytes) -> None:
        self.startup = startup
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.first_byte_at: float | None = None
        self.query_sent = False
        self.closed = False
        self.error = False
        self.answered = asyncio.get_running_loop().create_future()  # resolves on the first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.startup)

    def data_received(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
            if not self.answered.done():
                self.answered.set_result(None)
        self.buffer += data
        for kind in _messages(self.buffer):
            if kind == b"E":
                self.error = True
            elif kind == b"Z" and not self.query_sent and self.transport is not None:
                self.query_sent = True
                self.transport.write(QUERY)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.answered.done():
            self.answered.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(host: str, port: int, startup: bytes) -> RawClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: RawClient(startup), host, port)
    return client


# Enough ParameterStatus for drivers and for PgBouncer, which caches them from the server.
PARAMETERS = {
    "server_version": "15.0", "server_encoding": "UTF8", "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
    "TimeZone": "UTC", "IntervalStyle": "postgres", "is_superuser": "off",
    "application_name": "", "default_transaction_read_only": "off", "in_hot_standby": "off",
}
LOGIN_ANSWER = (message(b"R", struct.pack("!i", 0))
                + b"".join(message(b"S", k.encode() + b"\0" + v.encode() + b"\0")
                           for k, v in PARAMETERS.items())
                + message(b"K", struct.pack("!ii", 1, 2))
                + message(b"Z", b"I"))


class ServerSide(asyncio.Protocol):
    """One connection to the fake backend."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started_at: float | None = None  # when the startup packet had fully arrived
        self.queried_at: float | None = None  # when the first query arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        assert self.transport is not None
        while self.started_at is None and len(self.buffer) >= 8:
            length, code = struct.unpack_from("!ii", self.buffer)
            if len(self.buffer) < length:
                return
            del self.buffer[:length]
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                self.transport.write(b"N")
                continue
            self.started_at = now
            self.transport.write(LOGIN_ANSWER)
            self.backend.started.append(self)
            self.backend.changed()
        if self.started_at is None:
            return
        for kind in _messages(self.buffer):
            if kind == b"Q" and self.queried_at is None:
                self.queried_at = now
                self.backend.changed()
            elif kind == b"X":
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.changed()


class FakeBackend:
    def __init__(self) -> None:
        self.started: deque[ServerSide] = deque()  # connections whose startup arrived, in order
        self.server: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ServerSide(self), "127.0.0.1", 0, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    def changed(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], object], timeout: float = 30) -> None:
        """Wait for something this backend saw (a startup, a query), woken by each event."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for side in self.started:
            if side.transport is not None:
                side.transport.abort()
