"""The byte pump: two asyncio.Protocol halves that write what they read to each other.

Knows nothing of PostgreSQL. Flow control is coupled across the pair: when
one transport's write buffer passes its high-water mark, reading stops on
the other until it drains. Optional observers see each chunk each way, for
the session to follow what it needs.

Closing: the server closing makes the client transport close once its
buffer is flushed, so a server FATAL reaches the client first. The client's
EOF means it is gone (PostgreSQL drivers close both ways; after a FIN only a
write would tell a half-close apart, and a vanished client's query would then
hold its slot to the end). The server side is then half-closed and read (and
dropped) until the server closes: only then is its slot free again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

WRITE_HIGH_WATER = 256 * 1024

Observer = Callable[[bytes], None]


class PyPump:
    """The per-chunk work of a half: count, show the observer, write to the other side.

    The reference for `_walker.Pump`, the same in C, and what runs where no C
    compiler was at hand at install.
    """

    __slots__ = ("_write", "count", "observer")

    def __init__(self, write: Callable[[bytes], Any], observer: Observer | None = None) -> None:
        self._write = write
        self.observer = observer
        self.count = 0  # bytes read from this side

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        if self.observer is not None:
            self.observer(data)
        self._write(data)


try:
    from ._walker import Pump as CompiledPump
except ImportError:  # installed without a C compiler
    CompiledPump = None
DEFAULT_PUMP: type = CompiledPump or PyPump  # what relays use


def _halves(pump: type) -> tuple[type, type]:
    """The client and the server half of a relay, on `pump`."""

    class Half(pump, asyncio.Protocol):  # type: ignore[valid-type, misc]
        __slots__ = ("peer", "relay")

        def __init__(self, relay: Relay, peer: asyncio.Transport, observer: Observer | None) -> None:
            super().__init__(peer.write, observer)
            self.relay = relay
            self.peer = peer

        # Our transport's write buffer is full: stop reading what fills it.
        def pause_writing(self) -> None:
            self.peer.pause_reading()

        def resume_writing(self) -> None:
            self.peer.resume_reading()

    class ClientHalf(Half):
        __slots__ = ()

        def eof_received(self) -> bool:
            self.relay._client_gone()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.relay._client_gone()
            self.relay._client_closed()

    class ServerHalf(Half):
        __slots__ = ()

        def eof_received(self) -> bool:
            self.relay._server_gone()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.relay._server_gone()
            self.relay._server_closed()

    return ClientHalf, ServerHalf


_HALVES = {pump: _halves(pump) for pump in (PyPump, CompiledPump) if pump is not None}


class _Drain(asyncio.Protocol):
    """The server side once the client is gone: discard until the server closes."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._server_closed()


class Relay:
    """Couples a client transport with a server transport.

    `server_closed` resolves when the server's connection is closed (its slot
    is free), `client_closed` when the client's is. `on_client_gone()` runs
    once if the client leaves while the server connection is still open.
    """

    __slots__ = ("_client_left", "_on_client_gone", "_server_left", "client", "client_closed",
                 "client_half", "server", "server_closed", "server_half")

    def __init__(
        self,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        loop: asyncio.AbstractEventLoop,
        client_observer: Observer | None = None,
        server_observer: Observer | None = None,
        on_client_gone: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.server = server
        self.server_closed: asyncio.Future[None] = loop.create_future()
        self.client_closed: asyncio.Future[None] = loop.create_future()
        self._on_client_gone = on_client_gone
        self._client_left = False
        self._server_left = False
        for t in (client, server):
            t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        client_half, server_half = _HALVES[DEFAULT_PUMP]
        self.server_half = server_half(self, client, server_observer)
        self.client_half = client_half(self, server, client_observer)
        client.set_protocol(self.client_half)
        server.set_protocol(self.server_half)

    @property
    def bytes_to_server(self) -> int:
        return self.client_half.count

    @property
    def bytes_to_client(self) -> int:
        return self.server_half.count

    def set_server_observer(self, observer: Observer | None) -> None:
        self.server_half.observer = observer

    def to_client(self, data: bytes) -> None:
        """Send the client bytes of our own (at a message boundary: the caller knows)."""
        if not self._client_left:
            self.client.write(data)

    def to_server(self, data: bytes) -> None:
        if not self._server_left and not self._client_left:
            self.server.write(data)

    def close_client(self) -> None:
        """Close the client's side (after what is buffered); the server's follows as usual."""
        self.client.close()

    def close(self) -> None:
        """Close both sides now (shutdown timeout)."""
        self.client.abort()
        self.server.abort()

    def detach(self) -> None:
        """The session is over: drop what refers back to it, and once both sides have
        closed (nothing calls the halves any more), the halves' link to this relay."""
        self._on_client_gone = None
        self.client_half.observer = self.server_half.observer = None
        if self.client_closed.done() and self.server_closed.done():
            self.client_half.relay = self.server_half.relay = None

    def _client_gone(self) -> None:
        if self._client_left:
            return
        self._client_left = True
        self.client.close()
        if self._server_left:
            return
        if self._on_client_gone is not None:
            self._on_client_gone()
        # Keep reading until the server closes, so we know its slot is free.
        self.server.set_protocol(_Drain(self))
        self.server.resume_reading()
        if self.server.can_write_eof():
            self.server.write_eof()
        else:
            self.server.close()  # TLS: close_notify, and its connection_lost once the server closes

    def _server_gone(self) -> None:
        if self._server_left:
            return
        self._server_left = True
        if not self._client_left:
            # Stops reading the client at once; writes what is buffered
            # (such as the server's FATAL) before closing.
            self.client.close()

    def _server_closed(self) -> None:
        self._server_gone()
        if not self.server_closed.done():
            self.server_closed.set_result(None)

    def _client_closed(self) -> None:
        if not self.client_closed.done():
            self.client_closed.set_result(None)
