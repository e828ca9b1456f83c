"""The byte pump: what a session's client and server connections read goes to the other.

Two implementations of one contract (see Relay): `SocketRelay` works on the two
sockets themselves, for sessions without TLS on either side; `Relay` on two
asyncio transports, for the rest. `open_relay` picks. Knows nothing of PostgreSQL.

Flow control is coupled across the pair: when one side's writes back up (past a
transport's high-water mark, or at all on a socket), reading stops on the other
until they are sent. Optional observers see each chunk each way, for the
session to follow what it needs.

Closing: the server closing makes the client's side close once what it is owed
is sent, so a server FATAL reaches the client first. The client's EOF means it
is gone (PostgreSQL drivers close both ways; after a FIN only a write would tell
a half-close apart, and a vanished client's query would then hold its slot to
the end). The server side is then half-closed and read (and dropped) until the
server closes: only then is its slot free again.
"""

from __future__ import annotations

import asyncio
import os
import weakref
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
try:
    from ._walker import Conduit, Poller
except ImportError:  # no compiler, or not Linux (epoll)
    Conduit = Poller = None
DEFAULT_PUMP: type = CompiledPump or PyPump  # what transport relays use
SOCKETS = Conduit is not None  # whether open_relay may take the sockets over

# Weakly both ways: the loop's reader is what keeps a Poller, so that a loop closed with
# sessions still relayed frees them (and closes their sockets) with itself.
_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.ref[Any]] = \
    weakref.WeakKeyDictionary()


def poller_for(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's Poller for relayed sockets: the loop watches its one descriptor."""
    ref = _POLLERS.get(loop)
    poller = ref() if ref is not None else None
    if poller is None:
        poller = Poller()
        loop.add_reader(poller.fd, poller.dispatch)
        _POLLERS[loop] = weakref.ref(poller)
    return poller


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

    def start(self) -> None:
        """Read both sides from now on (the server's was paused until what came first was sent)."""
        self.server.resume_reading()

    def close_client(self) -> None:
        """Close the client's side (after what is buffered); the server's follows as usual."""
        self.client.close()

    def abort_client(self) -> None:
        """Close the client's side now, dropping what it has not taken."""
        self.client.abort()

    def close(self) -> None:
        """Close both sides now (shutdown timeout)."""
        # The client's end first, as the relay sees it: a TLS transport reports its loss
        # later than a plain one, and on_client_gone must find the server still there.
        self._client_gone()
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
        # Keep reading until the server closes, so we know its slot is free.
        self.server.set_protocol(_Drain(self))
        self.server.resume_reading()
        if self.server.can_write_eof():
            self.server.write_eof()
        else:
            self.server.close()  # TLS: close_notify, and its connection_lost once the server closes
        if self._on_client_gone is not None:  # last: whatever it does, the above is done
            self._on_client_gone()

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


class SocketRelay:
    """The Relay contract on the two sockets themselves (both plain: no TLS).

    Each socket is a C `Conduit`, watched by the loop's `Poller` (an epoll
    instance of its own). When a socket is readable it reads a chunk, shows it
    to the observer and sends it to the other socket. Compared with two
    transports, no protocol call or write queue sits in between, and the GIL is
    taken once per wakeup of all ready sockets, not twice per chunk. Only what a
    socket does not take at once is buffered, and reading the other side stops
    until it is sent. Endings are as in Relay.
    """

    __slots__ = ("_client_closing", "_client_left", "_eof_to_server", "_on_client_gone",
                 "client", "client_closed", "loop", "poller", "server", "server_closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, client_fd: int, server_fd: int, *,
                 client_observer: Observer | None = None, server_observer: Observer | None = None,
                 on_client_gone: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.poller = poller_for(loop)
        self.server_closed: asyncio.Future[None] = loop.create_future()
        self.client_closed: asyncio.Future[None] = loop.create_future()
        self._on_client_gone = on_client_gone
        self._client_left = False
        self._client_closing = False  # close the client once what it is owed is sent
        self._eof_to_server = False  # end the server's stream once what it is owed is sent
        self.client = Conduit(client_fd, self, client_observer)  # reads the client
        self.server = Conduit(server_fd, self, server_observer)
        self.client.link(self.server)
        self.server.link(self.client)

    @classmethod
    def take(cls, loop: asyncio.AbstractEventLoop, client: asyncio.Transport,
             server: asyncio.Transport, **kwargs: Any) -> SocketRelay | None:
        """Takes the sockets over from two plain transports, which are closed; None
        where it cannot (no compiled Conduit, TLS, a write still buffered, no
        descriptor left), and the transports are left as they were."""
        if not SOCKETS:
            return None
        socks = []
        for t in (client, server):
            sock = t.get_extra_info("socket")
            if sock is None or t.get_extra_info("ssl_object") is not None or t.is_closing() \
                    or t.get_write_buffer_size():
                return None
            socks.append(sock)
        fds: list[int] = []
        try:
            for sock in socks:
                fds.append(os.dup(sock.fileno()))
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        for t in (client, server):
            t.set_protocol(_IGNORED)  # its connection_lost is no news to anyone
            t.abort()  # closes its descriptor only: the socket lives on in ours
        return cls(loop, fds[0], fds[1], **kwargs)

    @property
    def bytes_to_server(self) -> int:
        return self.client.count

    @property
    def bytes_to_client(self) -> int:
        return self.server.count

    def set_server_observer(self, observer: Observer | None) -> None:
        self.server.observer = observer

    def start(self) -> None:
        """Read both sides from now on."""
        self._sync()

    def to_client(self, data: bytes) -> None:
        if not self._client_left:
            self.client.send(data)

    def to_server(self, data: bytes) -> None:
        if self.server.fd >= 0 and not self._client_left:
            self.server.send(data)

    def close_client(self) -> None:
        self._client_closing = True
        self._sync()

    def abort_client(self) -> None:
        """Close the client's side now, dropping what it has not taken."""
        self.client.drop()
        self.close_client()

    def close(self) -> None:
        self.server.drop()
        try:
            self.abort_client()
        finally:  # whatever on_client_gone does, the server's end closes too
            self._lose_server()

    def detach(self) -> None:
        self._on_client_gone = None
        self.client.observer = self.server.observer = None
        if self.client_closed.done() and self.server_closed.done():
            self.client.detach()
            self.server.detach()

    # -- what the conduits tell ------------------------------------------------------

    def _lost(self, end: Any, error: int) -> None:
        """End of stream (`error` 0) or a socket error on `end`."""
        if end is self.server:
            self._lose_server()
            return
        if error:
            end.drop()
        self._client_gone()
        self._sync()

    def _blocked(self, end: Any) -> None:
        self._sync()

    def _drained(self, end: Any) -> None:
        self._sync()

    def _fault(self, end: Any, error: BaseException) -> None:
        try:
            self.loop.call_exception_handler({"message": "relay failed; session closed",
                                              "exception": error})
        finally:
            self.close()

    # -- the state, and what the poller is asked to watch ----------------------------

    def _client_gone(self) -> None:
        if self._client_left:
            return
        self._client_left = True
        self._client_closing = True
        if self.server.fd < 0:  # the server left first
            return
        # Keep reading until the server closes, so we know its slot is free.
        self.server.link(None)
        self._eof_to_server = True
        if self._on_client_gone is not None:  # last: whatever it does, the above is done
            self._on_client_gone()

    def _lose_server(self) -> None:
        if self.server.fd < 0 and self.server_closed.done():  # lost already
            return
        self.server.close()  # the poller stops watching it
        if not self.server_closed.done():  # a cancelled waiter cancels it
            self.server_closed.set_result(None)
        # Stops reading the client; sends what it is owed (such as the server's FATAL), then closes.
        self._client_closing = True
        self._sync()

    def _sync(self) -> None:
        client, server = self.client, self.server
        if self._client_closing and client.fd >= 0 and not client.buffered:
            client.close()
            self._client_gone()
            if not self.client_closed.done():
                self.client_closed.set_result(None)
        if self._eof_to_server and server.fd >= 0 and not server.buffered:
            self._eof_to_server = False
            server.shutdown()
        if client.fd >= 0:
            self.poller.watch(client, not self._client_closing and not server.buffered, client.buffered > 0)
        if server.fd >= 0:
            self.poller.watch(server, self._client_left or not client.buffered, server.buffered > 0)


_IGNORED = asyncio.Protocol()  # for a transport whose socket a SocketRelay took over


def open_relay(loop: asyncio.AbstractEventLoop, client: asyncio.Transport, server: asyncio.Transport,
               **kwargs: Any) -> Relay | SocketRelay:
    """A relay between two connections: on their sockets where it can, else on the transports.

    The server transport's reading is paused; the relay's `start` resumes it.
    """
    return SocketRelay.take(loop, client, server, **kwargs) or Relay(client, server, loop=loop, **kwargs)
